"""Purge passes under random operations, against a real redis-server.

One budget hash small enough to be a hash table (``hash-max-listpack-entries`` lowered to 8), so
purge passes take several steps; reserves with short and long leases, settles, renewals, recovered
settles, and pauses of a few leases, in random order. After every operation the hash must satisfy:

- ``held`` equals the sum of the amounts of its ``h:`` fields;
- a pass is under way (``pm`` set) only while ``pa`` is due;
- with no pass under way, ``pa`` is no later than any hold's expiry or any tombstone's or done
  record's end (so no pass will ever miss them);

and at the end, once every lease has passed, reserves alone bring ``held`` back to 0.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from budget_middleware.budgets import Budget
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    Reservation,
    Settlement,
    new_reservation_id,
)

HORIZON_MS = 1500
OPERATIONS = 400

pytestmark = pytest.mark.parametrize(
    "backend", [pytest.param("redis", marks=pytest.mark.redis, id="redis")], indirect=True
)


async def server_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def check(ledger: Any, b: Budget, where: str) -> dict[str, str]:
    client = ledger.client()
    fields: dict[str, str] = await client.hgetall(ledger.layout.key(b))
    if not fields:
        return fields
    now = await server_ms(client)
    holds = {k: v for k, v in fields.items() if k.startswith("h:")}
    assert int(fields.get("held", 0)) == sum(int(v.split(":")[1]) for v in holds.values()), where
    pa = int(fields.get("pa", 0))
    if "pm" in fields:
        assert pa <= now, (where, "a pass under way while pa is not due", pa, now)
    else:
        dues = [int(v.split(":")[0]) for v in holds.values()]
        dues += [int(v.split(":")[0]) + HORIZON_MS for k, v in fields.items() if k[:2] in ("t:", "d:")]
        if dues:
            assert pa <= min(dues), (where, "pa later than something due", pa, min(dues))
    return fields


@pytest.mark.parametrize("seed", range(3))
async def test_random_operations_keep_the_pass_invariants(make_ledger: Any, seed: int) -> None:
    ledger = await make_ledger(horizon_ms=HORIZON_MS)
    client = ledger.client()
    entries = (await client.config_get("hash-max-listpack-entries"))["hash-max-listpack-entries"]
    await client.config_set("hash-max-listpack-entries", 8)
    rng = random.Random(seed)
    b = Budget("user", f"r:fuzz{seed}", 400)
    inflight: list[Reservation] = []
    last_expiry = 0
    try:
        for step in range(OPERATIONS):
            op = rng.random()
            if op < 0.45 or not inflight:
                lease = rng.choice([30, 80, 200, 600])
                hold = HoldRequest(b, 10**9, rng.randint(0, 5))
                r = await ledger.reserve(new_reservation_id(), [hold], lease)
                assert isinstance(r, Reservation)
                inflight.append(r)
                last_expiry = max(last_expiry, r.now_ms + lease)
                where = f"reserve {step}"
            elif op < 0.65:
                r = inflight.pop(rng.randrange(len(inflight)))
                await ledger.settle(Settlement(r.id, r.holds, rng.randint(0, 3), "completed"))
                where = f"settle {step}"
            elif op < 0.85:
                lease = rng.choice([50, 300, 800])
                await ledger.extend([rng.choice(inflight)], lease)
                last_expiry = max(last_expiry, await server_ms(client) + lease)
                where = f"extend {step}"
            elif op < 0.95:
                # A settle whose state was lost (another epoch, no hold): recovered, a done record.
                window = b.window_of(await server_ms(client))
                hb = HeldBudget(b, 1, window, "lost-epoch", 10**9, 0, None)
                out = await ledger.settle(Settlement(new_reservation_id(), (hb,), 1, "completed"))
                assert out.outcomes == ("recovered",), out
                where = f"recovered {step}"
            else:
                await asyncio.sleep(rng.choice([0.01, 0.05, 0.2]))  # time passing is the operation
                where = f"pause {step}"
            await check(ledger, b, where)

        for r in inflight:
            await ledger.settle(Settlement(r.id, r.holds, 0, "completed"))
        deadline = time.monotonic() + 10
        while await server_ms(client) <= last_expiry:  # every lease has passed
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        while True:  # reserves alone purge every hold left
            r = await ledger.reserve(new_reservation_id(), [HoldRequest(b, 10**9, 0)], 10)
            assert isinstance(r, Reservation)
            await ledger.settle(Settlement(r.id, r.holds, 0, "completed"))
            fields = await check(ledger, b, "drain")
            if int(fields.get("held", 0)) == 0 and not any(k.startswith("h:") for k in fields):
                break
            assert time.monotonic() < deadline, fields
    finally:
        await client.config_set("hash-max-listpack-entries", entries)
