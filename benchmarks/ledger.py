"""Reserve+settle pairs: MemoryLedger and RedisLedger against the naive INCRBYFLOAT baseline.

A pair is one one-rule reservation and its settlement::

    r = await ledger.reserve(new_reservation_id(), [HoldRequest(budget, limit, amount)], lease_ms)
    await ledger.settle(Settlement(r.id, r.holds, actual, "completed"))

The naive baseline is what the public gateway did on the same redis-server, three awaited
commands per request: ``INCRBYFLOAT c estimate`` and ``EXPIRE c 60`` on entry,
``INCRBYFLOAT c -(estimate - actual)`` on exit.

Every configuration runs in one asyncio client process at each concurrency (tasks sharing one
client and its connection pool), on one hot budget and spread over 1000 entities. Redis server
time comes from ``INFO commandstats`` deltas (``CONFIG RESETSTAT`` before each phase): only the
``evalsha``/``eval`` entries for the ledger (Redis 7 also lists the commands a script calls, whose
time is already inside the script's), only ``incrbyfloat`` + ``expire`` for the naive baseline.
Server CPU (``INFO cpu`` user+sys of the redis-server process) adds the networking and parsing
that commandstats leaves out. "in-script calls/pair" counts the ``redis.call``s the scripts made.

The memory ledger never awaits inside an operation, so its tasks run one after another and
concurrency changes nothing for it; ``memory(pre-ids)`` makes the reservation ids before the
clock starts, to show what the ledger costs without ULID generation.

    .venv/bin/python benchmarks/ledger.py                      # starts its own redis-server
    .venv/bin/python benchmarks/ledger.py --redis-url redis://localhost:6379/15 --pairs 50000
    .venv/bin/python benchmarks/ledger.py --backends memory    # no redis-server: memory phases only
    .venv/bin/python benchmarks/ledger.py --backends naive,redis --rounds 7

``--rounds N`` runs every configuration N times, interleaved, and lists the ledger's script time
over the naive baseline's for each round (the two phases back to back) and the median: on a
shared machine a single phase's command time moves by 2x or more, the ratio less.

With ``--redis-url`` the benchmark runs FLUSHDB and CONFIG RESETSTAT on that server: never point
it at a Redis that holds anything you want to keep.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import num, over_tasks, progress, ratio, redis_server, table_start

from budget_middleware import (
    Budget,
    HoldRequest,
    Ledger,
    MemoryLedger,
    RedisLedger,
    Reservation,
    Settlement,
)
from budget_middleware.ledger import new_reservation_id

LIMIT = 10**15  # micro-units: huge, so nothing is ever rejected
ESTIMATE = 1_000  # micro-units held per reservation
ACTUAL = 700  # micro-units spent per settlement
LEASE_MS = 30_000
PERIOD_MS = 86_400_000  # a daily budget
SPREAD_ENTITIES = 1_000
NAIVE_TTL_S = 60
# The gateway counted dollars as floats.
NAIVE_ESTIMATE = ESTIMATE / 1_000_000
NAIVE_RELEASE = -(ESTIMATE - ACTUAL) / 1_000_000

LEDGER_SCRIPT_CMDS = ("evalsha", "eval")
NAIVE_CMDS = ("incrbyfloat", "expire")
# Not part of a pair: the admin connection, health checks, connection setup, script loading.
HOUSEKEEPING = ("info", "config", "ping", "client", "hello", "script", "flushdb", "select")

PairFn = Callable[[int], Awaitable[None]]


# -- measurement ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ServerStats:
    """Deltas of one phase on the redis-server."""

    commands: dict[str, tuple[int, int]]  # command -> (calls, usec), commandstats since reset
    cpu_s: float  # used_cpu_user + used_cpu_sys of the server process

    def calls(self, names: tuple[str, ...]) -> int:
        return sum(self.commands.get(n, (0, 0))[0] for n in names)

    def usec(self, names: tuple[str, ...]) -> int:
        return sum(self.commands.get(n, (0, 0))[1] for n in names)

    def other_calls(self, names: tuple[str, ...]) -> int:
        """Calls of everything but ``names`` and housekeeping: for the ledger, the scripts' calls."""
        return sum(
            calls
            for cmd, (calls, _) in self.commands.items()
            if cmd not in names and not cmd.startswith(HOUSEKEEPING)
        )


