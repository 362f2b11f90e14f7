"""troth beside the job systems: the delayed-webhook scenario of ``../shared/peers``
for every system, size and scenario asked, one run each, in one sitting, and the
side-by-side table of them.

Each run is the harness's ``bench.py`` (its own redis-server 6.2 with AOF, receiver
and workers; one JSON line), troth creating in batches of 100. The runs are appended
to ``--out`` as they end, and a run already there is not run again, so an
interrupted sitting resumes, and a sitting may be split into several calls on one
file (say, the 100,000 rows of the slower systems apart). The table covers every
run in the file.

Scenarios: ``herd`` (all due at once), ``spread`` (due times uniform over N / 1,000
seconds, at least 10: 1,000 due a second at most) and ``crash`` (a herd whose
workers are killed with SIGKILL once 40% arrived, and restarted at once). The first
due time leaves the slowest client (about 2,000 schedules a second) time to schedule
all N before it.

Run:  python benchmarks/bench_peers.py --peers ../shared/peers
          --python /tmp/peersenv/bin/python --out /tmp/peers.jsonl
          [--sizes 1000,10000] [--systems troth,baseline,celery,...]
          [--scenarios herd,spread,crash] [--markdown] [--report]
Prints JSON (the runs in short and the table), or with ``--markdown`` the table
alone; ``--report`` runs nothing and prints the file's table; progress goes to
stderr. A run takes 30 s to a few minutes: at 10,000 the
slowest systems drain about 150 deliveries a second.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import emit, harness_env, machine

SYSTEMS = ("troth", "baseline", "celery", "dramatiq", "arq", "rq", "apscheduler")
SCENARIOS = ("herd", "spread", "crash")
#: The table's names of the systems.
NAMES = {
    "troth": "troth",
    "baseline": "bare Redis poller",
    "celery": "Celery",
    "dramatiq": "dramatiq",
    "arq": "arq",
    "rq": "RQ",
    "apscheduler": "APScheduler",
}


def delay_for(n: int) -> int:
    """Seconds from the client's start to the first due time: long enough for the
    slowest client to schedule all ``n`` first (30 s for 10,000, as the harness's
    published runs), else its lateness would measure the client."""
    return 10 if n <= 1_000 else 30 if n <= 10_000 else 10 + n // 1_250


def spread_for(n: int) -> int:
    return max(10, n // 1_000)


def command(python: str, peers: Path, system: str, n: int, scenario: str) -> list[str]:
    args = [python, str(peers / "bench.py"), system, "--n", str(n), "--delay", str(delay_for(n))]
    if scenario == "spread":
        args += ["--spread", str(spread_for(n))]
    if scenario == "crash":
        args.append("--crash")
    if system == "troth":
        args += ["--opt", "batch=100"]
    return [*args, "--tag", "bench_peers"]


def scenario_of(run: dict[str, Any]) -> str:
    """``herd``, ``spread`` or ``crash``: the harness names a spread run
    ``spread<seconds>``, and a crash run by its variant and a flag."""
    if run.get("crash"):
        return "crash"
    return "spread" if str(run.get("variant", "")).startswith("spread") else "herd"


def key(run: dict[str, Any]) -> tuple[str, int, str]:
    return (str(run["system"]), int(run["n"]), scenario_of(run))


def load(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def run_one(
    cmd: list[str], system: str, n: int, scenario: str, env: dict[str, str]
) -> dict[str, Any]:
    """One harness run; a failure (a system not set up, a timeout) becomes a row that
    says so, and the sitting goes on."""
    failed = {"system": system, "n": n, "variant": scenario, "crash": scenario == "crash"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    except subprocess.TimeoutExpired:
        return {**failed, "error": "timed out after 3600 s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {**failed, "error": tail[0][:300]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def row(run: dict[str, Any]) -> dict[str, Any]:
    """The table's columns of one run."""
    head = {"system": run["system"], "n": run["n"], "scenario": scenario_of(run)}
    if "error" in run:
        return {**head, "error": run["error"]}
    late = run["late_ms"]
    return {
        **head,
        "scheduled_per_s": run["sched_rate_per_s"],
        "late_p50_ms": late["p50"],
        "late_p99_ms": late["p99"],
        "drain_s": run["drain_s"],
        "deliveries_per_s": run["delivery_rate_per_s"],
        "lost": run["lost"],
        "repeats": run["duplicates"],
        "without_own_key": run["deliveries_total"] - run["idem_header_ok"],
        "stop": run.get("stop"),
        "date": run.get("date"),
    }


