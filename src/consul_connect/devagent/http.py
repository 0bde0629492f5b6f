"""HTTP plumbing of the dev agent: requests, responses, errors, routing, blocking.

Endpoint modules register handlers on a :class:`Router`; each handler takes a
:class:`Request` and returns a :class:`Response` or raises :class:`HTTPError`.
The ASGI application in :mod:`consul_connect.devagent.app` turns these into
Consul's wire behaviour (plain-text errors, standard headers, 404/405 answers).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from consul_connect._goduration import parse_duration

if TYPE_CHECKING:
    from consul_connect.devagent.acl import ACLAuthorizer
    from consul_connect.devagent.context import AgentContext

__all__ = [
    "DEFAULT_QUERY_TIME",
    "MAX_QUERY_TIME",
    "HTTPError",
    "QueryOptions",
    "Request",
    "Response",
    "Route",
    "Router",
    "blocking_query",
    "cache_headers",
    "decode_json_body",
    "get_ci",
    "go_json_kind",
    "json_response",
    "mapstructure_kind",
    "query_meta",
    "query_response",
]

MAX_QUERY_TIME = 600.0
DEFAULT_QUERY_TIME = 300.0

Handler = Callable[["Request"], Awaitable["Response"]]


class HTTPError(Exception):
    """An error answered as Consul does: ``status`` with a plain-text ``text`` body."""

    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


@dataclass
class Response:
    """An answer: status, body bytes, headers (names as Consul spells them)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = "application/json"


# Go's unicode.IsSpace, which strings.TrimSpace uses (Python's strip() also drops \x1c-\x1f).
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)


def _go_trim_space(s: str) -> str:
    return s.strip(_GO_SPACE)


def encode_json(data: Any) -> bytes:
    """Encode ``data`` as the dev-mode agent does: 4-space indent and a trailing newline."""
    return (json.dumps(data, indent=4, ensure_ascii=False) + "\n").encode()


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """Return a JSON :class:`Response`."""
    return Response(status=status, body=encode_json(data), headers=dict(headers or {}))


@dataclass(frozen=True)
class QueryOptions:
    """Parsed common query parameters (consul-api.md §1.3)."""

    index: int = 0
    wait: float = 0.0
    hash: str = ""
    stale: bool = False
    consistent: bool = False
    cached: bool = False
    filter: str = ""
    dc: str = ""

    @property
    def consistency(self) -> str:
        """The value of ``X-Consul-Effective-Consistency`` for this request."""
        if self.stale:
            return "stale"
        if self.consistent:
            return "consistent"
        return "leader"

    @property
    def blocking(self) -> bool:
        """True when this is a blocking request (``index`` > 0)."""
        return self.index > 0


