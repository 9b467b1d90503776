"""The Redis Cluster transport: script calls pipelined per primary (redis-py's ClusterPipeline).

Every call touches one slot; ``RedisClusterLedger._send`` groups a batch by the primary that
serves each call's slot and runs the groups concurrently through ``run_on_node``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster

from ._transport import Call, Script
from ._types import LedgerError, LedgerUnavailable

__all__ = ["CLUSTER_ERRORS", "load_on_nodes", "run_on_node", "wrap_cluster"]

# Errors that mean "the cluster (or part of it) cannot answer now". A RedisClusterException is
# raised for topology problems (no reachable startup node, a slot no node serves): this ledger never
# sends a cross-slot call, so it is an availability problem too.
_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)
CLUSTER_ERRORS = (rexc.RedisError, rexc.RedisClusterException, OSError, asyncio.TimeoutError)


def wrap_cluster(exc: BaseException) -> LedgerError:
    if isinstance(exc, LedgerError):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        return LedgerUnavailable(f"redis cluster unavailable: {type(exc).__name__}: {exc}")
    return LedgerError(f"redis error: {type(exc).__name__}: {exc}")


# -- the ledger -----------------------------------------------------------------------------------


async def run_on_node(
    client: RedisCluster,
    scripts: dict[str, Script],
    node: ClusterNode,
    calls: list[Call],
    wait: tuple[int, int] | None,
) -> list[Any]:
    """The calls whose slots ``node`` serves, in one pipeline (redirections are followed), and
    ``WAIT`` (replicas, timeout ms) on that node when ``wait`` is given. NOSCRIPT loads the
    script on the node that serves the call's slot, and the calls that did not run go again."""
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in (0, 1):
        # ClusterPipeline refuses pipe.evalsha() but routes EVALSHA by its keys.
        pipe = client.pipeline(transaction=False)
        for i in todo:
            name, keys, args = calls[i]
            pipe.execute_command("EVALSHA", scripts[name].sha, len(keys), *keys, *args)
        if wait is not None:
            pipe.execute_command("WAIT", *wait, target_nodes=node)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except CLUSTER_ERRORS as exc:
            raise wrap_cluster(exc) from exc
        if wait is not None:
            acked = replies.pop()
            if isinstance(acked, BaseException):
                raise wrap_cluster(acked) from acked
            if int(acked) < wait[0]:
                raise LedgerUnavailable(
                    f"only {acked} of {wait[0]} replicas of {node.name} acknowledged the batch"
                )
        missing = []
        for i, reply in zip(todo, replies, strict=True):
            if attempt == 0 and isinstance(reply, rexc.NoScriptError):
                missing.append(i)
            else:
                results[i] = wrap_cluster(reply) if isinstance(reply, BaseException) else reply
        if not missing:
            break
        await load_on_nodes(client, scripts, [calls[i] for i in missing])
        todo = missing
    return results


async def load_on_nodes(client: RedisCluster, scripts: dict[str, Script], calls: list[Call]) -> None:
    """SCRIPT LOAD on the node that now serves each call's slot (not on every primary: one
    unreachable primary must not stop the others)."""
    targets: dict[str, tuple[ClusterNode, set[str]]] = {}
    try:
        for name, keys, _ in calls:
            node = client.get_node_from_key(keys[0])
            if node is not None:
                targets.setdefault(node.name, (node, set()))[1].add(name)
        for node, names in targets.values():
            for name in sorted(names):
                await client.execute_command("SCRIPT LOAD", scripts[name].source, target_nodes=node)
    except CLUSTER_ERRORS as exc:
        raise wrap_cluster(exc) from exc
