"""The spans of ``examples/jaeger/app.py``, as an OTLP/HTTP collector (Jaeger, say) receives them.

A small OTLP/HTTP receiver runs in this process (a thread serving ``POST /v1/traces``); the example
app runs under uvicorn in a subprocess, exporting to it with the SDK's ``OTLPSpanExporter`` and a
``BatchSpanProcessor``, against a real redis-server. After one admitted and one rejected request and
a graceful stop (SIGTERM: the lifespan shutdown drains the finalizer, the exit flushes the batch
processor), the receiver must hold the request spans, ``budget.reserve`` under them, and
``budget.settle`` in a trace of its own linked to its reserve span, and no byte of any export may
contain the bearer token or the end-user id the client sent.

Parametrised over the example's request span: ``auto`` (``opentelemetry-instrumentation-asgi`` when
it is installed) and ``builtin`` (the example's wrapper, which leaves the span to FastAPI where
FastAPI opens one itself). Either way each request must have exactly one server span.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from redis_server import free_port

pytestmark = [pytest.mark.servers, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
EXPORT_TIMEOUT_S = 10.0

# What the client sends and no exported byte may contain. The user id is plain (it is stored raw in
# Redis keys, as ``r:<id>``), so it is the case where telemetry must digest it itself.
TOKEN = f"sk-leakcheck-{uuid.uuid4().hex}"
USER = f"user.leakcheck.{uuid.uuid4().hex[:16]}"
CLIENT_TRACE_ID = uuid.uuid4().hex
CLIENT_SPAN_ID = uuid.uuid4().hex[:16]

RULES = [
    # The first request (estimate 0.00402, actual 0.00086) fits; the second (0.02002) does not.
    {"name": "user-daily", "key": "header:x-end-user-id", "limit": "0.01", "period": "1d"},
    {"name": "key-monthly", "key": "bearer", "limit": "500", "period": "30d"},
]

T = TypeVar("T")


# -- the receiver ----------------------------------------------------------------------------------


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1, in a thread of this process."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []  # every export, decompressed, as it arrived
        self.exports: list[ExportTraceServiceRequest] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    receiver.errors.append(f"POST {self.path}")
                    self.send_error(404)
                    return
                try:
                    export = ExportTraceServiceRequest.FromString(body)
                except Exception as exc:
                    receiver.errors.append(f"undecodable export: {exc!r}")
                    self.send_error(400)
                    return
                with receiver._lock:
                    receiver.bodies.append(body)
                    receiver.exports.append(export)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def raw(self) -> list[bytes]:
        """Every export as it arrived, and re-serialised from its decoded message."""
        with self._lock:
            return self.bodies + [export.SerializeToString() for export in self.exports]

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """Every span received so far, with its resource's attributes."""
        with self._lock:
            exports = list(self.exports)
        return [
            (attributes(rs.resource.attributes), span)
            for export in exports
            for rs in export.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def named(self, name: str) -> list[Span]:
        return [span for _, span in self.spans() if span.name == name]


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = EXPORT_TIMEOUT_S) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    pairs: list[KeyValue] = list(kvs)
    return {kv.key: value(kv.value) for kv in pairs}


# -- the app under uvicorn -------------------------------------------------------------------------


class ExampleServer:
    """``uvicorn examples.jaeger.app:app`` in its own session; ``kill`` always cleans it up."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ExampleServer:
        for _ in range(3):  # a free port can be taken before uvicorn binds it
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    cwd=REPO,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._ready():
                return self
            self.kill()
        raise RuntimeError(f"the example app did not start:\n{self.log_tail()}")

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "examples.jaeger.app:app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--lifespan", "on",
            "--log-level", "warning",
            "--no-access-log",
            "--timeout-graceful-shutdown", "2",
        ]  # fmt: skip

    def _ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:  # no budget headers: no rule applies, nothing is reserved
                    if client.get(f"{self.url}/openapi.json").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        return False

    def stop(self) -> int:
        """SIGTERM (graceful) and wait for the exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(params=["auto", "builtin"])
def example(
    request: pytest.FixtureRequest, receiver: OtlpReceiver, redis_url: str, tmp_path: Path
) -> Iterator[ExampleServer]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "BUDGET_", "DEMO_", "WEB_CONCURRENCY"))
    }
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "BUDGET_REDIS_URL": redis_url,
            "BUDGET_RULES": json.dumps(RULES),
            "DEMO_REQUEST_SPANS": str(request.param),
        }
    )
    server = ExampleServer(env, tmp_path / "uvicorn.log")
    try:
        yield server.start()
    finally:
        server.kill()


