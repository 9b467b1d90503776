"""Redis URLs: checking, parsing and redacting them, in one place (the ledgers and config use it).

``redis://``, ``rediss://`` and ``unix://`` URLs go to redis-py as they are; ``redis+cluster://``
and ``redis+sentinel://`` URLs name several nodes, and are split here (``parse_cluster_url``,
``parse_sentinel_url``). ``check_redis_url`` refuses a URL that would be misread, ``redact_url``
makes one fit for a log line. Neither ever prints a password, whatever it contains: a password
with a ``/``, ``?``, ``#`` or ``@`` that is not percent-encoded is refused (redis-py would read part
of it as the host), and redaction cuts wide when it cannot tell where a password ends.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "CLUSTER_SCHEME",
    "REDIS_SCHEMES",
    "SENTINEL_SCHEME",
    "MultiHostURL",
    "SentinelURL",
    "check_redis_url",
    "location_of",
    "parse_cluster_url",
    "parse_multi_host_url",
    "parse_sentinel_url",
    "redact_url",
    "scheme_of",
]

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
REDIS_SCHEMES = ("redis", "rediss", "unix", CLUSTER_SCHEME, SENTINEL_SCHEME)

CLUSTER_PARAMS = frozenset({"username", "password", "ssl"})
# No secret may go in a parameter that ``redact_url`` does not mask: the Sentinels' own credentials
# are the ``sentinel_auth`` flag (reuse the primary's) or constructor arguments.
SENTINEL_PARAMS = frozenset({"db", "username", "password", "ssl", "sentinel_auth"})

# Query parameters whose value may be printed (when it is plain); any other is printed as ***.
_PLAIN_PARAMS = frozenset({"db", "ssl", "sentinel_auth", "protocol", "ssl_cert_reqs"})
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._-]*")
# A parameter whose name says it may hold a secret: it and everything after it are redacted, since
# its value may hold a '&' too.
_SECRET_NAME = re.compile(r"pass|user|token|secret|auth|key|cred", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"[?&;][^&;=]*(?:pass|user|token|secret|auth|key|cred)", re.IGNORECASE)
_HOST_END = re.compile(r"[/?#]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_ENCODE_HINT = "percent-encode '@', '/', '?' and '#' in a user name or password (%40, %2F, %3F, %23)"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _split_scheme(url: str) -> tuple[str, str]:
    """``(scheme, rest)`` of ``scheme://rest``; ``('', url)`` when it has no scheme (a '://' in
    a password does not make one)."""
    scheme, sep, rest = url.partition("://")
    if sep and _SCHEME.fullmatch(scheme):
        return scheme, rest
    return "", url


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased ('' when it has none)."""
    return _split_scheme(url)[0].lower()


def redact_url(url: str) -> str:
    """``url`` fit for a log line: user name and password replaced by ``***``, and every query
    parameter but a few plain ones (``db``, ``ssl``...) too; the fragment dropped.

    A password may hold any character, even unencoded ones that end the authority (``/``, ``?``,
    ``#``), so the credentials are taken to run to the *last* ``@``. When that ``@`` may be inside a
    secret query parameter instead (``?password=a@b``), everything after the scheme is redacted.
    """
    scheme, rest = _split_scheme(url)
    head = f"{scheme}://" if scheme else ""
    credentials, at, tail = rest.rpartition("@")
    if at and _SECRET_PARAM.search(credentials):
        return head + "***"
    tail, _, _fragment = tail.partition("#")  # never printed: it may be a password's tail
    address, question, query = tail.partition("?")
    out = head + ("***@" if at else "") + address
    if question:
        out += "?" + _redact_query(query)
    return out


def _redact_query(query: str) -> str:
    pairs = re.split(r"[&;]", query)
    shown: list[str] = []
    for i, pair in enumerate(pairs):
        name, eq, value = pair.partition("=")
        if name in _PLAIN_PARAMS:
            shown.append(pair if _PLAIN_VALUE.fullmatch(value) else f"{name}=***")
        elif not _PLAIN_VALUE.fullmatch(name):
            shown.append("***")
        elif _SECRET_NAME.search(name):
            shown.append(f"{name}=***" if eq else "***")
            if i + 1 < len(pairs):
                shown.append("***")  # what follows may be the rest of its value
            break
        else:
            shown.append(f"{name}=***" if eq else name)
    return "&".join(shown)


def _check_authority(url: str, scheme: str) -> None:
    """Refuse an ``@`` after the authority: a user name or password with an unencoded ``/``, ``?``
    or ``#``, which every URL parser (redis-py's too) would cut at that character."""
    rest = _split_scheme(url)[1]
    end = _HOST_END.search(rest)
    if end is not None and "@" in rest[end.start() :]:
        raise ValueError(f"{scheme}:// URL: an '@' after the host: {_ENCODE_HINT}")


