"""How much of a ledger pair's Redis time is the scripts' logic, and how much is the floor under it.

Runs, on one redis-server, one hot budget, request-response (concurrency 1), interleaved rounds:

- ``naive``: the baseline of benchmarks/ledger.py (INCRBYFLOAT, EXPIRE, INCRBYFLOAT);
- ``empty``: two EVALSHA of ``return 1`` (one key and the ledger's argument counts): the price of
  entering a script twice;
- ``bare``: two EVALSHA that make exactly the commands of the ledger's common path and nothing else
  (TIME, HMGET of the same fields, HSET of a hold; HDEL of it, two HINCRBY), with no Lua logic;
- ``least``: the least a script pair that enforces a budget does, with the same commands: the
  reserve works out the window from TIME, reads held and the window's spent, admits only if
  spent + held + amount <= limit, and writes the hold and held; the settle adds the actual cost and
  releases the hold only if its HDEL found it. No argument checks, TTLs, purge scheduling, epoch,
  idempotent reserve or limit override: what the ledger's scripts cost beyond this is their price;
- ``ledger``: the real RedisLedger pair.

Each reports ``INFO commandstats`` usec per pair of the script calls (or of the naive commands), as
benchmarks/ledger.py does, so ``bare / naive`` is the lowest ratio these commands can reach.

``--callgrind`` counts instead the instructions redis-server executes inside those commands
(valgrind's callgrind, collecting only inside ``evalShaCommand``, or ``incrbyfloatCommand`` and
``expireCommand`` for naive), per pair: the difference between a run of ``--cg-pairs`` HI and one of
LO pairs, each on its own redis-server. Counts do not move with the load on the machine, so they
show what a change to the scripts does where timings cannot (a run takes about a minute).

    .venv/bin/python benchmarks/script_floor.py [--pairs 6000] [--rounds 3]
    .venv/bin/python benchmarks/script_floor.py --callgrind [--cg-pairs 500 2500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).parent))

from _common import free_port, per_item, redis_server  # benchmarks/_common.py, next to this file
from ledger import (  # benchmarks/ledger.py, next to this file
    LEDGER_SCRIPT_CMDS,
    NAIVE_CMDS,
    Admin,
    PairFn,
    budgets_for,
    drive,
    ledger_pair,
    naive_pair,
)

from budget_middleware import RedisLedger
from budget_middleware.ledger import new_reservation_id

EMPTY = "return 1"
BARE_RESERVE = """
local t = redis.call('TIME')
redis.call('HMGET', KEYS[1], 'held', 'epoch', 'limit', 'ttl', 'pa', ARGV[4], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5], 'held', ARGV[6])
return 1
"""
BARE_SETTLE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', ARGV[4])
redis.call('HINCRBY', KEYS[1], ARGV[5], ARGV[2])
return 1
"""

LEAST_RESERVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + (t[2] - t[2] % 1000) / 1000
local window = now - now % ARGV[4]
local v = redis.call('HMGET', KEYS[1], 'held', string.format('s:%d', window))
local held, spent, amount = (v[1] or 0) + 0, (v[2] or 0) + 0, ARGV[6] + 0
if spent + held + amount > ARGV[5] + 0 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now + ARGV[2]), 'held',
  string.format('%d', held + amount))
return string.format('%d', now)
"""
LEAST_SETTLE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'held', ARGV[4])
  redis.call('HINCRBY', KEYS[1], ARGV[5], ARGV[2])
  return 'applied'
end
return 'duplicate'
"""
SCRIPTS = {
    "empty": (EMPTY, EMPTY),
    "bare": (BARE_RESERVE, BARE_SETTLE),
    "least": (LEAST_RESERVE, LEAST_SETTLE),
}
NAMES = ("naive", "empty", "bare", "least", "ledger")


def script_pair(client: aioredis.Redis, reserve_sha: str, settle_sha: str, least: bool) -> PairFn:
    """Two EVALSHA per pair with the argument counts of the ledger's one-rule reserve and settle
    (for ``least``, the reserve's arguments are the ledger's own: period, limit, amount)."""
    key = "floor:{bench:r:hot}"
    tail = (86_400_000, 10**15, 1000) if least else ("s:1764288000000", "99:1000", 1000)

    async def pair(_i: int) -> None:
        hold = "h:" + new_reservation_id()
        now = await client.evalsha(reserve_sha, 1, key, hold, 30_000, 86_400_000, *tail)
        if not now:
            raise SystemExit("the benchmark's budget never runs out")
        # least settles into the window its reserve read (the others' replies carry no time)
        window = f"s:{int(now) - int(now) % 86_400_000}" if least else "s:1764288000000"
        settled = await client.evalsha(
            settle_sha, 1, key, hold, 700, 86_400_000, -1000, window, "e", 86_400_000
        )
        if least and settled != "applied":
            raise SystemExit(f"least settle: {settled!r}")

    return pair


