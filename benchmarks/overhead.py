"""HTTP overhead of BudgetMiddleware: bare Starlette vs the memory ledger vs a real redis-server.

One trivial endpoint (``GET /`` answering ``{"ok":true}``; the metered configurations also call
``get_reservation(request).charge("0.000001")``, so every request ends in a settlement with a
reported cost) is measured in up to three ways, every configuration side by side in one run:

1. Over HTTP: each configuration is served by uvicorn (one worker, ``--no-access-log``, the asyncio
   loop and the h11 parser unless uvloop / httptools are installed) in a subprocess on a free port,
   driven by ``wrk --latency`` (a short warm-up run first). A wrk Lua script sets ``x-user`` per
   request, round robin over ``--users`` ids ("spread"); the "hot" variants send one id. Requests/s,
   p50 and p99 come from wrk; server CPU per request from ``/proc/<pid>/stat`` of the uvicorn
   process and, for Redis, from ``INFO cpu`` of the redis-server.
2. In-process, without the network: the same ASGI app driven directly with hand-written
   ``receive``/``send`` (``--inproc-requests`` requests over ``--inproc-concurrency`` tasks, after
   its lifespan startup), timed with ``time.process_time()`` until the finalizer is idle, so the
   settlement work (the Redis pipeline, spans) is inside the clock. Reported as CPU microseconds
   per request and as what each configuration adds over bare.
3. Optionally (``--callgrind-http``, slow: about a minute per configuration) the uvicorn process
   itself under valgrind's callgrind, serving bare, memory (and floor and least with ``--floor``)
   over real sockets: an asyncio client outside valgrind sends a fixed number of requests over
   keep-alive connections (``--callgrind-http-connections``, ids round robin as above), and the
   instructions per request are the difference of two such runs (``--callgrind-http-requests
   LO,HI``), so start-up and shutdown cancel out. It counts what wrk's requests/s depend on, the
   HTTP parser's work and the RateLimit headers' included, and other processes on the machine
   cannot move it; the table adds the throughput ratio the counts imply (bare/this) for a
   CPU-bound server. The Redis configurations are left out: the redis-server's work would not be
   counted.

The rule is ``header:x-user`` with a limit of 10^9 units a day, so nothing is ever rejected; the
estimate is 0.00001 (10 micro-units), above the charge, so no request overruns. The metered
configurations are built as a user builds them, ``BudgetMiddleware`` given only its config, so the
script leans on the public API alone and ``--src DIR`` measures the package of another source tree
with the same harness. ``--floor`` adds the measuring sticks of ``sticks.py``. With two or more CPUs
the uvicorn process gets the last CPU to itself and wrk + redis-server share the others (``--no-pin``
turns that off). ``--rounds N`` repeats the HTTP runs N times, interleaved, and shows the best run of
each configuration (the least disturbed by other processes; a "server CPU util" well below 100% says
the server did not get its CPU to itself).

    .venv/bin/python benchmarks/overhead.py                    # starts its own redis-server
    .venv/bin/python benchmarks/overhead.py --no-redis --no-hot --floor --rounds 5 --no-inproc
    .venv/bin/python benchmarks/overhead.py --no-http --no-inproc --no-redis --no-hot --callgrind-http
    .venv/bin/python benchmarks/overhead.py --no-http --no-inproc --no-redis --no-hot --callgrind-http \\
        --src ../other-worktree/src
    .venv/bin/python benchmarks/overhead.py --redis-url redis://localhost:6379/15 --duration 5

With ``--redis-url`` nothing is flushed: the benchmark's keys (prefix ``overheadbench``) stay
until their TTLs (lease + horizon, a day) run out. ``--tracing`` adds the memory configuration with
an OpenTelemetry SDK ``TracerProvider`` + ``BatchSpanProcessor`` and an exporter that drops spans.

This file is also the uvicorn app factory (``overhead:create_app``, configured by ``OVERHEAD_*``
environment variables); that is how the server subprocesses load it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import (  # noqa: E402  (benchmarks/ is not a package)
    CALLGRIND,
    WrkResult,
    callgrind_collected,
    free_port,
    lo_hi,
    machine_facts,
    num,
    over_tasks,
    per_item,
    pin,
    print_facts,
    proc_cpu_s,
    progress,
    ratio,
    redis_server,
    run_wrk,
    server_choice,
    split_cpus,
    stop,
    table_row,
    table_start,
    use_source_tree,
    uvicorn_command,
    wrk_script,
)
from sticks import HeaderFloor, LeastBudget  # noqa: E402

if TYPE_CHECKING:
    from budget_middleware import BudgetConfig, Finalizer

HEADER = "x-user"
LIMIT = "1000000000"  # units a day: nothing is ever rejected
CHARGE = "0.000001"  # reported per request (1 micro-unit): a settlement with a reported cost
PREFIX = "overheadbench"

# -- the app (also loaded by the uvicorn subprocesses through create_app) -----------------------


def budget_config(redis_url: str | None) -> BudgetConfig:
    from budget_middleware import BudgetConfig, Rule

    return BudgetConfig(
        rules=(Rule("bench", f"header:{HEADER}", LIMIT, "1d"),),
        redis_url=redis_url,
        estimate=10,  # micro-units held per request, above the charge
        prefix=PREFIX,
    )


@dataclass
class Built:
    app: Starlette

    def finalizer(self) -> Finalizer | None:
        """The finalizer the middleware made itself (the stack is built at the lifespan's start)."""
        node: Any = getattr(self.app, "middleware_stack", None)
        while node is not None:
            finalizer = getattr(node, "finalizer", None)
            if finalizer is not None:
                return finalizer  # type: ignore[no-any-return]
            node = getattr(node, "app", None)
        return None


def build_app(backend: str, redis_url: str | None = None) -> Built:
    """``backend``: bare (no middleware), floor (``HeaderFloor``), least (``LeastBudget``), memory,
    or redis."""
    import budget_middleware
    from budget_middleware import BudgetMiddleware, get_reservation

    package = os.path.dirname(os.path.realpath(budget_middleware.__file__))  # for the stats
    metered = backend not in ("bare", "floor", "least")

    # Which endpoint is chosen here, so bare's does nothing per request but answer.
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def charging_endpoint(request: Request) -> JSONResponse:
        get_reservation(request).charge(CHARGE)
        return JSONResponse({"ok": True})

    async def least_endpoint(request: Request) -> JSONResponse:
        request.scope["state"]["budget"].charge(CHARGE)  # as get_reservation finds the handle
        return JSONResponse({"ok": True})

    middleware: list[Middleware] = []
    if backend == "floor":
        middleware.append(Middleware(HeaderFloor))
    if backend == "least":
        middleware.append(Middleware(LeastBudget))
    if metered:
        if backend == "redis" and not redis_url:
            raise SystemExit("the redis configuration needs a redis url")
        config = budget_config(redis_url if backend == "redis" else None)
        middleware.append(Middleware(BudgetMiddleware, config=config))
    built: Built

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # The middleware drains the finalizer before the app's shutdown runs: the counts are final.
        finalizer = built.finalizer()
        if finalizer is not None and os.environ.get("OVERHEAD_STATS"):
            stats = {
                "package": package,
                "applied": finalizer.applied,
                "outcomes": finalizer.outcomes,
                "lost": finalizer.lost,
                "spans": _exported_spans(),
            }
            print("OVERHEAD-STATS " + json.dumps(stats), file=sys.stderr, flush=True)

    chosen = charging_endpoint if metered else least_endpoint if backend == "least" else endpoint
    app = Starlette(routes=[Route("/", chosen)], middleware=middleware, lifespan=lifespan)
    built = Built(app)
    return built


_EXPORTER: Any = None


def enable_tracing() -> None:
    """The OTel SDK: a TracerProvider with a BatchSpanProcessor and an exporter that drops spans."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class CountingExporter(SpanExporter):
        def __init__(self) -> None:
            self.count = 0

        def export(self, spans: Any) -> SpanExportResult:
            self.count += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    global _EXPORTER
    _EXPORTER = CountingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)


def _exported_spans() -> int | None:
    if _EXPORTER is None:
        return None
    from opentelemetry import trace

    provider: Any = trace.get_tracer_provider()
    provider.force_flush()
    return int(_EXPORTER.count)


def create_app() -> Starlette:
    """The uvicorn factory: ``OVERHEAD_BACKEND``, ``OVERHEAD_REDIS_URL``, ``OVERHEAD_TRACING``."""
    if os.environ.get("OVERHEAD_TRACING") == "1":
        enable_tracing()
    backend = os.environ.get("OVERHEAD_BACKEND", "bare")
    return build_app(backend, os.environ.get("OVERHEAD_REDIS_URL") or None).app


# -- configurations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cfg:
    name: str
    backend: str  # bare | floor | least | memory | redis
    users: int
    tracing: bool = False


def configurations(args: argparse.Namespace) -> list[Cfg]:
    cfgs = [
        Cfg("bare", "bare", args.users),
        Cfg("memory", "memory", args.users),
        Cfg("redis", "redis", args.users),
    ]
    if args.floor:
        cfgs[1:1] = [Cfg("floor", "floor", args.users), Cfg("least", "least", args.users)]
    if args.hot:
        cfgs += [Cfg("memory-hot", "memory", 1), Cfg("redis-hot", "redis", 1)]
    if args.tracing:
        cfgs.append(Cfg("memory+tracing", "memory", args.users, tracing=True))
    if not args.redis:
        cfgs = [c for c in cfgs if c.backend != "redis"]
    return cfgs


# -- the uvicorn server ------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stats(self) -> dict[str, Any] | None:
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("OVERHEAD-STATS "):
                result: dict[str, Any] = json.loads(line.removeprefix("OVERHEAD-STATS "))
                return result
        return None


@contextlib.contextmanager
def uvicorn_server(
    cfg: Cfg,
    redis_url: str | None,
    workdir: Path,
    cpus: set[int] | None,
    wrapper: tuple[str, ...] = (),
) -> Iterator[Server]:
    """uvicorn serving ``cfg``, run by ``wrapper`` (valgrind) if given; stopped with SIGTERM on
    exit, and waited for, so the log is complete when the block ends. A fixed hash seed, so dict
    layouts are the same in every run (for the instruction counts)."""
    port = free_port()
    log = workdir / f"uvicorn-{cfg.name}.log"
    env = {
        **os.environ,
        "OVERHEAD_BACKEND": cfg.backend,
        "OVERHEAD_REDIS_URL": redis_url or "",
        "OVERHEAD_TRACING": "1" if cfg.tracing else "0",
        "OVERHEAD_STATS": "1",
        "PYTHONHASHSEED": "0",
    }
    cmd = [*wrapper, *uvicorn_command("overhead:create_app", BENCH_DIR, port, factory=True)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin(cpus))
    server = Server(proc, port, log)
    try:
        _wait_ready(server, 300 if wrapper else 20)
        yield server
    finally:
        # SIGTERM: graceful, the lifespan shutdown drains the finalizer and prints the stats.
        stop(proc, timeout=120 if wrapper else 15)


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    request = f"GET / HTTP/1.1\r\nhost: bench\r\n{HEADER}: ready\r\nconnection: close\r\n\r\n"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"uvicorn exited early:\n{server.log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
                s.sendall(request.encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"uvicorn not ready in {timeout} s:\n{server.log.read_text(errors='replace')}")


# -- 1. over HTTP, with wrk ------------------------------------------------------------------------


def redis_cpu_s(url: str) -> float | None:
    """used_cpu_user + used_cpu_sys of the redis-server (None if unreachable)."""
    import redis

    try:
        client = redis.Redis.from_url(url)
        info: dict[str, Any] = client.info("cpu")
        client.close()
    except redis.RedisError:
        return None
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class HttpResult:
    cfg: Cfg
    wrk: WrkResult
    server_cpu_us: float | None  # uvicorn process CPU per request
    redis_cpu_us: float | None  # redis-server CPU per request
    server_util: float | None  # uvicorn CPU seconds / wall seconds
    stats: dict[str, Any] | None = None
    warmup_requests: int = 0
    rounds_rps: list[float] = field(default_factory=list)  # every round's req/s, in order


def measure_http(
    cfg: Cfg,
    args: argparse.Namespace,
    redis_url: str | None,
    workdir: Path,
    server_cpus: set[int] | None,
    client_cpus: set[int] | None,
) -> HttpResult:
    lua = wrk_script(workdir, cfg.users, HEADER)
    with uvicorn_server(cfg, redis_url, workdir, server_cpus) as server:
        warmed = 0
        if args.warmup > 0:
            warm = run_wrk(server.port, lua, args.threads, args.connections, args.warmup, client_cpus)
            warmed = warm.requests
        cpu0 = proc_cpu_s(server.proc.pid)
        rcpu0 = redis_cpu_s(redis_url) if cfg.backend == "redis" and redis_url else None
        wall0 = time.perf_counter()
        result = run_wrk(server.port, lua, args.threads, args.connections, args.duration, client_cpus)
        wall = time.perf_counter() - wall0
        cpu1 = proc_cpu_s(server.proc.pid)
        rcpu1 = redis_cpu_s(redis_url) if rcpu0 is not None and redis_url else None
    n = max(result.requests, 1)
    check_package(server)
    return HttpResult(
        cfg,
        result,
        server_cpu_us=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1e6 / n,
        redis_cpu_us=None if rcpu0 is None or rcpu1 is None else (rcpu1 - rcpu0) * 1e6 / n,
        server_util=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / wall,
        stats=server.stats(),
        warmup_requests=warmed,
    )


def http_rounds(
    cfgs: list[Cfg], args: argparse.Namespace, redis_url: str | None, pinned: tuple[Any, Any]
) -> list[HttpResult]:
    """``--rounds`` rounds over the configurations, interleaved, so drift and neighbours hit them
    alike; the best run of each."""
    runs: dict[Cfg, list[HttpResult]] = {cfg: [] for cfg in cfgs}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for rnd in range(args.rounds):
            for cfg in cfgs:
                hr = measure_http(cfg, args, redis_url, Path(tmp), *pinned)
                runs[cfg].append(hr)
                progress(
                    f"  http round {rnd + 1} {cfg.name:15} {hr.wrk.rps:>9,.0f} req/s  "
                    f"p50 {hr.wrk.p50_ms:.2f} ms  p99 {hr.wrk.p99_ms:.2f} ms  "
                    f"server {num(hr.server_cpu_us, '.0f')} us/req  "
                    f"load {os.getloadavg()[0]:.2f}"
                )
    return [best_run(runs[cfg]) for cfg in cfgs]


def best_run(runs: list[HttpResult]) -> HttpResult:
    """The run with the most req/s: other processes on the machine can only slow a run down, so
    the best of N is the least disturbed one (every round's req/s is shown beside it)."""
    chosen = max(runs, key=lambda r: r.wrk.rps)
    chosen.rounds_rps = [r.wrk.rps for r in runs]
    return chosen


def http_table(results: list[HttpResult]) -> str:
    base = next((r for r in results if r.cfg.backend == "bare"), None)
    head = (
        "| config | users | req/s | vs bare | p50 ms | p99 ms | p99 vs bare "
        "| server CPU us/req | bare/this server CPU | redis CPU us/req | server CPU util "
        "| req/s of each round |"
    )
    rows = table_start(head)
    for r in results:
        w = r.wrk
        cells = [
            r.cfg.name,
            str(r.cfg.users),
            f"{w.rps:,.0f}",
            ratio(w.rps, base.wrk.rps if base else None),
            f"{w.p50_ms:.2f}",
            f"{w.p99_ms:.2f}",
            ratio(w.p99_ms, base.wrk.p99_ms if base else None),
            num(r.server_cpu_us, ".0f"),
            ratio(base.server_cpu_us if base else None, r.server_cpu_us),
            num(r.redis_cpu_us, ".0f"),
            num(r.server_util, ".0%"),
            " / ".join(f"{x:,.0f}" for x in r.rounds_rps),
        ]
        rows.append(table_row(cells))
    return "\n".join(rows)


def verdict(results: list[HttpResult]) -> list[str]:
    by = {r.cfg.name: r for r in results}
    bare = by.get("bare")
    lines: list[str] = []
    if bare is None:
        return lines
    for name, target in (("memory", 0.90), ("redis", 0.50)):
        r = by.get(name)
        if r is None:
            continue
        share = r.wrk.rps / bare.wrk.rps
        line = f"{name}: {share:.0%} of bare throughput (target >= {target:.0%}): "
        line += "MET" if share >= target else "NOT MET"
        if r.server_cpu_us and bare.server_cpu_us:
            line += f"; server CPU per request implies {bare.server_cpu_us / r.server_cpu_us:.0%}"
        lines.append(line)
    return lines


def checks(results: list[HttpResult]) -> list[str]:
    """Did every request succeed, and did the metered servers settle what they admitted?"""
    lines = []
    for r in results:
        w = r.wrk
        note = (
            f"{r.cfg.name}: {w.requests} requests, {w.non_2xx} non-2xx, {w.socket_errors} socket errors"
        )
        if r.stats is not None:
            sent = w.requests + r.warmup_requests + 1  # + the readiness probe
            note += (
                f"; finalizer applied {r.stats['applied']} settlements for about {sent} requests "
                f"(wrk does not count the replies cut off at its end), outcomes "
                f"{r.stats['outcomes']}, lost {r.stats['lost']}"
            )
            if r.stats.get("spans") is not None:
                note += f", spans exported {r.stats['spans']}"
        lines.append(note)
    return lines


# -- 2. in-process ---------------------------------------------------------------------------------


class Lifespan:
    """Drives an ASGI app's lifespan by hand."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.events: dict[str, asyncio.Event] = {}
        self.task: asyncio.Task[None] | None = None

    def _event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"].endswith(".failed"):
            raise SystemExit(f"lifespan failed: {message}")
        self._event(message["type"]).set()

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.queue.get, self._send))
        await self.queue.put({"type": "lifespan.startup"})
        await self._event("lifespan.startup.complete").wait()

    async def shutdown(self) -> None:
        await self.queue.put({"type": "lifespan.shutdown"})
        await self._event("lifespan.shutdown.complete").wait()
        assert self.task is not None
        await self.task


async def drive_asgi(app: Any, requests: int, concurrency: int, users: int) -> None:
    """``requests`` GET / over ``concurrency`` tasks, each yielding to the loop once a request
    (as a server would between requests), so the finalizer runs interleaved, not only at the end."""
    headers = [[(b"host", b"bench"), (HEADER.encode(), f"user-{i}".encode())] for i in range(users)]
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    bad: list[int] = []

    async def one(i: int) -> None:
        received = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await asyncio.shield(never)  # no disconnect: the client stays

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/",
            "raw_path": b"/",
            "root_path": "",
            "query_string": b"",
            "headers": headers[i % users],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        await app(scope, receive, send)
        if status != 200:
            bad.append(status)

    await over_tasks(requests, concurrency, one, yield_each=True)
    if bad:
        raise SystemExit(f"{len(bad)} requests answered {sorted(set(bad))}, expected 200")


@dataclass
class InprocResult:
    cfg: Cfg
    cpu_us: float  # process CPU per request, finalizer work included
    wall_us: float
    applied: int | None = None


async def measure_inproc(
    cfg: Cfg, redis_url: str | None, requests: int, concurrency: int
) -> InprocResult:
    built = build_app(cfg.backend, redis_url)
    life = Lifespan(built.app)
    await life.startup()
    finalizer = built.finalizer()

    async def settle_all() -> None:
        if finalizer is not None and not await finalizer.wait_idle(30):
            raise SystemExit(f"{cfg.name}: the finalizer did not go idle in 30 s")

    try:
        # Warm up: imports, Redis connections and scripts, the budgets' state.
        await drive_asgi(built.app, max(1_000, requests // 10), concurrency, cfg.users)
        await settle_all()
        applied0 = finalizer.applied if finalizer else 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await drive_asgi(built.app, requests, concurrency, cfg.users)
        await settle_all()
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        applied = finalizer.applied - applied0 if finalizer else None
    finally:
        await life.shutdown()
    return InprocResult(cfg, cpu * 1e6 / requests, wall * 1e6 / requests, applied)


async def inproc_all(
    cfgs: list[Cfg], redis_url: str | None, args: argparse.Namespace
) -> list[InprocResult]:
    out: list[InprocResult] = []
    # Tracing can be switched on only once per process: the tracing configurations go last.
    for cfg in sorted(cfgs, key=lambda c: c.tracing):
        if cfg.tracing:
            enable_tracing()
        runs = [
            await measure_inproc(cfg, redis_url, args.inproc_requests, args.inproc_concurrency)
            for _ in range(args.inproc_rounds)
        ]
        best = runs[0]
        best.cpu_us = statistics.median(r.cpu_us for r in runs)
        best.wall_us = statistics.median(r.wall_us for r in runs)
        out.append(best)
        progress(f"  in-process {cfg.name:15} {best.cpu_us:8.1f} CPU us/req (applied {best.applied})")
    return out


def inproc_table(results: list[InprocResult]) -> str:
    base = next((r for r in results if r.cfg.backend == "bare"), None)
    head = "| config | users | CPU us/req | added over bare us/req | wall us/req |"
    rows = table_start(head)
    for r in results:
        added = "-" if base is None or r is base else f"{r.cpu_us - base.cpu_us:+.1f}"
        rows.append(f"| {r.cfg.name} | {r.cfg.users} | {r.cpu_us:.1f} | {added} | {r.wall_us:.1f} |")
    return "\n".join(rows)


# -- 3. instruction counts of the uvicorn process, under callgrind ---------------------------------


async def drive_http(port: int, requests: int, connections: int, users: int) -> None:
    """``requests`` GETs over ``connections`` keep-alive connections, one at a time on each, ids
    round robin over ``users`` as wrk's script sends them; every answer must be a 200."""
    per = requests // connections

    async def one(c: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for j in range(per):
                user = (c * per + j) % users
                writer.write(f"GET / HTTP/1.1\r\nhost: bench\r\n{HEADER}: user-{user}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"unexpected answer: {head!r}")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
        finally:
            writer.close()

    await asyncio.gather(*(one(c) for c in range(connections)))


def callgrind_http_instructions(cfg: Cfg, requests: int, connections: int, workdir: Path) -> int:
    """Instructions of the uvicorn process (every thread, start-up and shutdown included) serving
    ``requests`` requests from a client outside valgrind. What varies from run to run is timing:
    how many requests one event-loop turn finds ready, which moves the count by about 1k."""
    with uvicorn_server(cfg, None, workdir, None, CALLGRIND) as server:
        asyncio.run(drive_http(server.port, requests, connections, cfg.users))
    text = server.log.read_text(errors="replace")
    count = callgrind_collected(text)
    if count is None:
        raise SystemExit(f"callgrind run of uvicorn failed:\n{text[-3000:]}")
    check_package(server)
    return count


def check_package(server: Server) -> None:
    """The server measured the package this process imported (``--src`` reaches the servers)."""
    import budget_middleware

    stats = server.stats()
    here = os.path.dirname(os.path.realpath(budget_middleware.__file__))
    if stats is not None and stats.get("package") != here:
        raise SystemExit(f"the server imported {stats.get('package')}, this process {here}")


@dataclass
class IrResult:
    cfg: Cfg
    per_request: float  # instructions per request


def callgrind_http_all(cfgs: list[Cfg], args: argparse.Namespace) -> list[IrResult]:
    lo, hi = args.callgrind_http_requests
    out = []
    with tempfile.TemporaryDirectory(prefix="overhead-cg-") as tmp:
        for cfg in cfgs:

            def count(n: int, cfg: Cfg = cfg) -> int:
                return callgrind_http_instructions(cfg, n, args.callgrind_http_connections, Path(tmp))

            out.append(IrResult(cfg, per_item(lo, hi, count)))
            progress(f"  callgrind http {cfg.name:15} {out[-1].per_request:,.0f} instructions/req")
    return out


def callgrind_table(results: list[IrResult]) -> str:
    """With the throughput ratio the counts imply, bare/this, for a server that is CPU-bound and
    spends its instructions at one rate whatever the configuration."""
    base = next((r for r in results if r.cfg.backend == "bare"), None)
    base_ir = base.per_request if base else None
    head = (
        "| config | users | instructions/req | added over bare | vs bare | implied throughput vs bare |"
    )
    rows = table_start(head)
    for r in results:
        added = "-" if base is None or r is base else f"{r.per_request - base.per_request:+,.0f}"
        rows.append(
            f"| {r.cfg.name} | {r.cfg.users} | {r.per_request:,.0f} | {added} "
            f"| {ratio(r.per_request, base_ir)} | {ratio(base_ir, r.per_request)} |"
        )
    return "\n".join(rows)


# -- main -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--redis-url", help="use this Redis instead of starting a redis-server")
    p.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of the wrk warm-up run (0: none)")
    p.add_argument(
        "--rounds", type=int, default=1, help="interleaved HTTP rounds; the best run is shown"
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--users", type=int, default=100, help="distinct x-user ids (spread)")
    p.add_argument("--no-hot", dest="hot", action="store_false", help="skip the one-user runs")
    p.add_argument("--tracing", action="store_true", help="add memory with the OTel SDK on")
    p.add_argument(
        "--floor",
        action="store_true",
        help="add the measuring sticks of sticks.py: a middleware that only wraps send and adds "
        "two headers (floor), and the least a middleware enforcing the budget does (least)",
    )
    p.add_argument(
        "--no-redis",
        dest="redis",
        action="store_false",
        help="skip the Redis configurations (and start no redis-server)",
    )
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin CPUs")
    p.add_argument("--no-http", dest="http", action="store_false", help="no wrk runs")
    p.add_argument("--no-inproc", dest="inproc", action="store_false", help="skip in-process")
    p.add_argument("--inproc-requests", type=int, default=20_000)
    p.add_argument("--inproc-concurrency", type=int, default=32)
    p.add_argument("--inproc-rounds", type=int, default=1, help="median of N in-process runs")
    p.add_argument(
        "--callgrind-http",
        action="store_true",
        help="count instructions per request of the uvicorn process under valgrind, over HTTP",
    )
    p.add_argument(
        "--callgrind-http-requests",
        type=lo_hi,
        default=(400, 2400),
        metavar="LO,HI",
        help="instructions/request = (Ir(HI) - Ir(LO)) / (HI - LO), each a whole uvicorn run",
    )
    p.add_argument(
        "--callgrind-http-connections",
        type=int,
        default=8,
        help="keep-alive connections of the --callgrind-http client (they divide LO and HI)",
    )
    p.add_argument(
        "--src",
        type=Path,
        help="measure the package in this source tree (its src/ folder, which holds "
        "budget_middleware/) instead of the installed one, here and in every server started",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.src is not None:
        use_source_tree(args.src)
    if args.http and shutil.which("wrk") is None:
        raise SystemExit("wrk not found on PATH (or pass --no-http)")
    if args.callgrind_http and shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found on PATH (needed by --callgrind-http)")

    cfgs = configurations(args)
    server_cpus, client_cpus = split_cpus(args.pin)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url
        if redis_url is None and any(c.backend == "redis" for c in cfgs):
            redis_url = stack.enter_context(redis_server(client_cpus))
        facts = machine_facts(redis_url)
        print_facts(facts)
        if args.http:
            pinning = (
                f"uvicorn on CPU {sorted(server_cpus)}, wrk + redis-server on {sorted(client_cpus)}"
                if server_cpus and client_cpus
                else "none"
            )
            print(
                f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency "
                f"(warm-up {args.warmup:g}s) x {args.rounds} round(s); {args.users} users spread, "
                f"1 hot; uvicorn 1 worker {facts['loop/http']}; pinning: {pinning}",
                flush=True,
            )
        pinned = (server_cpus, client_cpus)
        http_results = http_rounds(cfgs, args, redis_url, pinned) if args.http else []
        inproc = asyncio.run(inproc_all(cfgs, redis_url, args)) if args.inproc else []
        # The redis-server's work would not be counted: the Redis configurations are left out.
        http_cfgs = [c for c in cfgs if c.backend != "redis"]
        http_irs = callgrind_http_all(http_cfgs, args) if args.callgrind_http else []

    print()
    if http_results:
        print("HTTP (uvicorn + wrk):")
        print(http_table(http_results))
        print()
        for line in verdict(http_results):
            print(line)
        for line in checks(http_results):
            print("check: " + line)
        print()
    if inproc:
        print(
            f"In-process (ASGI app driven directly, {args.inproc_requests} requests over "
            f"{args.inproc_concurrency} tasks, time.process_time() until the finalizer is idle):"
        )
        print(inproc_table(inproc))
    if http_irs:
        lo, hi = args.callgrind_http_requests
        _, parser = server_choice()
        print()
        print(
            f"Instructions per request of the uvicorn process under callgrind ({parser}, "
            f"{args.callgrind_http_connections} keep-alive connections from a client outside "
            f"valgrind, (Ir({hi}) - Ir({lo})) / {hi - lo}; start-up and shutdown cancel out):"
        )
        print(callgrind_table(http_irs))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; loadavg at end {load}")


if __name__ == "__main__":
    main()
