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
3. Optionally (``--callgrind``, slow: minutes) the same in-process loop under valgrind's callgrind,
   as instructions per request: a count that CPU contention from other processes cannot inflate.
4. Optionally (``--callgrind-http``, slow: about a minute per configuration) the uvicorn process
   itself under callgrind, serving bare, memory (and floor and least with ``--floor``) over real sockets:
   an asyncio client outside valgrind sends a fixed number of requests over keep-alive connections
   (``--callgrind-http-connections``, ids round robin as above), and the instructions per request
   are the difference of two such runs (``--callgrind-http-requests LO,HI``), so start-up and
   shutdown cancel out. It counts what wrk's requests/s depend on, the HTTP parser's work and the
   RateLimit headers' included, without the noise of wall-clock runs; the table adds the
   throughput ratio the counts imply (bare/this) for a CPU-bound server. The Redis configurations
   are left out: the redis-server's own work would not be counted.

The rule is ``header:x-user`` with a limit of 10^9 units a day, so nothing is ever rejected; the
estimate is 0.00001 (10 micro-units), above the charge, so no request overruns. With two or more
CPUs the uvicorn process gets the last CPU to itself and wrk + redis-server share the others
(``--no-pin`` turns that off). ``--rounds N`` repeats the HTTP runs N times, interleaved, and
shows the best run of each configuration (the least disturbed by other processes; a "server CPU
util" well below 100% says the server did not get its CPU to itself). "bare/this server CPU" is
the throughput ratio the server CPU per request implies for a server that is CPU-bound.

    .venv/bin/python benchmarks/overhead.py                    # starts its own redis-server
    .venv/bin/python benchmarks/overhead.py --rounds 2 --duration 6 --tracing --profile
    .venv/bin/python benchmarks/overhead.py --no-http --no-inproc --callgrind --tracing
    .venv/bin/python benchmarks/overhead.py --no-http --no-inproc --no-redis --no-hot --callgrind-http
    .venv/bin/python benchmarks/overhead.py --redis-url redis://localhost:6379/15 --duration 5

With ``--redis-url`` nothing is flushed: the benchmark's keys (prefix ``overheadbench``) stay
until their TTLs (lease + horizon, a day) run out. ``--tracing`` adds the memory configuration with
an OpenTelemetry SDK ``TracerProvider`` + ``BatchSpanProcessor`` and an exporter that drops spans.
``--profile`` runs cProfile (Python functions only, so C calls are not traced) over the in-process
loop and prints the package's hottest functions; its per-request times include the profiler's own
overhead, which weighs most on functions that make many small calls: read them as a ranking.

This file is also the uvicorn app factory (``overhead:create_app``, configured by ``OVERHEAD_*``
environment variables); that is how the server subprocesses load it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import heapq
import importlib.metadata
import importlib.util
import json
import os
import platform
import pstats
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from budget_middleware import BudgetConfig, Finalizer

BENCH_DIR = Path(__file__).resolve().parent
HEADER = "x-user"
LIMIT = "1000000000"  # units a day: nothing is ever rejected
ESTIMATE = "0.00001"  # held per request (10 micro-units)
CHARGE = "0.000001"  # reported per request (1 micro-unit): a settlement with a reported cost
PREFIX = "overheadbench"

# -- the app (also loaded by the uvicorn subprocesses through create_app) -----------------------


def budget_config(redis_url: str | None) -> BudgetConfig:
    from budget_middleware import BudgetConfig, Rule

    return BudgetConfig(
        rules=(Rule("bench", f"header:{HEADER}", LIMIT, "1d"),),
        redis_url=redis_url,
        estimate=10,
        prefix=PREFIX,
    )


@dataclass
class Built:
    app: Starlette
    metered: bool

    def finalizer(self) -> Finalizer | None:
        """The finalizer the middleware made itself (the stack is built at the lifespan's start)."""
        node: Any = getattr(self.app, "middleware_stack", None)
        while node is not None:
            finalizer = getattr(node, "finalizer", None)
            if finalizer is not None:
                return finalizer  # type: ignore[no-any-return]
            node = getattr(node, "app", None)
        return None


class HeaderFloor:
    """The least a pure-ASGI middleware of this kind does, for scale: read the id header, wrap
    ``send`` and add two RateLimit-shaped headers (fixed text). No ledger, no reservation."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = next((v for k, v in scope["headers"] if k == HEADER.encode()), b"")
        scope.setdefault("state", {})["user"] = user  # handed on, as a handle would be

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    *message.get("headers", ()),
                    (b"ratelimit-policy", b'"bench";q=1000000000000;w=86400'),
                    (b"ratelimit", b'"bench";r=999999999990;t=3600'),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _LeastState:
    __slots__ = ("heap", "held", "holds", "spent")

    def __init__(self) -> None:
        self.held = 0
        self.holds: dict[str, tuple[int, int]] = {}
        self.spent: dict[int, int] = {}
        self.heap: list[tuple[int, str]] = []


_plain_micros: dict[str, int] = {}  # the few prices an app reports, parsed once


def to_micros(amount: str, what: str) -> int:
    from budget_middleware import to_micros as parse

    return parse(amount, what=what)


class _LeastHandle:
    __slots__ = ("_headers", "_send", "charged", "closed", "reported", "status")

    def __init__(self, send: Any, headers: list[tuple[bytes, bytes]]) -> None:
        self.charged = 0
        self.reported = False
        self.closed = False
        self.status = 0
        self._send: Any = send
        self._headers = headers

    def charge(self, amount: str) -> None:
        micros = _plain_micros.get(amount)
        if micros is None:
            micros = _plain_micros[amount] = to_micros(amount, what="charge")
        if self.closed:
            raise RuntimeError("charged after the settle")
        self.charged += micros
        self.reported = True

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = message.copy()
            message["headers"] = [*message.get("headers", ()), *self._headers]
        await self._send(message)


class LeastBudget:
    """For scale: the least a middleware enforcing this benchmark's budget does per request, with
    none of the package's generality: the id header's budget from a dict, a time-ordered id, a
    hold with a lease (and an expiry heap, as a purge needs) checked against spent + held, the two
    RateLimit headers with the two numbers that change, an in-flight record (as lease renewal
    needs), a handle that takes charges, and the settle in ``finally``. No exclusions, missing ids,
    rejections, telemetry checks, disconnect watching, charge header, trailers, purge or
    finalizer: whatever the package does beyond this is its price for those."""

    LIMIT = 10**15
    PERIOD_MS = 86_400_000
    LEASE_MS = 60_000
    ESTIMATE = 10
    POLICY = (b"ratelimit-policy", b'"bench";q=1000000000000000;w=86400')

    def __init__(self, app: Any) -> None:
        self.app = app
        self.states: dict[bytes, _LeastState] = {}
        self.in_flight: dict[str, tuple[_LeastState, float]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = b""
        for name, value in scope["headers"]:
            if len(name) == 6 and name == b"x-user":
                user = value
        st = self.states.get(user)
        if st is None:
            st = self.states[user] = _LeastState()
        now = time.time_ns() // 1_000_000
        rid = (now << 80 | random.getrandbits(80)).to_bytes(16, "big").hex()
        window = now - now % self.PERIOD_MS
        left = self.LIMIT - st.spent.get(window, 0) - st.held
        estimate = self.ESTIMATE
        if left <= 0 or estimate > left:
            raise RuntimeError("the benchmark's budget never runs out")
        expiry = now + self.LEASE_MS
        st.holds[rid] = (expiry, estimate)
        heapq.heappush(st.heap, (expiry, rid))
        st.held += estimate
        wait_s = -(-(window + self.PERIOD_MS - now) // 1000)
        headers = [self.POLICY, (b"ratelimit", b'"bench";r=%d;t=%d' % (left - estimate, wait_s))]
        self.in_flight[rid] = (st, time.monotonic() + self.LEASE_MS / 3000)
        handle = _LeastHandle(send, headers)
        scope.setdefault("state", {})["budget"] = handle
        try:
            await self.app(scope, receive, handle.send)
        finally:
            actual = handle.charged if handle.reported else 0 if handle.status >= 400 else estimate
            # As the package does: the handle, left in the scope's state, lets go of the server's
            # send, or scope -> handle -> send -> scope is a cycle for the collector every request.
            handle.closed = True
            handle._send = None
            del self.in_flight[rid]
            entry = st.holds.pop(rid, None)
            if entry is not None:
                st.held -= entry[1]
                if not st.holds:
                    st.heap.clear()
                elif len(st.heap) > 2 * len(st.holds) + 64:  # settled entries: compact
                    st.heap = [e for e in st.heap if e[1] in st.holds]
                    heapq.heapify(st.heap)
            if actual:
                st.spent[window] = st.spent.get(window, 0) + actual


def build_app(backend: str, redis_url: str | None = None) -> Built:
    """``backend``: bare (no middleware), floor (``HeaderFloor``), least (``LeastBudget``), memory,
    or redis. The metered ones are built as a user builds them, ``BudgetMiddleware`` given only its
    config (which makes the ledger and the finalizer), so the benchmark leans on the public API
    alone and measures any source tree (``--src``)."""
    from budget_middleware import BudgetMiddleware, get_reservation

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
                "applied": finalizer.applied,
                "outcomes": finalizer.outcomes,
                "lost": finalizer.lost,
                "spans": _exported_spans(),
            }
            print("OVERHEAD-STATS " + json.dumps(stats), file=sys.stderr, flush=True)

    chosen = charging_endpoint if metered else least_endpoint if backend == "least" else endpoint
    app = Starlette(routes=[Route("/", chosen)], middleware=middleware, lifespan=lifespan)
    built = Built(app, metered)
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


# -- processes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pin(cpus: set[int] | None) -> Any:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_server(cpus: set[int] | None) -> Iterator[str]:
    """A throwaway redis-server on a free port: no persistence, noeviction, in a temp dir."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found on PATH; install it or pass --redis-url")
    with tempfile.TemporaryDirectory(prefix="overhead-redis-") as tmp:
        port = _free_port()
        log = os.path.join(tmp, "redis.log")
        argv = [
            exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tmp, "--logfile", log,
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_pin(cpus),
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"redis-server exited with {proc.returncode}; see {log}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not answer PING within 10 s")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(proc)


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


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_choice() -> tuple[str, str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


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
    ready_s: float = 20,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """uvicorn serving ``cfg``, run by ``wrapper`` (valgrind, say) if given, with ``extra_env``
    added to its environment; stopped with SIGTERM on exit, and waited for, so the log is complete
    when the block ends."""
    loop, http = server_choice()
    port = _free_port()
    log = workdir / f"uvicorn-{cfg.name}.log"
    env = {
        **os.environ,
        "OVERHEAD_BACKEND": cfg.backend,
        "OVERHEAD_REDIS_URL": redis_url or "",
        "OVERHEAD_TRACING": "1" if cfg.tracing else "0",
        "OVERHEAD_STATS": "1",
        **(extra_env or {}),
    }
    cmd = [
        *wrapper, sys.executable, "-m", "uvicorn", "overhead:create_app", "--factory",
        "--app-dir", str(BENCH_DIR),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--loop", loop, "--http", http, "--lifespan", "on",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_pin(cpus)
        )
    server = Server(proc, port, log)
    try:
        _wait_ready(server, ready_s)
        yield server
    finally:
        # SIGTERM: graceful, the lifespan shutdown drains the finalizer and prints the stats.
        _stop(proc, timeout=15 if not wrapper else 120)


def _wait_ready(server: Server, timeout: float = 20) -> None:
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


# -- wrk -------------------------------------------------------------------------------------------

WRK_LUA = """\
-- Round robin over {users} ids in the {header} header; requests are formatted once, in init.
local users = {users}
local reqs = {{}}
local i = 0
init = function(args)
  for n = 1, users do
    reqs[n] = wrk.format(nil, nil, {{["{header}"] = "user-" .. (n - 1)}})
  end
end
request = function()
  i = i % users + 1
  return reqs[i]
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.MULTILINE)
        if m is None:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{out}")
        return m

    done = grab(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        rps=float(grab(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(grab(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(grab(r"^\s+99%\s+(\S+)").group(1)),
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def run_wrk(
    port: int, lua: Path, threads: int, conns: int, duration: int, cpus: set[int] | None
) -> WrkResult:
    cmd = [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--latency",
        "-s", str(lua), f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=_pin(cpus))
    return parse_wrk(done.stdout)


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
    lua = workdir / f"users-{cfg.users}.lua"
    if not lua.exists():
        lua.write_text(WRK_LUA.format(users=cfg.users, header=HEADER))
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
    out = HttpResult(
        cfg,
        result,
        server_cpu_us=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1e6 / n,
        redis_cpu_us=None if rcpu0 is None or rcpu1 is None else (rcpu1 - rcpu0) * 1e6 / n,
        server_util=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / wall,
        stats=server.stats(),
        warmup_requests=warmed,
    )
    return out


# -- in-process ----------------------------------------------------------------------------------


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
    issued = 0
    bad: list[int] = []

    async def one(i: int) -> None:
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await asyncio.shield(never)  # no disconnect: the client stays

        status = 0

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

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            i = issued
            issued += 1
            await one(i)
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    if bad:
        raise SystemExit(f"{len(bad)} requests answered {sorted(set(bad))}, expected 200")


@dataclass
class InprocResult:
    cfg: Cfg
    requests: int
    cpu_us: float  # process CPU per request, finalizer work included
    wall_us: float
    applied: int | None = None
    profile: list[tuple[str, float, float, float]] = field(default_factory=list)


async def measure_inproc(
    cfg: Cfg, redis_url: str | None, requests: int, concurrency: int, profile: int
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
        hot: list[tuple[str, float, float, float]] = []
        if profile:
            prof = cProfile.Profile(builtins=False)
            prof.enable()
            await drive_asgi(built.app, profile, concurrency, cfg.users)
            await settle_all()
            prof.disable()
            hot = package_hotspots(prof, profile)
    finally:
        await life.shutdown()
    return InprocResult(cfg, requests, cpu * 1e6 / requests, wall * 1e6 / requests, applied, hot)


def package_hotspots(prof: cProfile.Profile, requests: int) -> list[tuple[str, float, float, float]]:
    """(function, cumulative us/request, own us/request, calls/request) of budget_middleware's
    functions, by cumulative time. A coroutine's time counts only while it runs, not while it
    awaits I/O."""
    stats: Any = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.items():
        if "budget_middleware" not in filename:
            continue
        where = filename.split("budget_middleware/", 1)[-1]
        rows.append((f"{where}:{line} {func}", ct * 1e6 / requests, tt * 1e6 / requests, nc / requests))
    rows.sort(key=lambda r: -r[1])
    return rows


# -- report -----------------------------------------------------------------------------------------


def _cmd_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine_facts(redis_url: str | None) -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = _cmd_version(["wrk", "-v"])
    loop, http = server_choice()
    import budget_middleware

    package = Path(budget_middleware.__file__).resolve().parent
    git = _cmd_version(["git", "-C", str(package), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(package), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
    ).stdout.strip()
    source = f"{package} at {git}" + (" + uncommitted changes" if dirty else "")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "loadavg at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "uvicorn": importlib.metadata.version("uvicorn"),
        "starlette": importlib.metadata.version("starlette"),
        "loop/http": f"{loop}/{http}",
        "wrk": re.sub(r"\s*Copyright.*", "", wrk),
        "redis-server": redis_version(redis_url) if redis_url else "-",
        "budget_middleware": source,
    }


def _ratio(x: float | None, base: float | None) -> str:
    if x is None or base is None or base == 0:
        return "-"
    return f"{x / base:.2f}"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


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
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        w = r.wrk
        rows.append(
            "| "
            + " | ".join(
                [
                    r.cfg.name,
                    str(r.cfg.users),
                    f"{w.rps:,.0f}",
                    _ratio(w.rps, base.wrk.rps if base else None),
                    f"{w.p50_ms:.2f}",
                    f"{w.p99_ms:.2f}",
                    _ratio(w.p99_ms, base.wrk.p99_ms if base else None),
                    _num(r.server_cpu_us, ".0f"),
                    _ratio(base.server_cpu_us if base else None, r.server_cpu_us),
                    _num(r.redis_cpu_us, ".0f"),
                    "-" if r.server_util is None else f"{r.server_util:.0%}",
                    " / ".join(f"{x:,.0f}" for x in r.rounds_rps),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def inproc_table(results: list[InprocResult]) -> str:
    base = next((r for r in results if r.cfg.backend == "bare"), None)
    head = "| config | users | CPU us/req | added over bare us/req | wall us/req |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        added = "-" if base is None or r is base else f"{r.cpu_us - base.cpu_us:+.1f}"
        rows.append(f"| {r.cfg.name} | {r.cfg.users} | {r.cpu_us:.1f} | {added} | {r.wall_us:.1f} |")
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
        ratio = r.wrk.rps / bare.wrk.rps
        met = "MET" if ratio >= target else "NOT MET"
        line = f"{name}: {ratio:.0%} of bare throughput (target >= {target:.0%}): {met}"
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


# -- main -------------------------------------------------------------------------------------------


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """The server gets the last CPU to itself; wrk and redis-server share the others."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


# -- instruction counts under callgrind (immune to CPU contention) -------------------------------


async def run_once(cfg: Cfg, redis_url: str | None, requests: int, concurrency: int) -> None:
    """One in-process run for callgrind: warm up, then ``requests`` more, then settle everything."""
    if cfg.tracing:
        enable_tracing()
    built = build_app(cfg.backend, redis_url)
    life = Lifespan(built.app)
    await life.startup()
    try:
        for n in (300, requests):
            if n:
                await drive_asgi(built.app, n, concurrency, cfg.users)
            finalizer = built.finalizer()
            if finalizer is not None:
                await finalizer.wait_idle(60)
    finally:
        await life.shutdown()


def callgrind_instructions(cfg: Cfg, redis_url: str | None, requests: int, concurrency: int) -> int:
    """Instructions executed by the whole process (every thread) for one ``run_once``."""
    once = f"{cfg.name}:{cfg.backend}:{cfg.users}:{int(cfg.tracing)}:{requests}:{concurrency}"
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, str(Path(__file__).resolve()), "--once", once,
    ]  # fmt: skip
    if redis_url:
        cmd += ["--redis-url", redis_url]
    done = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or m is None:
        raise SystemExit(f"callgrind run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(m.group(1))


@dataclass
class IrResult:
    cfg: Cfg
    per_request: float  # instructions per request


def per_request_counts(
    cfgs: list[Cfg], lo: int, hi: int, count: Callable[[Cfg, int], int], what: str
) -> list[IrResult]:
    """Instructions per request of each configuration: ``(count(cfg, hi) - count(cfg, lo)) / (hi -
    lo)``, where ``count`` runs a whole process for that many requests."""
    out = []
    for cfg in cfgs:
        a = count(cfg, lo)
        b = count(cfg, hi)
        out.append(IrResult(cfg, (b - a) / (hi - lo)))
        print(
            f"  {what} {cfg.name:15} {out[-1].per_request:,.0f} instructions/req",
            file=sys.stderr,
            flush=True,
        )
    return out


def callgrind_all(cfgs: list[Cfg], redis_url: str | None, args: argparse.Namespace) -> list[IrResult]:
    lo, hi = args.callgrind_requests
    return per_request_counts(
        cfgs,
        lo,
        hi,
        lambda cfg, n: callgrind_instructions(cfg, redis_url, n, args.inproc_concurrency),
        "callgrind",
    )


def callgrind_table(results: list[IrResult], throughput: bool = False) -> str:
    """``throughput``: add the throughput ratio the counts imply, bare/this, for a server that is
    CPU-bound and spends its instructions at one rate whatever the configuration."""
    base = next((r for r in results if r.cfg.backend == "bare"), None)
    head = "| config | users | instructions/req | added over bare | vs bare |"
    if throughput:
        head += " implied throughput vs bare |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        added = "-" if base is None or r is base else f"{r.per_request - base.per_request:+,.0f}"
        base_ir = base.per_request if base else None
        row = (
            f"| {r.cfg.name} | {r.cfg.users} | {r.per_request:,.0f} | {added} "
            f"| {_ratio(r.per_request, base_ir)} |"
        )
        if throughput:
            row += f" {_ratio(base_ir, r.per_request)} |"
        rows.append(row)
    return "\n".join(rows)


# -- instruction counts of the uvicorn process over real sockets ---------------------------------


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
    ``requests`` requests from a client outside valgrind."""
    wrapper = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
    # A fixed hash seed, so dict layouts are the same in every run. What still varies is timing:
    # how many requests one event-loop turn finds ready, which moves the count by about 1k.
    seed = {"PYTHONHASHSEED": "0"}
    with uvicorn_server(cfg, None, workdir, None, wrapper, ready_s=300, extra_env=seed) as server:
        asyncio.run(drive_http(server.port, requests, connections, cfg.users))
    text = server.log.read_text(errors="replace")
    m = re.search(r"Collected : (\d+)", text)
    if m is None:
        raise SystemExit(f"callgrind run of uvicorn failed:\n{text[-3000:]}")
    return int(m.group(1))


def callgrind_http_all(cfgs: list[Cfg], args: argparse.Namespace) -> list[IrResult]:
    lo, hi = args.callgrind_http_requests
    with tempfile.TemporaryDirectory(prefix="overhead-cg-") as tmp:
        return per_request_counts(
            cfgs,
            lo,
            hi,
            lambda cfg, n: callgrind_http_instructions(
                cfg, n, args.callgrind_http_connections, Path(tmp)
            ),
            "callgrind http",
        )


async def inproc_all(
    cfgs: list[Cfg], redis_url: str | None, args: argparse.Namespace
) -> list[InprocResult]:
    out: list[InprocResult] = []
    # Tracing can be switched on only once per process: the tracing configurations go last.
    for cfg in sorted(cfgs, key=lambda c: c.tracing):
        if cfg.tracing:
            enable_tracing()
        runs: list[InprocResult] = []
        for _ in range(args.inproc_rounds):
            runs.append(
                await measure_inproc(
                    cfg,
                    redis_url,
                    args.inproc_requests,
                    args.inproc_concurrency,
                    # Profiled: the spread configurations without tracing (the hot ones and
                    # tracing differ in a few functions only, and profiling is slow).
                    args.profile_requests
                    if args.profile and not runs and cfg.users == args.users and not cfg.tracing
                    else 0,
                )
            )
        best = min(runs, key=lambda r: r.cpu_us)
        best.cpu_us = statistics.median(r.cpu_us for r in runs)
        best.wall_us = statistics.median(r.wall_us for r in runs)
        best.profile = runs[0].profile
        out.append(best)
        print(
            f"  in-process {cfg.name:15} {best.cpu_us:8.1f} CPU us/req (applied {best.applied})",
            file=sys.stderr,
            flush=True,
        )
    return out


def use_source_tree(src: Path) -> None:
    """Import ``budget_middleware`` from ``src`` here and in every child process (PYTHONPATH comes
    before the installed packages, an editable install's path included)."""
    src = src.resolve()
    if not (src / "budget_middleware" / "__init__.py").is_file():
        raise SystemExit(f"--src {src}: no budget_middleware/__init__.py there")
    sys.path.insert(0, str(src))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p
    )


def _lo_hi(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        help="add, for scale, a middleware that only wraps send and adds two headers (floor) and "
        "the least a middleware enforcing the budget does (least)",
    )
    p.add_argument(
        "--no-redis",
        dest="redis",
        action="store_false",
        help="skip the Redis configurations (and start no redis-server)",
    )
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin CPUs")
    p.add_argument("--no-http", dest="http", action="store_false", help="in-process only")
    p.add_argument("--no-inproc", dest="inproc", action="store_false", help="skip in-process")
    p.add_argument("--inproc-requests", type=int, default=20_000)
    p.add_argument("--inproc-concurrency", type=int, default=32)
    p.add_argument("--inproc-rounds", type=int, default=1, help="median of N in-process runs")
    p.add_argument("--profile", action="store_true", help="cProfile the in-process loop")
    p.add_argument("--profile-requests", type=int, default=5_000)
    p.add_argument("--top", type=int, default=8, help="hotspots listed per configuration")
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions per request of the in-process loop under valgrind (slow)",
    )
    p.add_argument(
        "--callgrind-requests",
        type=_lo_hi,
        default=(200, 1200),
        metavar="LO,HI",
        help="instructions/request = (Ir(HI) - Ir(LO)) / (HI - LO)",
    )
    p.add_argument(
        "--callgrind-http",
        action="store_true",
        help="count instructions per request of the uvicorn process under valgrind, over HTTP",
    )
    p.add_argument(
        "--callgrind-http-requests",
        type=_lo_hi,
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
        help="measure the package in this source tree (its src/ directory, which holds "
        "budget_middleware/) instead of the installed one: put first on the path of this process "
        "and of every server it starts",
    )
    p.add_argument("--once", help=argparse.SUPPRESS)  # internal: one callgrind run
    args = p.parse_args()
    if args.src is not None:
        use_source_tree(args.src)
    if args.once:
        name, backend, users, tracing, requests, conc = args.once.split(":")
        cfg = Cfg(name, backend, int(users), tracing == "1")
        asyncio.run(run_once(cfg, args.redis_url, int(requests), int(conc)))
        return
    if args.http and shutil.which("wrk") is None:
        raise SystemExit("wrk not found on PATH (or pass --no-http)")
    if (args.callgrind or args.callgrind_http) and shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found on PATH (needed by --callgrind and --callgrind-http)")

    cfgs = configurations(args)
    server_cpus, client_cpus = split_cpus(args.pin)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url
        if redis_url is None and any(c.backend == "redis" for c in cfgs):
            redis_url = stack.enter_context(redis_server(client_cpus))
        facts = machine_facts(redis_url)
        print("argv: " + " ".join(sys.argv))
        print("; ".join(f"{k} {v}" for k, v in facts.items()))
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
        http_results: list[HttpResult] = []
        if args.http:
            runs: dict[Cfg, list[HttpResult]] = {cfg: [] for cfg in cfgs}
            with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
                # Rounds interleave the configurations, so drift and neighbours hit them alike.
                for rnd in range(args.rounds):
                    for cfg in cfgs:
                        hr = measure_http(cfg, args, redis_url, Path(tmp), server_cpus, client_cpus)
                        runs[cfg].append(hr)
                        print(
                            f"  http round {rnd + 1} {cfg.name:15} {hr.wrk.rps:>9,.0f} req/s  "
                            f"p50 {hr.wrk.p50_ms:.2f} ms  p99 {hr.wrk.p99_ms:.2f} ms  "
                            f"server {_num(hr.server_cpu_us, '.0f')} us/req  "
                            f"load {os.getloadavg()[0]:.2f}",
                            file=sys.stderr,
                            flush=True,
                        )
            for cfg in cfgs:
                http_results.append(best_run(runs[cfg]))
        inproc = asyncio.run(inproc_all(cfgs, redis_url, args)) if args.inproc else []
        irs = callgrind_all(cfgs, redis_url, args) if args.callgrind else []
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
    if irs:
        lo, hi = args.callgrind_requests
        print()
        print(
            "Instructions per request under callgrind (the in-process loop, every thread, "
            f"(Ir({hi}) - Ir({lo})) / {hi - lo}; the redis-server's own work is not counted):"
        )
        print(callgrind_table(irs))
    if http_irs:
        lo, hi = args.callgrind_http_requests
        _, parser = server_choice()
        print()
        print(
            f"Instructions per request of the uvicorn process under callgrind ({parser}, "
            f"{args.callgrind_http_connections} keep-alive connections from a client outside "
            f"valgrind, (Ir({hi}) - Ir({lo})) / {hi - lo}; start-up and shutdown cancel out):"
        )
        print(callgrind_table(http_irs, throughput=True))
    if args.profile:
        for r in inproc:
            if not r.profile:
                continue
            print()
            print(
                f"cProfile, {r.cfg.name} ({args.profile_requests} requests): budget_middleware "
                "functions by cumulative us/request (own us/request, calls/request)"
            )
            for name, cum, own, calls in r.profile[: args.top]:
                print(f"  {cum:7.2f} us  ({own:6.2f} own, {calls:5.2f} calls)  {name}")
            by_own = sorted(r.profile, key=lambda x: -x[2])[: args.top]
            print(
                "  by own time: " + ", ".join(f"{n.split(' ')[-1]} {o:.2f}" for n, _c, o, _n in by_own)
            )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; loadavg at end {load}")


if __name__ == "__main__":
    main()
