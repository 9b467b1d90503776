"""A real ``redis-server`` for the tests: a subprocess on a free port, in its own temp dir.

The memory ledger and fakeredis are quick, but only a real server proves the Lua scripts (TIME,
EVALSHA, NOSCRIPT, TTLs, pipelining). Without the binary the tests that need it are skipped, except
under CI (``CI=true``), where a missing server is a broken environment and fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

__all__ = ["RedisServer", "free_port", "require_redis_server"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_redis_server(binary: str = "redis-server") -> str:
    """The path of ``binary``; skips the test when it is missing, or fails it under CI."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary!r} is not installed (needed by the real-Redis tests)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must provide it", pytrace=False)
        pytest.skip(message)
    return path


class RedisServer:
    """One ``redis-server`` subprocess: no persistence, ``noeviction``, bound to 127.0.0.1."""

    def __init__(self, binary: str = "redis-server", *, password: str | None = None) -> None:
        self.binary = binary
        self.password = password
        self.host = "127.0.0.1"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The server's URL (with its password, when it has one: never log it unredacted)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client, for fixtures and assertions outside the event loop."""
        return redis.Redis(host=self.host, port=self.port, password=self.password, decode_responses=True)

    def start(self) -> RedisServer:
        path = require_redis_server(self.binary)
        self._tmp = tempfile.TemporaryDirectory(prefix="budget-redis-")
        workdir = Path(self._tmp.name)
        # A port can be taken between free_port() and the bind; try a few before giving up.
        last_error = ""
        for _ in range(3):
            self.port = free_port()
            log = workdir / f"redis-{self.port}.log"
            args = [
                path,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--maxmemory-policy", "noeviction",
                "--dir", str(workdir),
                "--logfile", str(log),
                "--daemonize", "no",
            ]  # fmt: skip
            if self.password:
                args += ["--requirepass", self.password]
            with open(workdir / f"stderr-{self.port}.txt", "wb") as stderr:
                self._proc = subprocess.Popen(  # a fixed argv, no shell
                    args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
                )
            if self._wait_ready():
                return self
            last_error = self._collect_failure(log, workdir / f"stderr-{self.port}.txt")
            self._terminate()
        self._cleanup_dir()
        raise RuntimeError(f"redis-server did not start: {last_error}")

    def _wait_ready(self) -> bool:
        """Poll PING until it answers, the process dies, or the deadline passes."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with self.client() as client:
                    if client.ping():
                        return True
            except redis.ConnectionError:
                pass
            time.sleep(0.02)
        return False

    def _collect_failure(self, *logs: Path) -> str:
        assert self._proc is not None
        parts = []
        if self._proc.poll() is not None:
            parts.append(f"exit code {self._proc.returncode}")
        for log in logs:
            with contextlib.suppress(OSError):
                parts.append(log.read_text(errors="replace")[-2000:])
        return "; ".join(parts) or "no PING answer before the deadline"

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)

    def _cleanup_dir(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def stop(self) -> None:
        self._terminate()
        self._cleanup_dir()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
