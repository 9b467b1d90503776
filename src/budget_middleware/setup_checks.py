"""Set-ups that silently do nothing or always reject, found before the first request.

``setup_warnings`` returns one line per problem; ``python -m budget_middleware check`` prints them
and the middleware logs them at start-up. A config given in Python wins entirely: the ``BUDGET_*``
variables are read only when no config is passed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from .amounts import format_micros
from .config import BudgetConfig, ConfigError

__all__ = ["ENV_VARIABLES", "setup_warnings"]

# Every variable ``BudgetConfig.from_env`` reads (tests/test_setup_warnings.py keeps it true).
ENV_VARIABLES = frozenset(
    {
        "BUDGET_REDIS_URL",
        "BUDGET_RULES",
        "BUDGET_KEY",
        "BUDGET_LIMIT",
        "BUDGET_PERIOD",
        "BUDGET_ESTIMATE",
        "BUDGET_MAX_HOLD",
        "BUDGET_SECRET",
        "BUDGET_LEASE",
        "BUDGET_FAIL_MODE",
        "BUDGET_EXCLUDE",
        "BUDGET_PREFIX",
        "BUDGET_UNIT",
        "BUDGET_ERROR_FORMAT",
        "BUDGET_CHARGE_ON_DISCONNECT",
        "BUDGET_CHARGE_ON_ERROR",
        "BUDGET_CHARGE_ON_CANCEL",
        "BUDGET_CHARGE_HEADER",
        "BUDGET_TIMEOUT",
        "BUDGET_DRAIN_TIMEOUT",
        "BUDGET_HORIZON",
        "BUDGET_HOLD_RETRY_AFTER",
        "BUDGET_WAIT_REPLICAS",
        "BUDGET_SPAN_RAW_IDS",
        "BUDGET_JOURNAL",
        "BUDGET_MAX_PENDING",
    }
)


def setup_warnings(
    config: BudgetConfig,
    *,
    python_config: bool,
    environ: Mapping[str, str],
    estimator: bool = False,
) -> list[str]:
    """Warnings about ``config``, one line each, most fundamental first; empty when all is well.

    ``python_config``: the config was given in Python rather than read with ``from_env`` (every
    ``BUDGET_*`` variable is then ignored); ``environ``: the process environment; ``estimator``:
    an estimate callable is installed, so the fixed estimate is not what requests hold.
    """
    warnings = _environment_warnings(config, python_config, environ)
    if not config.rules:
        where = (
            "the config has no rules"
            if python_config
            else "no rules are configured (set BUDGET_KEY and BUDGET_LIMIT, or BUDGET_RULES)"
        )
        warnings.append(f"{where}: every request passes unmetered")
    warnings += _rejecting_rules(config, python_config, estimator)
    # A const rule's one id is no one's secret; any other source names people or machines.
    names_people = any(r.source is None or r.source.kind != "const" for r in config.rules)
    if not config.secret and names_people:
        secret = "the config's secret" if python_config else "BUDGET_SECRET"
        warnings.append(
            f"{secret} is not set: entity digests (the Redis keys of credentials and unusual ids, "
            "and the ids in spans) are keyed with a public default, so the digest of a guessable "
            "id such as an email or an address can be reversed by trying candidates; set it to a "
            "long random string (changing it later starts digested budgets afresh)"
        )
    return warnings


def _environment_warnings(
    config: BudgetConfig, python_config: bool, environ: Mapping[str, str]
) -> list[str]:
    """Variables that are set and yet read by no one: all of them beside a Python config (unless
    it is what they make, ``BudgetConfig.from_env()`` passed on), and names that are not settings
    (a typo) otherwise."""
    present = sorted(k for k, v in environ.items() if k.startswith("BUDGET_") and v.strip())
    if python_config:
        ignored = [k for k in present if k in ENV_VARIABLES]
        if not ignored or _made_by(config, environ):
            return []
        return [
            "a config was given in Python, so it wins entirely: the middleware reads no BUDGET_* "
            f"variable, and these are set: {', '.join(ignored)} (they count only where the app's "
            "own code reads them, with BudgetConfig.from_env)"
        ]
    warnings = []
    for unknown in (k for k in present if k not in ENV_VARIABLES):
        # Compared without the prefix they share, which would make every name look alike.
        close = difflib.get_close_matches(unknown[7:], [k[7:] for k in sorted(ENV_VARIABLES)], 1, 0.75)
        hint = f" (did you mean BUDGET_{close[0]}?)" if close else ""
        warnings.append(f"{unknown} is not a budget-middleware setting and is ignored{hint}")
    return warnings


def _rejecting_rules(config: BudgetConfig, python_config: bool, estimator: bool) -> list[str]:
    """Rules that reject every request: a zero limit, or a fixed estimate above the limit."""
    fixed = config.estimate if config.max_hold is None else min(config.estimate, config.max_hold)
    source = "estimate" if python_config else "BUDGET_ESTIMATE"
    if config.max_hold is not None and config.max_hold < config.estimate:
        source += " capped by " + ("max_hold" if python_config else "BUDGET_MAX_HOLD")
    unit = config.unit
    warnings = []
    for rule in config.rules:
        if rule.limit_micros == 0:
            warnings.append(
                f"rule {rule.name!r} has a limit of 0: every request it applies to is rejected "
                "(unless an entity has a limit override)"
            )
        elif not estimator and fixed > rule.limit_micros:
            warnings.append(
                f"the fixed estimate ({source}, {format_micros(fixed)} {unit}) is above the limit "
                f"of rule {rule.name!r} ({format_micros(rule.limit_micros)} {unit}): every request "
                "it applies to is rejected (unless an entity has a limit override above it)"
            )
    return warnings


def _made_by(config: BudgetConfig, environ: Mapping[str, str]) -> bool:
    """Whether ``config`` is exactly what the variables in ``environ`` make."""
    try:
        return config == BudgetConfig.from_env(
            {k: v for k, v in environ.items() if k.startswith("BUDGET_")}
        )
    except ConfigError:
        return False
