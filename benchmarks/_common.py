"""What the benchmark scripts share: processes (free ports, CPU pinning, a throwaway redis-server,
the uvicorn command), load (wrk, and N operations over C tasks), CPU and instruction counts, the
machine's facts, and the cells of the result tables.

Not a benchmark: ``overhead.py``, ``compare.py``, ``ledger.py`` and ``script_floor.py`` import it
(``benchmarks/`` is not a package; each script puts its own folder on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pin(cpus: set[int] | None) -> Any:
    """A ``preexec_fn`` that pins the child to ``cpus`` (None: no pinning)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def split_cpus(pinned: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs): the server gets the last CPU to itself; wrk and redis-server
    share the others. (None, None) when not ``pinned`` or with a single CPU."""
    if not pinned or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_server(cpus: set[int] | None = None) -> Iterator[str]:
    """A throwaway redis-server on a free port: no persistence, noeviction, in a temp dir. Yields
    its url once it answers PING."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found on PATH; install it or pass --redis-url")
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        port = free_port()
        log = os.path.join(tmp, "redis.log")
        argv = [
            exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tmp, "--logfile", log,
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin(cpus)
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
            stop(proc)


def server_choice() -> tuple[str, str]:
    """uvicorn's event loop and HTTP parser: the fast ones when installed, as uvicorn picks."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def uvicorn_command(app: str, app_dir: Path, port: int, *, factory: bool = False) -> list[str]:
    """One uvicorn worker serving ``app`` (``module:attr``, found in ``app_dir``) on ``port``."""
    loop, http = server_choice()
    return [
        sys.executable, "-m", "uvicorn", app, *(["--factory"] if factory else []),
        "--app-dir", str(app_dir),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--loop", loop, "--http", http, "--lifespan", "on",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def use_source_tree(src: Path) -> None:
    """Import ``budget_middleware`` from ``src`` (a tree's ``src/`` folder) in this process and in
    every child it starts: PYTHONPATH comes before the installed packages, an editable install's
    path included. Call it before anything imports the package."""
    src = src.resolve()
    if not (src / "budget_middleware" / "__init__.py").is_file():
        raise SystemExit(f"--src {src}: no budget_middleware/__init__.py there")
    if "budget_middleware" in sys.modules:
        raise RuntimeError("budget_middleware was imported before use_source_tree")
    sys.path.insert(0, str(src))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p
    )


# -- load ------------------------------------------------------------------------------------------

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


def wrk_script(workdir: Path, users: int, header: str) -> Path:
    """The wrk Lua script that sends ``header: user-<n>``, n round robin over ``users`` ids."""
    path = workdir / f"users-{users}.lua"
    if not path.exists():
        path.write_text(WRK_LUA.format(users=users, header=header))
    return path


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
    port: int, lua: Path, threads: int, conns: int, duration: float, cpus: set[int] | None
) -> WrkResult:
    cmd = [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--latency",
        "-s", str(lua), f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=pin(cpus))
    return parse_wrk(done.stdout)


async def over_tasks(
    count: int, concurrency: int, one: Callable[[int], Awaitable[None]], *, yield_each: bool = False
) -> float:
    """``one(0)`` .. ``one(count - 1)`` over ``concurrency`` tasks; the wall time in seconds.
    ``yield_each``: each task yields to the loop after each call, as a server does between
    requests."""
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count:
            i = issued
            issued += 1
            await one(i)
            if yield_each:
                await asyncio.sleep(0)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - start


# -- CPU and instructions ------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def callgrind_collected(output: str) -> int | None:
    """The instruction count callgrind prints as its process exits (``Collected : N``)."""
    m = re.search(r"Collected : (\d+)", output)
    return int(m.group(1)) if m else None


def per_item(lo: int, hi: int, count: Callable[[int], int]) -> float:
    """``(count(hi) - count(lo)) / (hi - lo)``: what one more item costs, where ``count(n)`` runs
    a whole process for ``n`` items, so its start-up and shutdown cancel out."""
    low = count(lo)
    return (count(hi) - low) / (hi - lo)


def lo_hi(text: str) -> tuple[int, int]:
    """``LO,HI`` as an argparse type."""
    lo, hi = (int(x) for x in text.split(","))
    if not 0 <= lo < hi:
        raise ValueError(f"expected LO,HI with 0 <= LO < HI, got {text!r}")
    return lo, hi


# -- the machine ---------------------------------------------------------------------------------


def cmd_version(cmd: list[str]) -> str:
    """The first line ``cmd`` prints, or ``?``."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def package_source() -> str:
    """Where ``budget_middleware`` was imported from, with the commit of its git tree."""
    import budget_middleware

    package = Path(budget_middleware.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return f"{package} (not in a git checkout)"
    dirty = git("status", "--porcelain", "--", ".").stdout.strip()
    return f"{package} at {head.stdout.strip()}" + (" + uncommitted changes" if dirty else "")


def machine_facts(redis_url: str | None = None) -> dict[str, str]:
    """Date, nproc, CPU model, load, Python and server versions, and the measured package."""
    loop, http = server_choice()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "loadavg at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "uvicorn": importlib.metadata.version("uvicorn"),
        "starlette": importlib.metadata.version("starlette"),
        "hiredis": dist_version("hiredis"),
        "loop/http": f"{loop}/{http}",
        "wrk": re.sub(r"\s*Copyright.*", "", cmd_version(["wrk", "-v"])),
        "redis-server": redis_version(redis_url) if redis_url else "-",
        "budget_middleware": package_source(),
    }


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_facts(facts: dict[str, str]) -> None:
    print("argv: " + " ".join(sys.argv))
    print("; ".join(f"{k} {v}" for k, v in facts.items()), flush=True)


# -- table cells ---------------------------------------------------------------------------------


def num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def ratio(x: float | None, base: float | None, unit: str = "") -> str:
    """``x / base`` to two decimals (``-`` when either is missing), followed by ``unit``."""
    if x is None or base is None or base == 0:
        return "-"
    return f"{x / base:.2f}{unit}"


def table_start(head: str) -> list[str]:
    """The first two lines of a Markdown table whose header row is ``head`` (``| a | b |``)."""
    return [head, "|" + "---|" * (head.count("|") - 1)]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def progress(line: str) -> None:
    """A progress line, on stderr, so that stdout holds only the results."""
    print(line, file=sys.stderr, flush=True)