def check_redis_url(url: str) -> None:
    """Raise ``ValueError`` (never quoting a password) when ``url`` is not a Redis URL this package
    reads as meant: an unknown scheme, a password that would be cut short, a missing host, a bad
    port, or a Cluster or Sentinel URL that its ledger would refuse."""
    scheme = scheme_of(url)
    if scheme not in REDIS_SCHEMES:
        raise ValueError("use a redis://, rediss://, unix://, redis+cluster:// or redis+sentinel:// URL")
    _check_authority(url, scheme)
    if scheme == CLUSTER_SCHEME:
        parse_cluster_url(url)
    elif scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    elif scheme == "unix":
        if not urlsplit(url).path:
            raise ValueError("unix:// URL: name the socket's path, unix:///path/to/redis.sock")
    else:
        parts = urlsplit(url)
        _host_port(parts.netloc.rpartition("@")[2], 6379, scheme)
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{scheme}:// URL: the path names the database by its number, got {db!r}")


# -- URLs with several nodes ----------------------------------------------------------------------


@dataclass(frozen=True)
class MultiHostURL:
    """``scheme://[user[:password]@]host:port[,host:port...]/path?query``, split up."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    path: str
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    query: dict[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> bool:
        value = self.query.get(name, "false").strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ValueError(f"{self.scheme}:// URL: {name}={value!r} is not a boolean")

    def connection_options(self) -> dict[str, Any]:
        """redis-py keyword arguments for the data nodes: credentials and TLS."""
        options: dict[str, Any] = {}
        if self.username:
            options["username"] = self.username
        if self.password:
            options["password"] = self.password
        if self.flag("ssl"):
            options["ssl"] = True
        return options


@dataclass(frozen=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL: the Sentinels, the service they name a primary for, its db."""

    nodes: MultiHostURL
    service: str
    db: int


def _host_port(text: str, default_port: int, scheme: str) -> tuple[str, int]:
    """One ``host[:port]`` of the authority (after any credentials, so it may be quoted)."""
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{scheme}:// URL: bad IPv6 node {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{scheme}:// URL: a node without a host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{scheme}:// URL: node {host!r} has a bad port {port_text!r}")
    return host, int(port_text)


def parse_multi_host_url(
    url: str, scheme: str, *, default_port: int, allowed: Collection[str]
) -> MultiHostURL:
    """Split ``url`` into its nodes, credentials, path and query.

    Raises ``ValueError`` (never quoting the password) when the scheme is not ``scheme``, a
    password would be cut short, a node is malformed, or the query has a parameter outside
    ``allowed``.
    """
    if scheme_of(url) != scheme:
        raise ValueError(f"not a {scheme}:// URL")
    _check_authority(url, scheme)
    parts = urlsplit(url)
    userinfo, at, nodes = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = tuple(_host_port(n, default_port, scheme) for n in nodes.split(","))
    query: dict[str, str] = {}
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    # A name after a secret's value may be the rest of it ('password=a&b'): then none is quoted.
    quotable = not any(_SECRET_NAME.search(key) for key, _ in pairs)
    for key, value in pairs:
        if key not in allowed:
            shown = key if quotable and _PLAIN_VALUE.fullmatch(key) else "***"
            raise ValueError(
                f"{scheme}:// URL: unknown parameter {shown!r} (allowed: {', '.join(sorted(allowed))})"
            )
        query[key] = value
    if "username" in query:
        username = query.pop("username") or None
    if "password" in query:
        password = query.pop("password") or None
    return MultiHostURL(scheme, hosts, unquote(parts.path), username, password, query)


def parse_cluster_url(url: str) -> MultiHostURL:
    """``redis+cluster://[user:password@]host:port[,host:port...][?ssl=true]`` (database 0 only)."""
    parsed = parse_multi_host_url(url, CLUSTER_SCHEME, default_port=6379, allowed=CLUSTER_PARAMS)
    if parsed.path not in ("", "/", "/0"):
        raise ValueError("redis+cluster:// URL: a Redis Cluster has only database 0")
    parsed.flag("ssl")
    return parsed


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[?db=N]``."""
    parsed = parse_multi_host_url(url, SENTINEL_SCHEME, default_port=26379, allowed=SENTINEL_PARAMS)
    service, _, rest = parsed.path.strip("/").partition("/")
    if not service or rest:
        raise ValueError("redis+sentinel:// URL: name the service as the path: .../<service>")
    db_text = parsed.query.get("db", "0")
    if not db_text.isdigit():
        raise ValueError(f"redis+sentinel:// URL: db must be a number, got {db_text!r}")
    parsed.flag("ssl")
    parsed.flag("sentinel_auth")
    return SentinelURL(parsed, service, int(db_text))


def location_of(url: str) -> str:
    """Where ``url`` points, the same whatever its credentials: ``scheme://hosts/path`` without
    user, password, query or fragment, the hosts of a seed list sorted. Everything up to the last
    ``@`` goes (a password may hold ``/``, ``#``, ``?`` or ``@``), so no password can remain."""
    scheme, _, rest = url.partition("://")
    rest = rest.rpartition("@")[2]
    for end in "?#":
        rest = rest.partition(end)[0]
    hosts, slash, path = rest.partition("/")
    hosts = ",".join(sorted(hosts.lower().split(",")))  # a cluster's or sentinels' seed list, any order
    return f"{scheme.lower()}://{hosts}{slash}{path}"
