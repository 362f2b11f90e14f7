"""troth: a Python actor runtime with transactional Redis checkpoints, and
Commitment-as-a-Service built on it.

``troth serve`` runs a node (``--nodes N`` runs N of them, one process each, to use
N cores); ``status``, ``inspect`` and ``call`` read or reach a running deployment;
``actors``, ``delete``, ``outbox`` and ``drain`` are the operators' commands;
``redis`` manages the embedded Redis. Each command's ``--help`` says more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from importlib.metadata import entry_points

import httpx
import redis

from troth import __version__
from troth.core.access import DELETE_ACTOR, SYSTEM
from troth.core.config import Config, load_config
from troth.core.errors import RedisUnavailable, TrothError, error_from_dict
from troth.core.keys import KeySpace
from troth.core.names import ActorName, check_method, shard_of
from troth.core.redis_clients import discovered_client
from troth.edge import admin, embedded_redis
from troth.edge.logs import setup_logging
from troth.extension import COMMANDS, load_extensions
from troth.node import Node, check_config


def redis_url(args: argparse.Namespace, config: Config, start: bool) -> str:
    """--redis, then TROTH_REDIS_URL, then the config, then the embedded Redis."""
    url = args.redis or os.environ.get("TROTH_REDIS_URL") or config.redis.url
    if url:
        return str(url)
    data_dir = args.data_dir or str(config.resolve_path(config.node.data_dir))
    if start:
        return embedded_redis.ensure_running(data_dir, config.redis.appendfsync)
    if not embedded_redis.is_running(data_dir):
        raise TrothError(
            f"no Redis configured and no embedded Redis running under {data_dir} "
            "(give --redis or TROTH_REDIS_URL, or start a node first)"
        )
    return embedded_redis.url_for(data_dir)


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from troth.edge.server import serve_forever

    setup_logging(args.log_level, args.log_format)
    if args.access_log:
        config.node.access_log = True
    if args.cpu is not None:
        config.runtime.cpu = args.cpu
    check_config(config)  # a mistake starts nothing, not even the embedded Redis
    url = redis_url(args, config, start=True)
    if args.nodes > 1:
        from troth.edge.supervisor import supervise

        port = config.node.port if args.port is None else args.port
        args.cpu = config.runtime.cpu  # (from the file too: node i then gets the i-th)
        return supervise(args, url, port)
    serve_forever(
        config,
        url,
        args.host or config.node.host,
        config.node.port if args.port is None else args.port,
        args.node_id,
    )
    return 0


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    client = discovered_client(redis_url(args, config, start=False))
    extensions = load_extensions(config)
    keys = KeySpace(config.redis.key_prefix, config.cluster.shards)
    data = admin.status(client, keys, extensions)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"shards: {data['shards']} ({data['unserved_shards']} unserved)   "
        f"actors: {data['actors']}   timers: {data['timers']}   "
        f"outbox: {data['outbox']['pending']} pending, {data['outbox']['stuck']} dead/uncertain"
    )
    print(f"{'NODE':40} {'LIVE':5} {'SHARDS':>6} {'ACTIVE':>7} {'CPU':>4}  URL")
    for n in data["nodes"]:
        cpu = "-" if n["cpu"] is None else n["cpu"]  # pinned by runtime.cpu, or not
        print(
            f"{n['id']:40} {'yes' if n['live'] else 'no':5} {n['shards']:>6} "
            f"{n['active_actors']:>7} {cpu:>4}  {n['url']}"
        )
    for ext in extensions:
        section = data.get(ext.name)
        if section:
            print(f"{ext.name}: " + ", ".join(f"{k} {v}" for k, v in section.items()))
    if data["recent_failures"]:
        print("recent failures (dead or uncertain side effects):")
        for f in data["recent_failures"]:
            print(
                f"  {f['status']:9} {f['kind']:6} {f['id']}  attempts={f['attempts']}  {f['error']}"
            )
    return 0


def cmd_inspect(args: argparse.Namespace, config: Config) -> int:
    client = discovered_client(redis_url(args, config, start=False))
    keys = KeySpace(config.redis.key_prefix, config.cluster.shards)
    data = admin.inspect(client, keys, ActorName.parse(args.actor))
    if data is None:
        print(f"{args.actor}: no checkpoint", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, default=str))
    return 0


def cmd_call(args: argparse.Namespace, config: Config) -> int:
    name = ActorName.parse(args.actor)
    check_method(args.method)
    try:
        call_args = json.loads(args.args) if args.args else []
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as exc:
        raise TrothError(f"arguments must be JSON: {exc}") from exc
    if not isinstance(call_args, list):
        call_args = [call_args]
    if not isinstance(kwargs, dict):
        raise TrothError("--kwargs must be a JSON object")
    request_id = args.request_id or uuid.uuid4().hex
    url = redis_url(args, config, start=True)
    node_url = args.url or _live_node_url(url, config, name)
    if node_url:
        resp = httpx.post(
            f"{node_url}/v1/actors/{name.type}/{name.id}/{args.method}",
            json={"args": call_args, "kwargs": kwargs, "request_id": request_id},
            headers={"authorization": f"Bearer {args.token}"} if args.token else None,
            timeout=config.node.call_timeout_seconds + 5,
        )
        body = resp.json()
        if resp.status_code != 200:
            raise error_from_dict(body.get("error", {}))
        print(json.dumps(body["result"]))
        return 0
    # No node is running: host the call in a short-lived node of our own.
    node = Node(config, url)
    node.start()
    try:
        result = node.call(name, args.method, call_args, kwargs, request_id).result(
            timeout=config.node.call_timeout_seconds
        )
    finally:
        node.stop()
    print(json.dumps(result))
    return 0


def _keys(config: Config) -> KeySpace:
    return KeySpace(config.redis.key_prefix, config.cluster.shards)


def cmd_actors(args: argparse.Namespace, config: Config) -> int:
    client = discovered_client(redis_url(args, config, start=False))
    names: list[str] = []
    cursor: str | None = None
    while len(names) < args.limit:
        page, cursor = admin.list_actors(
            client, _keys(config), args.type, cursor, min(1000, args.limit - len(names))
        )
        names += page
        if cursor is None:
            break
    if args.json:
        print(json.dumps({"actors": names, "more": cursor is not None}, indent=2))
    else:
        if names:
            print("\n".join(names))
        if cursor is not None:
            print(f"(more than {len(names)}: raise --limit)", file=sys.stderr)
        elif not names:
            print(_none_found(args.type, config), file=sys.stderr)
    return 0


def _none_found(actor_type: str | None, config: Config) -> str:
    """Why ``troth actors`` printed nothing, with a hint for a mistyped type."""
    if actor_type is None:
        return "(no actors)"
    hint = ""
    if actor_type not in config.types:
        hint = f"; the types this configuration names: {', '.join(sorted(config.types)) or 'none'}"
    return f"(no actors of type {actor_type!r}{hint})"


def cmd_delete(args: argparse.Namespace, config: Config) -> int:
    """Through a node: the actor's last transaction runs where it lives."""
    name = ActorName.parse(args.actor)
    url = redis_url(args, config, start=False)
    node_url = args.url or _live_node_url(url, config, name)
    if node_url:
        resp = httpx.delete(
            f"{node_url}/v1/admin/actors/{name.type}/{name.id}",
            headers={"authorization": f"Bearer {args.token}"} if args.token else None,
            timeout=config.node.call_timeout_seconds + 5,
        )
        if resp.status_code != 200:
            raise error_from_dict(resp.json().get("error", {}), resp.status_code)
    else:  # no node runs: host the deletion in a short-lived node of our own
        node = Node(config, url)
        node.start()
        try:
            deleted = node.call(name, DELETE_ACTOR, caller=SYSTEM).result(
                timeout=config.node.call_timeout_seconds
            )
        finally:
            node.stop()
        if not deleted:
            raise TrothError(f"{name} has no checkpoint")
    print(f"deleted {name}")
    return 0


