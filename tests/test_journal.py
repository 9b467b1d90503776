"""The settlement journal (DESIGN.md section 7): records, torn lines, locks, take-over, compaction.

Liveness is tested with real processes: one that holds its journal while it runs, one that exits
without closing it, one that is SIGKILLed. Finalizer integration on a real Redis is in
``test_finalizer_outage.py``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import budget_middleware.journal as journal_module
from budget_middleware import Budget, BudgetConfig, BudgetMiddleware, MemoryLedger, Rule
from budget_middleware.finalizer import Finalizer
from budget_middleware.journal import Journal, encode_settlement, read_unapplied
from budget_middleware.ledger import HeldBudget, Settlement, new_reservation_id

DEADLINE_S = 15.0


def settlement(actual: int = 1_500_000, *, holds: int = 2, reason: str = "ok") -> Settlement:
    rid = new_reservation_id()
    return Settlement(
        reservation_id=rid,
        holds=tuple(
            HeldBudget(
                budget=Budget(f"rule{i}", f"r:user-{i}", 86_400_000 if i else 0),
                amount=2_000_000 + i,
                window=1_700_000_000_000 if i else 0,
                epoch=f"epoch-{i}",
                limit=10_000_000,
                remaining=8_000_000 - i,
                reset_ms=1_700_086_400_000 if i else None,
            )
            for i in range(holds)
        ),
        actual=actual,
        reason=reason,
        estimate=2_000_000,
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


def journal_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("journal-"))


def is_locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# =================================================================================================
# Records
# =================================================================================================


def test_every_field_of_a_settlement_survives_the_journal(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    written = [settlement(), settlement(0, holds=0, reason="release-error"), settlement(holds=1)]
    j.write(written)
    assert j.unapplied() == (written, False)
    assert j.path is not None
    assert read_unapplied(j.path) == written
    records = [json.loads(line) for line in j.path.read_text().splitlines()]
    assert [r["op"] for r in records] == ["settle"] * 3
    assert "context" not in records[0]
    assert "attempts" not in records[0]
    j.close()


def test_applied_marks_remove_settlements_and_limit_bounds_what_is_read(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    a, b, c = settlement(1), settlement(2), settlement(3)
    j.write([a, b, c])
    j.write((), [b.reservation_id])
    assert j.unapplied() == ([a, c], False)
    assert j.unapplied(limit=1) == ([a], True)
    j.write([settlement(4)], [a.reservation_id, c.reservation_id])  # one write, both kinds
    assert [s.actual for s in j.unapplied()[0]] == [4]
    j.close()


def test_the_file_is_per_process_private_and_locked_while_open(tmp_path: Path) -> None:
    j1, j2 = Journal(tmp_path / "new" / "dir"), Journal(tmp_path / "new" / "dir")
    p1, p2 = j1.open(), j2.open()
    assert p1 != p2
    assert p1.name.startswith(f"journal-{os.getpid()}-")
    assert p1.name.endswith(".jsonl")
    assert stat.S_IMODE(p1.stat().st_mode) == 0o600
    assert is_locked(p1)
    assert is_locked(p2)
    j1.close()
    j2.close()
    assert journal_files(tmp_path / "new" / "dir") == []  # nothing unapplied: deleted at close


def test_a_directory_that_cannot_be_one_fails_at_construction(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        Journal(tmp_path / "file")


def test_a_failed_write_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(tmp_path)
    good = settlement(1)
    j.write([good])
    real = journal_module._write_all

    def half_then_disk_full(fd: int, data: bytes) -> None:
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module, "_write_all", half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        j.write([settlement(2), settlement(3)])
    monkeypatch.setattr(journal_module, "_write_all", real)
    after = settlement(4)
    j.write([after])
    with caplog.at_level(logging.INFO, logger="budget_middleware"):
        assert j.unapplied() == ([good, after], False)
    assert not caplog.records  # no torn or malformed line anywhere
    j.close()


# =================================================================================================
# Torn and malformed lines
# =================================================================================================


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    a, b = settlement(1), settlement(2)
    j.write([a, b])
    path = j.path
    assert path is not None
    j.close()
    torn = json.dumps(encode_settlement(settlement(3)))[:57]
    with open(path, "a") as f:
        f.write(torn)  # a crash mid-write: no newline
    assert read_unapplied(path) == [a, b]
    taker = Journal(tmp_path)
    assert taker.claim() == 2
    assert taker.unapplied() == ([a, b], False)
    assert not path.exists()
    taker.close()


def test_a_malformed_line_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = settlement(1), settlement(2)
    path = tmp_path / "journal-1-dead.jsonl"
    lines = [
        json.dumps(encode_settlement(a)),
        '{"op":"settle","reservation_id":"X"}',  # fields missing
        '{"op":"settle", broken',
        json.dumps({**encode_settlement(settlement(9)), "actual": "9"}),  # wrong type
        '{"op":"compact"}',
        json.dumps(encode_settlement(b)),
    ]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        assert read_unapplied(path) == [a, b]
    assert sum("malformed" in r.getMessage() for r in caplog.records) == 4


# =================================================================================================
# Taking over the journals of processes that ended
# =================================================================================================


def test_claim_takes_over_a_dead_journal_and_deletes_it(tmp_path: Path) -> None:
    old = Journal(tmp_path)
    a, b, c = settlement(1), settlement(2), settlement(3)
    old.write([a, b, c])
    old.write((), [b.reservation_id])
    old_path = old.path
    assert old_path is not None
    old.close()  # unapplied left: the file stays, unlocked, like a process that ended
    assert old_path.exists()
    assert not is_locked(old_path)

    new = Journal(tmp_path)
    assert new.claim() == 2
    assert not old_path.exists()
    assert new.unapplied() == ([a, c], False)
    assert journal_files(tmp_path) == [new.path]

    third = Journal(tmp_path)
    assert third.claim() == 0  # ``new`` is alive: its file is not touched
    assert new.path is not None
    assert new.path.exists()
    new.write((), [a.reservation_id, c.reservation_id])
    new.close()  # all applied: deleted
    third.close()
    assert journal_files(tmp_path) == []


def test_a_journal_that_cannot_be_read_is_left_and_the_others_are_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "journal-0-bogus.jsonl").mkdir()  # unreadable as a file
    old = Journal(tmp_path)
    a = settlement(1)
    old.write([a])
    old.close()
    new = Journal(tmp_path)
    with caplog.at_level(logging.ERROR, logger="budget_middleware"):
        assert new.claim() == 1
    assert "cannot take over journal" in caplog.text
    assert (tmp_path / "journal-0-bogus.jsonl").is_dir()
    assert new.unapplied() == ([a], False)
    new.close()


def test_claim_removes_leftover_temporary_files(tmp_path: Path) -> None:
    leftover = tmp_path / ".journal-1-abc.tmp"  # a creator that died before naming its file
    leftover.write_text("")
    j = Journal(tmp_path)
    assert j.claim() == 0
    assert not leftover.exists()
    j.close()


CHILD = textwrap.dedent(
    """
    import sys, time
    from budget_middleware.journal import Journal, decode_settlement
    import json
    j = Journal(sys.argv[1])
    j.write([decode_settlement(json.loads(line)) for line in sys.argv[2:]])
    print(j.path, flush=True)
    sys.stdin.readline()  # hold the journal until told to go; then exit without closing it
    """
)


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_a_live_process_keeps_its_journal_and_a_dead_one_is_taken_over(
    tmp_path: Path, ending: str
) -> None:
    written = [settlement(1), settlement(2)]
    args = [json.dumps(encode_settlement(s)) for s in written]
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdin is not None
            child_path = Path(proc.stdout.readline().strip())
            assert child_path.name.startswith(f"journal-{proc.pid}-")
            assert is_locked(child_path)

            mine = Journal(tmp_path)
            assert mine.claim() == 0  # alive: not taken
            assert child_path.exists()
            assert read_unapplied(child_path) == written

            if ending == "sigkill":
                proc.send_signal(signal.SIGKILL)
            else:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            proc.wait(timeout=DEADLINE_S)
            assert not is_locked(child_path)  # the kernel dropped the lock with the process

            assert mine.claim() == 2
            assert not child_path.exists()
            assert mine.unapplied() == (written, False)
            assert mine.claim() == 0  # taking over twice finds nothing more
            mine.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=DEADLINE_S)


# =================================================================================================
# Compaction
# =================================================================================================


def test_compaction_truncates_a_fully_applied_file(tmp_path: Path) -> None:
    j = Journal(tmp_path, compact_bytes=4_000)
    for i in range(100):
        s = settlement(i)
        j.write([s])
        j.write((), [s.reservation_id])
        assert j.path is not None
        assert j.path.stat().st_size < 4_000 + 1_000
    assert j.unapplied() == ([], False)
    assert j.compactions >= 5
    j.close()


def test_compaction_keeps_the_unapplied_ones_and_the_lock(tmp_path: Path) -> None:
    j = Journal(tmp_path, compact_bytes=4_000)
    keep = [settlement(1), settlement(2)]
    j.write(keep)
    path = j.path
    assert path is not None
    for i in range(100):
        s = settlement(10 + i)
        j.write([s])
        j.write((), [s.reservation_id])
        assert path.stat().st_size < 4_000 + 1_000
    assert j.compactions >= 5
    assert j.path == path
    assert is_locked(path)
    assert j.unapplied() == (keep, False)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    other = Journal(tmp_path)
    assert other.claim() == 0
    other.close()
    j.close()
    assert read_unapplied(path) == keep


# =================================================================================================
# Configuration
# =================================================================================================


async def noop_app(scope: object, receive: object, send: object) -> None:
    pass


def test_the_middleware_passes_the_journal_and_the_bound_to_its_finalizer(tmp_path: Path) -> None:
    rule = Rule("user", "header:x-user", "10")
    config = BudgetConfig(
        rules=(rule,), redis_url="redis://127.0.0.1:1/0", journal_dir=str(tmp_path / "j"), max_pending=7
    )
    mw = BudgetMiddleware(noop_app, config)
    assert isinstance(mw.finalizer.journal, Journal)
    assert mw.finalizer.journal.directory == tmp_path / "j"
    assert mw.finalizer.max_pending == 7
    assert journal_files(tmp_path / "j") == []  # no file before the worker runs

    plain = BudgetMiddleware(noop_app, BudgetConfig(rules=(rule,), redis_url="redis://127.0.0.1:1/0"))
    assert plain.finalizer.journal is None
    assert plain.finalizer.max_pending == BudgetConfig().max_pending


def test_config_reads_the_journal_and_the_bound_from_the_environment(tmp_path: Path) -> None:
    config = BudgetConfig.from_env({"BUDGET_JOURNAL": str(tmp_path), "BUDGET_MAX_PENDING": "12"})
    assert config.journal_dir == str(tmp_path)
    assert config.max_pending == 12


async def test_a_memory_ledger_settles_at_once_and_ignores_the_journal(tmp_path: Path) -> None:
    ledger = MemoryLedger()
    fin = Finalizer(ledger, journal=Journal(tmp_path), max_pending=1)
    assert fin.journal is None
    for _ in range(3):
        fin.submit(settlement(holds=0))
    assert fin.applied == 3
    assert fin.lost == 0
    assert await fin.drain(0.1) == 0
    assert journal_files(tmp_path) == []


# =================================================================================================
# Each file names its ledger: a process claims only its own
# =================================================================================================


def test_a_journal_claims_only_the_files_of_its_own_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ours, theirs = settlement(), settlement()
    for identity, s in (("ours", ours), ("theirs", theirs)):
        dead = Journal(tmp_path, identity=identity)
        dead.write([s])
        dead.close()  # unapplied: left for the next start of that deployment

    mine = Journal(tmp_path, identity="ours")
    with caplog.at_level(logging.INFO, logger="budget_middleware"):
        assert mine.claim() == 1
    assert mine.unapplied() == ([ours], False)
    assert "belongs to another ledger" in caplog.text
    (left,) = [p for p in journal_files(tmp_path) if p != mine.path]
    assert read_unapplied(left) == [theirs]  # untouched, still there for its own deployment
    mine.close()

    other = Journal(tmp_path, identity="theirs")
    assert other.claim() == 1
    assert other.unapplied() == ([theirs], False)
    other.close()


def test_a_file_without_an_identity_is_claimed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = settlement()
    (tmp_path / "journal-1-abcdef.jsonl").write_text(json.dumps(encode_settlement(old)) + "\n")
    j = Journal(tmp_path, identity="ours")
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        assert j.claim() == 1
    assert j.unapplied() == ([old], False)
    assert "carries no ledger identity" in caplog.text
    j.close()


def test_the_identity_survives_compaction(tmp_path: Path) -> None:
    j = Journal(tmp_path, compact_bytes=2_000, identity="ours")
    kept = settlement()
    j.write([kept])
    for _ in range(20):
        s = settlement()
        j.write([s])
        j.write(applied=[s.reservation_id])
    assert j.compactions > 0
    done = settlement()
    j.write([done])
    j.write(applied=[done.reservation_id, kept.reservation_id])
    for _ in range(20):  # a compaction that keeps nothing truncates to the identity line
        s = settlement()
        j.write([s])
        j.write(applied=[s.reservation_id])
    assert j.path is not None
    lines = j.path.read_bytes().splitlines()
    assert json.loads(lines[0]) == {"op": "ledger", "id": "ours"}
    left = settlement()
    j.write([left])
    j.close()
    theirs = Journal(tmp_path, identity="theirs")
    assert theirs.claim() == 0
    theirs.close()
    again = Journal(tmp_path, identity="ours")
    assert again.claim() == 1
    assert again.unapplied() == ([left], False)
    again.close()


def test_the_ledger_identity_names_kind_location_and_prefix_and_never_a_password() -> None:
    from budget_middleware import RedisClusterLedger, RedisLedger
    from budget_middleware.journal import ledger_identity

    url = "redis://:s3cr%23t%2Fx%3Fy@cache:6379/0"  # a password of #, / and ?, encoded
    one = ledger_identity(RedisLedger(url, prefix="a"))
    assert one == ledger_identity(RedisLedger(url, prefix="a"))
    assert one == ledger_identity(RedisLedger("redis://:other-password@cache:6379/0", prefix="a"))
    assert one != ledger_identity(RedisLedger(url, prefix="b"))
    assert one != ledger_identity(RedisLedger("redis://:s3cr%23t%2Fx%3Fy@cache:6379/1", prefix="a"))
    assert one != ledger_identity(RedisLedger("redis://cache2:6379/0", prefix="a"))
    assert one != ledger_identity(MemoryLedger())
    seeds = ledger_identity(RedisClusterLedger("redis+cluster://h1:7000,h2:7001", prefix="a"))
    assert seeds == ledger_identity(RedisClusterLedger("redis+cluster://h2:7001,h1:7000", prefix="a"))
    assert seeds != one


def test_a_finalizer_journals_under_its_ledger_identity(tmp_path: Path) -> None:
    from budget_middleware import RedisLedger
    from budget_middleware.journal import ledger_identity

    ledger = RedisLedger("redis://:s3cr%23t@cache:6379/0", prefix="deploy-a")
    fin = Finalizer(ledger, journal=Journal(tmp_path))
    assert fin.journal is not None
    assert fin.journal.identity == ledger_identity(ledger)
    fin.journal.write([settlement()])
    assert fin.journal.path is not None
    data = fin.journal.path.read_text()
    assert json.loads(data.splitlines()[0]) == {"op": "ledger", "id": ledger_identity(ledger)}
    assert "s3cr" not in data
    fin.journal.close()
