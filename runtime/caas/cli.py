"""``troth commitments``: the commitments API from a shell.

Added to the ``troth`` command line through the entry point group
``troth.commands`` (see :mod:`troth.extension`), so that the runtime's command line
never imports Commitment-as-a-Service. Every action is one request of
:mod:`troth.caas.client` to a running node, with the client's guarantees: the input
is checked against the contract's models before anything is sent, a request is sent
again only when that is harmless, and an error is the node's own (its type and
message; the exit status is 2)::

    troth commitments create spec.json            # one object, or a list of up to 100
    troth commitments list --status pending
    troth commitments get cm_...
    troth commitments publish payment.completed '{"amount": 150}' --key pay-17
    troth commitments cancel cm_... cm_...

Which node and which API key: see :func:`node_urls` and ``--help``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from troth.core.config import Config
from troth.core.errors import BadRequestError

if TYPE_CHECKING:
    from troth.caas.client import Commitments
    from troth.caas.models import CommitmentSummary

__all__ = ["add_commands"]

#: What ``list --meta`` says when a scan stopped before the end.
STOPPED = "(the search stopped before it had looked at every one)"
#: How a listing shows each commitment when not asked for JSON.
_ROW = "{id:35} {status:10} {trigger_type:13} {due:20} {target}"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``troth commitments ACTION`` to the ``troth`` command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        action="append",
        help="a node's URL; repeat it for several (default: TROTH_URL, else the node "
        "--config describes, else http://127.0.0.1:8700)",
    )
    common.add_argument("--config", help="configuration file (ca.json): where the node listens")
    common.add_argument("--token", default=os.environ.get("TROTH_TOKEN"), help="API key")
    common.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for a request, resends included"
    )

    p = sub.add_parser(
        "commitments",
        help="create, list, get, cancel and retry commitments, and publish events, "
        "through a running node",
        description="The commitments API of a running node, one request an action: the "
        "input is checked before anything is sent, a request is sent again only when that "
        "is harmless, and an error is the node's own (exit status 2). The node: --url "
        "(repeatable), else TROTH_URL (comma-separated), else the one --config describes, "
        "else http://127.0.0.1:8700; the API key: --token, else TROTH_TOKEN.",
    )
    actions = p.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help, parents=[common])
        a.set_defaults(func=_run)
        return a

    a = action("create", "create commitments from JSON: one object, or a list of up to 100")
    a.add_argument("file", help="a JSON file, or - for standard input")
    a = action("list", "list commitments, newest first")
    a.add_argument("--status", help="only those in this status")
    a.add_argument("--trigger-type", help="only those with this trigger type")
    a.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    a.add_argument("--dedup-key", help="only the one created with this dedup_key")
    a.add_argument("--meta", metavar="KEY=VALUE", help="only those whose metadata has it")
    a.add_argument("--json", action="store_true", help="one JSON object a line")
    a = action("get", "a commitment with its delivery attempts")
    a.add_argument("id")
    a = action("cancel", "cancel pending (or failed) commitments")
    a.add_argument("ids", nargs="+", metavar="id")
    a = action("retry", "deliver a failed commitment again (a dead letter)")
    a.add_argument("id")
    a = action("reschedule", "move a pending time_after commitment's due time")
    a.add_argument("id")
    when = a.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="TIME", help="ISO 8601 with a timezone, or Unix seconds")
    when.add_argument("--in", dest="delay", type=float, metavar="SECONDS", help="from now")
    a = action("publish", "publish an event: the commitments waiting for it fire")
    a.add_argument("event_type")
    a.add_argument("payload", nargs="?", default="{}", help="a JSON object (default {})")
    a.add_argument("--key", help="event_key: the same key twice is one event")
    a = action("secret", "the principal's webhook signing secret; --rotate makes a new one")
    a.add_argument(
        "--rotate",
        action="store_true",
        help="a new secret; the current one goes on signing beside it for --keep-previous",
    )
    a.add_argument(
        "--keep-previous",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --rotate: how long the current secret goes on signing (default 86400; "
        "0: it stops at once, e.g. when it leaked)",
    )
    a.add_argument("--json", action="store_true", help="the secret with its rotation's times")


def node_urls(args: argparse.Namespace, config: Config) -> list[str]:
    """``--url`` (repeatable: the next is tried when one refuses), else ``TROTH_URL``
    (comma-separated), else the node ``--config`` describes, else the default one."""
    if args.url:
        return list(args.url)
    from_env = [u.strip() for u in os.environ.get("TROTH_URL", "").split(",") if u.strip()]
    if from_env:
        return from_env
    host = config.node.host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: reached on loopback
        host = "127.0.0.1"
    return [f"http://{host}:{config.node.port}"]


def _run(args: argparse.Namespace, config: Config) -> int:
    from troth.caas.client import Commitments

    with Commitments(node_urls(args, config), token=args.token, timeout=args.timeout) as cs:
        try:
            return _act(cs, args)
        except ValidationError as exc:  # refused before anything was sent
            raise BadRequestError(_validation_message(exc)) from None
        except ValueError as exc:  # (an id that is none) also refused before sending
            raise BadRequestError(str(exc)) from None


def _act(cs: Commitments, args: argparse.Namespace) -> int:
    from troth.caas import client
    from troth.caas.models import KEEP_PREVIOUS_SECONDS, MAX_PAGE, BatchCreate, CommitmentCreate

    if args.action == "create":
        specs = _json(_read(args.file), "the file")
        if isinstance(specs, list):  # (a batch's errors name the item: commitments.3...)
            specs = {"commitments": specs}
        if isinstance(specs, dict) and "commitments" in specs:  # a batch's body too
            batch = BatchCreate.model_validate(specs).commitments
            _print([c.model_dump(mode="json") for c in cs.send(client.create_many(batch))])
        else:
            spec = CommitmentCreate.model_validate(specs)
            _print(cs.send(client.create(spec)).model_dump(mode="json"))
    elif args.action == "list":
        if args.limit < 1:
            raise BadRequestError("--limit must be at least 1")
        page = min(args.limit, MAX_PAGE)
        if args.dedup_key is not None or args.meta is not None:
            meta = None
            if args.meta is not None:
                key, sep, value = args.meta.partition("=")
                if not sep or not key:
                    raise BadRequestError("--meta must be KEY=VALUE")
                meta = {key: value}

            def found() -> Iterator[CommitmentSummary]:  # (an indexed key's pages)
                cursor = None
                while True:
                    search = client.search(
                        args.dedup_key, meta, args.status, args.trigger_type, page, cursor
                    )
                    got = cs.send(search)
                    if got.truncated:
                        print(STOPPED, file=sys.stderr)
                    yield from got.items
                    if not got.next_cursor:
                        return
                    cursor = got.next_cursor

            listed: Iterator[CommitmentSummary] = found()
        else:
            listed = cs.list(args.status, args.trigger_type, limit=page)
        items = list(itertools.islice(listed, args.limit + 1))
        if len(items) > args.limit:
            items.pop()
            print(f"(more than {args.limit}: raise --limit)", file=sys.stderr)
        for item in items:
            if args.json:
                print(item.model_dump_json())
            else:
                due = item.due_at.isoformat(timespec="seconds")[:19] if item.due_at else "-"
                print(_ROW.format(due=due, **item.model_dump()))
    elif args.action == "get":
        _print(cs.get(args.id).model_dump(mode="json"))
    elif args.action == "cancel":
        results = cs.cancel_many(args.ids)
        _print([r.model_dump(mode="json", exclude_none=True) for r in results])
        return 1 if any(r.error for r in results) else 0
    elif args.action == "retry":
        _print(cs.retry(args.id).model_dump(mode="json"))
    elif args.action == "reschedule":
        at = None if args.at is None else _moment(args.at)
        _print(cs.reschedule(args.id, at, delay_seconds=args.delay).model_dump(mode="json"))
    elif args.action == "publish":
        payload = _json(args.payload, "the payload")
        _print(cs.publish(args.event_type, payload, event_key=args.key).model_dump(mode="json"))
    else:  # secret
        if args.keep_previous is not None and not args.rotate:
            raise BadRequestError("--keep-previous goes with --rotate")
        if args.rotate:
            keep = KEEP_PREVIOUS_SECONDS if args.keep_previous is None else args.keep_previous
            info = cs.send(client.rotate_secret(keep))
        else:
            info = cs.secret_info()
        if args.json:
            _print(info.model_dump(mode="json"))
            return 0
        print(info.secret)
        if args.rotate:
            everywhere = info.signing_everywhere_at
            previous = info.previous_expires_at
            print(
                f"every node signs with the new secret from {everywhere:%Y-%m-%d %H:%M:%S}Z; "
                + (
                    f"the previous one signs too until {previous:%Y-%m-%d %H:%M:%S}Z"
                    if previous
                    else "the previous one no longer signs"
                ),
                file=sys.stderr,
            )
    return 0


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise BadRequestError(f"cannot read {path}: {exc.strerror}") from None


def _moment(text: str) -> datetime | float:
    """``--at``: ISO 8601 (with a timezone, checked by the model) or Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise BadRequestError(f"--at {text!r}: give ISO 8601 or Unix seconds") from None


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"{what} is not JSON: {exc}") from None


def _validation_message(exc: ValidationError) -> str:
    """pydantic's errors, one a line, each with where it is (``trigger.delay_seconds``)."""
    lines = [f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()]
    return "the input does not fit the contract:\n  " + "\n  ".join(lines)


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2))
