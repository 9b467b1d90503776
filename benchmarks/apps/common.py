"""What every configuration shares: the endpoint, the ``/__rtt`` report, the counting Redis client.

Round trips are counted in the app process, where the client is: a Redis client's class is swapped
for a subclass whose ``execute_command`` (one command, one round trip) and whose pipelines'
``execute`` (one round trip, N commands; on a Cluster, one round trip per primary addressed) count
before they call the real method. Works for redis-py's asyncio and sync ``Redis`` and its asyncio
``RedisCluster``; a swapped client otherwise behaves exactly the same.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.client as aioclient
import redis.asyncio.cluster as aiocluster
import redis.client as syncclient
from fastapi import FastAPI, Request, Response
from fastapi.params import Depends

HEADER = "x-user"  # the identity, spread over the users by the wrk script
CHARGE_HEADER = "x-budget-charge"
CHARGE = "0.000001"  # the actual cost the endpoint reports (1 micro-unit)
ESTIMATE = "0.00001"  # what the metered configurations hold per request (10 micro-units)
LIMIT = "1000000000"  # a day: nothing is ever rejected
RTT_PATH = "/__rtt"

REDIS_URL = os.environ.get("COMPARE_REDIS_URL", "")


class Counts:
    requests: ClassVar[int] = 0  # requests the endpoint served
    round_trips: ClassVar[int] = 0
    commands: ClassVar[Counter[str]] = Counter()  # top-level commands sent, by commandstats name


# -- counting Redis clients -------------------------------------------------------------------

_CONTAINERS = {
    "acl", "client", "cluster", "command", "config", "function", "latency", "memory",
    "module", "object", "pubsub", "script", "slowlog", "xinfo",
}  # fmt: skip


def command_name(args: Sequence[Any]) -> str:
    """The ``INFO commandstats`` name of a command: ``evalsha``, ``config|get``."""
    if not args:
        return "?"
    first = args[0]
    name = (first.decode() if isinstance(first, bytes) else str(first)).lower()
    if " " in name:  # redis-py sends "CONFIG GET", "SCRIPT LOAD" as one argument
        return name.replace(" ", "|")
    if name in _CONTAINERS and len(args) > 1:
        sub = args[1]
        return f"{name}|{(sub.decode() if isinstance(sub, bytes) else str(sub)).lower()}"
    return name


def note_round_trip(commands: Sequence[Sequence[Any]]) -> None:
    """One round trip that sent ``commands`` (each a command's arguments, name first)."""
    Counts.round_trips += 1
    for args in commands:
        Counts.commands[command_name(args)] += 1


class _AsyncPipeline(aioclient.Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.command_stack:
            note_round_trip([args for args, _options in self.command_stack])
        return await super().execute(raise_on_error)


class _AsyncRedis(aioredis.Redis):
    async def execute_command(self, *args: Any, **options: Any) -> Any:
        note_round_trip([args])
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
        return _AsyncPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _SyncPipeline(syncclient.Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.command_stack:
            note_round_trip([args for args, _options in self.command_stack])
        return super().execute(raise_on_error)


class _SyncRedis(redis.Redis):
    def execute_command(self, *args: Any, **options: Any) -> Any:
        note_round_trip([args])
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
        return _SyncPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _ClusterPipeline(aiocluster.ClusterPipeline):
    """Counts one round trip per primary the queued commands go to (each node gets its part in
    one pipelined write), ignoring redirections."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        queue = getattr(self._execution_strategy, "_command_queue", [])
        if queue:
            client = self.cluster_client
            nodes = set()
            for command in queue:
                args = command.args
                target = command.kwargs.get("target_nodes")
                if target is not None:
                    nodes.add(getattr(target, "name", str(target)))
                elif command_name(args) in ("evalsha", "eval") and int(args[2]) > 0:
                    node = client.get_node_from_key(args[3])
                    nodes.add(node.name if node is not None else "?")
                else:
                    nodes.add("?")
            Counts.round_trips += len(nodes) - 1  # note_round_trip adds one
            note_round_trip([command.args for command in queue])
        return await super().execute(raise_on_error, allow_redirections)


class _RedisCluster(aiocluster.RedisCluster):
    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        note_round_trip([args])  # one round trip per call (a call sent to every primary is rare here)
        return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _ClusterPipeline(self, transaction)


C = TypeVar("C")


def count_round_trips(client: C) -> C:
    """Make ``client`` (a plain redis-py ``Redis``, asyncio or sync, or an asyncio
    ``RedisCluster``) count what it sends."""
    if type(client) is aioredis.Redis:
        client.__class__ = _AsyncRedis
    elif type(client) is redis.Redis:
        client.__class__ = _SyncRedis
    elif type(client) is aiocluster.RedisCluster:
        client.__class__ = _RedisCluster
    elif not isinstance(client, (_AsyncRedis, _SyncRedis, _RedisCluster)):
        raise TypeError(f"cannot count the round trips of a {type(client).__name__}")
    return client


# -- the app ------------------------------------------------------------------------------------


async def endpoint(request: Request, response: Response) -> dict[str, bool]:
    """The measured endpoint, the same in every configuration: a tiny JSON body, and its cost
    reported in a response header (read by BudgetMiddleware and the naive middleware, ignored by
    the others)."""
    Counts.requests += 1
    response.headers[CHARGE_HEADER] = CHARGE
    return {"ok": True}


SettleWait = Callable[[Request], Awaitable[dict[str, Any]]]


def build_app(
    *,
    route: Callable[..., Any] = endpoint,
    dependencies: Sequence[Depends] = (),
    settle_wait: SettleWait | None = None,
    **fastapi_options: Any,
) -> FastAPI:
    """A FastAPI app with ``GET /`` (``route``, with ``dependencies``) and ``GET /__rtt``.

    ``settle_wait`` runs first in ``/__rtt`` (for BudgetMiddleware: wait until the finalizer has
    applied every settlement, so their round trips are counted) and adds to its report.
    """
    app = FastAPI(**fastapi_options)
    app.add_api_route("/", route, methods=["GET"], dependencies=list(dependencies))

    async def rtt(request: Request) -> dict[str, Any]:
        extra = await settle_wait(request) if settle_wait is not None else {}
        return {
            "requests": Counts.requests,
            "round_trips": Counts.round_trips,
            "commands": dict(Counts.commands),
            **extra,
        }

    app.add_api_route(RTT_PATH, rtt, methods=["GET"])
    return app
