"""Redis URLs (``ledger/urls.py``): a password is never printed, whatever it contains.

``redact_url`` used to hand back ``redis://:s3cr#t@cache`` whole: the password's ``#`` ended the
authority for ``urlsplit``, so nothing looked like credentials. Passwords below are any text
(hypothesis), put in every place a Redis URL can carry one; the redacted URL must be exactly the
URL with its secrets replaced, or (when the redaction cannot tell where a secret ends) the scheme
alone. ``check_redis_url`` refuses what redis-py would misread, with a message that quotes nothing
of the password; config and the ledgers use it.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from redis.connection import parse_url

from budget_middleware.config import BudgetConfig, ConfigError
from budget_middleware.ledger import RedisClusterLedger, RedisLedger, RedisSentinelLedger, redact_url
from budget_middleware.ledger.urls import check_redis_url

passwords = st.text(min_size=1, max_size=40)

# (template, the redacted forms allowed: exact, or the scheme alone)
TEMPLATES = [
    ("redis://:{pw}@cache:6379/0", ["redis://***@cache:6379/0", "redis://***"]),
    ("redis://admin:{pw}@cache:6379/0", ["redis://***@cache:6379/0", "redis://***"]),
    ("rediss://{pw}@cache.example:6380", ["rediss://***@cache.example:6380", "rediss://***"]),
    ("unix://:{pw}@/run/redis.sock?db=1", ["unix://***@/run/redis.sock?db=1", "unix://***"]),
    (
        "redis+sentinel://:{pw}@s1:26379,s2/mymaster?db=2",
        ["redis+sentinel://***@s1:26379,s2/mymaster?db=2", "redis+sentinel://***"],
    ),
    (
        "redis+cluster://admin:{pw}@a:7000,b:7001?ssl=true",
        ["redis+cluster://***@a:7000,b:7001?ssl=true", "redis+cluster://***"],
    ),
    (
        "redis://cache:6379/0?password={pw}",
        ["redis://cache:6379/0?password=***", "redis://cache:6379/0?password=***&***", "redis://***"],
    ),
    (
        "redis://cache/0?db=1&password={pw}&ssl=true",
        ["redis://cache/0?db=1&password=***&***", "redis://cache/0?db=1&password=***", "redis://***"],
    ),
    (
        "redis://admin@cache/0?password={pw}",
        ["redis://***@cache/0?password=***", "redis://***@cache/0?password=***&***", "redis://***"],
    ),
    (":{pw}@cache:6379", ["***@cache:6379", "***"]),
]


@pytest.mark.parametrize(("template", "allowed"), TEMPLATES, ids=[t for t, _ in TEMPLATES])
@given(pw=passwords)
@example(pw="s3cr#t")
@example(pw="a/b?c#d@e")
@example(pw="x&y=z;w")
@example(pw="p@ss://word?password=@q")
def test_a_password_is_never_printed(template: str, allowed: list[str], pw: str) -> None:
    assert redact_url(template.format(pw=pw)) in allowed


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:s3cr#t@cache", "redis://***@cache"),
        ("redis://:s3/cr?t@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://cache/0?password=s3cr#t", "redis://cache/0?password=***"),
        ("redis://cache/0?password=s3cr@t", "redis://***"),
        ("redis://cache/0?password=s3&cr=t", "redis://cache/0?password=***&***"),
        ("redis://cache/0?db=1&ssl_keyfile=/k&x=1", "redis://cache/0?db=1&ssl_keyfile=***&***"),
        ("redis://cache/0?socket_timeout=5", "redis://cache/0?socket_timeout=***"),
        ("s3:cr://t@cache", "***@cache"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_what_redaction_keeps(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@given(pw=passwords)
def test_a_percent_encoded_password_reaches_redis_py_whole(pw: str) -> None:
    url = f"redis://:{quote(pw, safe='')}@cache:6379/0"
    check_redis_url(url)
    assert parse_url(url)["password"] == pw
    assert redact_url(url) == "redis://***@cache:6379/0"


# Passwords that hold a '/', '?' or '#' by construction (a filter on random text discarded so many
# that hypothesis's health check failed now and then).
_CUT_PASSWORDS = st.builds(
    lambda head, cut, tail: head + cut + tail,
    st.text(min_size=3, max_size=20),
    st.sampled_from("/?#"),
    st.text(min_size=2, max_size=19),
)


@pytest.mark.parametrize(
    "template",
    [
        "redis://:{pw}@cache:6379/0",
        "rediss://user:{pw}@cache",
        "unix://:{pw}@/run/redis.sock",
        "redis+cluster://:{pw}@a:7000,b:7001",
        "redis+sentinel://:{pw}@s1:26379/mymaster",
    ],
)
@given(pw=_CUT_PASSWORDS)
@example(pw="s3cr#t")
def test_an_unencoded_password_that_redis_py_would_cut_is_refused(template: str, pw: str) -> None:
    """Failed before: such a URL went to redis-py, which read part of the password as the host or
    port (and ``redact_url`` printed it)."""
    url = template.format(pw=pw)
    with pytest.raises(ValueError, match="percent-encode") as refused:
        check_redis_url(url)
    # The message quotes nothing of the URL: it is the same for any such password.
    with pytest.raises(ValueError, match="percent-encode") as placeholder:
        check_redis_url(template.format(pw="a/b"))
    assert str(refused.value) == str(placeholder.value)
    ledger = {
        "redis+cluster": RedisClusterLedger,
        "redis+sentinel": RedisSentinelLedger,
    }.get(url.partition("://")[0], RedisLedger)
    with pytest.raises(ValueError, match="percent-encode"):
        ledger(url)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://cache", "use a redis://"),
        ("redis://", "without a host"),
        ("redis://:pw@cache:port", "bad port"),
        ("redis://cache:70000", "bad port"),
        ("redis://cache:6379/abc", "names the database by its number"),  # was db 0, silently
        ("unix://", "socket's path"),
        ("redis+cluster://a:7000/1", "only database 0"),
        ("redis+cluster://a:7000?ssl=maybe", "not a boolean"),
        ("redis+sentinel://s1:26379", "name the service"),
        ("redis+sentinel://s1/svc?colour=blue", "unknown parameter 'colour'"),
        ("redis+sentinel://s1/svc?password=s3&cr3t", "unknown parameter '\\*\\*\\*'"),
    ],
)
def test_a_url_that_would_be_misread_is_refused(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_redis_url(url)


def printed_at_start_up(url: str) -> str:
    """What start-up prints of ``BUDGET_REDIS_URL=url``: its refusal, or the config's log line."""
    try:
        return BudgetConfig.from_env({"BUDGET_REDIS_URL": url}).describe()
    except ConfigError as exc:
        return str(exc)


@given(pw=st.text(min_size=6, max_size=40))
@example(pw="s3cr#t")
def test_config_never_prints_the_password(pw: str) -> None:
    """From the environment the URL is checked at start-up, and the error quotes it redacted; in
    Python it reaches the start-up log line (``describe``) redacted."""
    url = f"redis://:{pw}@cache:6379/0"
    # A password that is part of what is printed anyway (the redacted URL, 'fail_mode=closed') is
    # no leak: compare with what a placeholder password prints.
    placeholder = "redis://:placeholder@cache:6379/0"
    shown = printed_at_start_up(placeholder) + BudgetConfig(redis_url=placeholder).describe()
    assume(pw not in shown and "***" not in pw)
    assert pw not in printed_at_start_up(url)
    assert pw not in BudgetConfig(redis_url=url).describe()
