"""Soak under faults: the chaos harness of ``tests/chaos`` run for minutes, by hand.

One long run of replicas of ``tests/server_app.py`` (uvicorn, uvicorn, hypercorn, ...) sharing one
``redis-server`` with AOF (``--appendfsync always``), ``BUDGET_LEASE=1s``, a mixed load of
``--requests`` requests over ``--duration`` seconds (completed, streamed, abandoned mid-body, longer
than the lease, raising, over budget) from ``--concurrency`` clients, and fault cycles every
``--cycle`` seconds: SIGKILL a replica with streams in flight, SIGKILL and restart Redis on its AOF,
SIGTERM a replica, SIGKILL a replica during a Redis outage, force a uvicorn replica's shutdown (a
second SIGINT 0.3 s after the first, streams in flight), SIGTERM a replica during a Redis outage
while its settlements are being journaled, force a uvicorn replica's shutdown during a Redis outage
(each replica restarted at once). Then, unless
``--empty-runs 0``, a short run per empty restart: Redis killed and started EMPTY while requests are
in flight, whose settlements must land exactly once.

Prints, per run, requests by outcome, faults injected, leaked holds, the spend difference from the
apps' ground truth outside the counted in-flight losses of SIGKILLed replicas (named by reservation
id; without ``--journal`` also what a replica stopped in an outage logged itself as lost), and the
max of spent + held - limit the sampler saw. Exit status 1 if a check failed.

    .venv/bin/python benchmarks/soak.py --duration 240 --requests 20000
    .venv/bin/python benchmarks/soak.py --duration 240 --requests 20000 --journal
    .venv/bin/python benchmarks/soak.py --duration 60 --requests 3000 --markdown /tmp/soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cmd_version, cpu_model  # noqa: E402

from chaos.harness import (  # noqa: E402
    ChaosConfig,
    ChaosReport,
    FaultStep,
    default_faults,
    run_chaos,
)


def machine() -> str:
    redis_version = "?"
    binary = shutil.which("redis-server")
    if binary:
        redis_version = cmd_version([binary, "--version"])
    return (
        f"nproc {len(os.sched_getaffinity(0))}, CPU `{cpu_model()}`, "
        f"Python {platform.python_version()}, `{redis_version}`"
    )


def replica_kinds(n: int) -> tuple[str, ...]:
    return tuple("hypercorn" if i % 3 == 2 else "uvicorn" for i in range(n))


async def soak(args: argparse.Namespace, workdir: Path) -> list[ChaosReport]:
    kinds = replica_kinds(args.replicas)
    cycles = max(1, round(args.duration / args.cycle))
    reports = []
    main = ChaosConfig(
        workdir=workdir / "soak",
        name=f"soak{' (journal)' if args.journal else ''}",
        kinds=kinds,
        requests=args.requests,
        duration_s=args.duration,
        concurrency=args.concurrency,
        lease_s=args.lease,
        journal=args.journal,
        faults=default_faults(args.duration, len(kinds), cycles=cycles, servers=kinds),
        seed=args.seed,
        sleep_scale=args.sleep_scale,
        min_outage_s=args.outage,
    )
    print(
        f"soak: {args.requests} requests over {args.duration:g}s, {len(main.faults)} faults", flush=True
    )
    reports.append(await run_chaos(main))
    print(reports[-1].summary(max_named=args.max_named, max_faults=args.max_faults), flush=True)
    for i in range(args.empty_runs):
        empty_s = 20.0
        config = ChaosConfig(
            workdir=workdir / f"empty-{i}",
            name=f"empty restart {i + 1}{' (journal)' if args.journal else ''}",
            kinds=kinds,
            requests=max(200, round(args.requests * empty_s / args.duration)),
            duration_s=empty_s,
            concurrency=args.concurrency,
            lease_s=args.lease,
            journal=args.journal,
            faults=(FaultStep(empty_s / 2, "redis-empty"),),
            seed=args.seed + 1 + i,
            sleep_scale=args.sleep_scale,
            min_outage_s=args.outage,
        )
        reports.append(await run_chaos(config))
        print(reports[-1].summary(max_named=args.max_named, max_faults=args.max_faults), flush=True)
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of load (main run)")
    parser.add_argument(
        "--replicas", type=int, default=3, help="server replicas (every third hypercorn)"
    )
    parser.add_argument("--requests", type=int, default=20_000, help="target request count (main run)")
    parser.add_argument("--journal", action="store_true", help="BUDGET_JOURNAL per replica")
    parser.add_argument("--concurrency", type=int, default=96, help="concurrent clients")
    parser.add_argument("--cycle", type=float, default=32.0, help="seconds per cycle of the 7 faults")
    parser.add_argument("--lease", type=float, default=1.0, help="BUDGET_LEASE in seconds")
    parser.add_argument("--outage", type=float, default=0.3, help="least seconds Redis stays down")
    parser.add_argument("--empty-runs", type=int, default=1, help="short runs with an empty restart")
    parser.add_argument("--sleep-scale", type=float, default=0.5, help="scales the apps' sleeps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-named", type=int, default=40, help="lost requests named per run")
    parser.add_argument("--max-faults", type=int, default=12, help="faults listed per run")
    parser.add_argument("--markdown", type=Path, help="also write the summary here")
    parser.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temp dir)")
    args = parser.parse_args()
    if args.replicas < 2:
        parser.error("--replicas must be at least 2")

    # Stop cleanly on SIGINT or SIGTERM, even when started in the background (where SIGINT comes in
    # ignored): the runs' teardown then kills every server and redis-server they started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        with tempfile.TemporaryDirectory(prefix="budget-soak-") as tmp:
            reports = asyncio.run(soak(args, args.workdir or Path(tmp)))
    except KeyboardInterrupt:
        print("soak interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    command = "benchmarks/soak.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"Command: `.venv/bin/python {command.strip()}`",
            "",
            f"- Machine: {machine()}.",
            f"- Date: {when}; whole run {elapsed / 60:.1f} min.",
            "",
            "\n\n".join(
                r.summary(max_named=args.max_named, max_faults=args.max_faults) for r in reports
            ),
        ]
    )
    if args.markdown:
        args.markdown.write_text(text + "\n")
    failed = [r.config.name for r in reports if r.failures()]
    print(
        f"\nsoak finished in {elapsed:.0f}s: " + (f"FAILED {failed}" if failed else "all checks passed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
