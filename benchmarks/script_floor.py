"""How much of a ledger pair's Redis time is the scripts' logic, and how much is the floor under it.

Runs, on one redis-server, one hot budget, request-response (concurrency 1), interleaved rounds:

- ``naive``: the baseline of benchmarks/ledger.py (INCRBYFLOAT, EXPIRE, INCRBYFLOAT);
- ``empty``: two EVALSHA of ``return 1`` (one key and the ledger's argument counts): the price of
  entering a script twice;
- ``bare``: two EVALSHA that make exactly the commands of the ledger's common path and nothing else
  (TIME, HMGET of the same fields, HSET of a hold; HDEL of it, two HINCRBY), with no Lua logic;
- ``ledger``: the real RedisLedger pair.

Each reports ``INFO commandstats`` usec per pair of the script calls (or of the naive commands), as
benchmarks/ledger.py does, so ``bare / naive`` is the lowest ratio these commands can reach.

    .venv/bin/python benchmarks/script_floor.py [--pairs 6000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).parent))

from ledger import (  # benchmarks/ledger.py, next to this file
    LEDGER_SCRIPT_CMDS,
    NAIVE_CMDS,
    Admin,
    PairFn,
    budgets_for,
    drive,
    ledger_pair,
    naive_pair,
    redis_server,
)

from budget_middleware.ledger import RedisLedger, new_reservation_id

EMPTY = "return 1"
BARE_RESERVE = """
local t = redis.call('TIME')
redis.call('HMGET', KEYS[1], 'held', 'epoch', 'limit', 'ttl', 'pa', 's:' .. ARGV[5], 'h:' .. ARGV[1])
redis.call('HSET', KEYS[1], 'h:' .. ARGV[1], ARGV[6], 'held', ARGV[7])
return 1
"""
BARE_SETTLE = """
redis.call('HDEL', KEYS[1], 'h:' .. ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', ARGV[5])
redis.call('HINCRBY', KEYS[1], 's:' .. ARGV[6], ARGV[2])
return 1
"""


def script_pair(client: aioredis.Redis, reserve_sha: str, settle_sha: str) -> PairFn:
    """Two EVALSHA per pair with the argument counts of the ledger's one-rule reserve and settle."""
    key = "floor:{bench:r:hot}"

    async def pair(_i: int) -> None:
        rid = new_reservation_id()
        await client.evalsha(
            reserve_sha, 1, key, rid, 30_000, 86_400_000, "e", "1764288000000", "99:1000", 1000
        )
        await client.evalsha(
            settle_sha, 1, key, rid, 700, 86_400_000, 1764288000000, -1000, "1764288000000", 1
        )

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
            reserve, settle = (EMPTY, EMPTY) if name == "empty" else (BARE_RESERVE, BARE_SETTLE)
            shas = [await client.script_load(reserve), await client.script_load(settle)]
            pair, counted = script_pair(client, *shas), LEDGER_SCRIPT_CMDS
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
    names = ("naive", "empty", "bare", "ledger")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=6_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with redis_server() as url:
        asyncio.run(main_async(url, args.pairs, args.rounds))


if __name__ == "__main__":
    main()
