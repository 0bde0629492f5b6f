"""An async HTTP client for the Consul agent endpoints consul-connect uses.

One :class:`AgentClient` wraps one ``httpx.AsyncClient`` (connection pool, TLS to the
agent, unix socket). Every read returns ``(data, QueryMeta)`` so a watch loop can
block on the index. Every failure is translated once, in :meth:`AgentClient._send`,
into the :mod:`consul_connect.errors` tree:

=======================================  ==========================================
agent unreachable, timed out, 5xx         :class:`AgentUnavailableError` (retryable)
403                                       :class:`AgentPermissionError`
404                                       :class:`AgentNotFoundError`
429                                       :class:`AgentRateLimitedError`
other 4xx, undecodable or mis-shaped JSON :class:`AgentResponseError`
a ``filter`` Consul cannot compile (500)  :class:`AgentResponseError` (not retryable)
=======================================  ==========================================
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import httpx

from consul_connect.agent.blocking import format_wait, parse_index
from consul_connect.agent.config import AgentConfig
from consul_connect.errors import (
    AgentError,
    AgentNotFoundError,
    AgentPermissionError,
    AgentRateLimitedError,
    AgentRequestError,
    AgentResponseError,
    AgentUnavailableError,
    ConfigError,
)

__all__ = ["MAX_QUERY_TIME", "AgentClient", "QueryMeta", "error_for_status"]

JSONObject = dict[str, Any]
Params = list[tuple[str, str]]

# The server caps any `wait` at max_query_time (10 minutes by default); with no
# `wait` the leaf endpoint also waits up to 10 minutes.
MAX_QUERY_TIME = 600.0
_BODY_LIMIT = 4096

_LACKS = re.compile(r"lacks permission '([^']+)'(?: on \"([^\"]*)\")?")


@dataclass(frozen=True, slots=True)
class QueryMeta:
    """The blocking-query metadata of one agent answer.

    ``index``: ``X-Consul-Index`` (0 when absent or malformed: Consul never sends 0).
    ``known_leader``/``last_contact_ms``: staleness hints (None when not sent).
    ``content_hash``: ``X-Consul-ContentHash`` for hash-blocking endpoints.
    ``cache``: ``X-Cache`` (``HIT``/``MISS``) for agent-cached answers; ``age``: ``Age``.
    """

    index: int = 0
    known_leader: bool | None = None
    last_contact_ms: int | None = None
    content_hash: str | None = None
    cache: str | None = None
    age: int | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> QueryMeta:
        """Read the metadata from response headers (case-insensitive mapping)."""
        leader = headers.get("X-Consul-KnownLeader")
        return cls(
            index=parse_index(headers.get("X-Consul-Index")) or 0,
            known_leader=None if leader is None else leader.strip().lower() == "true",
            last_contact_ms=_int_or_none(headers.get("X-Consul-LastContact")),
            content_hash=headers.get("X-Consul-ContentHash") or None,
            cache=headers.get("X-Cache") or None,
            age=_int_or_none(headers.get("Age")),
        )


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _permission_message(body: str) -> str:
    """Say in one line what the token lacks, from Consul's plain-text 403 body."""
    match = _LACKS.search(body)
    if match:
        right, name = match.group(1), match.group(2)
        where = f' on "{name}"' if name is not None else ""
        return f"the ACL token lacks permission '{right}'{where}"
    if "ACL not found" in body:
        return "the ACL token is not known to the agent (unknown, expired or deleted)"
    if body:
        return f"permission denied: {body}"
    return "permission denied"


_BAD_FILTER = "Failed to create boolean expression evaluator"


def error_for_status(method: str, path: str, status: int, body: str) -> AgentError:
    """Translate a non-2xx agent answer into the library's error for that status.

    Returns (does not raise) the error, carrying ``status`` and the trimmed ``body``.
    """
    body = body.strip()[:_BODY_LIMIT]
    where = f"{method} {path}"
    if status == 403:
        return AgentPermissionError(
            f"{where}: {_permission_message(body)}", status=status, body=body
        )
    detail = f"{where}: HTTP {status}" + (f": {body}" if body else "")
    if status == 404:
        return AgentNotFoundError(detail, status=status, body=body)
    if status == 429:
        return AgentRateLimitedError(detail, status=status, body=body)
    if body.startswith(_BAD_FILTER):
        # Consul answers a filter it cannot compile with a plain 500; retrying cannot help.
        return AgentRequestError(
            f"{where}: the agent rejected the filter: {body}", status=status, body=body
        )
    if status >= 500:
        return AgentUnavailableError(detail, status=status, body=body)
    return AgentResponseError(detail, status=status, body=body)