# -- the test --------------------------------------------------------------------------------------


def test_spans_reach_an_otlp_collector(example: ExampleServer, receiver: OtlpReceiver) -> None:
    headers = {"authorization": f"Bearer {TOKEN}", "x-end-user-id": USER}
    with httpx.Client(base_url=example.url, timeout=10.0) as client:
        ok = client.post(
            "/v1/completions",
            json={"max_tokens": 200, "prompt": "hi"},
            headers={**headers, "traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"},
        )
        assert ok.status_code == 200, ok.text
        rejected = client.post(
            "/v1/completions", json={"max_tokens": 1000, "prompt": "hi"}, headers=headers
        )
        assert rejected.status_code == 429, rejected.text

    # uvicorn re-raises the SIGTERM after its graceful shutdown: the app's atexit hooks do not run.
    assert example.stop() in (0, -signal.SIGTERM), example.log_tail()
    assert "Failed to export" not in example.log_tail(), example.log_tail()
    wait_for(lambda: receiver.named("budget.settle"), "a budget.settle span")

    def two_reserves() -> list[Span] | None:
        found = receiver.named("budget.reserve")
        return found if len(found) >= 2 else None

    reserves = wait_for(two_reserves, "two budget.reserve spans")
    assert not receiver.errors, receiver.errors

    # Nothing exported carries the credential or the end-user id: no attribute, event, status
    # message, link or resource value, in the bytes as they arrived or as re-serialised.
    for body in receiver.raw():
        for secret in (TOKEN, USER):
            assert secret.encode() not in body, f"{secret!r} was exported"

    everything = receiver.spans()
    assert everything
    assert {res.get("service.name") for res, _ in everything} == {"budget-demo"}
    by_id = {span.span_id: span for _, span in everything}

    # budget.reserve: one admitted, one rejected, each under its request's server span.
    by_outcome = {attributes(s.attributes)["budget.outcome"]: s for s in reserves}
    assert sorted(by_outcome) == ["admitted", "rejected"], [s.name for s in reserves]
    for outcome, reserve in by_outcome.items():
        attrs = attributes(reserve.attributes)
        assert attrs["budget.rules"] == ["user-daily", "key-monthly"]
        assert isinstance(attrs["budget.estimate"], int)
        assert attrs["budget.estimate"] > 0
        assert attrs["budget.reservation_id"]
        assert all(e.startswith("h:") for e in attrs["budget.entities"]), attrs
        parent = by_id.get(reserve.parent_span_id)
        assert parent is not None, f"the {outcome} reserve span has no exported parent"
        assert parent.kind == Span.SPAN_KIND_SERVER
        assert parent.trace_id == reserve.trace_id
        status = attributes(parent.attributes)
        code = status.get("http.response.status_code", status.get("http.status_code"))
        assert code == (200 if outcome == "admitted" else 429), status
    servers = [s for _, s in everything if s.kind == Span.SPAN_KIND_SERVER and s.name.startswith("POST")]
    assert len(servers) == 2, [(s.name, s.trace_id.hex()) for s in servers]  # one per request
    admitted, refused = by_outcome["admitted"], by_outcome["rejected"]
    assert attributes(admitted.attributes)["budget.estimate"] == 4_020  # (200 + 1) * 0.00002
    assert attributes(refused.attributes)["budget.violated_rules"] == ["user-daily"]
    # The admitted request continued the client's trace.
    request_span = by_id[admitted.parent_span_id]
    assert request_span.trace_id.hex() == CLIENT_TRACE_ID
    assert request_span.parent_span_id.hex() == CLIENT_SPAN_ID

    # budget.settle: only the admitted reservation's, in a trace of its own, linked to its reserve.
    (settle,) = receiver.named("budget.settle")
    attrs = attributes(settle.attributes)
    assert attrs["budget.reservation_id"] == attributes(admitted.attributes)["budget.reservation_id"]
    assert attrs["budget.reason"] == "completed"
    assert attrs["budget.outcome"] == "applied"
    assert attrs["budget.actual"] == 860  # (42 + 0 + 1) * 0.00002
    assert attrs["budget.request_trace_id"] == CLIENT_TRACE_ID
    assert settle.trace_id != admitted.trace_id
    assert not settle.parent_span_id
    assert [(link.trace_id, link.span_id) for link in settle.links] == [
        (admitted.trace_id, admitted.span_id)
    ]
