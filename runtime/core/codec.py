"""msgpack encoding of everything troth stores or sends between its own parts.

Only plain data crosses this boundary (None, bool, int, float, str, bytes, list,
dict): nothing is ever unpickled, so a value read from Redis cannot run code.
Decoding is bounded so that a corrupt or hostile value cannot exhaust memory.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from troth.core.errors import SerializationError

#: The largest single encoded value troth decodes (state, reply, outbox entry).
MAX_VALUE_BYTES = 64 * 1024 * 1024

#: A packer per thread (``msgpack.packb`` makes one per call: a quarter of its cost).
_packers = threading.local()


def pack(value: Any) -> bytes:
    """Encode ``value``; raise :class:`SerializationError` naming the culprit."""
    try:
        packer: msgpack.Packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        packed: bytes = packer.pack(value)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        packer.reset()  # a failed pack may leave part of the value behind
        raise SerializationError(f"not msgpack-serializable: {exc}") from exc


def pack_for_lua(value: Any) -> bytes:
    """Encode for Redis's Lua ``cmsgpack``, which reads no bin type: bytes go as raw strings."""
    packed: bytes = msgpack.packb(value, use_bin_type=False)
    return packed


def unpack(data: bytes) -> Any:
    """Decode a value written by :func:`pack`; tuples come back as lists."""
    if len(data) > MAX_VALUE_BYTES:
        raise SerializationError(f"encoded value of {len(data)} bytes exceeds {MAX_VALUE_BYTES}")
    # unpackb bounds every container and string by the length of ``data`` itself.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def roundtrip(value: Any) -> tuple[bytes, Any]:
    """Encode and decode: proves serializability and yields an independent copy."""
    data = pack(value)
    return data, unpack(data)