class Request:
    """One HTTP request as endpoint handlers see it."""

    def __init__(
        self,
        ctx: AgentContext,
        method: str,
        path: str,
        raw_query: str,
        headers: Mapping[str, str],
        body: bytes,
        suffix: str = "",
    ) -> None:
        self.ctx = ctx
        self.method = method
        self.path = path
        self.suffix = suffix
        self.headers = headers
        self.body = body
        pairs = parse_qsl(raw_query, keep_blank_values=True)
        self.query: dict[str, list[str]] = {}
        for k, v in pairs:
            self.query.setdefault(k, []).append(v)
        self._options: QueryOptions | None = None
        self._authz: ACLAuthorizer | None = None

    def has(self, name: str) -> bool:
        """True when query parameter ``name`` is present (even empty)."""
        return name in self.query

    def param(self, name: str, default: str = "") -> str:
        """The first value of query parameter ``name``, or ``default``."""
        values = self.query.get(name)
        return values[0] if values else default

    def params(self, name: str) -> list[str]:
        """Every value of a repeated query parameter."""
        return list(self.query.get(name, []))

    def bool_param(self, name: str) -> bool:
        """A key-presence boolean as Consul reads ``passing``/``stale``: present and not false."""
        if name not in self.query:
            return False
        v = self.param(name).strip().lower()
        return v not in ("0", "false", "f")

    @property
    def token(self) -> str:
        """The request's ACL token: ``?token=``, ``X-Consul-Token``, ``Authorization: Bearer``.

        Without one, the agent's default token (``acl_default_token``, empty = anonymous).
        """
        return self._explicit_token() or self.ctx.config.acl_default_token or ""

    def _explicit_token(self) -> str:
        # Consul's parseTokenInternal / parseTokenFromHeaders (agent/http.go), including its
        # split on single spaces: "Bearer\t<secret>" carries no token there either.
        t = self.param("token")
        if t:
            return t
        t = self.headers.get("x-consul-token", "")
        if t:
            return t
        auth = self.headers.get("authorization", "")
        parts = auth.split(" ")
        if auth and len(parts) > 1 and parts[0].lower() == "bearer":
            value = _go_trim_space(" ".join(parts[1:]))
            return _go_trim_space(value.split(" ")[0])
        return ""

    @property
    def authz(self) -> ACLAuthorizer:
        """The ACL authorizer of this request's token (raises 403 ``ACL not found``)."""
        if self._authz is None:
            self._authz = self.ctx.acl.authorizer(self.token)
        return self._authz

    @property
    def options(self) -> QueryOptions:
        """The common query options, validated as Consul does (400 on bad values)."""
        if self._options is None:
            self._options = self._parse_options()
        return self._options

    def _parse_options(self) -> QueryOptions:
        # Consul's parseWait/parseConsistency skip empty values (`query.Get(k) != ""`).
        index = 0
        raw = self.param("index")
        if raw:
            if not re.fullmatch(r"[0-9]+", raw) or int(raw) >= 2**64:
                raise HTTPError(400, "Invalid index")
            index = int(raw)
        wait = 0.0
        raw = self.param("wait")
        if raw:
            try:
                # A negative wait is valid: the server then uses its default query time.
                wait = _go_duration(raw)
            except ValueError:
                raise HTTPError(400, "Invalid wait time") from None
        stale = self.has("stale")
        consistent = self.has("consistent")
        raw = self.param("max_stale")
        if raw:
            try:
                ms = _go_duration(raw)
            except ValueError:
                raise HTTPError(400, f'Invalid max_stale value "{raw}"') from None
            if ms > 0:
                stale = True
        if stale and consistent:
            raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        cached = self.has("cached")
        if cached and consistent:
            raise HTTPError(400, "Cannot specify ?cached with ?consistent, conflicting semantics.")
        return QueryOptions(
            index=index,
            wait=wait,
            hash=self.param("hash"),
            stale=stale,
            consistent=consistent,
            cached=cached,
            filter=self.param("filter"),
            dc=self.param("dc"),
        )

    def check_datacenter(self) -> None:
        """Answer 500 ``No path to datacenter`` for a ``dc`` other than the agent's."""
        dc = self.param("dc")
        if dc and dc != self.ctx.config.datacenter:
            raise HTTPError(500, "No path to datacenter")

    def reject_enterprise_tenancy(self) -> None:
        """Refuse ``ns``/``partition`` inputs with the 400 a CE agent gives."""
        for header, what, param in (
            ("x-consul-namespace", "Namespaces", "ns"),
            ("x-consul-partition", "Partitions", "partition"),
        ):
            if self.headers.get(header):
                name = "X-Consul-Namespace" if param == "ns" else "X-Consul-Partition"
                raise HTTPError(
                    400, f'Invalid header: "{name}" - {what} are a Consul Enterprise feature'
                )
            if self.param(param):
                raise HTTPError(
                    400,
                    f'Invalid query parameter: "{param}" - {what} are a Consul Enterprise feature',
                )

    def json(self) -> Any:
        """The decoded JSON body; 400 ``Request decode failed: ...`` when it is not JSON."""
        return decode_json_body(self.body, "Request decode failed")


_MAX_DURATION = (2**63 - 1) / 1e9


def _go_duration(text: str) -> float:
    """``time.ParseDuration``, including its refusal of values past int64 nanoseconds."""
    seconds = parse_duration(text)
    if abs(seconds) > _MAX_DURATION:
        raise ValueError(f"time: invalid duration {text!r}")
    return seconds


def decode_json_body(body: bytes, prefix: str) -> Any:
    """Decode a JSON request body, or raise a 400 whose text starts with ``prefix``."""
    if not body.strip():
        raise HTTPError(400, f"{prefix}: EOF")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"{prefix}: {_go_json_error(exc)}") from None
    # Go's decoder leaves its target untouched for a JSON null: the handler then
    # sees an empty request, exactly as for ``{}``.
    return {} if value is None else value


def go_json_kind(value: object) -> str:
    """How Go's ``json: cannot unmarshal <kind> into ...`` names a decoded JSON value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _go_json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        if exc.pos >= len(exc.doc.rstrip()):
            return "unexpected EOF"
        ch = exc.doc[exc.pos] if exc.pos < len(exc.doc) else ""
        return f"invalid character {ch!r} looking for beginning of value"
    return str(exc)


def mapstructure_kind(value: object) -> str:
    """How mapstructure's ``got unconvertible type '<kind>'`` names a decoded JSON value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "<nil>"


