"""The operator's command line (``python -m budget_middleware``), against a real redis-server."""

from __future__ import annotations

import json

import pytest

from budget_middleware.cli import main
from redis_server import free_port


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("BUDGET_RULES", "BUDGET_REDIS_URL", "BUDGET_SECRET", "BUDGET_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BUDGET_KEY", "header:x-end-user-id")
    monkeypatch.setenv("BUDGET_LIMIT", "0.5")
    monkeypatch.setenv("BUDGET_PERIOD", "1d")
    return monkeypatch


def usage(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(list(argv)) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.redis
def test_set_limit_usage_and_reset_act_on_the_shared_ledger(
    env: pytest.MonkeyPatch, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("BUDGET_REDIS_URL", redis_url)
    u = usage(capsys, "usage", "default", "alice")
    assert (u["limit"], u["spent"], u["live_holds"]) == ("0.5", "0", 0)
    assert usage(capsys, "set-limit", "default", "alice", "2")["limit"] == "2"
    assert usage(capsys, "usage", "default", "alice")["limit"] == "2"
    assert usage(capsys, "set-limit", "default", "alice", "none")["limit"] == "0.5"
    assert usage(capsys, "reset", "default", "alice")["spent"] == "0"


def test_operator_commands_refuse_the_memory_ledger(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = (["usage", "default", "a"], ["reset", "default", "a"], ["set-limit", "default", "a", "1"])
    for argv in commands:
        assert main(argv) == 2
        assert "needs BUDGET_REDIS_URL" in capsys.readouterr().err


def test_an_unreachable_ledger_is_one_line_not_a_traceback(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("BUDGET_REDIS_URL", f"redis://:secret-pw@127.0.0.1:{free_port()}/0")
    for argv in (["usage", "default", "alice"], ["check"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("ledger error: redis unavailable"), err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert "secret-pw" not in err


@pytest.mark.redis
def test_check_reports_a_reachable_ledger(
    env: pytest.MonkeyPatch, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("BUDGET_REDIS_URL", redis_url)
    assert main(["check"]) == 0
    assert "ledger: reachable" in capsys.readouterr().out


def test_check_names_the_memory_ledger(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check"]) == 0
    assert "ledger: memory" in capsys.readouterr().out


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "check", "usage", "set-limit", "reset"):
        assert f"    {command}" in out, out
