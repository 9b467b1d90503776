"""429/503/401 responses and the IETF ``RateLimit``/``RateLimit-Policy`` headers.

Header syntax follows draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Policy: "<rule>";q=<limit>;
w=<window seconds>`` and ``RateLimit: "<rule>";r=<remaining>;t=<seconds to reset>``, quantities in
integer micro-units. Problem bodies are RFC 9457 ``application/problem+json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from starlette.types import Send

from .amounts import format_micros
from .ledger import HeldBudget, Violation

__all__ = [
    "rate_limit_headers",
    "send_ambiguous_entity",
    "send_config_invalid",
    "send_estimate_failed",
    "send_identify_failed",
    "send_missing_entity",
    "send_rejection",
    "send_unavailable",
]

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"

Headers = list[tuple[bytes, bytes]]


def _seconds(ms: int) -> int:
    return max(0, -(-ms // 1000))  # whole seconds, rounded up


_policy_cache: dict[tuple[tuple[str, int, int], ...], bytes] = {}


def _policy_header(key: tuple[tuple[str, int, int], ...]) -> bytes:
    """``RateLimit-Policy`` depends only on the rules, limits and periods: built once each."""
    value = _policy_cache.get(key)
    if value is None:
        if len(_policy_cache) >= 1024:
            _policy_cache.clear()
        value = _policy_cache[key] = ", ".join(
            f'"{rule}";q={limit}' + (f";w={_seconds(period_ms)}" if period_ms else "")
            for rule, limit, period_ms in key
        ).encode()
    return value


def rate_limit_headers(
    items: Sequence[tuple[str, int, int, int, int | None, int]],
) -> Headers:
    """``items``: (rule, limit, remaining, period_ms, reset_ms, now_ms) per budget."""
    limits: list[str] = []
    for rule, _limit, remaining, _period_ms, reset_ms, now_ms in items:
        state = f'"{rule}";r={max(0, remaining)}'
        if reset_ms is not None:
            state += f";t={_seconds(reset_ms - now_ms)}"
        limits.append(state)
    policy = _policy_header(tuple((rule, limit, period) for rule, limit, _, period, _, _ in items))
    return [(b"ratelimit-policy", policy), (b"ratelimit", ", ".join(limits).encode())]


def admitted_headers(holds: Sequence[HeldBudget], now_ms: int) -> Headers:
    """The headers of an admitted request: ``rate_limit_headers`` of its holds.

    This runs on every request, and most have one rule: for them the policy header is one cache
    lookup and only the two numbers that change are formatted.
    """
    if len(holds) != 1:
        return rate_limit_headers(
            [
                (h.budget.rule, h.limit, h.remaining, h.budget.period_ms, h.reset_ms, now_ms)
                for h in holds
            ]
        )
    (h,) = holds
    budget = h.budget
    policy, start = hold_head(budget.rule, h.limit, budget.period_ms)
    return headers_from_head(policy, start, h.remaining, h.reset_ms, now_ms)


def headers_from_head(
    policy: tuple[bytes, bytes], start: bytes, remaining: int, reset_ms: int | None, now_ms: int
) -> Headers:
    """One budget's headers from its ``hold_head``: only the two numbers that change are formatted."""
    if remaining < 0:
        remaining = 0
    if reset_ms is None:
        return [policy, (b"ratelimit", b"%b%d" % (start, remaining))]
    wait_ms = reset_ms - now_ms
    wait_s = -(-wait_ms // 1000) if wait_ms > 0 else 0
    return [policy, (b"ratelimit", b"%b%d;t=%d" % (start, remaining, wait_s))]


def hold_head(rule: str, limit: int, period_ms: int) -> tuple[tuple[bytes, bytes], bytes]:
    """What one budget's headers take from its rule and limit alone: the ``RateLimit-Policy``
    header, and the start of the ``RateLimit`` value (``"<rule>";r=``). Built once each."""
    key = (rule, limit, period_ms)
    cached = _single_policy_cache.get(key)
    if cached is None:
        if len(_single_policy_cache) >= 1024:
            _single_policy_cache.clear()
        cached = _single_policy_cache[key] = (
            (b"ratelimit-policy", _policy_header((key,))),
            f'"{rule}";r='.encode(),
        )
    return cached


_single_policy_cache: dict[tuple[str, int, int], tuple[tuple[bytes, bytes], bytes]] = {}


def retry_after(violations: Sequence[Violation], hold_retry_after_s: int) -> int | None:
    """Seconds a client should wait, or None when waiting cannot help (a spent lifetime budget, or
    a request whose estimate alone is above a limit).

    Spent alone blocks: the time to the window's reset. Only live holds block: a short interval.
    """
    if any(v.amount > v.limit for v in violations):
        return None
    spend_blocked = [v for v in violations if v.blocked_by_spend]
    if not spend_blocked:
        return hold_retry_after_s
    resets = [v.reset_after for v in spend_blocked]
    if any(r is None for r in resets):
        return None
    return max(1, math.ceil(max(r for r in resets if r is not None)))


async def _send_json(
    send: Send, status: int, body: dict[str, Any], content_type: bytes, headers: Headers
) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_rejection(
    send: Send,
    violations: Sequence[Violation],
    *,
    unit: str,
    error_format: str,
    hold_retry_after_s: int,
) -> None:
    wait = retry_after(violations, hold_retry_after_s)
    waiting_helps = all(not v.blocked_by_spend for v in violations)
    headers = rate_limit_headers(
        [
            (v.budget.rule, v.limit, v.remaining, v.budget.period_ms, v.reset_ms, v.now_ms)
            for v in violations
        ]
    )
    if wait is not None:
        headers.append((b"retry-after", str(wait).encode()))
    details = "; ".join(_violation_detail(v, unit) for v in violations)
    if error_format == "openai":
        # What OpenAI's API answers and its SDKs and the clients built on them branch on: a spent
        # quota is ``insufficient_quota`` (not retried), a rate limit that a short wait lifts is
        # ``rate_limit_exceeded`` (retried after Retry-After).
        headers.append((b"x-should-retry", b"true" if waiting_helps else b"false"))
        kind = "requests" if waiting_helps else "insufficient_quota"
        body: dict[str, Any] = {
            "error": {
                "message": f"Budget exceeded: {details}.",
                "type": kind,
                "param": None,
                "code": "rate_limit_exceeded" if waiting_helps else "insufficient_quota",
            }
        }
        await _send_json(send, 429, body, b"application/json", headers)
        return
    body = {
        "type": QUOTA_EXCEEDED,
        "title": "Request cannot be satisfied as assigned quota has been exceeded",
        "status": 429,
        "detail": f"Budget exceeded: {details}.",
        "violated-policies": [v.budget.rule for v in violations],
        "budgets": [
            {
                "rule": v.budget.rule,
                "limit": format_micros(v.limit),
                "remaining": format_micros(v.remaining),
                "unit": unit,
                "resets_in": None if v.reset_after is None else math.ceil(v.reset_after),
                "retry_helps": not v.blocked_by_spend,
            }
            for v in violations
        ],
    }
    await _send_json(send, 429, body, b"application/problem+json", headers)


def _violation_detail(v: Violation, unit: str) -> str:
    """One budget's refusal in words; it says what the request tried to hold when that, not the
    spend, is what refuses it, so a client knows a smaller request (``max_tokens``) would pass."""
    text = (
        f"rule {v.budget.rule!r}: limit {format_micros(v.limit)} {unit}, "
        f"remaining {format_micros(v.remaining)} {unit}"
    )
    wants = f"this request tries to hold {format_micros(v.amount)} {unit}"
    if v.amount > v.limit:
        return f"{text} ({wants}, above the limit itself)"
    if v.spent < v.limit and v.spent + v.amount > v.limit:
        room = format_micros(v.limit - v.spent)
        return f"{text} ({wants}, more than the {room} {unit} the spend leaves)"
    if not v.blocked_by_spend:
        return f"{text} ({wants}; in-flight requests hold the rest, retry shortly)"
    return text


async def send_unavailable(send: Send, detail: str, *, error_format: str) -> None:
    await send_problem(
        send,
        503,
        "Budget service temporarily unavailable",
        detail,
        error_format=error_format,
        code="budget_unavailable",
        problem_type=REDUCED_CAPACITY,
        openai_type="server_error",
        headers=[(b"retry-after", b"1")],
    )


async def send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    error_format: str,
    code: str,
    problem_type: str = "about:blank",
    openai_type: str = "invalid_request_error",
    headers: Headers | None = None,
) -> None:
    """An RFC 9457 problem body, or the OpenAI error shape with ``BUDGET_ERROR_FORMAT=openai``."""
    if error_format == "openai":
        body: dict[str, Any] = {
            "error": {"message": detail, "type": openai_type, "param": None, "code": code}
        }
        await _send_json(send, status, body, b"application/json", headers or [])
        return
    body = {"type": problem_type, "title": title, "status": status, "detail": detail}
    await _send_json(send, status, body, b"application/problem+json", headers or [])


