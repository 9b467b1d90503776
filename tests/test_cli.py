"""The operator's command line, run as operators run it: ``python -m budget_middleware`` in a
subprocess, against a real redis-server, with real spend made through the ledger API.

Every mistake is one line on stderr and a non-zero exit (2: typed or configured wrong; 1: the
ledger failed), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
import redis.asyncio

from budget_middleware import cli
from budget_middleware.budgets import Budget
from budget_middleware.identity import EntityHasher
from budget_middleware.ledger import HoldRequest, RedisLedger, Settlement, new_reservation_id

SECRET = "cli-test-secret"
DAY_MS = 86_400_000
BASE_ENV = {"BUDGET_KEY": "header:x-end-user-id", "BUDGET_LIMIT": "0.5", "BUDGET_SECRET": SECRET}
# A rule keyed on a credential header: its ids are always digested.
KEYS_RULE = json.dumps([{"name": "keys", "key": "header:x-api-key", "limit": "10", "period": "1h"}])


@pytest.fixture(scope="module")
def unreachable() -> Iterator[str]:
    """A Redis URL whose port refuses connections: bound by this socket, which never listens, so
    no server started meanwhile can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"redis://:pw-not-shown@127.0.0.1:{sock.getsockname()[1]}/0"


def run_cli(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m budget_middleware *argv`` with ``BASE_ENV`` updated by ``env`` (an empty value
    removes a variable) and no other ``BUDGET_*`` variable."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    environ.update({k: v for k, v in {**BASE_ENV, **env}.items() if v})
    return subprocess.run(
        [sys.executable, "-m", "budget_middleware", *argv],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refused(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line a refused command printed, after checking the exit code and that it printed
    nothing else."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == ""
    return proc.stdout


def usage_json(*argv: str, **env: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ok(run_cli(*argv, "--json", **env)))
    return out


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- mistakes: one line, a non-zero exit, no traceback -------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "required: COMMAND"),
        (["spend"], "invalid choice: 'spend'"),
        (["usage"], "required: rule, entity"),
        (["usage", "default"], "required: entity"),
        (["set-limit", "default", "alice"], "required: limit"),
        (["usage", "default", "alice", "--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_a_missing_or_unknown_argument_is_one_line(argv: list[str], words: str) -> None:
    line = refused(run_cli(*argv), 2)
    assert words in line
    assert "--help" in line


@pytest.mark.parametrize("amount", ["abc", "-1", "0.0000001", "nan", "1e30", ""])
def test_a_bad_amount_is_one_line_and_reaches_no_ledger(amount: str, unreachable: str) -> None:
    # The ledger is unreachable: the amount is refused before any connection (not "ledger error").
    line = refused(run_cli("set-limit", "default", "alice", amount, BUDGET_REDIS_URL=unreachable), 2)
    assert line.startswith("set-limit: limit"), line
    assert "give an amount in usd (such as 12.5) or none" in line


def test_an_unknown_rule_is_one_line_naming_the_rules(unreachable: str) -> None:
    line = refused(run_cli("usage", "daily", "alice", BUDGET_REDIS_URL=unreachable), 2)
    assert line == "no rule named 'daily'; the rules are: default"
    env = {"BUDGET_KEY": "", "BUDGET_LIMIT": "", "BUDGET_REDIS_URL": unreachable}
    line = refused(run_cli("reset", "default", "alice", **env), 2)
    assert "no rules are configured" in line


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BUDGET_LIMIT": "lots"}, "BUDGET_LIMIT='lots'"),
        ({"BUDGET_RULES": "[{"}, "BUDGET_RULES is not valid JSON"),
        ({"BUDGET_LEASE": "soon"}, "BUDGET_LEASE='soon'"),
        ({"BUDGET_FAIL_MODE": "sideways"}, "BUDGET_FAIL_MODE='sideways'"),
        ({"BUDGET_REDIS_URL": "http://cache:6379"}, "BUDGET_REDIS_URL='http://cache:6379'"),
        ({"BUDGET_REDIS_URL": "redis://127.0.0.1:sixty"}, "BUDGET_REDIS_URL='redis://127.0.0.1:sixty'"),
        ({"BUDGET_REDIS_URL": "redis+sentinel://127.0.0.1:1"}, "name the service"),
    ],
)
@pytest.mark.parametrize("argv", [["usage", "default", "alice"], ["check"]])
def test_a_malformed_variable_is_one_line_naming_it(
    env: dict[str, str], named: str, argv: list[str]
) -> None:
    line = refused(run_cli(*argv, **env), 2)
    assert line.startswith("configuration error: "), line
    assert named in line, line


def test_a_url_that_cannot_be_parsed_shows_no_piece_of_its_password() -> None:
    # A '#' that is not percent-encoded ends the authority: the parser then reads "s3c" as a port.
    url = "redis://:s3c#r/t@127.0.0.1:6379/0"
    for argv in (["usage", "default", "alice"], ["check"]):
        line = refused(run_cli(*argv, BUDGET_REDIS_URL=url), 2)
        assert line.startswith("configuration error: BUDGET_REDIS_URL="), line
        assert "s3c" not in line, line
        assert "r/t" not in line, line


@pytest.mark.parametrize(
    "argv", [["usage", "default", "alice"], ["set-limit", "default", "alice", "2"], ["check"]]
)
def test_an_unreachable_ledger_is_one_line_without_the_password(
    argv: list[str], unreachable: str
) -> None:
    line = refused(run_cli(*argv, BUDGET_REDIS_URL=unreachable), 1)
    assert line.startswith("ledger error: redis unavailable"), line
    assert "pw-not-shown" not in line


@pytest.mark.parametrize(
    "argv", [["usage", "default", "a"], ["reset", "default", "a"], ["set-limit", "default", "a", "1"]]
)
def test_each_operator_command_says_it_cannot_reach_a_memory_ledger(argv: list[str]) -> None:
    line = refused(run_cli(*argv), 2)
    assert line.startswith(f"{argv[0]} needs BUDGET_REDIS_URL"), line
    assert "memory ledger" in line
    assert "inside the app's own process" in line


def test_a_raw_token_for_a_rule_of_credentials_is_refused(unreachable: str) -> None:
    env = {"BUDGET_RULES": KEYS_RULE, "BUDGET_REDIS_URL": unreachable}
    line = refused(run_cli("usage", "keys", "r:alice", **env), 2)
    assert "always digested" in line
    assert "'r:alice' is none of its entities" in line
    line = refused(run_cli("usage", "keys", "", **env), 2)
    assert line.startswith("the entity is empty")


def test_an_unexpected_failure_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*_: object) -> int:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "_run", broken)
    assert cli.main(["check"]) == 1
    err = capsys.readouterr().err
    assert err == "unexpected error (RuntimeError: something broke); please report it\n"