async def phase(name: str, url: str, admin: Admin, pairs: int) -> float:
    await admin.client.flushdb()
    client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
    ledger: RedisLedger | None = None
    try:
        if name == "naive":
            pair, counted = naive_pair(client, budgets_for("hot")), NAIVE_CMDS
        elif name == "ledger":
            ledger = RedisLedger(url)
            pair, counted = ledger_pair(ledger, budgets_for("hot")), LEDGER_SCRIPT_CMDS
        else:
            shas = [await client.script_load(source) for source in SCRIPTS[name]]
            pair, counted = script_pair(client, *shas, name == "least"), LEDGER_SCRIPT_CMDS
        await drive(pair, 500, 1)
        await admin.reset()
        await drive(pair, pairs, 1)
        stats = await admin.collect()
    finally:
        if ledger is not None:
            await ledger.aclose()
        await client.aclose()
    return stats.usec(counted) / pairs


async def main_async(url: str, pairs: int, rounds: int) -> None:
    admin = Admin(aioredis.Redis.from_url(url, decode_responses=True))
    names = NAMES
    results: dict[str, list[float]] = {n: [] for n in names}
    try:
        for r in range(rounds):
            for name in names:
                results[name].append(await phase(name, url, admin, pairs))
            print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1]:.2f}" for n in names))
        await admin.client.flushdb()
    finally:
        await admin.client.aclose()
    naive = statistics.median(results["naive"])
    print()
    print(f"server usec per pair (commandstats), median of {rounds} rounds of {pairs} pairs, c=1")
    print("| pair | usec/pair | vs naive | each round |")
    print("|---|---|---|---|")
    for name in names:
        med = statistics.median(results[name])
        rounds_text = " / ".join(f"{v:.1f}" for v in results[name])
        print(f"| {name} | {med:.2f} | {med / naive:.2f}x | {rounds_text} |")


# -- instructions under callgrind ----------------------------------------------------------------

COLLECT = {"naive": ("incrbyfloatCommand", "expireCommand")}
SCRIPT_COLLECT = ("evalShaCommand",)


@contextlib.contextmanager
def callgrind_server(name: str, out_file: str) -> Iterator[int]:
    """redis-server under callgrind on a free port, collecting inside the phase's commands only.

    Yields the port; the caller shuts the server down, and callgrind writes ``out_file`` as it exits.
    """
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind)")
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found on PATH")
    port = free_port()
    collect = [f"--toggle-collect={f}" for f in COLLECT.get(name, SCRIPT_COLLECT)]
    with tempfile.TemporaryDirectory(prefix="bench-cg-") as tmp:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *collect, exe,
             "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            yield port
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=60)


async def cg_drive(name: str, port: int, pairs: int) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            await client.ping()
            break
        except (OSError, aioredis.ConnectionError):
            if time.monotonic() > deadline:
                raise SystemExit("redis-server under callgrind did not answer within 60 s") from None
            await asyncio.sleep(0.1)
    ledger: RedisLedger | None = None
    try:
        if name == "naive":
            pair = naive_pair(client, budgets_for("hot"))
        elif name == "ledger":
            ledger = RedisLedger(url)
            pair = ledger_pair(ledger, budgets_for("hot"))
        else:
            shas = [await client.script_load(source) for source in SCRIPTS[name]]
            pair = script_pair(client, *shas, name == "least")
        await drive(pair, pairs, 1)
        with contextlib.suppress(aioredis.ConnectionError):
            await client.shutdown(nosave=True)  # callgrind writes its counts as redis-server exits
    finally:
        if ledger is not None:
            await ledger.aclose()
        await client.aclose()


def cg_instructions(name: str, pairs: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-cg-out-") as tmp:
        out_file = os.path.join(tmp, "callgrind.out")
        with callgrind_server(name, out_file) as port:
            asyncio.run(cg_drive(name, port, pairs))
        with open(out_file) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
    raise SystemExit(f"no instruction count in the callgrind output of {name}")


def main_callgrind(lo: int, hi: int) -> None:
    names = NAMES
    per_pair = {}
    for name in names:
        per_pair[name] = per_item(lo, hi, functools.partial(cg_instructions, name))
        print(f"{name}: {per_pair[name]:,.0f} instructions/pair", flush=True)
    print()
    print(f"redis-server instructions per pair inside the measured commands ({hi} - {lo} pairs, c=1)")
    print("| pair | instructions/pair | vs naive |")
    print("|---|---|---|")
    for name in names:
        print(f"| {name} | {per_pair[name]:,.0f} | {per_pair[name] / per_pair['naive']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=6_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--cg-pairs", type=int, nargs=2, default=(500, 2_500), metavar=("LO", "HI"))
    args = parser.parse_args()
    if args.callgrind:
        main_callgrind(*args.cg_pairs)
        return
    with redis_server() as url:
        asyncio.run(main_async(url, args.pairs, args.rounds))


if __name__ == "__main__":
    main()
