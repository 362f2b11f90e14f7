"""Batch frames of the WebSocket session protocol: several messages in one frame.

A client that keeps many calls in flight over one session (the client library does)
would otherwise pay for each call, on both ends, a frame of its own: building and
masking it, a write system call, a wake-up of the reader. Sent as one JSON array, the
calls made during one turn of the client's event loop cost those once; so do the
replies the node has ready in one turn of its own. A call made while no other is in
flight on its session goes at once, alone: there is nothing to batch it with, and
waiting for the end of the turn only delays it.

A batch means exactly what its messages would mean in separate frames, in the same
order: each call still gets its own reply (or error), matched by its ``id``, and a
message that fails validation fails alone. Who sends batches:

* the node announces in ``hello`` the largest frame it takes (``batch_bytes``); a
  client sends batches only to a node that says so (older nodes do not);
* the node sends batches only to a session that has sent one (older clients never
  do, so they never receive one).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Messages in one batch frame; a node refuses a longer batch whole.
MAX_BATCH = 1000


def join(texts: Sequence[str], limit: int) -> list[str]:
    """``texts`` (each one JSON document) as few frames as keep within ``limit``
    characters each, in order: one alone as it is (however long: its own frame is
    what it would have had anyway), several as a JSON array. At most
    :data:`MAX_BATCH` to a frame."""
    frames: list[str] = []
    start = 0
    while start < len(texts):
        end, size = start + 1, len(texts[start]) + 2
        while end < len(texts) and end - start < MAX_BATCH and size + len(texts[end]) + 1 <= limit:
            size += len(texts[end]) + 1
            end += 1
        if end - start == 1:
            frames.append(texts[start])
        else:
            frames.append("[" + ",".join(texts[start:end]) + "]")
        start = end
    return frames
