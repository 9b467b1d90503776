"""Sending one batch of settlements to the ledger, and accounting for what came back.

An outage (``LedgerUnavailable``, a timeout) puts the whole batch back for a retry; an error that is
not one (a script error, a bug) is isolated by settling the batch one by one, and a settlement the
store keeps refusing is given up (counted as lost, logged) so it cannot block the queue.
"""

from __future__ import annotations

import logging
import time

import anyio

from ..ledger import Ledger, LedgerError, LedgerUnavailable, Settlement
from ..telemetry import instruments
from ._counters import Counters
from ._recording import Recorder
from ._spool import Spool

__all__ = ["Sender"]

logger = logging.getLogger("budget_middleware")

# How often the store may refuse one settlement (not an outage) before it is given up as lost.
_MAX_REFUSALS = 20


class Sender:
    def __init__(
        self,
        counts: Counters,
        ledger: Ledger,
        spool: Spool,
        recorder: Recorder,
        timeout_s: float,
        max_batch: int,
    ) -> None:
        self._counts = counts
        self._ledger = ledger
        self._spool = spool
        self._recorder = recorder
        self._timeout_s = timeout_s
        self._max_batch = max_batch

    async def flush(self) -> bool:
        """Send one batch; False if the ledger failed (the batch is back in the queue)."""
        spool = self._spool
        batch = spool.take_batch(self._max_batch)
        if not batch:
            return True  # nothing to send, or nothing journaled yet: the next pass journals it
        started = time.time_ns()
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(self._timeout_s):
                results = await self._ledger.settle_many(batch)
        except (LedgerUnavailable, TimeoutError) as exc:  # an outage: retry the whole batch
            self._requeue(batch, exc)
            return False
        except anyio.get_cancelled_exc_class():
            spool.requeue(batch, failed=False)  # stopped mid-batch: count it with what is left
            raise
        except Exception:  # not an outage (a script error, a bug): isolate the culprit
            logger.exception("budget: settle batch failed unexpectedly; retrying one by one")
            return await self._settle_each(batch)
        finally:
            spool.batch_done()
        recorder = self._recorder
        recorder.batch_sent(t0, len(batch))
        for s, r in zip(batch, results, strict=True):
            spool.applied(s)
            recorder.settled(s, r, started)
        return True

    async def _settle_each(self, batch: list[Settlement]) -> bool:
        ok = True
        for n, s in enumerate(batch):
            try:
                with anyio.fail_after(self._timeout_s):
                    (result,) = await self._ledger.settle_many([s])
            except anyio.get_cancelled_exc_class():
                self._spool.requeue(batch[n:], failed=False)
                raise
            except (LedgerUnavailable, TimeoutError) as exc:
                # An outage after all: the rest waits for the batch's backoff, not a timeout each
                # (and renewals, which run between passes, are not held up).
                self._requeue(batch[n:], exc)
                return False
            except LedgerError as exc:
                # The store refused this one (out of memory, a script error): retry it a while
                # with the batch's backoff, then give up on it so it cannot block the queue. Only
                # refusals count here, not the retries of an outage before them.
                s.refusals += 1
                if s.refusals < _MAX_REFUSALS:
                    self._requeue([s], exc)
                    ok = False
                    continue
                logger.error(
                    "budget: settlement %s refused %d times (%s); counted as lost",
                    s.reservation_id,
                    s.refusals,
                    exc,
                )
                self._give_up(s)
                continue
            except Exception:
                logger.exception(
                    "budget: settlement %s cannot be applied; counted as lost", s.reservation_id
                )
                self._give_up(s)
                continue
            instruments().queue.add(-1)
            self._spool.applied(s)
            self._recorder.settled(s, result, time.time_ns())
        return ok

    def _give_up(self, s: Settlement) -> None:
        self._counts.lost += 1
        instruments().lost.add(1)
        instruments().queue.add(-1)
        self._spool.applied(s)  # marked in the journal, or every start would fail on it again

    def _requeue(self, batch: list[Settlement], exc: BaseException) -> None:
        self._counts.retries += 1
        self._spool.requeue(batch, failed=True)
        logger.warning(
            "budget: settle batch of %d failed (%s); will retry", len(batch), exc or "timeout"
        )
