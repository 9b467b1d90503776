"""Real ASGI servers (uvicorn, hypercorn, granian) in subprocesses, serving ``server_app:app``.

``ServerProcess`` starts one server on a free port with ``BUDGET_*`` settings in its environment,
waits until ``/health`` answers (with a deadline, failing with the server's log), and stops it with
SIGTERM (graceful: the lifespan shutdown drains the finalizer) or SIGKILL (nothing runs). Each server
runs in its own session, so a kill reaches every process it spawned (granian's workers), and
``close()`` always kills whatever is left: call it in a ``finally`` or use the object as a context
manager.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from redis_server import free_port

__all__ = ["SERVER_KINDS", "ServerProcess", "expected_spent", "server_command"]

TESTS_DIR = Path(__file__).resolve().parent
SERVER_KINDS = ("uvicorn", "hypercorn", "granian")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def server_command(kind: str, port: int, *, graceful_s: int = 1, lifespan: str = "on") -> list[str]:
    """The argv that serves ``server_app:app`` on 127.0.0.1:``port`` with ``kind`` (uvicorn with
    ``--lifespan lifespan``: ``on``, or its default ``auto``)."""
    python = sys.executable
    if kind == "uvicorn":
        return [
            python, "-m", "uvicorn", "server_app:app",
            "--host", "127.0.0.1", "--port", str(port),
            "--lifespan", lifespan,
            "--log-level", "warning",
            "--no-access-log",
            # After this, in-flight requests are cancelled and the lifespan shutdown drains.
            "--timeout-graceful-shutdown", str(graceful_s),
        ]  # fmt: skip
    if kind == "hypercorn":
        return [
            python, "-m", "hypercorn", "server_app:app",
            "--bind", f"127.0.0.1:{port}",
            # 0 workers: serve in this process (no spawn), so SIGTERM reaches the event loop.
            "--workers", "0",
            "--graceful-timeout", str(graceful_s),
            "--log-level", "WARNING",
        ]  # fmt: skip
    if kind == "granian":
        return [
            python, "-m", "granian", "server_app:app",
            "--interface", "asgi",
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",
            "--log-level", "warning",
            # Granian does not cancel in-flight requests on SIGTERM: it waits for them, then
            # kills the worker after this.
            "--workers-kill-timeout", str(max(1, graceful_s)),
        ]  # fmt: skip
    raise ValueError(f"unknown server kind {kind!r}")


class ServerProcess:
    """One server subprocess serving ``server_app:app``; see the module docstring."""

    def __init__(
        self,
        kind: str,
        *,
        redis_url: str,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        graceful_s: int = 1,
        truth_path: Path | None = None,
        lifespan: str = "on",
    ) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.workdir = workdir
        self.extra_env = dict(env or {})
        self.graceful_s = graceful_s
        self.lifespan = lifespan
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.truth_path = truth_path or workdir / f"truth-{kind}.jsonl"
        self.log_path = workdir / f"{kind}-server.log"
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def prefix(self) -> str:
        return self.extra_env.get("BUDGET_PREFIX", "budget")

    # -- start ---------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BUDGET_", "GRANIAN_"))}
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
                ),
                "PYTHONUNBUFFERED": "1",
                "BUDGET_REDIS_URL": self.redis_url,
                "BUDGET_TEST_TRUTH": str(self.truth_path),
                "BUDGET_EXCLUDE": "/health,/usage,/truth",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> ServerProcess:
        """Start the server and wait for ``/health``; retries a port lost to a race."""
        last = ""
        for _ in range(3):
            self.spawn()
            if self._wait_ready():
                return self
            last = self.log_tail()
            self.kill()
        raise RuntimeError(f"{self.kind} did not become ready on 127.0.0.1:{self.port}:\n{last}")

    def spawn(self) -> ServerProcess:
        """Start the server on a free port without waiting for it (see ``start``)."""
        self.port = free_port()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            server_command(self.kind, self.port, graceful_s=self.graceful_s, lifespan=self.lifespan),
            cwd=TESTS_DIR,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        return False

    # -- stop ----------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM to the server's main process (a graceful shutdown); do not wait."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def interrupt(self) -> None:
        """Send SIGINT (Ctrl-C) to the server's main process; do not wait. A second one while
        uvicorn shuts down forces its exit: it stops waiting for requests and skips the lifespan
        shutdown."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the main process to exit; returns its exit code (raises on timeout)."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the server and everything in its session; nothing of it runs afterwards."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
        self._close_log()

    def close(self) -> None:
        """Teardown: kill whatever is left of the server's session (idempotent)."""
        if self.proc is not None:
            self.kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it wrote -------------------------------------------------------------------------

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def truth(self, entity: str | None = None) -> list[dict[str, Any]]:
        """The ground-truth records this server (or any sharing its file) wrote, for ``entity``."""
        return read_truth(self.truth_path, entity)


def read_truth(path: Path, entity: str | None = None) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if entity is None or r["entity"] == entity]


def expected_spent(records: list[dict[str, Any]], *, unreported: str) -> int:
    """What the ledger must have recorded for these requests, in micro-units.

    A request that reported charges costs their sum; one that reported nothing costs its estimate
    (``unreported="estimate"``: completed, disconnected, cancelled) or nothing (``"zero"``: error,
    status >= 400), per the default charge table of DESIGN.md section 6.
    """
    if unreported not in ("estimate", "zero"):
        raise ValueError(unreported)
    starts = {r["rid"]: r for r in records if r["ev"] == "start"}
    charged: dict[str, int] = {}
    for r in records:
        if r["ev"] == "charge":
            charged[r["rid"]] = charged.get(r["rid"], 0) + int(r["amount"])
    total = 0
    for rid, start in starts.items():
        if rid in charged:
            total += charged[rid]
        elif unreported == "estimate":
            total += int(start["est"])
    return total
