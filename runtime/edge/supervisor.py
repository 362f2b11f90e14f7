"""``troth serve --nodes N``: one command for N node processes on one machine.

A node runs its actors on one event loop, so it uses about one core; a machine's
cores are used by running several nodes against the same Redis, as several
machines would. The supervisor starts N ``troth serve`` processes on consecutive
ports (node ids ``ID-0`` ... ``ID-N-1`` when ``--node-id`` is given), passes
SIGTERM and SIGINT on to them (each drains and releases its shards), and starts
again, under the same node id, a node that exits without being asked to: it then
reclaims its shards at once.

With ``--cpu C`` node ``i`` is pinned to the ``i``-th CPU counted from ``C`` (see
``runtime.cpu``): one node a core, none of them moved between cores by the kernel.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0


def child_command(args: argparse.Namespace, redis_url: str, port: int, index: int) -> list[str]:
    cmd = [sys.executable, "-m", "troth.edge.cli", "serve", "--redis", redis_url]
    cmd += ["--port", str(port + index if port else 0)]
    cmd += ["--log-level", args.log_level, "--log-format", args.log_format]
    if args.config:
        cmd += ["--config", args.config]
    if args.host:
        cmd += ["--host", args.host]
    if args.node_id:
        cmd += ["--node-id", f"{args.node_id}-{index}"]
    if args.cpu is not None:
        cmd += ["--cpu", str(nth_cpu(args.cpu, index))]
    return cmd


def nth_cpu(first: int, index: int) -> int:
    """The CPU of node ``index`` when node 0 is pinned to ``first``: the CPUs this
    process may use, in order from ``first``, round again when there are more nodes
    than CPUs (``first`` was checked by the command line)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[(allowed.index(first) + index) % len(allowed)]


def supervise(args: argparse.Namespace, redis_url: str, port: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if args.cpu is not None else 0
    if cpus and args.nodes > cpus:
        log.warning(
            "%d nodes pinned to %d CPUs: some share one, and none can move to an idle "
            "one (leave out --cpu to let the kernel place them)",
            args.nodes,
            cpus,
        )
    commands = [child_command(args, redis_url, port, i) for i in range(args.nodes)]
    children = [subprocess.Popen(cmd) for cmd in commands]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d nodes (pids %s)", len(children), [c.pid for c in children])
    while True:
        time.sleep(0.5)
        if stopping:
            break
        for i, child in enumerate(children):
            code = child.poll()
            if code is not None:
                log.warning("node %d exited with %s; starting it again", i, code)
                time.sleep(RESTART_DELAY)
                children[i] = subprocess.Popen(commands[i])
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0
