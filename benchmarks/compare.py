"""Side by side with the peers: bare FastAPI, BudgetMiddleware, slowapi, fastapi-limiter, naive.

One run, one machine, one trivial FastAPI endpoint (``GET /`` answering ``{"ok":true}`` and
reporting its cost in an ``x-budget-charge`` header), one load generator and one real redis-server
(started here on a free port, ``--save "" --appendonly no``). Configurations, each an app module
in ``benchmarks/apps/`` served by uvicorn (one worker, ``--no-access-log``):

- ``bare``: no limiter;
- ``budget-memory``, ``budget-redis``, ``budget-cluster``: BudgetMiddleware configured from
  ``BUDGET_*`` (one rule, ``header:x-user``, 10^9 a day, estimate 0.00001), on the memory ledger,
  on Redis, and (when ``budget_middleware.ledger`` has ``RedisClusterLedger``) on a Redis Cluster
  of 3 primaries started here (``redis+cluster://``; its Redis figures are summed over them);
- ``slowapi``: ``Limiter(key_func=<x-user>, storage_uri="redis://...")``, ``@limiter.limit``
  with 10^9/day on the endpoint (the ``limits`` library's sync Redis storage, fixed window);
- ``fastapi-limiter``: 0.2's ``Depends(RateLimiter(limiter=...))`` over pyrate-limiter's
  ``RedisBucket`` (one per user), 10^9/day;
- ``naive``: pure ASGI reserve-then-release (``INCRBYFLOAT`` + ``EXPIRE`` on entry, ``INCRBYFLOAT``
  of the difference on exit, each awaited), 429 when over the limit.

Load: ``wrk -t1 -cN --latency`` with a Lua script setting ``x-user`` per request, round robin over
``--users`` ids, at each ``--connections``. Every server runs for the whole benchmark; ``--rounds``
rounds each go over every (configuration, connections) cell in a rotated order, a short warm-up
before every run, and the run with the median req/s of each cell is shown (this box is shared:
interleaving spreads other jobs' bursts over all configurations). Per run, over the measured part
only (denominator: requests the endpoint served):

- requests/s, p50, p99 (wrk);
- app CPU us/request: utime+stime of the uvicorn process (``/proc/<pid>/stat``);
- Redis round trips and top-level commands per request, counted in the app process by a client
  that counts what it sends (``apps/common.py``; a pipeline is one round trip);
- Redis commands executed per request (``INFO commandstats`` calls, the commands Lua scripts call
  included) and Redis usec per request (``INFO commandstats`` usec of the commands the app sent:
  a script's time already contains its inner commands'), after ``CONFIG RESETSTAT``;
- redis-server CPU us/request (``INFO cpu`` user+sys deltas: networking and parsing included);
- other load: CPU the rest of the machine used meanwhile (``/proc/stat`` busy time minus the
  app's, the Redis servers' and wrk's), in cores.

``/__rtt`` (unmetered) reports the app's counters; for BudgetMiddleware it first waits for the
finalizer to apply every pending settlement, so their round trips count.

    .venv/bin/python benchmarks/compare.py                  # about 5 minutes
    .venv/bin/python benchmarks/compare.py --quiet-wait 15  # each run first waits for a quiet box
    .venv/bin/python benchmarks/compare.py --only budget-redis,slowapi --connections 1,8,64

``--src DIR`` serves the package of another source tree (its ``src/``) with the same harness.
Helpers (redis-server, wrk and its output, /proc CPU, machine facts, CPU pinning: uvicorn on the
last CPU, wrk and redis-server on the others) come from ``benchmarks/_common.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import (  # noqa: E402  (benchmarks/ is not a package)
    WrkResult,
    dist_version,
    free_port,
    machine_facts,
    num,
    pin,
    print_facts,
    proc_cpu_s,
    progress,
    ratio,
    redis_server,
    run_wrk,
    split_cpus,
    stop,
    table_row,
    table_start,
    use_source_tree,
    uvicorn_command,
    wrk_script,
)
from apps.common import ESTIMATE, HEADER, LIMIT, RTT_PATH  # noqa: E402

PREFIX = "comparebench"
# Commands of the benchmark's own admin connection and of connection setup: never the app's.
HOUSEKEEPING = (
    "info", "config|resetstat", "flushall", "hello", "client|setinfo", "ping", "cluster|info",
)  # fmt: skip


@dataclass(frozen=True)
class Cfg:
    name: str
    module: str  # apps.<module>:app
    redis: bool  # uses the redis-server
    budget_redis: bool = False  # BUDGET_REDIS_URL is set
    cluster: bool = False  # ... to the 3-primary Redis Cluster


CONFIGS = [
    Cfg("bare", "bare", redis=False),
    Cfg("budget-memory", "budget", redis=False),
    Cfg("budget-redis", "budget", redis=True, budget_redis=True),
    Cfg("budget-cluster", "budget", redis=True, budget_redis=True, cluster=True),
    Cfg("slowapi", "with_slowapi", redis=True),
    Cfg("fastapi-limiter", "with_fastapi_limiter", redis=True),
    Cfg("naive", "naive", redis=True),
]


def cluster_ledger_available() -> bool:
    import budget_middleware.ledger

    return hasattr(budget_middleware.ledger, "RedisClusterLedger")


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000)")


def _wait(what: str, probe: Any, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if probe():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within:g} s")
        time.sleep(0.05)


@contextlib.contextmanager
def redis_cluster(cpus: set[int] | None, primaries: int = 3) -> Iterator[list[int]]:
    """A Redis Cluster of ``primaries`` primaries, no replicas, no persistence, noeviction
    (``redis-cli --cluster create``); yields the ports once every node says cluster_state:ok."""
    exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if exe is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed for the cluster")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="compare-cluster-") as tmp:
        try:
            ports = []
            for _ in range(primaries):
                port = _cluster_port()
                workdir = Path(tmp) / f"node-{port}"
                workdir.mkdir()
                argv = [
                    exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(workdir),
                    "--logfile", str(workdir / "redis.log"), "--maxmemory-policy", "noeviction",
                    "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "2000",
                ]  # fmt: skip
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        preexec_fn=pin(cpus),
                    )
                )
                ports.append(port)
            clients = [redis.Redis(port=p, decode_responses=True, socket_timeout=1) for p in ports]
            for c in clients:
                _wait("redis-server answering PING", c.ping)
            hosts = [f"127.0.0.1:{p}" for p in ports]
            subprocess.run(
                [cli, "--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=True,
            )

            def ok() -> bool:
                for c in clients:
                    info = str(c.execute_command("CLUSTER", "INFO"))
                    if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                        return False
                    if f"cluster_known_nodes:{primaries}" not in info:
                        return False
                return True

            _wait("cluster_state:ok on every node", ok)
            for c in clients:
                c.close()
            yield ports
        finally:
            for proc in procs:
                stop(proc)


# -- the app server ------------------------------------------------------------------------------


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def report(self, timeout: float = 30) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{RTT_PATH}"
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            data: dict[str, Any] = json.loads(reply.read())
            return data


def app_env(cfg: Cfg, redis_url: str, cluster_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUDGET_", "COMPARE_"))}
    env["COMPARE_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH")) if p)
    if cfg.module == "budget":
        rule = {"name": "bench", "key": f"header:{HEADER}", "limit": LIMIT, "period": "1d"}
        env |= {
            "BUDGET_RULES": json.dumps([rule]),
            "BUDGET_ESTIMATE": ESTIMATE,
            "BUDGET_EXCLUDE": RTT_PATH,
            "BUDGET_PREFIX": PREFIX,
        }
        if cfg.cluster:
            assert cluster_url is not None
            env["BUDGET_REDIS_URL"] = cluster_url
        elif cfg.budget_redis:
            env["BUDGET_REDIS_URL"] = redis_url
    return env


@contextlib.contextmanager
def app_server(
    cfg: Cfg, redis_url: str, cluster_url: str | None, workdir: Path, cpus: set[int] | None
) -> Iterator[App]:
    port = free_port()
    log = workdir / f"uvicorn-{cfg.name}.log"
    cmd = uvicorn_command(f"apps.{cfg.module}:app", BENCH_DIR, port)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=app_env(cfg, redis_url, cluster_url),
            preexec_fn=pin(cpus),
        )
    app = App(proc, port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{cfg.name}: uvicorn exited:\n{log.read_text(errors='replace')}")
            try:
                app.report(timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"{cfg.name}: not ready in 30 s:\n{log.read_text(errors='replace')}"
                    ) from None
                time.sleep(0.1)
        yield app
    finally:
        stop(proc)


# -- redis-server statistics -------------------------------------------------------------------------


def redis_cpu(admins: list[redis.Redis]) -> float:
    """used_cpu_user + used_cpu_sys, summed over the servers."""
    total = 0.0
    for admin in admins:
        info: dict[str, Any] = admin.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def commandstats(admins: list[redis.Redis]) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) since the last CONFIG RESETSTAT, summed over the servers."""
    out: dict[str, tuple[int, int]] = {}
    for admin in admins:
        info: dict[str, Any] = admin.info("commandstats")
        for key, v in info.items():
            if key.startswith("cmdstat_") and isinstance(v, dict):
                name = key.removeprefix("cmdstat_")
                calls, usec = out.get(name, (0, 0))
                out[name] = (calls + int(v["calls"]), usec + int(v["usec"]))
    return out