async def send_missing_entity(send: Send, rule: str, source: str, *, error_format: str) -> None:
    await send_problem(
        send,
        401,
        "Budget identity missing",
        f"rule {rule!r} needs an entity id from {source}, and the request has none",
        error_format=error_format,
        code="budget_identity_missing",
    )


async def send_ambiguous_entity(send: Send, detail: str, *, error_format: str) -> None:
    await send_problem(
        send,
        400,
        "Ambiguous budget identity",
        detail,
        error_format=error_format,
        code="budget_identity_ambiguous",
    )


async def send_identify_failed(send: Send, *, error_format: str) -> None:
    await send_problem(
        send,
        500,
        "Budget identity lookup failed",
        "the request's budget identity could not be resolved",
        error_format=error_format,
        code="budget_identify_failed",
    )


async def send_estimate_failed(send: Send, *, client_error: bool, error_format: str) -> None:
    """400 when the request is at fault (a body that cannot be read: not worth a retry), else 500."""
    if client_error:
        await send_problem(
            send,
            400,
            "Request cannot be estimated",
            "the request's body cannot be read to estimate its cost",
            error_format=error_format,
            code="budget_invalid_request",
            headers=[(b"x-should-retry", b"false")],
        )
        return
    await send_problem(
        send,
        500,
        "Budget estimate failed",
        "the request's cost could not be estimated",
        error_format=error_format,
        code="budget_estimate_failed",
    )


async def send_config_invalid(send: Send) -> None:
    """Every request of a middleware whose BUDGET_* configuration is malformed (with no lifespan
    to stop the server at start): a fixed text; the error itself is in the server's log."""
    await send_problem(
        send,
        500,
        "budget configuration invalid",
        "the budget middleware's configuration is invalid; the server's log says why",
        error_format="problem",
        code="budget_configuration_invalid",
    )