def cmd_outbox(args: argparse.Namespace, config: Config) -> int:
    client = discovered_client(redis_url(args, config, start=False))
    keys = _keys(config)
    if args.action == "list":
        actor = ActorName.parse(args.actor) if args.actor else None
        entries = admin.failed_entries(client, keys, actor=actor, limit=args.limit)
        if args.json:
            print(json.dumps(entries, indent=2, default=str))
        for e in [] if args.json else entries:
            print(
                f"{e['status']:9} {e['kind']:6} {e['id']}  attempts={e['attempts']}  {e['error']}"
            )
        return 0
    if not args.ids:
        raise TrothError(
            f"outbox {args.action}: name at least one entry id (outbox list shows them)"
        )
    change = admin.redrive if args.action == "redrive" else admin.purge
    for entry_id in args.ids:
        result = change(client, keys, entry_id)
        print(f"{result['status']:8} {entry_id}")
    return 0


def cmd_drain(args: argparse.Namespace, config: Config) -> int:
    client = discovered_client(redis_url(args, config, start=False))
    keys = _keys(config)
    admin.drain(client, keys, args.node, undo=args.undo, force=args.force)
    if args.undo:
        print(f"{args.node} takes its share of shards again")
        return 0
    deadline = time.monotonic() + args.wait
    while True:
        # Drained once it owns nothing and every shard is served again: the others
        # have taken what it released (they say so at their next heartbeat).
        status = admin.status(client, keys)
        node = next((n for n in status["nodes"] if n["id"] == args.node), None)
        owned = node["shards"] if node else 0
        unserved = status["unserved_shards"]
        print(f"{args.node}: {owned} shards left, {unserved} not served yet", flush=True)
        if owned == 0 and unserved == 0:
            print(f"{args.node} is drained: it serves nothing and can be stopped")
            return 0
        if time.monotonic() >= deadline:
            print(
                f"{args.node} still owns {owned} shards ({unserved} not served) "
                f"after {args.wait:g} s",
                file=sys.stderr,
            )
            return 1
        time.sleep(1)