@dataclass(slots=True)
class Phase:
    backend: str  # naive | redis | memory | memory(pre-ids)
    mode: str  # hot | spread
    concurrency: int
    pairs: int
    seconds: float
    server: ServerStats | None = None
    counted: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.mode}"

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds

    @property
    def usec_per_pair(self) -> float | None:
        return None if self.server is None else self.server.usec(self.counted) / self.pairs

    @property
    def calls_per_pair(self) -> float | None:
        return None if self.server is None else self.server.calls(self.counted) / self.pairs

    @property
    def inner_calls_per_pair(self) -> float | None:
        if self.server is None or self.backend == "naive":
            return None
        return self.server.other_calls(self.counted) / self.pairs

    @property
    def cpu_usec_per_pair(self) -> float | None:
        return None if self.server is None else self.server.cpu_s * 1e6 / self.pairs


@dataclass(slots=True)
class Admin:
    """A separate connection for CONFIG RESETSTAT / INFO, so it never shares the measured pool."""

    client: aioredis.Redis
    cpu_at_reset: float = 0.0

    async def _cpu(self) -> float:
        info: dict[str, Any] = await self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def reset(self) -> None:
        await self.client.config_resetstat()
        self.cpu_at_reset = await self._cpu()

    async def collect(self) -> ServerStats:
        cpu = await self._cpu() - self.cpu_at_reset
        info: dict[str, Any] = await self.client.info("commandstats")
        commands: dict[str, tuple[int, int]] = {}
        for key, value in info.items():
            if key.startswith("cmdstat_") and isinstance(value, dict):
                commands[key.removeprefix("cmdstat_")] = (int(value["calls"]), int(value["usec"]))
        # The admin connection's own INFO cpu after the reset is in there; it is not counted.
        return ServerStats(commands, cpu)


async def drive(pair: PairFn, pairs: int, concurrency: int) -> float:
    """Run ``pairs`` pairs over ``concurrency`` tasks; return the wall time in seconds."""
    return await over_tasks(pairs, concurrency, pair)


def budgets_for(mode: str) -> list[Budget]:
    if mode == "hot":
        return [Budget("bench", "r:hot", PERIOD_MS)]
    return [Budget("bench", f"r:e{i:04d}", PERIOD_MS) for i in range(SPREAD_ENTITIES)]


def ledger_pair(ledger: Ledger, budgets: list[Budget], ids: list[str] | None = None) -> PairFn:
    """A reserve+settle pair; with ``ids`` the reservation ids are made beforehand, untimed."""
    requests = [[HoldRequest(b, LIMIT, ESTIMATE)] for b in budgets]
    n = len(budgets)

    async def pair(i: int) -> None:
        rid = new_reservation_id() if ids is None else ids[i]
        r = await ledger.reserve(rid, requests[i % n], LEASE_MS)
        if not isinstance(r, Reservation):
            raise RuntimeError(f"reservation rejected: {r!r}")
        settled = await ledger.settle(Settlement(rid, r.holds, ACTUAL, "completed"))
        if settled.outcome != "applied":
            raise RuntimeError(f"settle was {settled.outcome!r}, expected 'applied'")

    return pair


def naive_pair(client: aioredis.Redis, budgets: list[Budget]) -> PairFn:
    keys = [f"naive:{{{b.rule}:{b.entity}}}:spent" for b in budgets]
    n = len(keys)

    async def pair(i: int) -> None:
        key = keys[i % n]
        await client.incrbyfloat(key, NAIVE_ESTIMATE)
        await client.expire(key, NAIVE_TTL_S)
        await client.incrbyfloat(key, NAIVE_RELEASE)

    return pair


async def run_memory(mode: str, concurrency: int, pairs: int, *, pregen_ids: bool) -> Phase:
    """The memory ledger; ``pregen_ids`` takes ULID generation out of the timed loop."""
    budgets = budgets_for(mode)
    warm = min(pairs, 2_000)
    await drive(ledger_pair(MemoryLedger(), budgets), warm, concurrency)
    ledger = MemoryLedger()
    ids = [new_reservation_id() for _ in range(pairs)] if pregen_ids else None
    seconds = await drive(ledger_pair(ledger, budgets, ids), pairs, concurrency)
    return Phase("memory(pre-ids)" if pregen_ids else "memory", mode, concurrency, pairs, seconds)


