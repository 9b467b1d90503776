"""``setup_warnings``: set-ups that silently do nothing or always reject, each warned about once,
and no warning for a set-up without the problem."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from budget_middleware import config as config_module
from budget_middleware.config import BudgetConfig, Rule
from budget_middleware.setup_checks import ENV_VARIABLES, setup_warnings

GOOD_ENV = {"BUDGET_KEY": "header:x-end-user-id", "BUDGET_LIMIT": "5", "BUDGET_SECRET": "k" * 32}
ROOT = Path(__file__).resolve().parent.parent


def from_env(**env: str) -> list[str]:
    """The warnings of ``GOOD_ENV`` updated by ``env`` (an empty value removes a variable)."""
    environ = {k: v for k, v in {**GOOD_ENV, **env}.items() if v}
    return setup_warnings(BudgetConfig.from_env(environ), python_config=False, environ=environ)


def in_python(config: BudgetConfig, environ: dict[str, str] | None = None, **kw: bool) -> list[str]:
    return setup_warnings(config, python_config=True, environ=environ or {}, **kw)


def rule(limit: str = "5", key: str = "header:x-end-user-id", name: str = "daily") -> Rule:
    return Rule(name, key, limit, "1d")


def test_a_sound_set_up_has_no_warning() -> None:
    assert from_env() == []
    assert in_python(BudgetConfig(rules=(rule(),), secret="k" * 32)) == []


def test_no_rules_means_every_request_passes_unmetered() -> None:
    (warning,) = from_env(BUDGET_KEY="", BUDGET_LIMIT="")
    assert warning == (
        "no rules are configured (set BUDGET_KEY and BUDGET_LIMIT, or BUDGET_RULES): "
        "every request passes unmetered"
    )
    (warning,) = in_python(BudgetConfig(secret="k"))
    assert warning == "the config has no rules: every request passes unmetered"


def test_a_fixed_estimate_above_a_limit_rejects_every_request_of_that_rule() -> None:
    rules = (
        '[{"name": "small", "key": "client", "limit": "0.5"},'
        ' {"name": "big", "key": "user", "limit": "9"}]'
    )
    (warning,) = from_env(BUDGET_KEY="", BUDGET_LIMIT="", BUDGET_RULES=rules, BUDGET_ESTIMATE="0.75")
    assert warning == (
        "the fixed estimate (BUDGET_ESTIMATE, 0.75 usd) is above the limit of rule 'small' "
        "(0.5 usd): every request it applies to is rejected (unless an entity has a limit "
        "override above it)"
    )
    # Equal to the limit is admitted on an untouched budget.
    assert from_env(BUDGET_ESTIMATE="5") == []


def test_the_estimate_is_compared_after_the_max_hold_cap() -> None:
    assert from_env(BUDGET_ESTIMATE="8", BUDGET_MAX_HOLD="5") == []
    (warning,) = from_env(BUDGET_ESTIMATE="8", BUDGET_MAX_HOLD="6", BUDGET_UNIT="eur")
    assert warning.startswith(
        "the fixed estimate (BUDGET_ESTIMATE capped by BUDGET_MAX_HOLD, 6 eur) is above the limit "
        "of rule 'default' (5 eur)"
    )
    (warning,) = in_python(
        BudgetConfig(rules=(rule(),), secret="k", estimate=8_000_000, max_hold=6_000_000)
    )
    assert warning.startswith("the fixed estimate (estimate capped by max_hold, 6 usd)")


def test_an_estimator_makes_the_fixed_estimate_irrelevant() -> None:
    config = BudgetConfig(rules=(rule(),), secret="k", estimate=8_000_000)
    assert len(in_python(config)) == 1
    assert in_python(config, estimator=True) == []


def test_a_zero_limit_rejects_every_request() -> None:
    (warning,) = from_env(BUDGET_LIMIT="0")
    assert warning == (
        "rule 'default' has a limit of 0: every request it applies to is rejected "
        "(unless an entity has a limit override)"
    )


def test_an_unset_secret_makes_digests_reversible_by_guessing() -> None:
    (warning,) = from_env(BUDGET_SECRET="")
    assert warning.startswith("BUDGET_SECRET is not set: entity digests ")
    assert "an email or an address can be reversed by trying candidates" in warning
    (warning,) = in_python(BudgetConfig(rules=(rule(),), secret=""))
    assert warning.startswith("the config's secret is not set: ")


def test_a_const_rule_names_no_one_and_needs_no_secret() -> None:
    assert from_env(BUDGET_SECRET="", BUDGET_KEY="const:global") == []


def test_a_python_config_wins_and_the_variables_it_ignores_are_named() -> None:
    environ = {"BUDGET_LIMIT": "5", "BUDGET_REDIS_URL": "redis://cache", "BUDGET_UNIT": " ", "HOME": "/"}
    (warning,) = in_python(BudgetConfig(rules=(rule(),), secret="k"), environ)
    assert warning == (
        "a config was given in Python, so it wins entirely: the middleware reads no BUDGET_* "
        "variable, and these are set: BUDGET_LIMIT, BUDGET_REDIS_URL (they count only where the "
        "app's own code reads them, with BudgetConfig.from_env)"
    )
    # The same variables read by from_env are no warning.
    assert from_env(BUDGET_REDIS_URL="redis://cache") == []


def test_a_config_made_from_the_environment_and_passed_on_is_no_warning() -> None:
    environ = {**GOOD_ENV, "BUDGET_REDIS_URL": "redis://cache", "PATH": "/bin"}
    assert in_python(BudgetConfig.from_env(environ), environ) == []
    # ... but one changed after it was read no longer says what the variables say.
    changed = BudgetConfig.from_env(environ).with_rules(rule())
    assert len(in_python(changed, environ)) == 1


def test_a_misspelt_variable_is_named_with_the_setting_it_resembles() -> None:
    (warning,) = from_env(BUDGET_ESTIMTE="0.2")
    assert warning == (
        "BUDGET_ESTIMTE is not a budget-middleware setting and is ignored "
        "(did you mean BUDGET_ESTIMATE?)"
    )
    (warning,) = from_env(BUDGET_COLOUR="blue")
    assert warning == "BUDGET_COLOUR is not a budget-middleware setting and is ignored"


def test_each_warning_is_given_once() -> None:
    warnings = from_env(BUDGET_SECRET="", BUDGET_LIMIT="0", BUDGET_LIMT="1")
    assert len(warnings) == len(set(warnings)) == 3


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        (Path(config_module.__file__), r'"(BUDGET_[A-Z_]+)"'),
        (ROOT / "README.md", r"^\| `(BUDGET_[A-Z_]+)` \|"),
    ],
    ids=["config.py", "README"],
)
def test_the_list_of_variables_is_the_one_from_env_reads_and_the_readme_documents(
    source: Path, pattern: str
) -> None:
    names = set(re.findall(pattern, source.read_text("utf-8"), re.MULTILINE))
    assert names == ENV_VARIABLES


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    """An app that completes its lifespan and answers every request with a 200."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_the_middleware_logs_its_warnings_once_at_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same warnings as ``check``, in the server's log when the lifespan starts."""
    import logging

    import anyio

    from budget_middleware import BudgetMiddleware, MemoryLedger

    mw = BudgetMiddleware(ok_app, BudgetConfig(), ledger=MemoryLedger())
    to_app, from_server = anyio.create_memory_object_stream[dict[str, Any]](4)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.WARNING, logger="budget_middleware"), to_app, from_server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                mw, {"type": "lifespan", "asgi": {"version": "3.0"}}, from_server.receive, send
            )
            await to_app.send({"type": "lifespan.startup"})
            await to_app.send({"type": "lifespan.shutdown"})
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    no_rules = [r for r in caplog.records if "every request passes unmetered" in r.getMessage()]
    assert len(no_rules) == 1