def _live_node_url(url: str, config: Config, name: ActorName) -> str | None:
    """The URL of the owner of the actor's shard if it is live, else of any live node."""
    client = discovered_client(url)
    keys = KeySpace(config.redis.key_prefix, config.cluster.shards)
    data = admin.status(client, keys)
    live = {n["id"]: n["url"] for n in data["nodes"] if n["live"] and n["url"]}
    owner = client.hget(keys.shard(shard_of(name, keys.shard_count)).lease, "owner")
    client.close()
    if owner and owner.decode() in live:
        return str(live[owner.decode()])
    return next(iter(live.values()), None)


def cmd_redis(args: argparse.Namespace, config: Config) -> int:
    data_dir = args.data_dir or str(config.resolve_path(config.node.data_dir))
    if args.action == "start":
        print(embedded_redis.ensure_running(data_dir, config.redis.appendfsync))
    elif args.action == "stop":
        stopped = embedded_redis.stop(data_dir)
        print("stopped" if stopped else f"no embedded Redis running under {data_dir}")
    else:
        running = embedded_redis.is_running(data_dir)
        print(embedded_redis.url_for(data_dir) if running else "not running")
        return 0 if running else 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="troth",
        description=(
            "troth: an actor runtime with transactional Redis checkpoints, and "
            "Commitment-as-a-Service built on it. 'troth serve' runs a node ('--nodes N' "
            "runs N, one process each, to use N cores); 'status' and 'inspect' read Redis "
            "directly; 'call' reaches a running deployment (or hosts the call itself when "
            "none runs); 'actors', 'delete', 'outbox' and 'drain' are the operators' "
            "commands; 'redis' manages the embedded Redis. Each command's --help says "
            "more; the README and docs/design.md say why."
        ),
    )
    p.add_argument("--version", action="version", version=f"troth {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="configuration file (ca.json)")
        sp.add_argument("--redis", help="Redis URL (else TROTH_REDIS_URL, config, embedded)")
        sp.add_argument(
            "--data-dir",
            help="embedded Redis data directory (default: node.data_dir, beside the config)",
        )

    s = sub.add_parser("serve", help="start a node")
    common(s)
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to bind (default 8700; 0: any)")
    s.add_argument("--node-id", help="stable node id (default: host-pid-random)")
    s.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="run this many nodes, one process each, on consecutive ports against the "
        "same Redis (a node uses one core; default 1)",
    )
    s.add_argument(
        "--cpu",
        type=int,
        help="pin the node's event loop and its worker threads to this CPU (Linux; "
        "runtime.cpu); with --nodes, node i to the i-th CPU from this one",
    )
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--log-format", choices=["text", "json"], default="text")
    s.add_argument("--access-log", action="store_true", help="log every HTTP request")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="nodes, shards, backlogs (reads Redis)")
    common(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("inspect", help="an actor's checkpoint, timers, outbox (reads Redis)")
    common(s)
    s.add_argument("actor", help="TYPE/ID")
    s.add_argument("--json", action="store_true", help="(output is always JSON)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("call", help="call an actor method")
    common(s)
    s.add_argument("actor", help="TYPE/ID")
    s.add_argument("method")
    s.add_argument("args", nargs="?", help="JSON list of positional arguments (or one value)")
    s.add_argument("--kwargs", help="JSON object of keyword arguments")
    s.add_argument("--request-id", help="de-duplication id (default: random)")
    s.add_argument("--url", help="node URL (default: a live node found in Redis)")
    s.add_argument("--token", default=os.environ.get("TROTH_TOKEN"), help="API key")
    s.set_defaults(func=cmd_call)

    s = sub.add_parser("actors", help="list actors, of one type or all (reads Redis)")
    common(s)
    s.add_argument("--type", help="only this actor type")
    s.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_actors)

    s = sub.add_parser(
        "delete",
        help="delete an actor: its last transaction, run by the node that owns it, removes "
        "its checkpoint, timers, cached replies and notifications",
    )
    common(s)
    s.add_argument("actor", help="TYPE/ID")
    s.add_argument("--url", help="node URL (default: a live node found in Redis)")
    s.add_argument("--token", default=os.environ.get("TROTH_TOKEN"), help="operator API key")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser(
        "outbox", help="dead or uncertain side effects of any actor: list, re-drive, purge"
    )
    common(s)
    s.add_argument("action", choices=["list", "redrive", "purge"])
    s.add_argument("ids", nargs="*", help="entry ids (redrive, purge)")
    s.add_argument("--actor", help="list: only this actor's entries (TYPE/ID)")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_outbox)

    s = sub.add_parser(
        "drain", help="hand a node's shards off to the others before maintenance, and wait"
    )
    common(s)
    s.add_argument("node", help="node id (troth status lists them)")
    s.add_argument("--undo", action="store_true", help="let the node take shards again")
    s.add_argument("--force", action="store_true", help="even the last live node that serves")
    s.add_argument("--wait", type=float, default=60, help="seconds to wait (default 60)")
    s.set_defaults(func=cmd_drain)

    s = sub.add_parser("redis", help="manage the embedded Redis")
    common(s)
    s.add_argument("action", choices=["start", "stop", "url"])
    s.set_defaults(func=cmd_redis)

    for entry in entry_points(group=COMMANDS):  # e.g. troth commitments
        try:
            entry.load()(sub)
        except Exception as exc:  # a broken package must not take the command line down
            print(f"troth: the commands of {entry.value} did not load: {exc}", file=sys.stderr)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return int(args.func(args, config))
    except redis.RedisError as exc:  # (e.g. none listens where --redis says)
        error: TrothError = RedisUnavailable(str(exc))
    except TrothError as exc:
        error = exc
    except KeyboardInterrupt:
        return 130
    print(f"troth: {error.type_name}: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
