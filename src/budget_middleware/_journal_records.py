"""The journal's records: a settlement as a JSON line and back, the ledger identity line, parsing.

Records are JSON lines: ``{"op":"ledger","id":...}`` first (the identity of the ledger the file
belongs to, see ``ledger_identity``), then ``{"op":"settle",...}`` with every field a settle needs and
``{"op":"applied","id":...}`` marks. ``journal.py`` writes and claims the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any

from .budgets import Budget
from .ledger import HeldBudget, Settlement
from .ledger.urls import location_of

__all__ = ["decode_settlement", "encode_settlement", "ledger_identity"]

logger = logging.getLogger("budget_middleware")


def encode_settlement(s: Settlement) -> dict[str, Any]:
    """A settlement as a journal record (everything but the telemetry ``context``)."""
    return {
        "op": "settle",
        "reservation_id": s.reservation_id,
        "actual": s.actual,
        "reason": s.reason,
        "estimate": s.estimate,
        "trace_id": s.trace_id,
        "holds": [
            {
                "rule": h.budget.rule,
                "entity": h.budget.entity,
                "period_ms": h.budget.period_ms,
                "amount": h.amount,
                "window": h.window,
                "epoch": h.epoch,
                "limit": h.limit,
                "remaining": h.remaining,
                "reset_ms": h.reset_ms,
                "reserved_ms": h.reserved_ms,
            }
            for h in s.holds
        ],
    }


def ledger_identity(ledger: object) -> str:
    """A digest naming the store ``ledger`` writes to: its kind (the package's ledger class it is
    or derives from), its location without credentials, and its key prefix."""
    kind = next(
        (c.__name__ for c in type(ledger).__mro__ if c.__module__.startswith("budget_middleware.")),
        type(ledger).__name__,
    )
    url = getattr(ledger, "url", None)
    location = location_of(url) if isinstance(url, str) else _client_location(ledger)
    layout = getattr(ledger, "layout", None)
    prefix = getattr(layout, "prefix", "")
    text = f"{kind}\n{location}\n{prefix}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _client_location(ledger: object) -> str:
    """The location of a ledger built on a client the caller owns (no URL), as far as it says."""
    pool = getattr(getattr(ledger, "_client", None), "connection_pool", None)
    options = getattr(pool, "connection_kwargs", None)
    if not isinstance(options, dict):
        return ""
    where = options.get("path") or f"{options.get('host', '')}:{options.get('port', '')}"
    return f"client://{where}/{options.get('db', 0)}"


def _int(record: dict[str, Any], name: str) -> int:
    value = record[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _str(record: dict[str, Any], name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def decode_settlement(record: dict[str, Any]) -> Settlement:
    """The settlement of a ``settle`` record; ValueError (or KeyError) when it is malformed."""
    holds = []
    for h in record["holds"]:
        reset = h["reset_ms"]
        if reset is not None and (not isinstance(reset, int) or isinstance(reset, bool)):
            raise ValueError(f"reset_ms must be an integer or null, got {reset!r}")
        holds.append(
            HeldBudget(
                budget=Budget(_str(h, "rule"), _str(h, "entity"), _int(h, "period_ms")),
                amount=_int(h, "amount"),
                window=_int(h, "window"),
                epoch=_str(h, "epoch"),
                limit=_int(h, "limit"),
                remaining=_int(h, "remaining"),
                reset_ms=reset,
                # Absent from the lines of a version before it: unknown (see HeldBudget).
                reserved_ms=_int(h, "reserved_ms") if "reserved_ms" in h else 0,
            )
        )
    return Settlement(
        reservation_id=_str(record, "reservation_id"),
        holds=tuple(holds),
        actual=_int(record, "actual"),
        reason=_str(record, "reason"),
        estimate=_int(record, "estimate"),
        trace_id=_str(record, "trace_id"),
    )


def _lines(settlements: Iterable[Settlement], applied: Iterable[str]) -> bytes:
    out = [json.dumps(encode_settlement(s), separators=(",", ":")) for s in settlements]
    out += [json.dumps({"op": "applied", "id": i}, separators=(",", ":")) for i in applied]
    return "".join(line + "\n" for line in out).encode()


def _parse(data: bytes, origin: object) -> dict[str, Settlement]:
    """The unapplied settlements of a journal's bytes, by reservation id, in file order.

    A torn last line (no newline: the writer died mid-write) is skipped quietly; any other line that
    does not parse is skipped with a warning. A settlement is applied if an ``applied`` record for its
    id appears anywhere in the file (ids are unique; order does not matter)."""
    settles: dict[str, Settlement] = {}
    applied: set[str] = set()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn:
        logger.info("budget: journal %s ends with a torn record (%d bytes); skipped", origin, len(torn))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            op = record["op"]
            if op == "settle":
                s = decode_settlement(record)
                settles.setdefault(s.reservation_id, s)
            elif op == "applied":
                applied.add(_str(record, "id"))
            elif op == "ledger":
                _str(record, "id")
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("budget: journal %s line %d is malformed (%s); skipped", origin, number, exc)
    return {i: s for i, s in settles.items() if i not in applied}


def _identity(data: bytes) -> str | None:
    """The ledger identity a journal's bytes open with, None for a file of an older version."""
    first = data.partition(b"\n")[0]
    if not first.startswith(b'{"op":"ledger"'):
        return None
    try:
        value = json.loads(first)["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _header(identity: str | None) -> bytes:
    if identity is None:
        return b""
    return (json.dumps({"op": "ledger", "id": identity}, separators=(",", ":")) + "\n").encode()