async def test_without_a_lifespan_the_warnings_are_logged_once_at_the_first_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``uvicorn --lifespan off``: before, nothing was logged at all."""
    import logging

    from asgi_helpers import RecordingSend, ScriptedReceive, http_scope
    from budget_middleware import BudgetMiddleware, MemoryLedger

    config = BudgetConfig(rules=(Rule("user", "header:x-user", "1"),), estimate=2_000_000)
    mw = BudgetMiddleware(ok_app, config, ledger=MemoryLedger())
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        for _ in range(3):
            await mw(http_scope(headers=[("x-user", "a")]), ScriptedReceive(), RecordingSend())
        await mw.finalizer.drain(2)
    above = [r for r in caplog.records if "above" in r.getMessage() and "limit" in r.getMessage()]
    assert len(above) == 1, [r.getMessage() for r in caplog.records]


async def test_with_a_lifespan_requests_log_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    """The lifespan logged the warnings at start-up; its requests must not log them again."""
    import logging

    import anyio

    from asgi_helpers import RecordingSend, ScriptedReceive, http_scope
    from budget_middleware import BudgetMiddleware, MemoryLedger

    config = BudgetConfig(rules=(Rule("user", "header:x-user", "1"),), estimate=2_000_000)
    mw = BudgetMiddleware(ok_app, config, ledger=MemoryLedger())
    to_app, from_server = anyio.create_memory_object_stream[dict[str, Any]](4)
    started = anyio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    with caplog.at_level(logging.WARNING, logger="budget_middleware"), to_app, from_server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                mw, {"type": "lifespan", "asgi": {"version": "3.0"}}, from_server.receive, send
            )
            await to_app.send({"type": "lifespan.startup"})
            with anyio.fail_after(5):
                await started.wait()
            for _ in range(3):
                await mw(http_scope(headers=[("x-user", "a")]), ScriptedReceive(), RecordingSend())
            await to_app.send({"type": "lifespan.shutdown"})
    above = [r for r in caplog.records if "above" in r.getMessage() and "limit" in r.getMessage()]
    assert len(above) == 1, [r.getMessage() for r in caplog.records]


def test_a_count_that_is_not_a_number_is_said_so_in_words() -> None:
    """Before, ``BUDGET_MAX_PENDING=lots`` answered with Python's own int() error."""
    from budget_middleware.config import ConfigError

    environ = {"BUDGET_KEY": "const:x", "BUDGET_LIMIT": "1", "BUDGET_MAX_PENDING": "lots"}
    with pytest.raises(ConfigError) as refused:
        BudgetConfig.from_env(environ)
    assert str(refused.value) == "BUDGET_MAX_PENDING='lots': must be a whole number"
