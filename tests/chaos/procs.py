"""The processes of a chaos run: one ``redis-server`` the harness can kill and restart on the same
port (with its AOF, or empty), and the server replicas (``servers.ServerProcess``) it kills, stops
(gracefully, or forced with a second SIGINT) and restarts; what a replica's processes logged, each
apart (``Replica.log_of``), and the settlements each logged as lost (``logged_losses``).

Every process runs in its own session and is SIGKILLed by ``close()``, whatever happened: call it in
a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from budget_middleware import to_micros
from redis_server import free_port, require_redis_server
from servers import ServerProcess

__all__ = ["ChaosRedis", "LoggedLoss", "Replica", "logged_losses"]

REDIS_START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class ChaosRedis:
    """A ``redis-server`` with ``--appendonly yes --appendfsync always`` in ``root/data-<n>``.

    ``kill()`` is SIGKILL (with ``appendfsync always`` every acknowledged write is on disk);
    ``start()`` after it reuses the same port and data dir, so the server comes back with its data;
    ``start(empty=True)`` uses a new data dir, as a Redis that lost its state would.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self.generation = 0
        self.data_dir = root / "data-0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.empty_restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, empty: bool = False) -> ChaosRedis:
        """Start (or restart) the server; the first start picks a free port, later ones reuse it."""
        binary = require_redis_server()
        if self.alive:
            raise RuntimeError("redis-server is still running")
        if empty:
            self.generation += 1
            self.data_dir = self.root / f"data-{self.generation}"
            self.empty_restarts += 1
        elif self.port:
            self.restarts += 1
        self.data_dir.mkdir(parents=True, exist_ok=True)
        first = not self.port
        last = ""
        for _ in range(3 if first else 20):
            if first:
                self.port = free_port()
            log = self.data_dir / "redis.log"
            args = [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--maxmemory-policy", "noeviction",
                "--dir", str(self.data_dir),
                "--logfile", str(log),
                "--daemonize", "no",
            ]  # fmt: skip
            self.proc = subprocess.Popen(  # a fixed argv, no shell
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready():
                return self
            with contextlib.suppress(OSError):
                last = log.read_text(errors="replace")[-2000:]
            self.kill()
            if not first:  # the port may still be held for a moment by the old process: retry it
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}: {last}")

    def _wait_ready(self) -> bool:
        """PING until it answers (a server still loading its AOF answers LOADING: wait on)."""
        assert self.proc is not None
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with self.client() as client:
                    if client.ping():
                        return True
            except redis.RedisError:
                pass
            time.sleep(0.01)
        return False

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its port is then free again)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


_RESERVE_FAILED = re.compile(r"budget: reserve failed \((.*)\)\s*$", re.MULTILINE)
_REPLAYED = re.compile(r"replaying (\d+) settlements left unapplied")
_SHELVED = re.compile(r"with (\d+) settlements unapplied .*stay in the journal")

# Every line the package writes when it gives a settlement up (finalizer/_spool.py, _sending.py):
# a drain or a forced exit with settlements neither applied nor journaled (count and amount), one
# settlement over the pending bound (id and amount), spilled ones the journal could not keep (count,
# amount, ids), one the store refused or could not apply (id).
_LOST_UNAPPLIED = re.compile(
    r"budget: .* with (\d+) settlements unapplied \(([-\d.]+) in actual cost\); their holds "
    r"expire by lease, their spend is not recorded"
)
_LOST_OVER_BOUND = re.compile(r"budget: settlement (\S+) \(actual ([-\d.]+), reason \S+\) lost:")
_LOST_SPILLED = re.compile(
    r"budget: (\d+) settlements over the pending bound lost \(([-\d.]+) in actual cost\).*; "
    r"ids (.*)$",
    re.MULTILINE,
)
_LOST_GIVEN_UP = re.compile(
    r"budget: settlement (\S+) (?:refused \d+ times .*|cannot be applied); counted as lost"
)