def lateness(p50_ms: float | None, p99_ms: float | None) -> str:
    """p50 / p99 in ms below a second, else in seconds."""
    if p50_ms is None or p99_ms is None:
        return "-"
    if p99_ms < 1000:
        return f"{p50_ms:.0f} / {p99_ms:.0f} ms"
    return f"{p50_ms / 1000:.2f} / {p99_ms / 1000:.2f} s"


def table(rows: list[dict[str, Any]]) -> str:
    def order(r: dict[str, Any]) -> tuple[int, int, int]:
        system = SYSTEMS.index(r["system"]) if r["system"] in SYSTEMS else len(SYSTEMS)
        return (r["n"], SCENARIOS.index(r["scenario"]), system)

    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        "| N | scenario | system | scheduled/s | lateness p50 / p99 | drain | deliveries/s "
        "| lost / repeats |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=order):
        head = f"| {r['n']:,} | {r['scenario']} | {NAMES.get(r['system'], r['system'])} "
        if "error" in r:
            lines.append(head + f"| error: {r['error']} | | | | |")
            continue
        drain_s = r["drain_s"]
        drain = (
            ""
            if r["scenario"] == "spread"
            else f"{num(drain_s, 2 if (drain_s or 0) < 10 else 1)} s"
        )
        lines.append(
            head + f"| {num(r['scheduled_per_s'])} "
            f"| {lateness(r['late_p50_ms'], r['late_p99_ms'])} | {drain} "
            f"| {num(r['deliveries_per_s'])} | {r['lost']:,} / {r['repeats']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peers", type=Path, required=True, help="the harness (../shared/peers)")
    ap.add_argument("--python", default="python3", help="the harness's interpreter")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended; resumed")
    ap.add_argument("--sizes", default="1000,10000", help="N, comma-separated")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--markdown", action="store_true", help="print the table alone")
    ap.add_argument("--report", action="store_true", help="run nothing: the file's table")
    args = ap.parse_args()
    if not (args.peers / "bench.py").is_file():
        ap.error(f"{args.peers} has no bench.py")
    try:
        sizes = [int(n) for n in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes takes whole numbers: {args.sizes!r}")
    if any(not 100 <= n <= 1_000_000 for n in sizes):
        ap.error("each size must be between 100 and 1,000,000")
    systems, scenarios = args.systems.split(","), args.scenarios.split(",")
    for given, known in ((systems, SYSTEMS), (scenarios, SCENARIOS)):
        unknown = set(given) - set(known)
        if unknown:
            ap.error(f"unknown {sorted(unknown)}; known: {', '.join(known)}")
    peers, env = args.peers.resolve(), harness_env()
    done = {key(r) for r in load(args.out) if "error" not in r}
    todo = (
        []
        if args.report
        else [
            (n, scenario, system)
            for n in sizes
            for scenario in scenarios
            for system in systems
            if (system, n, scenario) not in done
        ]
    )
    for i, (n, scenario, system) in enumerate(todo, 1):
        cmd = command(args.python, peers, system, n, scenario)
        step = f"{i}/{len(todo)} {' '.join(cmd[2:])}"
        print(f"[{time.strftime('%H:%M:%S')}] {step}", file=sys.stderr, flush=True)
        result = run_one(cmd, system, n, scenario, env)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        if "error" in result:
            print(f"  failed: {result['error']}", file=sys.stderr, flush=True)
    latest = {key(r): r for r in load(args.out)}  # a failed run, run again, is replaced
    rows = [row(r) for r in latest.values()]
    if args.markdown:
        print(table(rows))
        return
    emit({"benchmark": "peers", "machine": machine(), "runs": rows, "table": table(rows)})


if __name__ == "__main__":
    main()