def get_ci(obj: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """Read a key as Go's JSON decoder does: case-insensitively, trying each alias in order."""
    for name in names:
        if name in obj:
            return obj[name]
    lowered = {k.lower(): k for k in obj if isinstance(k, str)}
    for name in names:
        key = lowered.get(name.lower())
        if key is not None:
            return obj[key]
    return default


def query_meta(
    req: Request, index: int, *, consistency: bool = False, backend: str = "blocking-query"
) -> dict[str, str]:
    """The headers Consul's ``setMeta`` writes for a raft-backed read.

    ``X-Consul-Index`` (never 0), ``X-Consul-LastContact``, ``X-Consul-KnownLeader``
    and ``X-Consul-Query-Backend`` always; ``X-Consul-Effective-Consistency`` only
    when ``consistency`` is set, as only some Consul handlers (catalog, health,
    intention match, prepared queries) record the consistency level they used.
    """
    headers = {
        "X-Consul-Index": str(max(index, 1)),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
    }
    if consistency:
        headers["X-Consul-Effective-Consistency"] = req.options.consistency
    headers["X-Consul-Query-Backend"] = backend
    return headers


def query_response(
    req: Request,
    data: Any,
    index: int,
    *,
    extra_headers: Mapping[str, str] | None = None,
    consistency: bool = False,
    backend: str = "blocking-query",
) -> Response:
    """A JSON answer of a raft-backed read with the headers of :func:`query_meta`."""
    headers = query_meta(req, index, consistency=consistency, backend=backend)
    if extra_headers:
        headers.update(extra_headers)
    return json_response(data, headers=headers)


def cache_headers(req: Request, index: int) -> dict[str, str]:
    """``X-Cache`` (and ``Age`` on a hit) for a read served through the agent cache.

    The first request for a given path and query (minus ``index``/``wait``) is a
    ``MISS``; later ones are ``HIT``s, as the agent cache keeps the entry fresh
    with background blocking queries. ``Age`` counts from the last time the
    entry's data changed (or from the first fetch).
    """
    import time

    skip = {"index", "wait", "hash", "token"}
    key = (
        req.path
        + "?"
        + "&".join(f"{k}={v}" for k in sorted(req.query) if k not in skip for v in req.query[k])
    )
    entries: dict[str, tuple[int, float]] = req.ctx.extensions.setdefault(_CACHE_KEY, {})
    now = time.monotonic()
    seen = entries.get(key)
    if seen is None:
        entries[key] = (index, now)
        return {"X-Cache": "MISS"}
    if seen[0] != index:
        seen = entries[key] = (index, now)
    return {"X-Cache": "HIT", "Age": str(round(now - seen[1]))}


_CACHE_KEY = "http.agent-cache"


def block_timeout(wait: float, default: float = DEFAULT_QUERY_TIME) -> float:
    """The server-side timeout for ``wait``: capped at 10 min, plus jitter up to 1/16."""
    timeout = wait if wait > 0 else default
    timeout = min(timeout, MAX_QUERY_TIME)
    return timeout + random.random() * timeout / 16


async def blocking_query(
    req: Request,
    tables: Iterable[str],
    run: Callable[[], tuple[int, Any]],
    *,
    default_wait: float = DEFAULT_QUERY_TIME,
) -> tuple[int, Any]:
    """Run ``run`` (returning ``(index, result)``) with Consul's index-blocking rules.

    Without ``index`` (or with 0) the result comes back at once. Otherwise the
    query is re-run whenever one of ``tables`` changes, until the result's index
    is strictly greater than the requested one or the wait times out; on timeout
    the current result (and index) is returned.
    """
    import asyncio

    store = req.ctx.store
    names = list(tables)
    opts = req.options
    events = store.watch(names)
    index, result = run()
    if not opts.blocking or index > opts.index:
        return index, result
    loop = asyncio.get_running_loop()
    deadline = loop.time() + block_timeout(opts.wait, default_wait)
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0 or store.closed:
            return index, result
        await store.wait_any(events, remaining)
        events = store.watch(names)
        index, result = run()
        if index > opts.index:
            return index, result


@dataclass(frozen=True)
class Route:
    """A registered endpoint: a path (or a path prefix ending in ``/``) and its methods."""

    path: str
    methods: dict[str, Handler]
    prefix: bool


class Router:
    """Maps paths to handlers as Consul's mux does: exact paths, then longest prefix."""

    def __init__(self) -> None:
        self._exact: dict[str, Route] = {}
        self._prefixes: list[Route] = []

    def add(self, path: str, methods: Iterable[str], handler: Handler) -> None:
        """Register ``handler`` for ``methods`` on ``path``; a path ending in ``/`` is a prefix."""
        prefix = path.endswith("/")
        table = {r.path: r for r in self._prefixes} if prefix else self._exact
        route = table.get(path)
        if route is None:
            route = Route(path=path, methods={}, prefix=prefix)
            if prefix:
                self._prefixes.append(route)
                self._prefixes.sort(key=lambda r: len(r.path), reverse=True)
            else:
                self._exact[path] = route
        for m in methods:
            route.methods[m.upper()] = handler

    def route(self, path: str, *methods: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add`."""

        def deco(fn: Handler) -> Handler:
            self.add(path, methods, fn)
            return fn

        return deco

    def resolve(self, path: str) -> tuple[Route, str] | None:
        """Return the route for ``path`` and the path suffix after a prefix route."""
        r = self._exact.get(path)
        if r is not None:
            return r, ""
        for r in self._prefixes:
            if path.startswith(r.path):
                return r, path[len(r.path) :]
        return None
