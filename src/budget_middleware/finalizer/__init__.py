"""The background finalizer: applies settlements and lease renewals, in batches, with retries.

The request path never awaits a settlement: it calls ``submit`` (synchronous, so no cancellation
can interrupt it) and goes on. One worker task sends everything pending in one batch as soon as there
is work, so batches grow by themselves under load and a quiet server settles at once. Failed batches
are retried with capped backoff; settlements are idempotent, so a retry never double-charges.

Its parts, one concern each:

- ``_spool``: the pending queue (bounded by ``max_pending``; releases apart, dropped first) and the
  journal (``BUDGET_JOURNAL``): each settlement knows whether it is journaled, and with a journal
  none is sent before it is; at start the journals of processes that ended are replayed.
- ``_renewals``: the reservations in flight, in a heap of the times their leases are due.
- ``_worker``: ``Finalizer`` itself, the request path's side, the worker loop and shutdown.
- ``_sending``: one batch to the ledger, and what came back (retries, refusals).
- ``_recording``: the settle and renew spans and the metrics.
"""

from __future__ import annotations

from ..telemetry import tracer as tracer  # re-exported: tests without an SDK patch it here too
from ._worker import Finalizer

__all__ = ["Finalizer"]
