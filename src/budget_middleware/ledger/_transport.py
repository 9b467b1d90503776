"""The Redis transport: the ledger's script calls packed by hand and sent in one round trip.

The scripts (``lua/*.lua``, with the prelude ``lua/_common.lua`` and the helpers ``lua/_helpers.lua``)
are loaded once, called by EVALSHA. A batch of calls is packed into one buffer in the Redis protocol
(RESP) and written on one pooled connection, then a reply or error is read per call: what
redis-py's pipeline does, without a command object per call. This is the one module that uses
redis-py's connection internals (``pool.get_connection()``, ``send_packed_command``,
``read_response``, ``retry.call_with_retry``, ``disconnect(nowait=True)``); they change between
versions, so ``scripts/test-redis-floor`` runs the Redis suite on the lowest version declared.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from ._types import LedgerError, LedgerNotSent, LedgerUnavailable

__all__ = [
    "SCRIPTS",
    "Call",
    "Script",
    "load_scripts",
    "pack_command",
    "pack_evalsha",
    "round_trip",
    "wrap",
]

# One script call: the script's name, its KEYS and its ARGV.
Call = tuple[str, list[str], list[Any]]
SCRIPTS = ("reserve", "settle", "extend", "usage", "reset", "limit")


class Script:
    __slots__ = ("head", "name", "sha", "source")

    def __init__(self, name: str, prelude: str, helpers: str) -> None:
        body = resources.files(__package__).joinpath(f"lua/{name}.lua").read_text("utf-8")
        self.name = name
        self.source = prelude + "\n" + _include_helpers(body, helpers)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.head = b"$7\r\nEVALSHA\r\n$40\r\n" + self.sha.encode() + b"\r\n"


def _bulk(value: str | int) -> bytes:
    data = value.encode() if isinstance(value, str) else b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack_command(*args: str | int) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


def pack_evalsha(script: Script, keys: list[str], args: list[Any]) -> bytes:
    """One EVALSHA in the Redis protocol (RESP). Our arguments are only ``str`` and ``int``.

    Keys, ids and numbers are ASCII (keys are sanitised, ids hex), so the bulk strings are built
    as text and encoded once, where a character counts one byte; anything else is packed per value.
    """
    body = "".join([f"${len(v)}\r\n{v}\r\n" for v in map(str, (*keys, *args))])
    body_bytes = body.encode() if body.isascii() else b"".join(map(_bulk, (*keys, *args)))
    return b"*%d\r\n%b%b%b" % (3 + len(keys) + len(args), script.head, _bulk(len(keys)), body_bytes)


_INCLUDE_HELPERS = "-- #include _helpers.lua\n"


def _include_helpers(body: str, helpers: str) -> str:
    """``body`` with the helper functions where its include line is, or before it all."""
    if body.count(_INCLUDE_HELPERS) > 1:
        raise ValueError("a script includes its helpers once")
    if _INCLUDE_HELPERS in body:
        return body.replace(_INCLUDE_HELPERS, helpers)
    return helpers + "\n" + body


def load_scripts() -> dict[str, Script]:
    lua = resources.files(__package__).joinpath("lua")
    prelude = lua.joinpath("_common.lua").read_text("utf-8")
    helpers = lua.joinpath("_helpers.lua").read_text("utf-8")
    return {n: Script(n, prelude, helpers) for n in SCRIPTS}


def wrap(exc: BaseException) -> LedgerError:
    if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError)):
        return LedgerUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, (rexc.ClusterDownError, rexc.TryAgainError, rexc.ReadOnlyError)):
        return LedgerUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")
    return LedgerError(f"redis error: {type(exc).__name__}: {exc}")


async def round_trip(pool: aioredis.ConnectionPool, payload: bytes, count: int) -> list[Any]:
    """Writes ``payload`` (``count`` packed commands) on one connection of ``pool``, then reads a
    reply, or the error reply as its exception, per command.

    Failures are retried as the connection's retry policy says (for a client made from a URL: once,
    on a fresh connection, when the pooled one had gone stale); every script is idempotent, so a
    batch that ran before its connection broke runs again harmlessly. Raises ``LedgerError``, and
    ``LedgerNotSent`` when no connection could be had (nothing was written).
    """
    try:
        conn = await pool.get_connection()  # type: ignore[no-untyped-call, unused-ignore]
    except (rexc.RedisError, OSError) as exc:
        # No connection: nothing of the batch was written, so none of it can have run.
        raise LedgerNotSent(f"redis unavailable: {type(exc).__name__}: {exc}") from exc

    async def send_and_read() -> list[Any]:
        # One deadline for the whole batch instead of a timer per reply.
        async with asyncio.timeout(conn.socket_timeout):
            await conn.send_packed_command(payload)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await conn.read_response(timeout=math.inf))
                except rexc.ResponseError as exc:
                    replies.append(exc)
            return replies

    async def drop(_error: Exception) -> None:
        await conn.disconnect()

    try:
        replies: list[Any] = await conn.retry.call_with_retry(send_and_read, drop)
        return replies
    except (rexc.RedisError, OSError) as exc:
        await conn.disconnect()
        raise wrap(exc) from exc
    except BaseException:
        # Cancelled mid-batch: replies may be left unread, so the connection is not reused.
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
