"""Dev agent endpoints: Connect CA roots, service leaf certificates, CA configuration.

* ``GET /v1/agent/connect/ca/roots`` and ``GET /v1/connect/ca/roots`` (§2.1)
* ``GET /v1/agent/connect/ca/leaf/<service>`` (§2.2), with the agent's leaf cache
* ``GET``/``PUT /v1/connect/ca/configuration`` (§2.14), which may rotate the root

The CA itself is :class:`consul_connect.devagent.ca.ConnectCA`; this module adds
the agent-side behaviour: the roots cache headers, the per-service leaf cache
with its renewal and root-change rules, and the background pruning of old roots.
``ctx.extensions["connect_ca"]`` holds a :class:`ConnectCAExtension` whose
methods are hooks for tests and demos (force a rotation, prune now, move the
pruning clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consul_connect.devagent.ca import (
    LEAF_TABLE,
    ROOTS_TABLE,
    CAStateReadOnlyError,
    ConnectCA,
    IssuedLeaf,
    renewal_time,
)
from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.http import (
    HTTPError,
    Request,
    Response,
    Router,
    block_timeout,
    blocking_query,
    get_ci,
    go_json_kind,
    json_response,
    query_meta,
    query_response,
)
from consul_connect.errors import ConfigError

__all__ = ["EXTENSION_KEY", "ConnectCAExtension", "register"]

log = logging.getLogger("consul_connect.devagent")

EXTENSION_KEY = "connect_ca"

# The leaf manager's own blocking default and cap (agent/leafcert), not the
# server's 5-minute default.
LEAF_MAX_QUERY_TIME = 600.0
# The agent cache serves the roots with the same 10-minute default.
ROOTS_CACHE_QUERY_TIME = 600.0


@dataclass
class _LeafEntry:
    issued: IssuedLeaf
    renew_at: float
    fetched_at: float
    force_expire_after: float | None = None


class ConnectCAExtension:
    """The CA and the agent's leaf cache, reachable as ``ctx.extensions["connect_ca"]``."""

    def __init__(self, ctx: AgentContext) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.ca = ConnectCA(
            ctx.store,
            datacenter=cfg.datacenter,
            cluster_id=cfg.cluster_id,
            leaf_cert_ttl=cfg.leaf_cert_ttl,
        )
        self.ca.bootstrap()
        self.leaves: dict[str, _LeafEntry] = {}
        self.roots_first_fetch: float | None = None
        self._prune_wakeup = asyncio.Event()

    # -- hooks for tests and demos ------------------------------------------------

    def rotate(self, key_type: str | None = None, key_bits: int | None = None) -> str:
        """Rotate to a new, cross-signed root now; returns the new root's ID."""
        return self.ca.rotate(key_type=key_type, key_bits=key_bits)

    def prune(self) -> list[str]:
        """Prune expired inactive roots now; returns the IDs removed."""
        return self.ca.prune()

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Replace the clock (epoch seconds) behind ``RotatedOutAt`` and pruning."""
        self.ca.clock = clock
        self._prune_wakeup.set()

    def set_prune_interval(self, seconds: float) -> None:
        """Change how often the background pruner checks (Consul: hourly)."""
        self.ca.prune_interval = seconds
        self._prune_wakeup.set()

    # -- background ----------------------------------------------------------------

    async def pruner(self, ctx: AgentContext) -> None:
        """Check for prunable roots every ``prune_interval`` seconds until cancelled."""
        while not ctx.store.closed:
            self._prune_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._prune_wakeup.wait(), self.ca.prune_interval)
            if ctx.store.closed:
                return
            try:
                removed = self.ca.prune()
            except Exception:  # a pruning bug must not stop the agent
                log.exception("pruning CA roots failed")
                continue
            for root_id in removed:
                log.info("pruned old unused root CA %s", root_id)

    # -- leaves --------------------------------------------------------------------

    def _issue(self, service: str) -> _LeafEntry:
        try:
            issued = self.ca.sign_leaf(service)
        except ConfigError as exc:
            raise HTTPError(500, str(exc)) from None
        entry = _LeafEntry(
            issued=issued,
            renew_at=renewal_time(issued.valid_after, issued.valid_before),
            fetched_at=time.monotonic(),
        )
        self.leaves[service] = entry
        return entry

    def _root_changed(self, entry: _LeafEntry) -> bool:
        active_key_id: str = self.ca.active_root()["SigningKeyID"]
        return entry.issued.authority_key_id != active_key_id

    async def leaf(self, service: str, index: int, wait: float) -> tuple[_LeafEntry, bool]:
        """The leaf for ``service`` under the agent's cache rules; ``(entry, cache_hit)``.

        Non-blocking (``index`` 0): the cached leaf unless the active root changed or
        its renewal time passed. Blocking: at once when the cached leaf is newer
        than ``index``; otherwise wait for the renewal time, a root change (plus the
        configured jitter) or the timeout, whichever comes first.
        """
        entry = self.leaves.get(service)
        if entry is None:
            return self._issue(service), False
        if index == 0:
            if self._root_changed(entry) or time.time() >= entry.renew_at:
                return self._issue(service), False
            return entry, False
        if entry.issued.index > index:
            return entry, True
        store = self.ctx.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_timeout(wait, LEAF_MAX_QUERY_TIME)
        while True:
            events = store.watch([ROOTS_TABLE, LEAF_TABLE])
            entry = self.leaves.get(service)
            if entry is None:  # dropped meanwhile: start over
                return self._issue(service), False
            if entry.issued.index > index:
                return entry, False
            now = time.time()
            if entry.force_expire_after is None and self._root_changed(entry):
                jitter = max(0.0, self.ctx.config.leaf_root_change_jitter)
                entry.force_expire_after = now + random.uniform(0.0, jitter)
            expires_at = entry.renew_at
            if entry.force_expire_after is not None:
                expires_at = min(expires_at, entry.force_expire_after)
            if now >= expires_at:
                return self._issue(service), False
            remaining = deadline - loop.time()
            if remaining <= 0 or store.closed:
                return entry, False
            await store.wait_any(events, min(remaining, expires_at - now))


def _roots_meta(req: Request, index: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    # The roots handlers call setMeta without recording a consistency level.
    headers = query_meta(req, index)
    headers.update(extra or {})
    return headers


def _parse_go_bool(text: str) -> bool | None:
    # strconv.ParseBool
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _decode_ca_config(body: Any) -> tuple[str, dict[str, Any] | None, Any, bool]:
    """``(Provider, Config, State, ForceWithoutCrossSigning)`` of a PUT body, or a 400."""

    def bad(what: str, value: Any, field: str, go_type: str) -> HTTPError:
        return HTTPError(
            400,
            f"Request decode failed: json: cannot unmarshal {go_json_kind(value)} into Go "
            f"struct field CAConfiguration.{field} of type {go_type}",
        )

    if body is None:
        return "", None, None, False
    if not isinstance(body, dict):
        raise HTTPError(
            400,
            f"Request decode failed: json: cannot unmarshal {go_json_kind(body)} into Go "
            "value of type structs.CAConfiguration",
        )
    provider = get_ci(body, "Provider")
    if provider is None:
        provider = ""
    if not isinstance(provider, str):
        raise bad("Provider", provider, "Provider", "string")
    config = get_ci(body, "Config")
    if config is not None and not isinstance(config, dict):
        raise bad("Config", config, "Config", "map[string]interface {}")
    state = get_ci(body, "State")
    if state is not None:
        if not isinstance(state, dict):
            raise bad("State", state, "State", "map[string]string")
        for v in state.values():
            if not isinstance(v, str):
                raise bad("State", v, "State", "string")
    force = get_ci(body, "ForceWithoutCrossSigning")
    if force is not None and not isinstance(force, bool):
        raise bad("ForceWithoutCrossSigning", force, "ForceWithoutCrossSigning", "bool")
    snake = body.get("force_without_cross_signing")
    if snake is not None and not isinstance(snake, bool):
        raise bad("force_without_cross_signing", snake, "force_without_cross_signing", "bool")
    return provider, config, state, bool(force) or bool(snake)


def register(router: Router, ctx: AgentContext) -> None:
    """Register the Connect CA routes, bootstrap the CA and start its pruner."""
    ext = ConnectCAExtension(ctx)
    ctx.extensions[EXTENSION_KEY] = ext
    ctx.background.append(ext.pruner)
    ca = ext.ca

    def roots_now() -> tuple[int, Any]:
        return ca.roots_index(), ca.roots_json()

    @router.route("/v1/agent/connect/ca/roots", "GET")
    async def agent_roots(req: Request) -> Response:
        opts = req.options
        req.check_datacenter()
        now = time.monotonic()
        first = ext.roots_first_fetch is None
        if ext.roots_first_fetch is None:
            ext.roots_first_fetch = now
        hit = not first and (not opts.blocking or ca.roots_index() > opts.index)
        index, data = await blocking_query(
            req, [ROOTS_TABLE], roots_now, default_wait=ROOTS_CACHE_QUERY_TIME
        )
        extra = {"X-Cache": "HIT" if hit else "MISS"}
        if hit:
            fetched = max(ext.roots_first_fetch, ca.roots_changed_at)
            extra["Age"] = str(round(max(0.0, time.monotonic() - fetched)))
        return json_response(data, headers=_roots_meta(req, index, extra))

    @router.route("/v1/connect/ca/roots", "GET")
    async def roots(req: Request) -> Response:
        req.options  # noqa: B018 - validates the common query parameters first
        pem = False
        raw = req.param("pem")
        if raw != "":
            parsed = _parse_go_bool(raw)
            if parsed is None:
                raise HTTPError(400, "The 'pem' query parameter must be a boolean value")
            pem = parsed
        req.check_datacenter()
        index, data = await blocking_query(req, [ROOTS_TABLE], roots_now)
        if not pem:
            return query_response(req, data, index)
        return Response(
            200,
            ca.roots_pem().encode(),
            _roots_meta(req, index),
            "application/pem-certificate-chain",
        )

    @router.route("/v1/agent/connect/ca/leaf/", "GET")
    async def leaf(req: Request) -> Response:
        service = req.suffix
        req.reject_enterprise_tenancy()
        opts = req.options
        req.check_datacenter()
        req.authz.require("service", "write", service)
        entry, hit = await ext.leaf(service, opts.index, opts.wait)
        headers = {
            "X-Consul-Index": str(entry.issued.index),
            "X-Cache": "HIT" if hit else "MISS",
        }
        if hit:
            headers["Age"] = str(round(max(0.0, time.monotonic() - entry.fetched_at)))
        return json_response(entry.issued.body, headers=headers)

    @router.route("/v1/connect/ca/configuration", "GET", "PUT")
    async def configuration(req: Request) -> Response:
        if req.method == "GET":
            req.options  # noqa: B018 - validates the common query parameters first
            req.check_datacenter()
            req.authz.require("operator", "write")
            return json_response(ca.config_json())
        body = req.json()
        provider, config, state, force = _decode_ca_config(body)
        req.check_datacenter()
        req.authz.require("operator", "write")
        try:
            ca.set_config(provider, config, state=state, force_without_cross_signing=force)
        except CAStateReadOnlyError as exc:
            raise HTTPError(400, str(exc)) from None
        except ConfigError as exc:
            raise HTTPError(500, str(exc)) from None
        return Response(200, b"", {}, None)
