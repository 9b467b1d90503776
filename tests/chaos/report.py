"""The data of a chaos run: its configuration (``ChaosConfig``, ``FaultStep``), what happened
(``ChaosReport``: outcomes, faults, samples, per-budget accounting, losses) and its checks
(``ChaosReport.failures``) and markdown summary (``ChaosReport.summary``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_middleware import format_micros

from .procs import LoggedLoss

__all__ = [
    "FAULT_KINDS",
    "FORCED_KINDS",
    "GRACE_503_S",
    "HANDOVER_KINDS",
    "TIGHT_KINDS",
    "BudgetRow",
    "ChaosConfig",
    "ChaosReport",
    "FaultRecord",
    "FaultStep",
    "LoggedLoss",
    "Lost",
    "Sample",
]

FAULT_KINDS = (
    "sigkill",
    "redis-restart",
    "sigterm",
    "sigkill-in-outage",
    "forced-shutdown",
    "sigterm-in-outage",
    "forced-in-outage",
    "redis-empty",
)
# The faults that stop a replica without SIGKILL while it cannot settle everything it holds: what
# it neither applies nor journals, the package must log as lost (journal off), or lose nothing.
HANDOVER_KINDS = ("forced-shutdown", "sigterm-in-outage", "forced-in-outage")
FORCED_KINDS = ("forced-shutdown", "forced-in-outage")  # a second SIGINT: uvicorn replicas only
TIGHT_KINDS = ("tight", "broke")  # the load's kinds that go to the budgets of the small rule
GRACE_503_S = 0.5  # a reserve sent just before Redis came back


@dataclass(frozen=True)
class FaultStep:
    at: float  # seconds into the load
    kind: str
    replica: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}")


@dataclass
class ChaosConfig:
    workdir: Path  # servers' logs, truth files, journals, Redis data
    kinds: tuple[str, ...] = ("uvicorn", "uvicorn", "hypercorn")  # one replica each
    requests: int = 400  # target count, paced evenly over duration_s
    duration_s: float = 12.0  # the load goes on past it until the last fault is over
    concurrency: int = 24  # client workers
    lease_s: float = 1.0  # BUDGET_LEASE
    journal: bool = False  # BUDGET_JOURNAL, a dir per replica (kept across its restarts)
    faults: tuple[FaultStep, ...] = ()
    seed: int = 1
    entities: int = 6  # u0..u<n-1>, the entities with room
    mix: dict[str, float] | None = None  # request kind -> weight (load.DEFAULT_MIX)
    sleep_scale: float = 1.0  # scales the apps' sleeps and the short streams' delays
    drain_deadline_s: float = 20.0  # how long the holds may take to go after the lease
    min_outage_s: float = 0.3  # a Redis outage lasts at least this (and until 503s were seen)
    name: str = "chaos"


@dataclass
class FaultRecord:
    kind: str
    replica: int | None
    t0: float
    t1: float = -1.0
    ok: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    # sigkill-in-outage: requests the app finished while Redis was down (settlements queued), and
    # the settlements in the replica's journal when it was killed; HANDOVER_KINDS: the
    # settlements its journal held unapplied once the process had exited (its next start replays
    # them: none may be lost)
    ended_rids: list[str] = field(default_factory=list)
    journaled_rids: list[str] = field(default_factory=list)


@dataclass
class BudgetRow:
    rule: str
    entity: str
    limit: int
    spent: int
    held: int
    holds: int
    truth: int  # after an empty restart: of the requests that restarted Redis saw settle
    lost: int
    checked: bool = True

    @property
    def diff(self) -> int:
        return self.spent - (self.truth - self.lost)


@dataclass
class Lost:
    rid: str
    pid: int
    replica: int
    path: str
    entity: str
    amount: int
    ended: bool  # the app had finished its response (an "end" record) before the kill
    killed: bool  # the pid was SIGKILLed
    handover: str = ""  # else the fault (HANDOVER_KINDS) that stopped the pid, if one did


@dataclass
class Sample:
    t: float
    budget: str
    spent: int
    held: int
    limit: int


@dataclass
class ChaosReport:
    config: ChaosConfig
    replicas: list[str]
    elapsed_s: float = 0.0
    load_s: float = 0.0
    calls: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    faults: list[FaultRecord] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)
    outage_503: int = 0
    late_503: list[tuple[str, int, float]] = field(default_factory=list)
    unexplained_503: list[tuple[str, int, float, float]] = field(default_factory=list)
    reserve_failures: Counter[str] = field(default_factory=Counter)
    unexpected: list[tuple[str, str, float]] = field(default_factory=list)
    samples: int = 0
    sampler_errors: int = 0
    max_over: int | None = None
    max_over_at: Sample | None = None
    violations: list[Sample] = field(default_factory=list)
    regressions: list[tuple[Sample, int]] = field(default_factory=list)
    leaked_after_lease: dict[str, tuple[int, int]] = field(default_factory=dict)
    drained_after_s: float = -1.0
    leaked_at_end: dict[str, list[str]] = field(default_factory=dict)
    budgets: list[BudgetRow] = field(default_factory=list)
    lost: list[Lost] = field(default_factory=list)
    never_ran: list[str] = field(default_factory=list)
    truth_requests: int = 0
    killed_pids: list[int] = field(default_factory=list)
    # Per pid that was not SIGKILLed and wrote a "lost" line, what its log says it lost.
    logged_lost: dict[int, LoggedLoss] = field(default_factory=dict)
    flight_rids: list[str] = field(default_factory=list)
    recovered: int = 0
    recovered_all: int = 0
    journal_replayed: int = 0
    journal_shelved: int = 0
    journal_leftovers: list[str] = field(default_factory=list)
    exit_codes: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    # -- derived --------------------------------------------------------------------------------

    @property
    def spend_diff(self) -> int:
        """Sum of |spent - (truth - lost)| over the checked budgets (target 0)."""
        return sum(abs(b.diff) for b in self.budgets if b.checked)

    @property
    def lost_amount(self) -> int:
        return sum(x.amount for x in self.killed_lost)

    @property
    def killed_lost(self) -> list[Lost]:
        """The counted in-flight losses of SIGKILLed replicas."""
        return [x for x in self.lost if x.killed]

    @property
    def stray_lost(self) -> list[Lost]:
        """Losses of processes that were not SIGKILLed: allowed only without a journal, and only
        as many and as much as their own logs said they lost (``logged_mismatch``)."""
        return [x for x in self.lost if not x.killed]

    def logged_mismatch(self) -> dict[int, str]:
        """Per pid not SIGKILLed, how its counted loss differs from what it logged as lost."""
        by_pid: dict[int, list[Lost]] = {}
        for x in self.stray_lost:
            by_pid.setdefault(x.pid, []).append(x)
        out: dict[int, str] = {}
        for pid in sorted(set(by_pid) | set(self.logged_lost)):
            lost = by_pid.get(pid, [])
            logged = self.logged_lost.get(pid, LoggedLoss())
            amount = sum(x.amount for x in lost)
            named = set(logged.rids) - {x.rid for x in lost}
            priced = logged.unpriced == 0
            if len(lost) != logged.count or (priced and amount != logged.micros) or named:
                out[pid] = (
                    f"pid {pid}: {len(lost)} settlements lost ({amount} micro-units), its log says "
                    f"{logged.count} ({logged.micros} micro-units"
                    + (f", {logged.unpriced} unpriced" if logged.unpriced else "")
                    + ")"
                    + (f"; named lost but landed: {sorted(named)}" if named else "")
                    + f"; lines {logged.lines[:5]}"
                )
        return out

    @property
    def leaked_holds(self) -> int:
        return sum(h for _, h in self.leaked_after_lease.values()) + sum(
            len(v) for v in self.leaked_at_end.values()
        )

    def fault_counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.faults if f.ok)

    def failures(self) -> list[str]:
        out = list(self.errors)
        for f in self.faults:
            if not f.ok:
                out.append(f"fault {f.kind} (replica {f.replica}) did not complete: {f.detail}")
        if self.unexpected:
            out.append(f"unexpected responses: {self.unexpected[:10]}")
        if self.unexplained_503:
            out.append(f"503 with no Redis outage before it: {self.unexplained_503[:10]}")
        if self.reserve_failures["other"]:
            out.append(f"reserves failed for other reasons than Redis down: {self.reserve_failures}")
        if self.outcomes.get("timeout"):
            out.append(f"{self.outcomes['timeout']} client timeouts (a server hung?)")
        wrong_429 = {k: c["429"] for k, c in self.by_kind.items() if c["429"] and k not in TIGHT_KINDS}
        if wrong_429:
            out.append(f"429 on budgets with room: {wrong_429}")
        if "broke" in self.by_kind and not self.by_kind["broke"]["429"]:
            out.append("no 429 on the over-budget entity 'broke'")
        if self.max_over is not None and self.max_over > 0:
            out.append(
                f"spent + held exceeded the limit by {self.max_over} micro-units: "
                f"{self.max_over_at}; violations {self.violations[:5]}"
            )
        if self.regressions:
            out.append(f"spent went down (data lost across a restart with AOF): {self.regressions[:5]}")
        if self.leaked_after_lease:
            out.append(f"holds still live one lease after the run: {self.leaked_after_lease}")
        if self.leaked_at_end:
            out.append(f"holds left after every replica stopped: {self.leaked_at_end}")
        for b in self.budgets:
            if b.checked and b.diff:
                out.append(
                    f"{b.rule}:{b.entity}: spent {b.spent} != truth {b.truth} - counted loss "
                    f"{b.lost} (diff {b.diff:+d} micro-units)"
                )
        stray = self.stray_lost
        if self.config.journal:
            if stray:
                out.append(f"settlements lost on replicas that were not SIGKILLed: {stray}")
            logged = {pid: x.lines[:5] for pid, x in self.logged_lost.items() if x.count}
            if logged:
                out.append(f"settlements logged as lost with the journal on: {logged}")
        else:
            # Without a journal a process stopped while it cannot apply (Redis down, or a forced
            # exit cut its drain short) loses what it holds: exactly what it logged as lost. A
            # graceful shutdown with Redis up (sigterm, the end of the run) loses nothing.
            for why in self.logged_mismatch().values():
                out.append(f"a loss of a process not SIGKILLed differs from its log: {why}")
            graceful = [x for x in stray if not x.handover]
            if graceful:
                out.append(f"settlements lost by a graceful shutdown with Redis up: {graceful}")
        lost_ids = {x.rid for x in self.lost}
        if not self.config.journal:
            # Only memory held these settlements when the replica was killed: none can have landed.
            ended = {r for f in self.faults if f.kind == "sigkill-in-outage" for r in f.ended_rids}
            if ended - lost_ids:
                out.append(
                    f"settlements queued in the memory of a SIGKILLed replica landed: "
                    f"{sorted(ended - lost_ids)}"
                )
        saved = {r for f in self.faults for r in f.journaled_rids} & lost_ids
        if saved:
            out.append(
                f"settlements in a journal at a SIGKILL or a shutdown were lost all the same: "
                f"{sorted(saved)}"
            )
        if self.journal_leftovers:
            out.append(f"unapplied settlements left in journals: {self.journal_leftovers}")
        return out

    # -- the summary ------------------------------------------------------------------------------

    def summary(self, *, max_named: int = 100, max_faults: int = 100) -> str:
        """A markdown summary: tables of outcomes and checks, the faults, the counted losses."""
        c = self.config
        lines = [
            f"### {c.name}: {len(self.replicas)} replicas ({', '.join(self.replicas)}), "
            f"lease {c.lease_s:g}s, journal {'on' if c.journal else 'off'}",
            "",
            f"{self.calls} requests in {self.load_s:.1f}s of load ({self.elapsed_s:.1f}s in all), "
            f"{self.truth_requests} admitted by the apps; {self.samples} usage samples "
            f"({self.sampler_errors} failed while Redis was down).",
            "",
            "| requests by outcome | " + " | ".join(sorted(self.outcomes)) + " | total |",
            "|---|" + "---|" * (len(self.outcomes) + 1),
        ]
        for kind in sorted(self.by_kind):
            row = self.by_kind[kind]
            cells = [str(row.get(o, 0)) for o in sorted(self.outcomes)]
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {sum(row.values())} |")
        cells = [str(self.outcomes[o]) for o in sorted(self.outcomes)]
        lines.append("| **all** | " + " | ".join(cells) + f" | {self.calls} |")
        counts = self.fault_counts()
        faults = ", ".join(f"{k} x{counts[k]}" for k in FAULT_KINDS if counts[k]) or "none"
        checked = [b for b in self.budgets if b.checked]
        killed_lost = self.killed_lost
        lost_ended = [x for x in killed_lost if x.ended]
        stray = self.stray_lost
        logged = [x for x in self.logged_lost.values() if x.count]
        over = "n/a"
        if self.max_over is not None and self.max_over_at is not None:
            over = f"{self.max_over:+d} micro-units (on {self.max_over_at.budget})"
        since = ""
        if any(f.kind == "redis-empty" for f in self.faults):
            since = "; truth = requests the empty Redis admitted or saw settle as recovered"
        lines += [
            "",
            "| check | result | target |",
            "|---|---|---|",
            f"| faults injected | {faults} | each at least once |",
            f"| leaked holds (one lease after the run; after shutdown) | {self.leaked_holds} | 0 |",
            f"| spend difference from ground truth, outside counted losses "
            f"({len(checked)} budgets{since}) | {self.spend_diff} micro-units | 0 |",
            f"| counted in-flight loss of SIGKILLed replicas | {len(killed_lost)} requests, "
            f"{self.lost_amount} micro-units ({format_micros(self.lost_amount)} units); "
            f"{len(lost_ended)} of them had finished their response | "
            f"{'only what was in flight' if c.journal else 'reported'} |",
            f"| lost on replicas not SIGKILLed (forced shutdown, SIGTERM in an outage, ...): "
            f"counted / logged as lost by the package | {len(stray)} requests "
            f"({sum(x.amount for x in stray)} micro-units) / {sum(x.count for x in logged)} "
            f"({sum(x.micros for x in logged)} micro-units) | "
            f"{'0 / 0' if c.journal else 'counted = logged'} |",
            f"| max observed spent + held - limit | {over} | <= 0 |",
            f"| spent regressions across AOF restarts | {len(self.regressions)} | 0 |",
            f"| 503 while Redis was down (+{GRACE_503_S:g}s) / with no outage before | "
            f"{self.outage_503} / {len(self.unexplained_503)} | - / 0 |",
            f"| 503 after Redis was back (first use of a pooled connection to the old Redis: "
            f"known bug) | {len(self.late_503)} | 0 |",
            "| reserve failures in the replicas' logs | "
            + (", ".join(f"{k} {n}" for k, n in sorted(self.reserve_failures.items())) or "none")
            + " | other 0 |",
        ]
        outage_kills = [f for f in self.faults if f.kind == "sigkill-in-outage"]
        if outage_kills:
            lost_ids = {x.rid for x in self.lost}
            ended = {r for f in outage_kills for r in f.ended_rids}
            journaled = {r for f in outage_kills for r in f.journaled_rids}
            lines.append(
                "| SIGKILL during an outage: requests the app finished while Redis was down, "
                f"their settlement lost | {len(ended & lost_ids)} of {len(ended)} | "
                f"{'only those not journaled yet' if c.journal else 'all (only memory held them)'} |"
            )
            if c.journal:
                lines.append(
                    f"| ... settlements in the journal at the SIGKILL, lost | "
                    f"{len(journaled & lost_ids)} of {len(journaled)} | 0 |"
                )
        for kind, label in (
            ("forced-shutdown", "forced shutdown (double SIGINT) with streams in flight"),
            ("sigterm-in-outage", "SIGTERM during an outage, with settlements being journaled"),
            ("forced-in-outage", "forced shutdown during an outage, with streams in flight"),
        ):
            done = [f for f in self.faults if f.kind == kind and f.ok]
            if not done:
                continue
            lost_ids = {x.rid for x in self.lost}
            cut = sum(f.detail.get("requests_cut", 0) for f in done)
            journaled = {r for f in done for r in f.journaled_rids}
            pids = {f.detail.get("pid") for f in done}
            lost_here = [x for x in self.lost if x.pid in pids]
            lines.append(
                f"| {label}: requests it cut off / settlements in its journal after the exit, lost "
                f"/ lost in all | {cut} / {len(journaled & lost_ids)} of {len(journaled)} / "
                f"{len(lost_here)} ({sum(x.amount for x in lost_here)} micro-units) | "
                f"- / 0 / {'0' if c.journal else 'as logged'} |"
            )
        if c.journal:
            lines.append(
                f"| journal: replayed at restart / shelved at shutdown / left unapplied | "
                f"{self.journal_replayed} / {self.journal_shelved} / {len(self.journal_leftovers)} "
                f"| - / - / 0 |"
            )
        if self.flight_rids:
            flights = [b for b in self.budgets if b.entity.startswith("flight-")]
            ok = sum(1 for b in flights if b.diff == 0)
            lines.append(
                f"| requests in flight across the empty restart landing once | {ok} of "
                f"{len(flights)} entities exact, {self.recovered} of {len(self.flight_rids)} "
                f"settled as recovered ({self.recovered_all} recovered settlements on all "
                f"budgets) | all exact |"
            )
        lines += ["", "Faults (seconds into the load):", ""]
        for f in self.faults[:max_faults]:
            target = "" if f.replica is None or f.kind == "redis-empty" else f" replica {f.replica}"
            lines.append(f"- {f.t0:.2f}-{f.t1:.2f} {f.kind}{target}: {f.detail}")
        if len(self.faults) > max_faults:
            outages = [b - a for a, b in self.outages]
            lines.append(
                f"- ... and {len(self.faults) - max_faults} more; Redis outages "
                f"{min(outages):.2f}-{max(outages):.2f}s (mean {sum(outages) / len(outages):.2f}s)"
            )
        if self.lost:
            lines += [
                "",
                "Counted in-flight loss (reservation id, replica/pid, path, entity, amount):",
                "",
            ]
            ordered = sorted(self.lost, key=lambda x: (x.pid, x.rid))
            for x in ordered[:max_named]:
                state = "finished, settlement not yet applied" if x.ended else "in flight"
                if not x.killed:
                    state += f"; not SIGKILLed: {x.handover or 'stopped'}, logged as lost"
                lines.append(
                    f"- `{x.rid}` replica {x.replica} pid {x.pid} {x.path} {x.entity} "
                    f"{x.amount} ({state})"
                )
            if len(ordered) > max_named:
                lines.append(f"- ... and {len(ordered) - max_named} more")
        failures = self.failures()
        lines += ["", "Result: " + ("PASS" if not failures else f"FAIL ({len(failures)} checks)")]
        lines += [f"- {f}" for f in failures]
        return "\n".join(lines)