@dataclass
class LoggedLoss:
    """The settlements a process logged as lost: how many, their actual cost (micro-units) where
    the line says it (``unpriced`` lines do not), and the ids where the line names them."""

    count: int = 0
    micros: int = 0
    unpriced: int = 0
    rids: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def logged_losses(log: str) -> LoggedLoss:
    """Parse every "lost" line of one process's log (see the patterns above)."""
    out = LoggedLoss()
    for m in _LOST_UNAPPLIED.finditer(log):
        out.count += int(m[1])
        out.micros += to_micros(m[2])
        out.lines.append(m[0])
    for m in _LOST_OVER_BOUND.finditer(log):
        out.count += 1
        out.micros += to_micros(m[2])
        out.rids.append(m[1])
        out.lines.append(m[0])
    for m in _LOST_SPILLED.finditer(log):
        out.count += int(m[1])
        out.micros += to_micros(m[2])
        out.rids += [x.strip() for x in m[3].split(",") if x.strip()]
        out.lines.append(m[0])
    for m in _LOST_GIVEN_UP.finditer(log):
        out.count += 1
        out.unpriced += 1
        out.rids.append(m[1])
        out.lines.append(m[0])
    return out


class Replica:
    """One server replica (a ``ServerProcess``) that can be killed, stopped and started again on
    the same truth file and journal dir. ``up`` says whether the load may send it requests.

    Its processes append to one log file, one after the other: where each began is remembered, so
    ``log_of(pid)`` is what that process alone wrote."""

    def __init__(self, index: int, server: ServerProcess, journal_dir: Path | None) -> None:
        self.index = index
        self.server = server
        self.journal_dir = journal_dir
        self.up = False
        self.pids: list[int] = []
        self.killed_pids: list[int] = []
        self.stopped_pids: list[int] = []
        self.forced_pids: list[int] = []
        self.stop_codes: list[int] = []
        self._log_starts: list[tuple[int, int]] = []  # (pid, offset in the log where it began)

    @property
    def kind(self) -> str:
        return self.server.kind

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    @property
    def truth_path(self) -> Path:
        return self.server.truth_path

    def start(self) -> None:
        offset = self._log_size()
        self.server.start()
        self.pids.append(self.pid)
        self._log_starts.append((self.pid, offset))
        self.up = True

    def kill(self) -> int:
        """SIGKILL the replica (after taking it out of the load); returns the killed pid."""
        self.up = False
        pid = self.pid
        self.server.kill()
        self.killed_pids.append(pid)
        return pid

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (a graceful shutdown, the finalizer drains) and wait; returns the exit code."""
        self.up = False
        pid = self.pid
        self.server.terminate()
        try:
            code = self.server.wait_exit(timeout_s)
        finally:
            self.server.close()
        self.stopped_pids.append(pid)
        self.stop_codes.append(code)
        return code

    def force_stop(self, gap_s: float = 0.3, timeout_s: float = 20.0) -> int:
        """SIGINT, and a second SIGINT ``gap_s`` later (an operator's second Ctrl-C): uvicorn then
        stops waiting for the requests in flight, skips the lifespan shutdown and lets
        ``asyncio.run`` cancel every task. Waits for the exit; returns the exit code."""
        self.up = False
        pid = self.pid
        self.server.interrupt()
        time.sleep(gap_s)
        self.server.interrupt()
        try:
            code = self.server.wait_exit(timeout_s)
        finally:
            self.server.close()
        self.forced_pids.append(pid)
        self.stop_codes.append(code)
        return code

    def close(self) -> None:
        self.up = False
        self.server.close()

    def _log_size(self) -> int:
        try:
            return self.server.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self) -> str:
        try:
            return self.server.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_of(self, pid: int) -> str:
        """What process ``pid`` of this replica wrote to the log (from its start to the next's)."""
        try:
            data = self.server.log_path.read_bytes()
        except OSError:
            return ""
        starts = self._log_starts
        for i, (p, offset) in enumerate(starts):
            if p == pid:
                end = starts[i + 1][1] if i + 1 < len(starts) else len(data)
                return data[offset:end].decode(errors="replace")
        return ""

    def reserve_failures(self) -> list[str]:
        """Why its reserves failed (each such request was answered 503), from its log."""
        return _RESERVE_FAILED.findall(self.log_text())

    def journal_replayed(self) -> int:
        """How many settlements this replica's processes replayed from journals of ended ones."""
        return sum(int(n) for n in _REPLAYED.findall(self.log_text()))

    def journal_shelved(self) -> int:
        """How many settlements its graceful shutdowns left in the journal for the next start."""
        return sum(int(n) for n in _SHELVED.findall(self.log_text()))
