"""One chaos run: replicas of ``server_app`` on real servers sharing a real ``redis-server``, a mixed
load (``load.LoadDriver``), faults on a schedule, a sampler of every budget, and exact accounting
against the ground truth the apps wrote.

Setup. ``redis-server`` with ``--appendonly yes --appendfsync always`` (``procs.ChaosRedis``), two or
three replicas (``uvicorn``, ``uvicorn``, ``hypercorn`` by default) with ``BUDGET_LEASE=1s`` and two
lifetime rules: ``user`` (``header:x-user``, a limit nothing reaches) and ``tight``
(``header:x-tight``, limit 3 units, only on ``tight-a`` and ``broke``). The estimate is 1 unit and
no charge exceeds it, so invariant 1 (never ``spent + held > limit``) must hold exactly. Each replica
appends its ground truth to its own file (``BUDGET_TEST_TRUTH``); a restarted replica keeps its file
(and its journal dir, with ``journal=True``).

Faults (``FaultStep``), each at a time into the load:

    sigkill            SIGKILL a replica once it has streams in flight; restart it
    redis-restart      SIGKILL redis-server, wait for 503s (fail-closed), restart it on its AOF
    sigterm            SIGTERM a replica with streams in flight (graceful: its finalizer drains),
                       restart it
    sigkill-in-outage  SIGKILL redis-server, wait until a replica has settlements queued (with a
                       journal: in its journal), SIGKILL that replica, restart Redis, then it
    forced-shutdown    SIGINT a uvicorn replica with streams in flight, and SIGINT it again 0.3 s
                       later (an operator's second Ctrl-C: uvicorn stops waiting for the requests,
                       skips the lifespan shutdown and ``asyncio.run`` cancels every task); restart
                       it. Only on uvicorn: hypercorn's handler of SIGINT sets one shutdown event,
                       so its second SIGINT does nothing and the fault would be a graceful shutdown
                       again (``sigterm``): a hypercorn replica scheduled for it fails the fault.
    forced-in-outage   the same forced shutdown of a uvicorn replica while redis-server is down
                       (SIGKILLed, 503s seen): its drain cannot apply, what it holds must reach
                       the journal (or, without one, be logged as lost); Redis is restarted on its
                       AOF, then the replica (it replays its journal)
    sigterm-in-outage  SIGKILL redis-server while the load runs, wait until the replica journals
                       the settlements it cannot apply (its journal's unapplied count grows twice;
                       without a journal: a request it finished in the outage), SIGTERM it with
                       streams in flight (its drain cannot apply and shelves), restart Redis on
                       its AOF, then the replica (it replays its journal)
    redis-empty        open streams on the ``flight-*`` entities, then SIGKILL redis-server and
                       start an EMPTY one on the same port (no AOF file) while they run

Checks (``report.ChaosReport.failures``), after the load and one lease:

- ``held == 0`` and no live hold on every budget (nothing leaked), and again after every replica
  was stopped gracefully;
- per budget, ``spent == truth - lost`` exactly, in micro-units, where ``truth`` sums what the app
  charged per request (or the estimate, or zero for /raise, when it reported nothing: DESIGN.md
  section 6), and ``lost`` is what requests of SIGKILLed replicas had in flight and never settled.
  Those are read from the ledger itself: a hold that nobody settled expires into a tombstone
  (``<prefix>:{...}:expired``, kept for the 24 h horizon) and a late settlement removes it, so the
  tombstones left at the end name exactly the reservations whose settlement never came. Every one
  must belong to a pid that was SIGKILLed, with one exception: without a journal, a process stopped
  while it could not apply everything (SIGTERM in an outage; a forced shutdown whose drain was cut
  short) loses what it held, and then its own log must say so: per pid, the tombstones of its
  requests must equal, in number and in micro-units, the settlements its "lost" lines count
  (``procs.logged_losses``). With a journal nothing may be lost there, and no "lost" line written;
  the settlements its journal held after the exit must all land (replayed at its restart);
- the sampler never saw ``spent + held > limit``, and ``spent`` never went down across a restart
  with AOF;
- 503 only once Redis had been down (the ones after it was back are counted apart: a known bug,
  see ``test_chaos.py``), every reserve failure in the replicas' logs a Redis outage, 429 only on
  the tight budgets (and some on ``broke``), no other unexpected status, no client timeout;
- with ``redis-empty``: every request in flight during the empty restart landed exactly once:
  ``spent`` of each ``flight-*`` entity equals its whole truth (the settlements apply as
  ``recovered``), and on every budget ``spent`` equals the truth of the requests the empty Redis
  admitted (reservation ids carry their creation time) plus those it recorded as recovered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from budget_middleware import RedisLedger, format_micros, to_micros
from budget_middleware.budgets import Budget, KeyLayout
from budget_middleware.identity import EntityHasher
from budget_middleware.journal import read_unapplied
from budget_middleware.ledger import id_time_ms
from servers import ServerProcess, expected_spent, read_truth

from .load import DEFAULT_MIX, EST, SLOW_KINDS, LoadDriver, RawStream
from .procs import ChaosRedis, Replica, logged_losses
from .report import (
    FORCED_KINDS,
    GRACE_503_S,
    HANDOVER_KINDS,
    TIGHT_KINDS,
    BudgetRow,
    ChaosConfig,
    ChaosReport,
    FaultRecord,
    FaultStep,
    Lost,
    Sample,
)

__all__ = [
    "FAULT_CYCLE",
    "ChaosConfig",
    "ChaosReport",
    "FaultStep",
    "Sampler",
    "default_faults",
    "journal_unapplied",
    "replica_env",
    "run_chaos",
    "wait_for",
]

FAULT_CYCLE = (
    "sigkill",
    "redis-restart",
    "sigterm",
    "sigkill-in-outage",
    "forced-shutdown",
    "sigterm-in-outage",
    "forced-in-outage",
)
PREFIX = "chaos"
USER_LIMIT = "1000000"
TIGHT_LIMIT = "3"
TIGHT_ENTITIES = ("tight-a", "broke")
FLIGHTS = 6  # requests in flight across an empty restart
FLIGHT_PATH = "/stream?chunks=12&delay=0.25&cost=0.05"  # 3 s, 0.6 units
FORCED_GAP_S = 0.3  # between the two SIGINTs of a forced shutdown
CUTS = 2  # streams a forced or in-outage shutdown cuts off, on entities of their own
CUT_PATH_FORCED = "/stream?chunks=100&delay=0.05&cost=0.005"  # 5 s, 0.5 units
CUT_PATH_OUTAGE = "/stream?chunks=150&delay=0.1&cost=0.005"  # 15 s, 0.75 units
ENDING_PATH = "/stream?chunks=10&delay=0.1&cost=0.01"  # 1 s: ends during the outage


class Sampler:
    """Polls ``usage()`` of every budget (a ``RedisLedger`` on the same prefix) and records
    max(spent + held - limit), and any drop of ``spent`` (a Redis that lost data)."""

    def __init__(self, url: str, budgets: list[tuple[Budget, int]], origin: float) -> None:
        self.ledger = RedisLedger(url, prefix=PREFIX, socket_timeout=2.0)
        self.budgets = budgets
        self.origin = origin
        self.samples = 0
        self.errors = 0
        self.max_over: int | None = None
        self.max_over_at: Sample | None = None
        self.violations: list[Sample] = []
        self.regressions: list[tuple[Sample, int]] = []
        self._last_spent: dict[str, int] = {}
        self._losing_state = False
        self.stopped = asyncio.Event()

    def losing_state(self, losing: bool) -> None:
        """Around an empty restart (every budget's state is lost, spent starts again from zero),
        ``spent`` is not compared with what was seen before."""
        self._losing_state = losing
        self._last_spent.clear()

    async def run(self) -> None:
        try:
            while not self.stopped.is_set():
                await self.sample_once()
                await asyncio.sleep(0.02)
        finally:
            await self.ledger.aclose()

    async def sample_once(self) -> None:
        found = await asyncio.gather(
            *(self.ledger.usage(b, limit) for b, limit in self.budgets), return_exceptions=True
        )
        t = time.monotonic() - self.origin
        for (budget, _), usage in zip(self.budgets, found, strict=True):
            if isinstance(usage, BaseException):
                self.errors += 1
                continue
            self.samples += 1
            label = f"{budget.rule}:{budget.entity}"
            sample = Sample(t, label, usage.spent, usage.held, usage.limit)
            over = usage.spent + usage.held - usage.limit
            if self.max_over is None or over > self.max_over:
                self.max_over, self.max_over_at = over, sample
            if over > 0 and len(self.violations) < 50:
                self.violations.append(sample)
            if self._losing_state:
                continue
            last = self._last_spent.get(label)
            if last is not None and usage.spent < last and len(self.regressions) < 50:
                self.regressions.append((sample, last))
            self._last_spent[label] = usage.spent


# =================================================================================================
# The run
# =================================================================================================


def replica_env(lease_s: float, journal_dir: Path | None) -> dict[str, str]:
    rules = [
        {"name": "user", "key": "header:x-user", "limit": USER_LIMIT, "period": "none"},
        {"name": "tight", "key": "header:x-tight", "limit": TIGHT_LIMIT, "period": "none"},
    ]
    env = {
        "BUDGET_RULES": json.dumps(rules),
        "BUDGET_ESTIMATE": format_micros(EST),
        "BUDGET_LEASE": f"{round(lease_s * 1000)}ms",
        "BUDGET_PREFIX": PREFIX,
        "BUDGET_DRAIN_TIMEOUT": "5s",
        "BUDGET_FAIL_MODE": "closed",
    }
    if journal_dir is not None:
        env["BUDGET_JOURNAL"] = str(journal_dir)
    return env


async def wait_for(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> bool:
    """Poll ``condition`` until it holds (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


def reserve_failure_kind(reason: str) -> str:
    """``redis down`` (refused, or still loading its AOF), ``connection lost`` (a connection to a
    Redis that died, used before or after it came back), or ``other`` (a timeout, a bug)."""
    if "Connect call failed" in reason or "Error 111" in reason or "LOADING" in reason.upper():
        return "redis down"
    lost = ("Connection closed by server", "reset by peer", "Broken pipe", "Connection lost")
    if any(x in reason for x in lost):
        return "connection lost"
    return "other"


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def ended_after(path: Path, offset: int) -> list[str]:
    """Reservation ids of the "end" records the truth file at ``path`` got after byte ``offset``."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    rows = [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]
    return [r["rid"] for r in rows if r["ev"] == "end"]


def journal_unapplied(directory: Path | None) -> list[str]:
    """Reservation ids of the unapplied settlements in every journal file of ``directory``."""
    if directory is None or not directory.exists():
        return []
    out: list[str] = []
    for path in sorted(directory.glob("journal-*.jsonl")):
        try:
            out += [s.reservation_id for s in read_unapplied(path)]
        except OSError:
            continue
    return out


class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.origin = time.monotonic()
        workdir = config.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = ChaosRedis(workdir / "redis")
        self.replicas: list[Replica] = []
        for i, kind in enumerate(config.kinds):
            journal_dir = workdir / f"journal-{i}" if config.journal else None
            server = ServerProcess(
                kind,
                redis_url="redis://127.0.0.1:0/0",  # set once Redis has its port
                workdir=workdir / f"replica-{i}",
                env=replica_env(config.lease_s, journal_dir),
                graceful_s=1,
                truth_path=workdir / f"truth-{i}.jsonl",
            )
            self.replicas.append(Replica(i, server, journal_dir))
        self.empty_run = any(f.kind == "redis-empty" for f in config.faults)
        self.entities = [f"u{i}" for i in range(config.entities)]
        mix = dict(config.mix or DEFAULT_MIX)
        if self.empty_run:  # an empty restart resets the small budgets: leave them out
            mix = {k: v for k, v in mix.items() if k not in TIGHT_KINDS}
        self.mix = mix
        self.flight_entities = [f"flight-{i}" for i in range(FLIGHTS)] if self.empty_run else []
        handovers = any(f.kind in HANDOVER_KINDS for f in config.faults)
        self.cut_entities = [f"cut-{i}" for i in range(CUTS)] if handovers else []
        self.hasher = EntityHasher()
        self.layout = KeyLayout(PREFIX)
        self.report = ChaosReport(config, [r.kind for r in self.replicas])
        self.load: LoadDriver | None = None
        self.sampler: Sampler | None = None
        self.empty_since_ms = 0

    def now(self) -> float:
        return time.monotonic() - self.origin

    # -- budgets ----------------------------------------------------------------------------------

    def budgets(self) -> list[tuple[Budget, int]]:
        user, tight = to_micros(USER_LIMIT), to_micros(TIGHT_LIMIT)
        entities = [*self.entities, *self.flight_entities, *self.cut_entities]
        tight_load = bool(set(TIGHT_KINDS) & set(self.mix))
        if tight_load:
            entities += list(TIGHT_ENTITIES)
        out = [(self.budget("user", e), user) for e in entities]
        if tight_load:
            out += [(self.budget("tight", e), tight) for e in TIGHT_ENTITIES]
        return out

    def budget(self, rule: str, entity: str) -> Budget:
        return Budget(rule, self.hasher.token(entity), 0)

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        cfg = self.config
        await asyncio.to_thread(self.redis.start)
        for r in self.replicas:
            r.server.redis_url = self.redis.url
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in self.replicas))
        self.origin = time.monotonic()
        self.load = LoadDriver(
            self.replicas,
            origin=self.origin,
            requests=cfg.requests,
            duration_s=cfg.duration_s,
            concurrency=cfg.concurrency,
            lease_s=cfg.lease_s,
            entities=self.entities,
            mix=self.mix,
            seed=cfg.seed,
            sleep_scale=cfg.sleep_scale,
        )
        self.sampler = Sampler(self.redis.url, self.budgets(), self.origin)
        sampling = asyncio.create_task(self.sampler.run())
        loading = asyncio.create_task(self.load.run())
        faults = asyncio.create_task(self._faults())
        try:
            await faults
            self.load.release.set()  # the load ends at its target count / duration from here on
            await loading
            self.report.load_s = self.now()
            await self._finish()
        finally:
            for task in (faults, loading):
                task.cancel()
            self.sampler.stopped.set()
            await asyncio.gather(faults, loading, sampling, return_exceptions=True)
        self._collect()
        self.report.elapsed_s = self.now()
        return self.report

    def close(self) -> None:
        """Teardown: SIGKILL whatever is left of every process."""
        for r in self.replicas:
            r.close()
        self.redis.close()

    # -- faults -----------------------------------------------------------------------------------

    async def _faults(self) -> None:
        for step in sorted(self.config.faults, key=lambda s: s.at):
            at = step.at
            await wait_for(lambda: self.now() >= at, max(0.0, at - self.now()) + 1, 0.02)  # noqa: B023
            rec = FaultRecord(
                step.kind, step.replica if step.kind != "redis-restart" else None, self.now()
            )
            self.report.faults.append(rec)
            try:
                await getattr(self, "_fault_" + step.kind.replace("-", "_"))(step, rec)
                rec.ok = True
            except Exception as exc:  # recorded as a failure; the run goes on
                rec.detail["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                rec.t1 = self.now()
                # Whatever happened, the run goes on with Redis and every replica up.
                if not self.redis.alive:
                    await asyncio.to_thread(self.redis.start)
                for r in self.replicas:
                    if not r.server.alive:
                        await asyncio.to_thread(r.start)

    async def _redis_down(self, rec: FaultRecord, *, empty: bool = False) -> float:
        assert self.sampler is not None
        if empty:
            self.sampler.losing_state(True)
        t_down = self.now()
        await asyncio.to_thread(self.redis.kill)
        rec.detail["redis_killed_at"] = round(t_down, 3)
        if empty:
            # Reservation ids carry their creation time (ms): one made from here on can only have
            # been admitted by the empty Redis.
            self.empty_since_ms = time.time_ns() // 1_000_000
        return t_down

    async def _redis_up(self, rec: FaultRecord, t_down: float, *, empty: bool = False) -> None:
        assert self.load is not None
        assert self.sampler is not None
        rec.detail["503_seen"] = self.load.count("503", since=t_down)
        await asyncio.to_thread(self.redis.start, empty=empty)
        t_up = self.now()
        if empty:
            self.sampler.losing_state(False)
        rec.detail["outage_s"] = round(t_up - t_down, 3)
        self.report.outages.append((t_down, t_up))

    async def _wait_503(self, t_down: float, extra: Callable[[], bool] = lambda: True) -> bool:
        assert self.load is not None
        load = self.load
        return await wait_for(
            lambda: (
                load.count("503", since=t_down) >= 3
                and self.now() - t_down >= self.config.min_outage_s
                and extra()
            ),
            self.config.min_outage_s + 4.0,
        )

    async def _fault_sigkill(self, step: FaultStep, rec: FaultRecord) -> None:
        assert self.load is not None
        load, replica = self.load, self.replicas[step.replica]
        rec.detail["streams_ready"] = await wait_for(
            lambda: load.streams_in_flight(replica.index) >= 2, 5
        )
        rec.detail["streams_in_flight"] = load.streams_in_flight(replica.index)
        rec.detail["requests_in_flight"] = len(load.inflight[replica.index])
        replica.up = False
        rec.detail["pid"] = await asyncio.to_thread(replica.kill)
        await asyncio.to_thread(replica.start)

    async def _fault_sigterm(self, step: FaultStep, rec: FaultRecord) -> None:
        assert self.load is not None
        load, replica = self.load, self.replicas[step.replica]
        rec.detail["streams_ready"] = await wait_for(
            lambda: load.streams_in_flight(replica.index) >= 1, 5
        )
        rec.detail["streams_in_flight"] = load.streams_in_flight(replica.index)
        replica.up = False
        rec.detail["pid"] = replica.pid
        rec.detail["exit_code"] = await asyncio.to_thread(replica.stop)
        await asyncio.to_thread(replica.start)

    async def _fault_redis_restart(self, step: FaultStep, rec: FaultRecord) -> None:
        t_down = await self._redis_down(rec)
        rec.detail["503_ready"] = await self._wait_503(t_down)
        await self._redis_up(rec, t_down)

    async def _fault_sigkill_in_outage(self, step: FaultStep, rec: FaultRecord) -> None:
        assert self.load is not None
        load, replica = self.load, self.replicas[step.replica]
        # A stream longer than the lease in flight: it ends during the outage, its settlement queued.
        rec.detail["slow_ready"] = await wait_for(
            lambda: load.streams_in_flight(replica.index, SLOW_KINDS) >= 1, 8
        )
        t_down = await self._redis_down(rec)
        truth_offset = file_size(replica.truth_path)
        journal_dir = replica.journal_dir

        def queued() -> bool:
            if journal_dir is not None:  # settlements in the journal, unapplied
                return bool(journal_unapplied(journal_dir))
            # A request the app finished after Redis died: its settlement is queued in memory.
            return bool(ended_after(replica.truth_path, truth_offset))

        rec.detail["queued_ready"] = await self._wait_503(t_down, queued)
        rec.journaled_rids = journal_unapplied(journal_dir)
        rec.ended_rids = ended_after(replica.truth_path, truth_offset)
        rec.detail["ended_in_outage"] = len(rec.ended_rids)
        rec.detail["journaled_at_kill"] = len(rec.journaled_rids)
        rec.detail["requests_in_flight"] = len(load.inflight[replica.index])
        replica.up = False
        rec.detail["pid"] = await asyncio.to_thread(replica.kill)
        await self._redis_up(rec, t_down)
        await asyncio.to_thread(replica.start)

    async def _fault_forced_shutdown(self, step: FaultStep, rec: FaultRecord) -> None:
        assert self.load is not None
        load, replica = self.load, self.replicas[step.replica]
        if replica.kind != "uvicorn":
            raise ValueError(f"a second SIGINT forces no exit on {replica.kind}, only on uvicorn")
        rec.detail["streams_ready"] = await wait_for(
            lambda: load.streams_in_flight(replica.index) >= 2, 5
        )
        streams = await self._open_cut_streams(replica, CUT_PATH_FORCED)
        try:
            rec.detail["streams_in_flight"] = load.streams_in_flight(replica.index) + len(streams)
            rec.detail["requests_in_flight"] = len(load.inflight[replica.index]) + len(streams)
            pid = rec.detail["pid"] = replica.pid
            exit_at = time.monotonic()
            rec.detail["exit_code"] = await asyncio.to_thread(replica.force_stop, FORCED_GAP_S)
            rec.detail["exit_s"] = round(time.monotonic() - exit_at, 2)
        finally:
            await self._close_cut_streams(streams)
        self._after_handover(replica, pid, rec)
        await asyncio.to_thread(replica.start)

    async def _fault_forced_in_outage(self, step: FaultStep, rec: FaultRecord) -> None:
        replica = self.replicas[step.replica]
        if replica.kind != "uvicorn":
            raise ValueError(f"a second SIGINT forces no exit on {replica.kind}, only on uvicorn")
        streams = await self._open_cut_streams(replica, CUT_PATH_OUTAGE)
        try:
            t_down = await self._redis_down(rec)
            rec.detail["503_ready"] = await self._wait_503(t_down)
            pid = rec.detail["pid"] = replica.pid
            exit_at = time.monotonic()
            rec.detail["exit_code"] = await asyncio.to_thread(replica.force_stop, FORCED_GAP_S)
            rec.detail["exit_s"] = round(time.monotonic() - exit_at, 2)
        finally:
            await self._close_cut_streams(streams)
        self._after_handover(replica, pid, rec)
        await self._redis_up(rec, t_down)
        await asyncio.to_thread(replica.start)

    async def _fault_sigterm_in_outage(self, step: FaultStep, rec: FaultRecord) -> None:
        assert self.load is not None
        load, replica = self.load, self.replicas[step.replica]
        streams = await self._open_cut_streams(replica, CUT_PATH_OUTAGE)
        try:
            # The load's requests are refused once Redis is down: this one, admitted before, ends
            # during the outage, so at least one settlement is journaled in it.
            ending = await self._open_cut_streams(replica, ENDING_PATH, self.cut_entities[:1])
            streams += ending
            t_down = await self._redis_down(rec)
            truth_offset = file_size(replica.truth_path)
            journal_dir = replica.journal_dir
            seen: list[int] = []

            def being_journaled() -> bool:
                if journal_dir is None:  # a settlement queued in memory: no drain can apply it
                    return bool(ended_after(replica.truth_path, truth_offset))
                # Journal writes in progress: its unapplied count grew since Redis died.
                n = len(journal_unapplied(journal_dir))
                if not seen or n > seen[-1]:
                    seen.append(n)
                return len(seen) >= 2 and bool(ended_after(replica.truth_path, truth_offset))

            rec.detail["journaling_ready"] = await self._wait_503(t_down, being_journaled)
            rec.detail["unapplied_seen"] = seen
            rec.detail["ended_in_outage"] = len(ended_after(replica.truth_path, truth_offset))
            rec.detail["streams_in_flight"] = load.streams_in_flight(replica.index) + len(streams)
            pid = rec.detail["pid"] = replica.pid
            rec.detail["exit_code"] = await asyncio.to_thread(replica.stop)
        finally:
            await self._close_cut_streams(streams)
        self._after_handover(replica, pid, rec)
        await self._redis_up(rec, t_down)
        await asyncio.to_thread(replica.start)

    async def _open_cut_streams(
        self, replica: Replica, path: str, entities: Sequence[str] | None = None
    ) -> list[RawStream]:
        """Streams on the ``cut-*`` entities, one chunk read: far longer than the fault, requests
        the shutdown certainly cuts off (the load's own may all end before it)."""
        streams: list[RawStream] = []
        for entity in self.cut_entities if entities is None else entities:
            stream = await RawStream.open(replica.server.port, path, {"x-user": entity})
            streams.append(stream)
            if not await stream.read_until_chunk(0):
                raise RuntimeError(f"a stream to cut off was not admitted: {stream.data[:200]!r}")
        return streams

    async def _close_cut_streams(self, streams: list[RawStream]) -> None:
        for stream in streams:
            await stream.close()

    def _after_handover(self, replica: Replica, pid: int, rec: FaultRecord) -> None:
        """Once a forced or in-outage shutdown has exited: what it left in its journal (all of it
        must land after its restart), the requests it cut off, what it logged as lost."""
        rec.journaled_rids = journal_unapplied(replica.journal_dir)
        rec.detail["journaled_after_exit"] = len(rec.journaled_rids)
        rows = [r for r in read_truth(replica.truth_path) if r["pid"] == pid]
        rows = [r for r in rows if r["entity"] in self.cut_entities]
        ended = {r["rid"] for r in rows if r["ev"] == "end"}
        rec.detail["requests_cut"] = sum(1 for r in rows if r["ev"] == "start" and r["rid"] not in ended)
        rec.detail["logged_lost"] = logged_losses(replica.log_of(pid)).count

    async def _fault_redis_empty(self, step: FaultStep, rec: FaultRecord) -> None:
        """Requests in flight across an empty restart: streams on the flight entities, opened
        before Redis dies; some read to the end, some abandoned after the restart."""
        up = [r for r in self.replicas if r.up]
        streams: list[RawStream] = []
        try:
            for i, entity in enumerate(self.flight_entities):
                replica = up[i % len(up)]
                headers = {"x-user": entity}
                streams.append(await RawStream.open(replica.server.port, FLIGHT_PATH, headers))
            started = await asyncio.gather(*(s.read_until_chunk(0) for s in streams))
            rec.detail["flights_started"] = sum(started)
            t_down = await self._redis_down(rec, empty=True)
            rec.detail["503_ready"] = await self._wait_503(t_down)
            await self._redis_up(rec, t_down, empty=True)

            async def finish(i: int, stream: RawStream) -> None:
                if i % 3 == 2:  # abandoned mid-body, after the restart
                    seen = stream.data.count(b"chunk ")
                    await stream.read_until_chunk(seen + 1)
                else:
                    await stream.read_to_eof()

            await asyncio.gather(*(finish(i, s) for i, s in enumerate(streams)))
            rec.detail["flights_read_to_end"] = sum(1 for s in streams if s.seen(11))
        finally:
            for s in streams:
                await s.close()

    # -- the end of the run -------------------------------------------------------------------------

    async def _finish(self) -> None:
        """One lease after the load: no live hold anywhere; then stop every replica gracefully."""
        cfg, report = self.config, self.report
        assert self.sampler is not None
        ledger = RedisLedger(self.redis.url, prefix=PREFIX)
        try:
            end = self.now()
            budgets = self.budgets()
            deadline = time.monotonic() + cfg.lease_s + cfg.drain_deadline_s
            live: dict[str, tuple[int, int]] = {}
            while True:
                live = {}
                for b, limit in budgets:
                    u = await ledger.usage(b, limit)
                    if u.held or u.holds:
                        live[f"{b.rule}:{b.entity}"] = (u.held, u.holds)
                if (not live and self.now() >= end + cfg.lease_s) or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
            report.leaked_after_lease = live
            report.drained_after_s = self.now() - end
            codes = await asyncio.gather(*(asyncio.to_thread(r.stop) for r in self.replicas))
            report.exit_codes = [(r.kind, c) for r, c in zip(self.replicas, codes, strict=True)]
            for b, limit in budgets:
                await ledger.usage(b, limit)  # purges what expired meanwhile
            await self.sampler.sample_once()
        finally:
            await ledger.aclose()

    def _collect(self) -> None:
        report, load = self.report, self.load
        assert load is not None
        report.calls = len(load.calls)
        report.outcomes = load.outcomes()
        report.by_kind = load.by_kind()
        report.unexpected = [
            (c.kind, c.outcome, round(c.t0, 3)) for c in load.calls if c.outcome.startswith("unexpected")
        ]
        outages = report.outages
        for c in load.calls:
            if c.outcome != "503":
                continue
            if any(c.t0 <= up + GRACE_503_S and c.t1 >= down for down, up in outages):
                report.outage_503 += 1
            elif any(up <= c.t0 for _, up in outages):
                report.late_503.append((c.kind, c.replica, round(c.t0, 3)))
            else:
                report.unexplained_503.append((c.kind, c.replica, round(c.t0, 3), round(c.t1, 3)))
        for r in self.replicas:
            report.reserve_failures.update(reserve_failure_kind(x) for x in r.reserve_failures())
        sampler = self.sampler
        assert sampler is not None
        report.samples, report.sampler_errors = sampler.samples, sampler.errors
        report.max_over, report.max_over_at = sampler.max_over, sampler.max_over_at
        report.violations, report.regressions = sampler.violations, sampler.regressions
        report.killed_pids = [p for r in self.replicas for p in r.killed_pids]
        killed = set(report.killed_pids)
        for r in self.replicas:
            for pid in r.pids:
                if pid not in killed:
                    found = logged_losses(r.log_of(pid))
                    if found.count:
                        report.logged_lost[pid] = found
        report.journal_replayed = sum(r.journal_replayed() for r in self.replicas)
        report.journal_shelved = sum(r.journal_shelved() for r in self.replicas)
        report.journal_leftovers = [i for r in self.replicas for i in journal_unapplied(r.journal_dir)]
        self._account()

    def _account(self) -> None:
        """Spent per budget against the ground truth, minus what the tombstones say never settled."""
        report = self.report
        rows: list[dict[str, Any]] = []
        for r in self.replicas:
            rows += read_truth(r.truth_path)
        by_rid: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row.get("rid"):
                by_rid.setdefault(row["rid"], []).append(row)
        starts = {rid: next(x for x in rs if x["ev"] == "start") for rid, rs in by_rid.items()}
        report.truth_requests = len(starts)
        expected = {
            rid: expected_spent(
                by_rid[rid], unreported="zero" if start["path"] == "/raise" else "estimate"
            )
            for rid, start in starts.items()
        }
        ended = {rid for rid, rs in by_rid.items() if any(x["ev"] == "end" for x in rs)}
        pid_replica = {p: r.index for r in self.replicas for p in r.pids}
        killed = set(report.killed_pids)
        handover = {
            f.detail["pid"]: f.kind
            for f in report.faults
            if f.kind in HANDOVER_KINDS and "pid" in f.detail
        }
        lost: dict[str, Lost] = {}
        with self.redis.client() as client:
            for budget, _limit in self.budgets():
                fields = client.hgetall(self.layout.key(budget))
                spent = sum(int(v) for f, v in fields.items() if f.startswith("s:"))
                held = int(fields.get("held", 0))
                holds = [f[2:] for f in fields if f.startswith("h:")]
                tombs = [f[2:] for f in fields if f.startswith("t:")]
                done = {f[2:] for f in fields if f.startswith("d:")}
                report.recovered_all += len(done)
                entity = budget.entity.removeprefix("r:")
                flight = entity.startswith("flight-")
                mine = [rid for rid, s in starts.items() if s["entity"] == entity]
                if flight:  # every one was in flight across the empty restart: all must land
                    report.flight_rids += mine
                    report.recovered += sum(1 for rid in mine if rid in done)
                elif self.empty_run:
                    # The empty Redis knows the requests it admitted, and those admitted before
                    # whose settlement came after: applied as recovered, each remembered in done.
                    mine = [rid for rid in mine if id_time_ms(rid) >= self.empty_since_ms or rid in done]
                truth = sum(expected[rid] for rid in mine)
                counted = 0
                for rid in tombs:
                    if rid not in starts:
                        report.never_ran.append(rid)  # reserved, the app never ran it
                        continue
                    counted += expected[rid]
                    start = starts[rid]
                    lost[rid] = Lost(
                        rid,
                        start["pid"],
                        pid_replica.get(start["pid"], -1),
                        start["path"],
                        entity,
                        expected[rid],
                        rid in ended,
                        start["pid"] in killed,
                        handover.get(start["pid"], ""),
                    )
                if held or holds:
                    report.leaked_at_end[f"{budget.rule}:{budget.entity}"] = holds
                report.budgets.append(
                    BudgetRow(
                        budget.rule,
                        entity,
                        _limit,
                        spent,
                        held,
                        len(holds),
                        truth,
                        counted,
                    )
                )
        report.lost = list(lost.values())
        report.never_ran = sorted(set(report.never_ran))


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run one chaos scenario; every process is killed at the end, whatever happened."""
    run = ChaosRun(config)
    try:
        return await run.run()
    finally:
        run.close()  # synchronous: runs even when the test is cancelled


def default_faults(
    duration_s: float, replicas: int, *, cycles: int = 1, servers: Sequence[str] = ()
) -> tuple[FaultStep, ...]:
    """``cycles`` rounds of the faults of ``FAULT_CYCLE``, spread evenly over the load (the last
    step well before its end), rotating over the replicas (one further each round). ``servers``
    (the replicas' server kinds) sends the forced shutdowns to uvicorn replicas only: they force no
    exit elsewhere (see the module docstring); without it, or without a uvicorn replica, no forced
    shutdown is scheduled."""
    kinds = FAULT_CYCLE
    uvicorn = [i for i, kind in enumerate(servers) if kind == "uvicorn"]
    steps = []
    n = cycles * len(kinds)
    span = duration_s * 0.85
    for i in range(n):
        kind = kinds[i % len(kinds)]
        replica = (i + i // len(kinds)) % replicas
        if kind in FORCED_KINDS:
            if not uvicorn:
                continue
            # The rotation's replica if it runs uvicorn, else the next one that does.
            replica = next(r for r in (*range(replica, replicas), *range(replica)) if r in uvicorn)
        steps.append(FaultStep(round(span * (i + 0.4) / n, 2), kind, replica))
    return tuple(steps)