def _ssl_context(config: AgentConfig) -> ssl.SSLContext:
    try:
        if config.ca_file or config.ca_path:
            ctx = ssl.create_default_context(cafile=config.ca_file, capath=config.ca_path)
        else:
            ctx = ssl.create_default_context()
        if config.client_cert and config.client_key:
            ctx.load_cert_chain(config.client_cert, config.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot set up TLS to the Consul agent: {exc}") from exc
    if not config.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class AgentClient:
    """Async client of one Consul agent.

    Use as ``async with AgentClient(config) as client:`` or call :meth:`aclose`.
    ``timeout`` bounds every non-blocking request; a blocking request gets
    ``wait + wait/16 + timeout`` (the server adds up to ``wait/16`` of jitter).
    ``transport`` replaces the network (tests). Construction raises
    :class:`~consul_connect.errors.ConfigError` if the TLS files cannot be loaded or the
    address is not a valid URL authority (a port that is not a number).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.timeout = timeout
        headers = {"User-Agent": "consul-connect-python"}
        if config.token:
            headers["X-Consul-Token"] = config.token
        if transport is None:
            verify: ssl.SSLContext | bool = (
                _ssl_context(config) if config.scheme == "https" else True
            )
            # Each Service holds long-lived blocking queries; httpx's default pool (100)
            # would cap a process at about 50 Services.
            transport = httpx.AsyncHTTPTransport(
                uds=config.unix_socket,
                verify=verify,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
            )
        self._extensions: dict[str, Any] = {}
        if config.scheme == "https" and config.tls_server_name:
            # Verify (and send SNI for) a name that differs from the host we dial.
            self._extensions["sni_hostname"] = config.tls_server_name
        try:
            self._http = httpx.AsyncClient(
                base_url=config.base_url,
                headers=headers,
                auth=config.http_auth,
                transport=transport,
                timeout=timeout,
                follow_redirects=False,
            )
        except httpx.InvalidURL as exc:
            # e.g. CONSUL_HTTP_ADDR=127.0.0.1:abc; Go's client refuses it the same way.
            raise ConfigError(f"invalid agent address {config.address!r}: {exc}") from exc
        self._base_params: Params = []
        if config.namespace:
            self._base_params.append(("ns", config.namespace))
        if config.partition:
            self._base_params.append(("partition", config.partition))

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._http.aclose()

    # -- plumbing ---------------------------------------------------------------

    def _params(self, extra: Params, dc: str | None = None) -> Params:
        params = list(self._base_params)
        datacenter = dc or self.config.datacenter
        if datacenter:
            params.append(("dc", datacenter))
        params.extend(extra)
        return params

    def _blocking(self, index: int, wait: float | None) -> tuple[Params, float]:
        """Blocking parameters and the client-side timeout that must outlast the server."""
        params: Params = []
        if index > 0:
            params.append(("index", str(index)))
        formatted = format_wait(wait) if wait is not None else None
        if formatted is not None:
            params.append(("wait", formatted))
        if index <= 0 and formatted is None:
            return params, self.timeout
        server_wait = min(wait, MAX_QUERY_TIME) if wait else MAX_QUERY_TIME
        return params, server_wait + server_wait / 16 + self.timeout

    async def _send(
        self,
        method: str,
        path: str,
        params: Params,
        *,
        body: Any = None,
        timeout: float | None = None,
        expect: Literal["object", "list", "any", "none"] = "object",
    ) -> tuple[Any, QueryMeta]:
        """Send one request; the single place where foreign errors become ours."""
        content: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(
                method,
                path,
                params=tuple(params),
                content=content,
                headers=headers,
                timeout=timeout if timeout is not None else self.timeout,
                extensions=dict(self._extensions),
            )
        except httpx.TimeoutException as exc:
            raise AgentUnavailableError(
                f"{method} {path}: the Consul agent at {self.config.base_url} did not answer "
                f"in time ({type(exc).__name__})"
            ) from exc
        except httpx.DecodingError as exc:
            raise AgentResponseError(f"{method} {path}: undecodable response: {exc}") from exc
        except httpx.RequestError as exc:
            raise AgentUnavailableError(
                f"{method} {path}: cannot reach the Consul agent at {self.config.base_url}: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc
        text = response.text
        if not response.is_success:
            raise error_for_status(method, path, response.status_code, text)
        meta = QueryMeta.from_headers(response.headers)
        if expect == "none" or (expect == "any" and not text.strip()):
            return None, meta
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # nesting deeper than the parser recurses
            raise AgentResponseError(
                f"{method} {path}: the agent's answer is not JSON: {exc}",
                status=response.status_code,
                body=text.strip()[:_BODY_LIMIT],
            ) from exc
        wanted: type | None = {"object": dict, "list": list}.get(expect)
        if wanted is not None and not isinstance(data, wanted):
            raise AgentResponseError(
                f"{method} {path}: expected a JSON {expect}, got {type(data).__name__}",
                status=response.status_code,
                body=text.strip()[:_BODY_LIMIT],
            )
        return data, meta

    async def _get(
        self,
        path: str,
        extra: Params | None = None,
        *,
        index: int = 0,
        wait: float | None = None,
        dc: str | None = None,
        expect: Literal["object", "list", "any"] = "object",
    ) -> tuple[Any, QueryMeta]:
        blocking, timeout = self._blocking(index, wait)
        params = self._params([*(extra or []), *blocking], dc)
        return await self._send("GET", path, params, timeout=timeout, expect=expect)

    @staticmethod
    def _seg(value: str) -> str:
        """One path segment: ``/``, ``?``, ``#``, ``%`` in a name must not change the path."""
        # ':' stays literal: check IDs such as "service:web-1" are common and legal here.
        return quote(value, safe=":@")

    # -- agent ------------------------------------------------------------------

    async def agent_self(self) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/agent/self``: the agent's config (``Config.Datacenter``, ``NodeName``...).

        Raises :class:`AgentPermissionError` without ``agent:read``.
        """
        return await self._get("/v1/agent/self")

    async def status_leader(self) -> tuple[str, QueryMeta]:
        """``GET /v1/status/leader``: the leader's RPC address, ``""`` when there is none."""
        data, meta = await self._get("/v1/status/leader", expect="any")
        if not isinstance(data, str):
            raise AgentResponseError("GET /v1/status/leader: expected a JSON string")
        return data, meta

    async def acl_token_self(self) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/acl/token/self``: the token in use (AccessorID, Policies, ...).

        Raises :class:`AgentPermissionError` for an unknown token.
        """
        return await self._get("/v1/acl/token/self")

    # -- connect CA -------------------------------------------------------------

    async def ca_roots(
        self, index: int = 0, wait: float | None = None
    ) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/agent/connect/ca/roots`` (agent-cached): ``ActiveRootID``, ``Roots``..."""
        return await self._get("/v1/agent/connect/ca/roots", index=index, wait=wait)

    async def leaf_cert(
        self, service: str, index: int = 0, wait: float | None = None
    ) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/agent/connect/ca/leaf/<service>``: ``CertPEM``, ``PrivateKeyPEM``...

        Raises :class:`AgentPermissionError` without ``service:write`` on ``service``.
        """
        return await self._get(
            f"/v1/agent/connect/ca/leaf/{self._seg(service)}", index=index, wait=wait
        )

    async def connect_ca_config(self) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/connect/ca/configuration`` (needs ``operator:write`` on recent Consul)."""
        return await self._get("/v1/connect/ca/configuration")

    async def set_connect_ca_config(self, cfg: Mapping[str, Any]) -> None:
        """``PUT /v1/connect/ca/configuration``: may start a root rotation."""
        await self._send(
            "PUT", "/v1/connect/ca/configuration", self._params([]), body=dict(cfg), expect="none"
        )

    # -- authorization ----------------------------------------------------------

    async def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> tuple[JSONObject, QueryMeta]:
        """``POST /v1/agent/connect/authorize``: ``{"Authorized": bool, "Reason": str}``.

        Raises :class:`AgentPermissionError` without ``service:write`` on ``target``.
        """
        body = {
            "Target": target,
            "ClientCertURI": client_cert_uri,
            "ClientCertSerial": client_cert_serial,
        }
        data, meta = await self._send(
            "POST", "/v1/agent/connect/authorize", self._params([]), body=body
        )
        if not isinstance(data.get("Authorized"), bool):
            raise AgentResponseError(
                "POST /v1/agent/connect/authorize: answer has no boolean 'Authorized'"
            )
        return data, meta

    async def intention_match_destination(
        self, name: str, index: int = 0, wait: float | None = None, *, cached: bool = False
    ) -> tuple[list[JSONObject], QueryMeta]:
        """Intentions whose destination is ``name`` or ``*``, highest precedence first.

        ``GET /v1/connect/intentions/match?by=destination&name=<name>``; ``cached`` asks
        the agent cache. Raises :class:`AgentPermissionError` without ``intentions:read``.
        """
        extra: Params = [("by", "destination"), ("name", name)]
        if cached:
            extra.append(("cached", ""))
        data, meta = await self._get("/v1/connect/intentions/match", extra, index=index, wait=wait)
        entries = data.get(name, [])
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise AgentResponseError("GET /v1/connect/intentions/match: entry is not a list")
        return entries, meta

    async def intention_check(self, source: str, destination: str) -> bool:
        """``GET /v1/connect/intentions/check``: would ``source`` be allowed to ``destination``."""
        data, _ = await self._get(
            "/v1/connect/intentions/check", [("source", source), ("destination", destination)]
        )
        allowed = data.get("Allowed")
        if not isinstance(allowed, bool):
            raise AgentResponseError("GET /v1/connect/intentions/check: no boolean 'Allowed'")
        return allowed

    async def list_intentions(
        self, filter: str | None = None, index: int = 0, wait: float | None = None
    ) -> tuple[list[JSONObject], QueryMeta]:
        """``GET /v1/connect/intentions``: every intention the token can read."""
        extra: Params = [("filter", filter)] if filter else []
        return await self._get(
            "/v1/connect/intentions", extra, index=index, wait=wait, expect="list"
        )

    async def get_intention_exact(
        self, source: str, destination: str
    ) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/connect/intentions/exact``; raises :class:`AgentNotFoundError` if absent."""
        return await self._get(
            "/v1/connect/intentions/exact", [("source", source), ("destination", destination)]
        )

    async def upsert_intention_exact(
        self, source: str, destination: str, body: Mapping[str, Any]
    ) -> bool:
        """``PUT /v1/connect/intentions/exact``: create or replace one intention.

        ``body`` holds ``Action`` (or ``Permissions``), ``Description``... Returns the
        agent's ``true``. Raises :class:`AgentPermissionError` without ``intentions:write``.
        """
        params = self._params([("source", source), ("destination", destination)])
        data, _ = await self._send(
            "PUT", "/v1/connect/intentions/exact", params, body=dict(body), expect="any"
        )
        return bool(data)

    async def delete_intention_exact(self, source: str, destination: str) -> bool:
        """``DELETE /v1/connect/intentions/exact`` (also ``true`` when nothing matched)."""
        params = self._params([("source", source), ("destination", destination)])
        data, _ = await self._send("DELETE", "/v1/connect/intentions/exact", params, expect="any")
        return bool(data)

    # -- discovery --------------------------------------------------------------

    def _discovery_params(
        self,
        *,
        passing: bool,
        filter: str | None,
        stale: bool,
        near: str | None,
        tags: Sequence[str],
    ) -> Params:
        extra: Params = []
        if passing:
            extra.append(("passing", ""))
        if stale:
            extra.append(("stale", ""))
        if near:
            extra.append(("near", near))
        if filter:
            extra.append(("filter", filter))
        extra.extend(("tag", tag) for tag in tags)
        return extra

    async def health_connect(
        self,
        service: str,
        passing: bool = True,
        dc: str | None = None,
        filter: str | None = None,
        index: int = 0,
        wait: float | None = None,
        stale: bool = True,
        near: str | None = None,
        tags: Sequence[str] = (),
    ) -> tuple[list[JSONObject], QueryMeta]:
        """``GET /v1/health/connect/<service>``: Connect-capable instances with checks.

        Each entry is ``{"Node": ..., "Service": ..., "Checks": [...]}``.
        """
        extra = self._discovery_params(
            passing=passing, filter=filter, stale=stale, near=near, tags=tags
        )
        return await self._get(
            f"/v1/health/connect/{self._seg(service)}",
            extra,
            index=index,
            wait=wait,
            dc=dc,
            expect="list",
        )

    async def health_service(
        self,
        service: str,
        passing: bool = True,
        dc: str | None = None,
        filter: str | None = None,
        index: int = 0,
        wait: float | None = None,
        stale: bool = True,
        near: str | None = None,
        tags: Sequence[str] = (),
    ) -> tuple[list[JSONObject], QueryMeta]:
        """``GET /v1/health/service/<service>``: every instance of ``service`` with checks."""
        extra = self._discovery_params(
            passing=passing, filter=filter, stale=stale, near=near, tags=tags
        )
        return await self._get(
            f"/v1/health/service/{self._seg(service)}",
            extra,
            index=index,
            wait=wait,
            dc=dc,
            expect="list",
        )

    async def catalog_connect(
        self,
        service: str,
        dc: str | None = None,
        filter: str | None = None,
        index: int = 0,
        wait: float | None = None,
        stale: bool = True,
        near: str | None = None,
        tags: Sequence[str] = (),
    ) -> tuple[list[JSONObject], QueryMeta]:
        """``GET /v1/catalog/connect/<service>``: flat ``ServiceNode`` entries (no health)."""
        extra = self._discovery_params(
            passing=False, filter=filter, stale=stale, near=near, tags=tags
        )
        return await self._get(
            f"/v1/catalog/connect/{self._seg(service)}",
            extra,
            index=index,
            wait=wait,
            dc=dc,
            expect="list",
        )

    async def prepared_query_execute(
        self,
        name_or_id: str,
        connect: bool = True,
        *,
        dc: str | None = None,
        near: str | None = None,
        limit: int | None = None,
    ) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/query/<id-or-name>/execute``: ``{"Service", "Nodes": [...], ...}``.

        Raises :class:`AgentNotFoundError` for an unknown query.
        """
        extra: Params = []
        if connect:
            extra.append(("connect", "true"))
        if near:
            extra.append(("near", near))
        if limit is not None:
            extra.append(("limit", str(limit)))
        return await self._get(f"/v1/query/{self._seg(name_or_id)}/execute", extra, dc=dc)

    # -- registration -----------------------------------------------------------

    async def register_service(
        self, definition: Mapping[str, Any], *, replace_existing_checks: bool = False
    ) -> None:
        """``PUT /v1/agent/service/register`` with a ``ServiceDefinition`` body.

        Raises :class:`AgentResponseError` (400) for an invalid definition and
        :class:`AgentPermissionError` without ``service:write``.
        """
        extra: Params = [("replace-existing-checks", "true")] if replace_existing_checks else []
        await self._send(
            "PUT",
            "/v1/agent/service/register",
            self._params(extra),
            body=dict(definition),
            expect="none",
        )

    async def deregister_service(self, service_id: str) -> None:
        """``PUT /v1/agent/service/deregister/<id>``; unknown id → :class:`AgentNotFoundError`."""
        await self._send(
            "PUT",
            f"/v1/agent/service/deregister/{self._seg(service_id)}",
            self._params([]),
            expect="none",
        )

    async def agent_service(
        self, service_id: str, hash: str | None = None, wait: float | None = None
    ) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/agent/service/<id>`` (hash-blocking; ``meta.content_hash`` is the hash).

        Raises :class:`AgentNotFoundError` when the agent does not know the id.
        """
        extra: Params = []
        timeout = self.timeout
        if hash:
            extra.append(("hash", hash))
            server_wait = min(wait, MAX_QUERY_TIME) if wait else MAX_QUERY_TIME
            timeout = server_wait + server_wait / 16 + self.timeout
        formatted = format_wait(wait) if wait is not None else None
        if formatted is not None:
            extra.append(("wait", formatted))
        params = self._params(extra)
        return await self._send(
            "GET", f"/v1/agent/service/{self._seg(service_id)}", params, timeout=timeout
        )

    async def agent_checks(self, *, filter: str | None = None) -> tuple[JSONObject, QueryMeta]:
        """``GET /v1/agent/checks``: the agent's local checks by check ID (``filter`` narrows)."""
        extra: Params = [("filter", filter)] if filter else []
        return await self._send("GET", "/v1/agent/checks", self._params(extra))

    async def service_maintenance(self, service_id: str, enable: bool, reason: str = "") -> None:
        """``PUT /v1/agent/service/maintenance/<id>``: take an instance out of (or back into)
        queries with a critical ``_service_maintenance:<id>`` check.

        ``reason`` becomes the check's notes. Raises :class:`AgentNotFoundError` for an
        unknown service id and :class:`AgentPermissionError` without ``service:write``.
        """
        extra: Params = [("enable", "true" if enable else "false")]
        if enable and reason:
            extra.append(("reason", reason))
        await self._send(
            "PUT",
            f"/v1/agent/service/maintenance/{self._seg(service_id)}",
            self._params(extra),
            expect="none",
        )

    async def node_maintenance(self, enable: bool, reason: str = "") -> None:
        """``PUT /v1/agent/maintenance``: the same for every service on the agent's node
        (needs ``node:write``)."""
        extra: Params = [("enable", "true" if enable else "false")]
        if enable and reason:
            extra.append(("reason", reason))
        await self._send("PUT", "/v1/agent/maintenance", self._params(extra), expect="none")

    async def update_ttl_check(self, check_id: str, status: str, output: str = "") -> None:
        """``PUT /v1/agent/check/update/<id>`` with ``{"Status", "Output"}``.

        ``status`` is ``passing``, ``warning`` or ``critical``. Raises
        :class:`AgentNotFoundError` for an unknown check id.
        """
        await self._send(
            "PUT",
            f"/v1/agent/check/update/{self._seg(check_id)}",
            self._params([]),
            body={"Status": status, "Output": output},
            expect="none",
        )
