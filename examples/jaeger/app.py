"""The FastAPI example (``examples/fastapi_app.py``) with OpenTelemetry tracing exported over OTLP/HTTP.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 uvicorn examples.jaeger.app:app

The SDK is configured from the standard ``OTEL_*`` variables: ``OTEL_SERVICE_NAME`` (default
``budget-demo``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` and
``OTEL_EXPORTER_OTLP_*``. Every request has one server span with ``budget.reserve`` under it: from
``opentelemetry-instrumentation-asgi`` when it is installed (FastAPI then opens none of its own),
else from FastAPI itself (versions with built-in telemetry), else from ``RequestSpan`` below.
``DEMO_REQUEST_SPANS=builtin`` skips the instrumentation package. See ``README.md`` beside this file.
"""

from __future__ import annotations

import os

import anyio
from fastapi import FastAPI
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from examples.fastapi_app import app as budget_app

__all__ = [
    "FlushSpansOnShutdown",
    "RequestSpan",
    "add_request_spans",
    "app",
    "configure_tracing",
]

DEFAULT_SERVICE_NAME = "budget-demo"


def configure_tracing() -> None:
    """Install an SDK tracer provider exporting over OTLP/HTTP, unless one is installed already."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # e.g. run under ``opentelemetry-instrument``: keep what it configured
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_BSP_*, OTEL_EXPORTER_*
    trace.set_tracer_provider(provider)


class RequestSpan:
    """A server span per HTTP request, unless one is open already (FastAPI's own, say).

    Continues a W3C ``traceparent`` from the client. Records no headers and no query string: those
    may carry credentials and end-user ids.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.tracer = trace.get_tracer("examples.jaeger")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or trace.get_current_span().is_recording():
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        with self.tracer.start_as_current_span(
            f"{method} {path}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:

            async def send_with_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_with_status)


class FlushSpansOnShutdown:
    """Flushes the span processor when the lifespan shutdown completes.

    The last requests' ``budget.settle`` spans are written during the shutdown, when the budget
    finalizer drains; and the SDK's exit hook does not run when uvicorn stops on SIGTERM (it
    re-raises the signal once its graceful shutdown is done), so flush here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_after_flush(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                flush = getattr(trace.get_tracer_provider(), "force_flush", None)
                if flush is not None:
                    await anyio.to_thread.run_sync(flush)
            await send(message)

        await self.app(scope, receive, send_after_flush)


def add_request_spans(fastapi_app: FastAPI) -> None:
    """Open a server span per request outside ``BudgetMiddleware`` (added last: it runs first).

    Inside FastAPI rather than around it: a FastAPI with built-in telemetry sees the ASGI
    instrumentation in its stack and leaves the request span to it (wrapped around FastAPI, each
    request would get two server spans, in two traces).
    """
    if os.environ.get("DEMO_REQUEST_SPANS", "auto") != "builtin":
        try:
            from opentelemetry.instrumentation.asgi import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
                OpenTelemetryMiddleware,
            )
        except ImportError:
            pass
        else:  # one span per request, without its per-message "http send" / "http receive" spans
            fastapi_app.add_middleware(OpenTelemetryMiddleware, exclude_spans=["receive", "send"])
            return
    fastapi_app.add_middleware(RequestSpan)


configure_tracing()
add_request_spans(budget_app)
app = FlushSpansOnShutdown(budget_app)