# -- the rest of the machine: this box is shared, so how busy it was is part of every result ---


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, steal). Interrupt time
    is left out: most of it is the loopback traffic of the run itself, charged to no process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children (the wrk runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(limit_cores: float, max_wait_s: float) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until the machine, idle of our own load, used less than
    ``limit_cores`` over a 1 s sample. Returns (seconds waited, cores busy in the last sample)."""
    start = time.monotonic()
    while True:
        b0 = busy_cpu_s()
        time.sleep(1.0)
        cores = busy_cpu_s() - b0
        waited = time.monotonic() - start
        if cores < limit_cores or waited >= max_wait_s:
            return waited, cores


# -- one measurement ------------------------------------------------------------------------------


@dataclass
class Result:
    cfg: Cfg
    conns: int
    wrk: WrkResult
    requests: int  # served by the endpoint during the measured run
    app_cpu_us: float | None
    app_util: float | None  # app CPU seconds / wall seconds
    rtt: float | None = None  # Redis round trips per request
    sent: float | None = None  # top-level commands sent per request
    sent_by_name: dict[str, float] = field(default_factory=dict)
    executed: float | None = None  # commands executed by redis-server per request (in-script too)
    executed_by_name: dict[str, tuple[float, float]] = field(default_factory=dict)  # calls, usec
    redis_usec: float | None = None  # commandstats usec of the commands sent, per request
    redis_cpu_us: float | None = None  # redis-server CPU per request
    other_cores: float | None = None  # CPU the rest of the machine used during the run (cores)
    quiet_wait_s: float = 0.0  # how long the run waited for the machine to go quiet
    notes: list[str] = field(default_factory=list)
    rounds_rps: list[float] = field(default_factory=list)  # every round's req/s, in order
    rounds_other: list[float | None] = field(default_factory=list)  # ... and other load


def measure(
    cfg: Cfg,
    app: App,
    conns: int,
    args: argparse.Namespace,
    lua: Path,
    admins: list[redis.Redis],
    client_cpus: set[int] | None,
    warmup: float,
) -> Result:
    waited, busy = wait_quiet(args.quiet, args.quiet_wait) if args.quiet_wait > 0 else (0.0, 0.0)
    if warmup > 0:  # also after the quiet wait: the connections and caches are warm again
        run_wrk(app.port, lua, args.threads, conns, warmup, client_cpus)
    before = app.report()  # for BudgetMiddleware: after the warm-up's settlements are applied
    for admin in admins:
        admin.config_resetstat()
    rcpu0 = redis_cpu(admins)
    cpu0 = proc_cpu_s(app.proc.pid)
    busy0, wrk0 = busy_cpu_s(), children_cpu_s()
    wall0 = time.perf_counter()
    w = run_wrk(app.port, lua, args.threads, conns, args.duration, client_cpus)
    after = app.report()  # waits for the finalizer: its round trips and CPU are in
    wall = time.perf_counter() - wall0
    cpu1 = proc_cpu_s(app.proc.pid)
    rcpu1 = redis_cpu(admins)
    busy1, wrk1 = busy_cpu_s(), children_cpu_s()
    stats = commandstats(admins)

    n = after["requests"] - before["requests"]
    if n <= 0:
        raise SystemExit(f"{cfg.name}: the endpoint served no requests")
    r = Result(
        cfg,
        conns,
        w,
        n,
        app_cpu_us=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1e6 / n,
        app_util=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / wall,
    )
    if cpu0 is not None and cpu1 is not None:
        ours = (cpu1 - cpu0) + (rcpu1 - rcpu0) + (wrk1 - wrk0)
        r.other_cores = max(0.0, (busy1 - busy0) - ours) / wall
    r.quiet_wait_s = waited
    if args.quiet_wait > 0 and busy >= args.quiet:
        r.notes.append(f"the machine did not go quiet ({busy:.2f} cores busy after {waited:.0f} s)")
    if w.non_2xx or w.socket_errors:
        r.notes.append(f"{w.non_2xx} non-2xx, {w.socket_errors} socket errors")
    if "applied" in after:
        applied = after["applied"] - before["applied"]
        r.notes.append(
            f"finalizer applied {applied} settlements for {n} requests, idle "
            f"{after['finalizer_idle']}, lost {after['lost']}, outcomes {after['outcomes']}"
        )
    if not cfg.redis:
        return r
    sent = {
        name: count - before["commands"].get(name, 0)
        for name, count in after["commands"].items()
        if count - before["commands"].get(name, 0) > 0
    }
    r.rtt = (after["round_trips"] - before["round_trips"]) / n
    r.sent = sum(sent.values()) / n
    r.sent_by_name = {name: c / n for name, c in sorted(sent.items())}
    # Idle servers stay up during other runs; fastapi-limiter's leak task keeps sending its
    # ZREMRANGEBYSCOREs (one per bucket every 10 s): not this configuration's work unless it sent them.
    skip = set(HOUSEKEEPING) | ({"zremrangebyscore"} - set(sent))
    r.executed = sum(c for cmd, (c, _) in stats.items() if cmd not in skip) / n
    r.redis_usec = sum(stats.get(cmd, (0, 0))[1] for cmd in sent if cmd not in HOUSEKEEPING) / n
    r.redis_cpu_us = (rcpu1 - rcpu0) * 1e6 / n
    r.executed_by_name = {
        cmd: (c / n, usec / n) for cmd, (c, usec) in sorted(stats.items()) if cmd not in skip and c
    }
    return r


# -- report ---------------------------------------------------------------------------------------


def main_table(results: list[Result]) -> str:
    head = (
        "| config | conns | req/s | vs bare | p50 ms | p99 ms | app CPU us/req | vs bare "
        "| app CPU util | other load (cores) | RTT/req | cmds sent/req | cmds executed/req "
        "| Redis usec/req | vs naive "
        "| redis-server CPU us/req | vs naive | req/s of each round (other load) |"
    )
    rows = table_start(head)
    for r in results:
        same = [x for x in results if x.conns == r.conns]
        bare = next((x for x in same if x.cfg.name == "bare"), None)
        naive = next((x for x in same if x.cfg.name == "naive"), None)
        cells = [
            r.cfg.name,
            str(r.conns),
            f"{r.wrk.rps:,.0f}",
            ratio(r.wrk.rps, bare.wrk.rps if bare else None, "x"),
            f"{r.wrk.p50_ms:.2f}",
            f"{r.wrk.p99_ms:.2f}",
            num(r.app_cpu_us, ".0f"),
            ratio(r.app_cpu_us, bare.app_cpu_us if bare else None, "x"),
            num(r.app_util, ".0%"),
            num(r.other_cores, ".2f"),
            num(r.rtt, ".2f"),
            num(r.sent, ".2f"),
            num(r.executed, ".2f"),
            num(r.redis_usec, ".1f"),
            ratio(r.redis_usec, naive.redis_usec if naive else None, "x"),
            num(r.redis_cpu_us, ".1f"),
            ratio(r.redis_cpu_us, naive.redis_cpu_us if naive else None, "x"),
            " / ".join(
                f"{x:,.0f} ({num(o, '.1f')})" for x, o in zip(r.rounds_rps, r.rounds_other, strict=True)
            ),
        ]
        rows.append(table_row(cells))
    return "\n".join(rows)


def versus_table(results: list[Result], subject: str = "budget-redis") -> str:
    """``subject``'s metrics divided by each other configuration's, per connection count."""
    head = (
        f"| {subject} / peer | conns | req/s | p50 | p99 | app CPU/req | RTT/req "
        "| Redis usec/req | redis-server CPU/req |"
    )
    rows = table_start(head)
    for conns in sorted({r.conns for r in results}):
        me = next((r for r in results if r.cfg.name == subject and r.conns == conns), None)
        if me is None:
            continue
        for peer in (r for r in results if r.conns == conns and r is not me):
            cells = [
                peer.cfg.name,
                str(conns),
                ratio(me.wrk.rps, peer.wrk.rps, "x"),
                ratio(me.wrk.p50_ms, peer.wrk.p50_ms, "x"),
                ratio(me.wrk.p99_ms, peer.wrk.p99_ms, "x"),
                ratio(me.app_cpu_us, peer.app_cpu_us, "x"),
                ratio(me.rtt, peer.rtt, "x"),
                ratio(me.redis_usec, peer.redis_usec, "x"),
                ratio(me.redis_cpu_us, peer.redis_cpu_us, "x"),
            ]
            rows.append(table_row(cells))
    return "\n".join(rows)


def targets(results: list[Result]) -> list[str]:
    lines = []

    def get(name: str, conns: int) -> Result | None:
        return next((r for r in results if r.cfg.name == name and r.conns == conns), None)

    for conns in sorted({r.conns for r in results}):
        me, bare, naive = get("budget-redis", conns), get("bare", conns), get("naive", conns)
        if me is None:
            continue
        peers = [p for p in (get("slowapi", conns), get("fastapi-limiter", conns)) if p]
        for p in peers:
            ok = me.wrk.rps >= p.wrk.rps
            lines.append(
                f"c{conns}: budget-redis {me.wrk.rps:,.0f} req/s vs {p.cfg.name} {p.wrk.rps:,.0f} "
                f"(target: at least as much): {'MET' if ok else 'NOT MET'}"
            )
        if conns >= 64 and me.rtt is not None:
            ok = me.rtt <= 1.5
            lines.append(
                f"c{conns}: budget-redis {me.rtt:.2f} Redis round trips/request "
                f"(target <= 1.5 at >= 64 connections): {'MET' if ok else 'NOT MET'}"
            )
        if naive and me.redis_usec is not None and naive.redis_usec:
            times = me.redis_usec / naive.redis_usec
            cpu = ratio(me.redis_cpu_us, naive.redis_cpu_us, "x")
            lines.append(
                f"c{conns}: budget-redis Redis usec/request {times:.2f}x naive's (target <= 3x): "
                f"{'MET' if times <= 3 else 'NOT MET'} (redis-server CPU/request: {cpu} naive's)"
            )
        if conns == 32 and bare:
            share = me.wrk.rps / bare.wrk.rps
            lines.append(
                f"c{conns}: budget-redis {share:.0%} of bare throughput (target >= 70%): "
                f"{'MET' if share >= 0.70 else 'NOT MET'}"
            )
    return lines


def versions() -> dict[str, str]:
    dists = ("fastapi", "slowapi", "limits", "fastapi-limiter", "pyrate-limiter", "redis")
    return {dist: dist_version(dist) for dist in dists}


# -- main -------------------------------------------------------------------------------------------


def median_run(runs: list[Result]) -> Result:
    """The run with the median req/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.wrk.rps)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.rounds_rps = [r.wrk.rps for r in runs]
    chosen.rounds_other = [r.other_cores for r in runs]
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # wrk takes whole seconds.
    p.add_argument("--duration", type=int, default=5, help="seconds of each measured wrk run")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds of each server at start")
    p.add_argument("--rewarm", type=int, default=1, help="warm-up seconds before every run")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument(
        "--connections",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[32, 128],
        help="comma list of wrk connection counts",
    )
    p.add_argument("--users", type=int, default=100, help="distinct x-user ids")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over every (configuration, connections) cell, interleaved; medians shown",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.3,
        help="with --quiet-wait: wait for the machine to use fewer cores than this (1 s samples)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        help="before each run, wait at most this many seconds for the machine to go quiet",
    )
    p.add_argument("--only", help="comma list of configuration names")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin CPUs")
    p.add_argument("--src", type=Path, help="serve the package of this source tree (its src/)")
    args = p.parse_args()
    if args.src is not None:
        use_source_tree(args.src)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found on PATH")
    cfgs = CONFIGS
    if args.only:
        wanted = set(args.only.split(","))
        cfgs = [c for c in CONFIGS if c.name in wanted]
    server_cpus, client_cpus = split_cpus(args.pin)
    cluster_note = ""
    if any(c.cluster for c in cfgs) and not cluster_ledger_available():
        cfgs = [c for c in cfgs if not c.cluster]
        cluster_note = "budget_middleware.ledger has no RedisClusterLedger: no Cluster row"

    t0 = time.perf_counter()
    runs: dict[tuple[str, int], list[Result]] = {}
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(client_cpus))
        admin = redis.Redis.from_url(redis_url, decode_responses=True)
        stack.callback(admin.close)
        single = [admin]
        cluster_url: str | None = None
        cluster_admins: list[redis.Redis] = []
        if any(c.cluster for c in cfgs):
            try:
                ports = stack.enter_context(redis_cluster(client_cpus))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                cfgs = [c for c in cfgs if not c.cluster]
                cluster_note = f"the Redis Cluster did not start ({exc}): no Cluster row"
            else:
                cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
                for port in ports:
                    node = redis.Redis(port=port, decode_responses=True)
                    stack.callback(node.close)
                    cluster_admins.append(node)
                cluster_note = (
                    f"budget-cluster: RedisClusterLedger on a Redis Cluster of 3 primaries, no "
                    f"replicas (ports {', '.join(map(str, ports))}), pinned like the redis-server; "
                    "Redis figures are summed over the 3 primaries"
                )
        facts = machine_facts(redis_url) | versions()
        print_facts(facts)
        print(
            f"wrk -t{args.threads} -c{{{','.join(map(str, args.connections))}}} "
            f"-d{args.duration}s --latency, {args.rounds} interleaved rounds (each server warmed "
            f"{args.warmup}s at start, {args.rewarm}s before every run); {args.users} users round "
            f"robin in {HEADER}; uvicorn 1 worker {facts['loop/http']}; pinning: "
            + (
                f"uvicorn on CPU {sorted(server_cpus)}, wrk + redis-server on {sorted(client_cpus)}"
                if server_cpus and client_cpus
                else "none"
            ),
            flush=True,
        )
        if cluster_note:
            print(f"note: {cluster_note}", flush=True)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-")))
        lua = wrk_script(tmp, args.users, HEADER)
        # Every server runs for the whole benchmark (an idle one costs nothing), so the runs can
        # interleave: each round goes over every cell, in a rotated order, and slow drift or a
        # neighbour's burst lands on all configurations alike instead of on one.
        for a in [*single, *cluster_admins]:
            a.flushall()
        apps: dict[str, App] = {}
        for cfg in cfgs:
            app = stack.enter_context(app_server(cfg, redis_url, cluster_url, tmp, server_cpus))
            run_wrk(app.port, lua, args.threads, args.connections[0], args.warmup, client_cpus)
            apps[cfg.name] = app
        cells = [(cfg, conns) for conns in args.connections for cfg in cfgs]
        for rnd in range(args.rounds):
            shift = (rnd * len(cells)) // max(args.rounds, 1)
            for cfg, conns in cells[shift:] + cells[:shift]:
                app = apps[cfg.name]
                admins = cluster_admins if cfg.cluster else single
                r = measure(cfg, app, conns, args, lua, admins, client_cpus, args.rewarm)
                runs.setdefault((cfg.name, conns), []).append(r)
                progress(
                    f"  round {rnd + 1} {cfg.name:16} c{conns:<4} {r.wrk.rps:>8,.0f} req/s  "
                    f"p50 {r.wrk.p50_ms:6.2f} ms  p99 {r.wrk.p99_ms:6.2f} ms  "
                    f"app {num(r.app_cpu_us, '.0f')} us/req ({num(r.app_util, '.0%')})  "
                    f"RTT/req {num(r.rtt, '.2f')}  other load {num(r.other_cores, '.2f')} cores"
                )
        for name, app in apps.items():
            text = app.log.read_text(errors="replace").strip()
            if text:
                print(f"  {name} server log:\n    " + text.replace("\n", "\n    "))

    results = [median_run(same) for same in runs.values()]
    results.sort(key=lambda r: (r.conns, CONFIGS.index(r.cfg)))
    print()
    print(main_table(results))
    print()
    print(versus_table(results))
    print()
    print("Commands sent per request, by name:")
    for r in results:
        if r.sent_by_name:
            names = ", ".join(f"{k} {v:.3f}" for k, v in r.sent_by_name.items())
            print(f"  {r.cfg.name} c{r.conns}: {names}")
    print()
    print("Commands executed by redis-server per request (calls, usec), in-script calls included:")
    for r in results:
        if r.executed_by_name:
            names = ", ".join(f"{k} {c:.2f} ({u:.1f})" for k, (c, u) in r.executed_by_name.items())
            print(f"  {r.cfg.name} c{r.conns}: {names}")
    print()
    for line in targets(results):
        print("target: " + line)
    for same in runs.values():
        for i, r in enumerate(same):
            for note in r.notes:
                print(f"check: {r.cfg.name} c{r.conns} round {i + 1}: {note}")
    if cluster_note:
        print(f"note: {cluster_note}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; loadavg at end {load}")


if __name__ == "__main__":
    main()