def test_an_interrupt_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["check"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "check", "usage", "set-limit", "reset"):
        assert f"    {command}" in out, out


# -- usage, set-limit and reset on a real redis-server --------------------------------------------


def spend(url: str, budget: Budget, limit: int, *, charged: int = 0, held: int = 0) -> None:
    """Spend on ``budget`` with the ledger's own API: a reservation settled at ``charged``
    micro-units, and (if ``held``) one live hold of ``held`` left in flight."""

    async def run() -> None:
        await clear_of_a_window_end(url, budget.period_ms)
        ledger = RedisLedger(url)
        try:
            if charged:
                rid = new_reservation_id()
                reservation = await ledger.reserve(rid, [HoldRequest(budget, limit, charged)], 60_000)
                assert reservation.admitted
                settled = await ledger.settle(Settlement(rid, reservation.holds, charged, "completed"))
                assert settled.outcome == "applied"
            if held:
                rid = new_reservation_id()
                reservation = await ledger.reserve(rid, [HoldRequest(budget, limit, held)], 60_000)
                assert reservation.admitted
        finally:
            await ledger.aclose()

    asyncio.run(run())


async def clear_of_a_window_end(url: str, period_ms: int, margin_ms: int = 30_000) -> None:
    """Return once the budget's window (by Redis TIME, the ledger's clock) has at least
    ``margin_ms`` left, so the spend made next and the command run after it read the same window:
    near a window's end this waits for the next window to begin (at most ``margin_ms``)."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        with anyio.fail_after(margin_ms / 1000 + 10):
            while True:
                seconds, micros = await client.time()
                now_ms = seconds * 1000 + micros // 1000
                left_ms = period_ms - now_ms % period_ms
                if left_ms >= margin_ms:
                    return
                await anyio.sleep(left_ms / 1000)  # until the next window begins, then look again
    finally:
        await client.aclose()


def alice() -> Budget:
    return Budget("default", EntityHasher(SECRET).token("alice"), DAY_MS)


@pytest.mark.redis
def test_usage_of_an_untouched_entity_says_there_is_no_record(redis_url: str) -> None:
    out = ok(run_cli("usage", "default", "bob", BUDGET_REDIS_URL=redis_url))
    assert out.startswith("no record of r:bob under rule 'default' in this window ("), out
    assert "nothing spent, nothing held, no live holds and no limit override" in out
    assert len(out.splitlines()) == 1
    u = usage_json("usage", "default", "bob", BUDGET_REDIS_URL=redis_url)
    assert (u["record"], u["spent"], u["held"], u["holds"], u["limit"]) == (False, "0", "0", 0, "0.5")


@pytest.mark.redis
def test_usage_shows_real_spend_in_the_unit_and_iso_times(redis_url: str) -> None:
    spend(redis_url, alice(), 500_000, charged=125_000, held=200_000)
    env = {"BUDGET_REDIS_URL": redis_url, "BUDGET_UNIT": "eur"}
    out = ok(run_cli("usage", "default", "alice", **env))
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["spent"] == "0.125 eur"
    assert rows["held"] == "0.2 eur in 1 live hold"
    assert rows["remaining"] == "0.175 eur"
    assert rows["limit"] == "0.5 eur"
    assert rows["entity"] == "r:alice"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00Z to \d{4}-\d\d-\d\dT00:00:00Z", rows["window"])
    assert not re.search(r"\d{10,}", out), out  # neither micro-units nor epoch milliseconds

    u = usage_json("usage", "default", "alice", **env)
    assert (u["spent"], u["spent_micros"], u["held"], u["held_micros"]) == (
        "0.125",
        125_000,
        "0.2",
        200_000,
    )
    assert (u["remaining"], u["remaining_micros"], u["holds"], u["record"]) == (
        "0.175",
        175_000,
        1,
        True,
    )
    assert u["unit"] == "eur"
    assert u["override"] is False
    assert u["window_start"] == iso(u["window_start_ms"])
    assert u["window_start_ms"] % DAY_MS == 0
    assert u["reset"] == iso(u["reset_ms"])
    assert u["reset_ms"] == u["window_start_ms"] + DAY_MS
    assert u["window_start"] == rows["window"].split()[0]
    # Another entity has no record, whatever alice spent.
    assert usage_json("usage", "default", "bob", **env)["record"] is False


@pytest.mark.redis
def test_usage_takes_the_token_it_prints(redis_url: str) -> None:
    key = "sk-live-0123456789"
    budget = Budget("keys", EntityHasher(SECRET).token(key, secret=True), 3_600_000)
    spend(redis_url, budget, 10_000_000, charged=1_500_000)
    spend(redis_url, alice(), 500_000, charged=100_000)
    env = {"BUDGET_REDIS_URL": redis_url, "BUDGET_RULES": KEYS_RULE}

    by_id = usage_json("usage", "keys", key, **env)
    assert by_id["entity"] == budget.entity
    assert budget.entity.startswith("h:")
    assert (by_id["spent"], by_id["period"]) == ("1.5", "1h")
    by_token = usage_json("usage", "keys", by_id["entity"], **env)
    assert {**by_token, "now": 0, "now_ms": 0} == {**by_id, "now": 0, "now_ms": 0}
    text = ok(run_cli("usage", "keys", key, **env))
    assert f"{budget.entity} (the digest of the id given)" in text
    assert key not in text  # a credential is never printed back
    assert usage_json("usage", "default", "r:alice", **env)["spent"] == "0.1"


@pytest.mark.redis
def test_set_limit_and_reset_act_on_the_shared_ledger(redis_url: str) -> None:
    spend(redis_url, alice(), 500_000, charged=300_000, held=100_000)
    env = {"BUDGET_REDIS_URL": redis_url}
    u = usage_json("set-limit", "default", "alice", "2", **env)
    assert (u["command"], u["limit"], u["override"], u["rule_limit"]) == ("set-limit", "2", True, "0.5")
    out = ok(run_cli("usage", "default", "alice", **env))
    assert "limit      2 usd (a limit override; the rule's is 0.5 usd)" in out
    # A bad amount changes nothing.
    refused(run_cli("set-limit", "default", "alice", "-3", **env), 2)
    assert usage_json("usage", "default", "alice", **env)["limit"] == "2"

    out = ok(run_cli("set-limit", "default", "alice", "none", **env))
    assert out.startswith("limit override of r:alice under rule 'default' removed\n")
    u = usage_json("usage", "default", "alice", **env)
    assert (u["limit"], u["override"], u["spent"]) == ("0.5", False, "0.3")

    out = ok(run_cli("reset", "default", "alice", **env))
    assert out.startswith("spend of r:alice under rule 'default' cleared in the current window\n")
    u = usage_json("usage", "default", "alice", **env)
    assert (u["spent"], u["held"], u["holds"], u["record"]) == ("0", "0.1", 1, True)


@pytest.mark.redis
def test_a_lifetime_budget_has_no_window(redis_url: str) -> None:
    env = {"BUDGET_REDIS_URL": redis_url, "BUDGET_PERIOD": "none"}
    u = usage_json("set-limit", "default", "carol", "3", **env)
    assert (u["period"], u["window_start"], u["reset"], u["reset_ms"]) == ("lifetime", None, None, None)
    out = ok(run_cli("usage", "default", "carol", **env))
    assert "window     lifetime, never resets" in out
    assert "rule       default (0.5 usd, a lifetime budget)" in out


# -- check -----------------------------------------------------------------------------------------


@pytest.mark.redis
def test_check_reports_a_reachable_ledger_and_the_rules(redis_url: str) -> None:
    out = ok(run_cli("check", BUDGET_REDIS_URL=redis_url))
    assert re.search(r"^ledger +redis://127\.0\.0\.1:\d+/0: reachable$", out, re.M), out
    assert re.search(r"^  default +0\.5 usd +1d +header:x-end-user-id +skip$", out, re.M), out
    assert "warning" not in out
    facts = usage_json("check", BUDGET_REDIS_URL=redis_url)
    assert (facts["reachable"], facts["warnings"]) == (True, [])
    assert facts["rules"][0]["limit"] == "0.5"
    assert facts["rules"][0]["limit_micros"] == 500_000


def test_check_names_the_memory_ledger_and_warns_once_about_each_set_up() -> None:
    out = ok(run_cli("check", BUDGET_KEY="", BUDGET_LIMIT="", BUDGET_SECRET="", BUDGET_LIMT="1"))
    assert re.search(r"^ledger +memory", out, re.M), out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, out
    assert "BUDGET_LIMT is not a budget-middleware setting" in warnings[0]
    assert warnings[1].startswith("warning: no rules are configured")
    assert json.loads(ok(run_cli("check", "--json", BUDGET_ESTIMATE="1")))["warnings"] == [
        "the fixed estimate (BUDGET_ESTIMATE, 1 usd) is above the limit of rule 'default' (0.5 usd): "
        "every request it applies to is rejected (unless an entity has a limit override above it)"
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ("usage", "default", "alice", "--json"),
        ("set-limit", "default", "alice", "abc", "--json"),
        ("check", "--json"),
    ],
)
def test_with_json_a_mistake_is_one_json_line(argv: tuple[str, ...], unreachable: str) -> None:
    """A script that asked for --json gets its errors as JSON too (they were plain text)."""
    env = {"BUDGET_REDIS_URL": unreachable} if argv[0] != "usage" else {}
    proc = run_cli(*argv, **env)
    line = refused(proc, 2 if argv[0] != "check" else 1)  # a mistake; a ledger that failed
    error = json.loads(line)
    assert set(error) == {"error", "exit"}
    assert error["exit"] == proc.returncode
    assert error["error"]