async def run_redis(
    backend: str, mode: str, concurrency: int, pairs: int, url: str, admin: Admin
) -> Phase:
    await admin.client.flushdb()
    budgets = budgets_for(mode)
    client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
    ledger: RedisLedger | None = None
    try:
        if backend == "redis":
            # The ledger's own url-made client (decode_responses, timeouts, health checks), so the
            # benchmark measures the client a deployment gets.
            ledger = RedisLedger(url)
            pair = ledger_pair(ledger, budgets)
            counted = LEDGER_SCRIPT_CMDS
        else:
            pair = naive_pair(client, budgets)
            counted = NAIVE_CMDS
        # Warm up at the same concurrency: loads the scripts, opens every pooled connection and
        # creates the keys, so neither SCRIPT LOAD nor connection setup lands in the phase.
        await drive(pair, max(concurrency * 4, min(pairs // 20, 1_000)), concurrency)
        await admin.reset()
        seconds = await drive(pair, pairs, concurrency)
        stats = await admin.collect()
    finally:
        if ledger is not None:
            await ledger.aclose()
        await client.aclose()
    return Phase(backend, mode, concurrency, pairs, seconds, stats, counted)


# -- report --------------------------------------------------------------------------------------


def table(phases: list[Phase]) -> str:
    naive = {(p.mode, p.concurrency): p for p in phases if p.backend == "naive"}
    head = (
        "| config | conc | pairs | pairs/s | pairs/s vs naive | server usec/pair "
        "| vs naive | calls/pair | in-script calls/pair | server CPU usec/pair | vs naive |"
    )
    rows = table_start(head)
    for p in phases:
        base = naive.get((p.mode, p.concurrency))
        rows.append(
            "| "
            + " | ".join(
                [
                    p.name,
                    str(p.concurrency),
                    str(p.pairs),
                    f"{p.rate:,.0f}",
                    ratio(p.rate, base.rate if base else None, "x"),
                    num(p.usec_per_pair, ".2f"),
                    ratio(p.usec_per_pair, base.usec_per_pair if base else None, "x"),
                    num(p.calls_per_pair, ".2f"),
                    num(p.inner_calls_per_pair, ".2f"),
                    num(p.cpu_usec_per_pair, ".1f"),
                    ratio(p.cpu_usec_per_pair, base.cpu_usec_per_pair if base else None, "x"),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def breakdown(phases: list[Phase]) -> str:
    """Every command the server saw per pair, with its usec per call (scripts' inner calls too)."""
    lines = []
    for p in phases:
        if p.server is None:
            continue
        parts = []
        for cmd, (calls, usec) in sorted(p.server.commands.items(), key=lambda kv: -kv[1][1]):
            if cmd.startswith(HOUSEKEEPING):
                continue
            parts.append(f"{cmd} {calls / p.pairs:.2f}/pair x {usec / max(calls, 1):.2f} us")
        lines.append(f"  {p.name} c={p.concurrency}: " + ", ".join(parts))
    return "\n".join(lines)


async def server_version(admin: Admin) -> str:
    info: dict[str, Any] = await admin.client.info("server")
    return str(info.get("redis_version", "?"))


BACKENDS = ("naive", "redis", "memory", "memory(pre-ids)")


async def main_async(args: argparse.Namespace, url: str | None) -> None:
    admin = None if url is None else Admin(aioredis.Redis.from_url(url, decode_responses=True))
    try:
        version = "-" if admin is None else await server_version(admin)
        print(
            f"python {platform.python_version()}, redis-server {version}, {os.cpu_count()} cpus; "
            f"pairs {args.pairs} (memory {args.memory_pairs}), concurrency {args.concurrency}, "
            f"modes {args.modes}; hot = 1 budget, spread = {SPREAD_ENTITIES} entities",
            flush=True,
        )
        phases: list[Phase] = []
        for _round in range(args.rounds):
            phases += await one_round(args, url, admin)
        first = phases[: len(phases) // args.rounds]
        print()
        print(table(first if args.rounds > 1 else phases))
        if args.rounds > 1:
            print()
            print(f"Script time vs naive, round by round ({args.rounds} interleaved rounds):")
            print(rounds_table(phases))
        if any(p.server is not None for p in first):
            print()
            print(
                "Per-pair command breakdown, calls/pair x usec/call (commandstats; the calls a"
                " script makes are listed too, and their time is already inside the script's):"
            )
            print(breakdown(first))
        if admin is not None:
            await admin.client.flushdb()
    finally:
        if admin is not None:
            await admin.client.aclose()


async def one_round(args: argparse.Namespace, url: str | None, admin: Admin | None) -> list[Phase]:
    """Every configuration once: for each mode and concurrency, each backend in turn."""
    phases: list[Phase] = []
    for mode in args.modes:
        for conc in args.concurrency:
            for backend in args.backends:
                t0 = time.perf_counter()
                if backend.startswith("memory"):
                    phase = await run_memory(
                        mode, conc, args.memory_pairs, pregen_ids=backend != "memory"
                    )
                else:
                    assert url is not None
                    assert admin is not None
                    phase = await run_redis(backend, mode, conc, args.pairs, url, admin)
                phases.append(phase)
                progress(
                    f"  {phase.name:22} c={conc:<3} {phase.rate:>10,.0f} pairs/s "
                    f"server {num(phase.usec_per_pair, '.2f')} usec/pair "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
    return phases


def rounds_table(phases: list[Phase]) -> str:
    """Per mode and concurrency: the ledger's script time over the naive baseline's in each round
    (the two phases run back to back), and the median of those ratios."""
    head = "| config | conc | each round | median | median usec/pair (redis / naive) |"
    rows = table_start(head)
    keys = dict.fromkeys((p.mode, p.concurrency) for p in phases if p.backend == "redis")
    for mode, conc in keys:
        redis = [p for p in phases if (p.backend, p.mode, p.concurrency) == ("redis", mode, conc)]
        naive = [p for p in phases if (p.backend, p.mode, p.concurrency) == ("naive", mode, conc)]
        if len(redis) != len(naive):
            continue
        ratios = [
            r.usec_per_pair / n.usec_per_pair
            for r, n in zip(redis, naive, strict=True)
            if r.usec_per_pair is not None and n.usec_per_pair
        ]
        if not ratios:
            continue
        ledger_us = statistics.median(r.usec_per_pair or 0.0 for r in redis)
        naive_us = statistics.median(n.usec_per_pair or 0.0 for n in naive)
        rows.append(
            f"| redis-{mode} | {conc} | {' / '.join(f'{x:.2f}x' for x in ratios)} "
            f"| {statistics.median(ratios):.2f}x | {ledger_us:.1f} / {naive_us:.1f} |"
        )
    return "\n".join(rows)


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers, comma separated")
    return values


def _mode_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("hot", "spread") for v in values):
        raise argparse.ArgumentTypeError("expected hot, spread or hot,spread")
    return values


def _backend_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in BACKENDS for v in values):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(BACKENDS)}")
    return [b for b in BACKENDS if b in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--redis-url",
        help="use this Redis (it is FLUSHDB'd and RESETSTAT'd!); default: start a redis-server",
    )
    parser.add_argument("--pairs", type=int, default=8_000, help="pairs per Redis phase")
    parser.add_argument(
        "--memory-pairs", type=int, default=None, help="pairs per memory phase (default 5x --pairs)"
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 64], help="e.g. 1,64")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every configuration this many times, interleaved; the ratios of each round"
        " and their median are listed",
    )
    parser.add_argument("--modes", type=_mode_list, default=["hot", "spread"], help="hot,spread")
    parser.add_argument(
        "--backends",
        type=_backend_list,
        default=list(BACKENDS),
        help="some of naive,redis,memory,memory(pre-ids); without naive and redis no redis-server"
        " is started",
    )
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be positive")
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    if args.memory_pairs is None:
        args.memory_pairs = args.pairs * 5
    if not any(b in ("naive", "redis") for b in args.backends):
        asyncio.run(main_async(args, None))
    elif args.redis_url:
        asyncio.run(main_async(args, args.redis_url))
    else:
        with redis_server() as url:
            asyncio.run(main_async(args, url))


if __name__ == "__main__":
    main()
