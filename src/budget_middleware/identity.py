"""Who a request is charged to: entity ids from requests, their sanitising and hashing.

An entity id is client data. In a key it is either raw, ``r:<id>``, when it is short, plain and not a
credential, or a digest, ``h:<hex>``, for anything else; the two namespaces never collide, and no
client byte can move the ``{hash tag}`` of a budget (``budgets.py`` makes the key).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SECRET_HEADERS",
    "SOURCE_KINDS",
    "AmbiguousEntity",
    "EntityHasher",
    "KeySource",
    "header_id",
    "header_value",
    "plain_id",
]

_RAW_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")
# Used when no BUDGET_SECRET is set: digests are then stable but guessable for small id spaces.
_DEFAULT_KEY = b"budget-middleware/v1"


class EntityHasher:
    """Turns raw entity ids into key-safe tokens and span-safe digests."""

    __slots__ = ("_key", "_span_cache")

    def __init__(self, secret: str | bytes | None = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self._key = secret or _DEFAULT_KEY
        self._span_cache: dict[str, str] = {}

    def digest(self, raw: str | bytes) -> str:
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        return "h:" + hmac.new(self._key, data, hashlib.sha256).hexdigest()[:32]

    def token(self, raw: str | bytes, *, secret: bool = False) -> str:
        """``r:<id>`` for a plain non-secret id, else ``h:<digest>``."""
        if not secret and isinstance(raw, str) and _RAW_ID.fullmatch(raw):
            return "r:" + raw
        return self.digest(raw)

    def for_span(self, token: str) -> str:
        """What telemetry may carry for an entity token: never the raw id."""
        if not token.startswith("r:"):
            return token
        cached = self._span_cache.get(token)
        if cached is None:
            if len(self._span_cache) >= 4096:
                self._span_cache.clear()
            cached = self._span_cache[token] = self.digest(token[2:])
        return cached


# -- entity ids from requests ----------------------------------------------------------------

# Headers that carry credentials: a rule keyed on them always stores a digest.
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)
SOURCE_KINDS = ("header", "query", "bearer", "client", "user", "const")


class AmbiguousEntity(ValueError):
    """An identity source given more than once with different values (a spoofing pattern)."""


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a rule finds its entity id: ``header:<name>``, ``query:<name>``, ``bearer``,
    ``client``, ``user`` or ``const:<id>``."""

    kind: str
    name: str = ""
    secret: bool = False

    @classmethod
    def parse(cls, text: str, *, secret: bool = False) -> KeySource:
        if not isinstance(text, str):
            raise ValueError(f"key source must be a string, got {text!r}")
        kind, _, name = text.partition(":")
        kind = kind.strip().lower()
        if kind not in SOURCE_KINDS:
            raise ValueError(
                f"unknown key source {text!r}: use header:<name>, query:<name>, bearer, client, "
                "user or const:<id>"
            )
        if kind in ("header", "query", "const"):
            if not name:
                raise ValueError(f"key source {text!r} needs a name after the colon")
            if kind == "header":
                name = name.strip().lower()
                if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]{1,128}", name):
                    raise ValueError(f"key source {text!r}: not a valid header name")
                secret = secret or name in SECRET_HEADERS
            elif kind == "query" and len(name) > 128:
                raise ValueError(f"key source {text!r}: query parameter name too long")
        elif name:
            raise ValueError(f"key source {text!r} takes no name")
        return cls(kind, name, secret or kind == "bearer")

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind

    def extract(self, scope: MutableMapping[str, Any]) -> str | bytes | None:
        """The raw id in this request, or None when it is absent or empty.

        Raises ``AmbiguousEntity`` when a header or query parameter repeats with different values.
        """
        kind = self.kind
        if kind == "header":
            return header_id(scope, self.name.encode("latin-1"), self)
        if kind == "bearer":
            auth = header_id(scope, b"authorization", self)
            if auth is None:
                return None
            raw = auth.encode("latin-1", "surrogateescape") if isinstance(auth, str) else auth
            scheme, _, token = raw.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                return None
            return token.strip()
        if kind == "query":
            from urllib.parse import parse_qsl

            qs = scope.get("query_string", b"")
            # latin-1 maps every percent-escaped byte back to itself: ids that are not UTF-8 are
            # digested like header bytes, never refused.
            pairs = parse_qsl(
                qs.decode("latin-1") if isinstance(qs, bytes) else str(qs),
                keep_blank_values=True,
                encoding="latin-1",
            )
            return _single([v.encode("latin-1") for k, v in pairs if k == self.name], self)
        if kind == "client":
            client = scope.get("client")
            if isinstance(client, (tuple, list)) and client and isinstance(client[0], str):
                return client[0] or None
            return None
        if kind == "user":
            user = scope.get("user")
            if user is None or not getattr(user, "is_authenticated", False):
                return None
            identity = getattr(user, "identity", None)
            return str(identity) if identity else None
        return self.name  # const


def header_id(scope: MutableMapping[str, Any], name: bytes, source: KeySource) -> str | bytes | None:
    """The id in header ``name`` (lowercase bytes) for ``source``, as ``extract`` finds it:
    ``_single(_header_values(...))`` in one pass without lists, since it runs on every request."""
    value = header_value(scope, name, source)
    return None if value is None else plain_id(value)


def header_value(scope: MutableMapping[str, Any], name: bytes, source: KeySource) -> bytes | None:
    """``header_id`` before decoding: the header's stripped bytes, or None. A cache of budgets can
    be keyed by these bytes, which spares a returning client's id the decode (``plain_id``)."""
    found = b""
    size = len(name)
    for key, value in scope.get("headers") or ():
        # Only a name of the same length can match: most headers are passed over without lower().
        if len(key) == size and (key == name or key.lower() == name):
            value = value.strip()
            if not value or value == found:
                continue
            if found:  # a repeat that disagrees: _single counts them and raises
                _single(_header_values(scope, name), source)
            found = value
    return found or None


def plain_id(value: bytes) -> str | bytes:
    """An id's bytes decoded when they are plain ASCII, else the bytes themselves."""
    return value.decode("ascii") if value.isascii() else value


def _header_values(scope: MutableMapping[str, Any], name: bytes) -> list[bytes]:
    headers = scope.get("headers") or ()
    return [v for k, v in headers if k.lower() == name]


def _single(values: list[bytes], source: KeySource) -> str | bytes | None:
    """One value, decoded when it is plain ASCII; repeats must agree."""
    values = [v.strip() for v in values]
    values = [v for v in values if v]
    if not values:
        return None
    if any(v != values[0] for v in values[1:]):
        raise AmbiguousEntity(f"{source} was sent {len(values)} times with different values")
    return plain_id(values[0])
