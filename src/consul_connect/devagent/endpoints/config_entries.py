"""Dev agent endpoints: ``/v1/config`` (config entries), and the entry store they share.

Config entries live in one store table, ``config_entries``, keyed ``<kind>/<name>``, as
the JSON Consul returns for them (``CreateIndex``/``ModifyIndex`` included). The intention
endpoints (:mod:`.intentions`) read and write ``service-intentions`` entries through the
helpers here, so the legacy, exact and config-entry views of intentions always agree.

Kinds with full support: ``service-intentions`` (validated by the shared pure model in
:mod:`consul_connect.authz.intentions`, including the L7 protocol prerequisite),
``service-defaults`` and ``proxy-defaults`` (protocol). Other Consul kinds are stored as
given (canonical ``Kind``/``Name`` plus indexes) without validation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from consul_connect.authz.intentions import (
    Intention,
    IntentionDecodeError,
    IntentionValidationError,
    ServiceIntentionsEntry,
    sort_intentions,
)
from consul_connect.devagent.acl import ACLAuthorizer, filtered_headers, go_quote
from consul_connect.devagent.bexpr import BexprError, compile_filter
from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.http import (
    HTTPError,
    Request,
    Response,
    Router,
    blocking_query,
    decode_json_body,
    get_ci,
    go_json_kind,
    json_response,
    mapstructure_kind,
    query_meta,
    query_response,
)

__all__ = [
    "CONFIG_TABLE",
    "KNOWN_KINDS",
    "SERVICE_DEFAULTS",
    "SERVICE_INTENTIONS",
    "all_intentions",
    "apply_intentions_entry",
    "check_l7_protocols",
    "delete_entry",
    "get_entry",
    "list_entries",
    "register",
    "service_protocol",
]

CONFIG_TABLE = "config_entries"
SERVICE_INTENTIONS = "service-intentions"
SERVICE_DEFAULTS = "service-defaults"
PROXY_DEFAULTS = "proxy-defaults"

KNOWN_KINDS = frozenset(
    {
        SERVICE_DEFAULTS,
        PROXY_DEFAULTS,
        "service-router",
        "service-splitter",
        "service-resolver",
        "ingress-gateway",
        "terminating-gateway",
        SERVICE_INTENTIONS,
        "mesh",
        "exported-services",
        "sameness-group",
        "api-gateway",
        "bound-api-gateway",
        "inline-certificate",
        "file-system-certificate",
        "http-route",
        "tcp-route",
        "jwt-provider",
        "control-plane-request-limit",
    }
)
_SERVICE_KINDS = frozenset(
    {SERVICE_DEFAULTS, "service-router", "service-splitter", "service-resolver"}
)
_HTTP_LIKE = frozenset({"http", "http2", "grpc"})
_DEFAULT_PROTOCOL = "tcp"


# --------------------------------------------------------------------------------------------
# Store helpers (shared with the intention endpoints)


def _key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def get_entry(ctx: AgentContext, kind: str, name: str) -> dict[str, Any] | None:
    """The stored JSON of one entry, or None."""
    rec = ctx.store.table(CONFIG_TABLE).get(_key(kind, name))
    return None if rec is None else dict(rec)


def list_entries(ctx: AgentContext, kind: str) -> list[dict[str, Any]]:
    """Every stored entry of ``kind``, sorted by name (Consul's index order)."""
    table = ctx.store.table(CONFIG_TABLE)
    out = [dict(v) for v in table.values() if v["Kind"] == kind]
    out.sort(key=lambda e: e["Name"])
    return out


def _put_entry(ctx: AgentContext, entry: dict[str, Any]) -> int:
    table = ctx.store.table(CONFIG_TABLE)
    key = _key(entry["Kind"], entry["Name"])
    idx = ctx.store.next_index()
    prev = table.get(key)
    entry["CreateIndex"] = prev["CreateIndex"] if prev is not None else idx
    entry["ModifyIndex"] = idx
    table[key] = entry
    return ctx.store.commit(CONFIG_TABLE)


def delete_entry(ctx: AgentContext, kind: str, name: str) -> bool:
    """Delete one entry; True when it existed (the store index moves either way)."""
    existed = ctx.store.table(CONFIG_TABLE).pop(_key(kind, name), None) is not None
    ctx.store.commit(CONFIG_TABLE)
    return existed


def all_intentions(ctx: AgentContext) -> list[Intention]:
    """Every intention of every ``service-intentions`` entry, in Consul's list order."""
    out: list[Intention] = []
    for entry in list_entries(ctx, SERVICE_INTENTIONS):
        out.extend(ServiceIntentionsEntry.from_json(entry).to_intentions())
    return sort_intentions(out)


def _protocol_of(entry: Mapping[str, Any] | None, *, proxy: bool) -> str:
    if entry is None:
        return ""
    if proxy:
        cfg = entry.get("Config") or {}
        value = cfg.get("protocol", "") if isinstance(cfg, Mapping) else ""
        return value.lower() if isinstance(value, str) else ""
    value = entry.get("Protocol", "")
    return value if isinstance(value, str) else ""


Overrides = Mapping[tuple[str, str], "dict[str, Any] | None"]


def _entry_with(
    ctx: AgentContext, kind: str, name: str, overrides: Overrides
) -> dict[str, Any] | None:
    if (kind, name) in overrides:
        return overrides[(kind, name)]
    return get_entry(ctx, kind, name)


def service_protocol(ctx: AgentContext, name: str, overrides: Overrides | None = None) -> str:
    """The protocol of service ``name``: service-defaults, else proxy-defaults, else tcp."""
    ov = overrides or {}
    proto = _protocol_of(_entry_with(ctx, SERVICE_DEFAULTS, name, ov), proxy=False)
    if not proto:
        proto = _protocol_of(_entry_with(ctx, PROXY_DEFAULTS, "global", ov), proxy=True)
    return proto or _DEFAULT_PROTOCOL


def check_l7_protocols(ctx: AgentContext, overrides: Overrides) -> None:
    """Refuse a write that would leave L7 intentions on a non-HTTP service (500, Consul's text).

    ``overrides`` maps ``(kind, name)`` to the proposed entry (None = deleted). Like Consul,
    only the intentions affected by the proposed change are checked.
    """
    names: set[str] = set()
    for kind, name in overrides:
        if kind in (SERVICE_INTENTIONS, SERVICE_DEFAULTS):
            names.add(name)
        elif kind == PROXY_DEFAULTS:
            names.update(e["Name"] for e in list_entries(ctx, SERVICE_INTENTIONS))
    for name in sorted(names):
        raw = _entry_with(ctx, SERVICE_INTENTIONS, name, overrides)
        if raw is None or name == "*":
            continue
        if not any(src.get("Permissions") for src in raw.get("Sources", [])):
            continue
        proto = service_protocol(ctx, name, overrides)
        if proto not in _HTTP_LIKE:
            raise HTTPError(
                500,
                f"service {go_quote(name)} has protocol {go_quote(proto)}, which is "
                "incompatible with L7 intentions permissions",
            )


def apply_intentions_entry(
    ctx: AgentContext,
    entry: ServiceIntentionsEntry | None,
    name: str,
    *,
    legacy: bool,
    authz: ACLAuthorizer | None = None,
) -> None:
    """Validate and store (or, for None / no sources, delete) ``name``'s intentions entry.

    ``entry`` is normalized and validated as Consul does for the write kind (``legacy``
    for the ID-based API); then, when ``authz`` is given, ``intention:write`` on ``name``
    is required (403); then the L7 protocol prerequisite is checked. A write that changes
    nothing is skipped, as Consul skips it. Raises :class:`HTTPError` (500 with Consul's
    validation message, or 403).
    """
    if entry is None or not entry.sources:
        if authz is not None:
            authz.require("intention", "write", name)
        check_l7_protocols(ctx, {(SERVICE_INTENTIONS, name): None})
        delete_entry(ctx, SERVICE_INTENTIONS, name)
        return
    norm = entry.normalized(legacy=legacy)
    try:
        norm.validate(legacy=legacy)
    except IntentionValidationError as exc:
        raise HTTPError(500, str(exc)) from None
    if authz is not None:
        authz.require("intention", "write", name)
    doc = norm.to_json()
    current = get_entry(ctx, SERVICE_INTENTIONS, name)
    if current is not None and _strip_indexes(current) == _strip_indexes(doc):
        return
    check_l7_protocols(ctx, {(SERVICE_INTENTIONS, name): doc})
    _put_entry(ctx, doc)


# --------------------------------------------------------------------------------------------
# Kind-specific decoding, normalization and ACLs


def _decode_error(field: str, want: str, value: object) -> HTTPError:
    return HTTPError(
        400,
        "Request decoding failed: 1 error(s) decoding:\n\n"
        f"* '{field}' expected type '{want}', got unconvertible type '{mapstructure_kind(value)}', "
        f"value: '{value}'",
    )


def _get_str(raw: Mapping[str, Any], field: str, *aliases: str) -> str:
    value = get_ci(raw, field, *aliases)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _decode_error(field, "string", value)
    return value


def _get_obj(raw: Mapping[str, Any], field: str, *aliases: str) -> Any:
    value = get_ci(raw, field, *aliases)
    if value is not None and not isinstance(value, dict):
        raise _decode_error(field, "map[string]interface {}", value)
    return value


def _meta(raw: Mapping[str, Any]) -> dict[str, str]:
    value = _get_obj(raw, "Meta")
    if not value:
        return {}
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise _decode_error(f"Meta[{k}]", "string", v)
        out[str(k)] = v
    return out


def _service_defaults(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    if not name:
        raise HTTPError(500, "Name is required")
    if name == "*":
        raise HTTPError(
            500, "service-defaults name must be the name of a service, and not a wildcard"
        )
    mode = _get_str(raw, "Mode")
    if mode not in ("", "direct", "transparent"):
        raise HTTPError(500, f"invalid value for Mode: {go_quote(mode)}")
    out: dict[str, Any] = {"Kind": SERVICE_DEFAULTS, "Name": name}
    proto = _get_str(raw, "Protocol").lower()
    if proto:
        out["Protocol"] = proto
    if mode:
        out["Mode"] = mode
    out["TransparentProxy"] = _get_obj(raw, "TransparentProxy", "transparent_proxy") or {}
    mtls = _get_str(raw, "MutualTLSMode", "mutual_tls_mode")
    if mtls:
        out["MutualTLSMode"] = mtls
    out["MeshGateway"] = _get_obj(raw, "MeshGateway", "mesh_gateway") or {}
    out["Expose"] = _get_obj(raw, "Expose") or {}
    for field, aliases in (
        ("ExternalSNI", ("external_sni",)),
        ("UpstreamConfig", ("upstream_config",)),
        ("Destination", ()),
        ("MaxInboundConnections", ("max_inbound_connections",)),
        ("LocalConnectTimeoutMs", ("local_connect_timeout_ms",)),
        ("LocalRequestTimeoutMs", ("local_request_timeout_ms",)),
        ("BalanceInboundConnections", ("balance_inbound_connections",)),
        ("RateLimits", ("rate_limits",)),
        ("EnvoyExtensions", ("envoy_extensions",)),
    ):
        value = get_ci(raw, field, *aliases)
        if value not in (None, "", 0, [], {}):
            out[field] = value
    meta = _meta(raw)
    if meta:
        out["Meta"] = meta
    return out


def _proxy_defaults(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    if name != "global":
        raise HTTPError(500, f'invalid name ({go_quote(name)}), only "global" is supported')
    out: dict[str, Any] = {"Kind": PROXY_DEFAULTS, "Name": name}
    config = _get_obj(raw, "Config")
    if config:
        out["Config"] = config
    mode = _get_str(raw, "Mode")
    if mode not in ("", "direct", "transparent"):
        raise HTTPError(500, f"invalid value for Mode: {go_quote(mode)}")
    if mode:
        out["Mode"] = mode
    out["TransparentProxy"] = _get_obj(raw, "TransparentProxy", "transparent_proxy") or {}
    out["MeshGateway"] = _get_obj(raw, "MeshGateway", "mesh_gateway") or {}
    out["Expose"] = _get_obj(raw, "Expose") or {}
    meta = _meta(raw)
    if meta:
        out["Meta"] = meta
    return out


def _generic(raw: Mapping[str, Any], kind: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"Kind": kind, "Name": name}
    skip = {"kind", "name", "createindex", "modifyindex", "create_index", "modify_index"}
    for k, v in raw.items():
        if isinstance(k, str) and k.lower() not in skip:
            out[k] = v
    return out


def _intentions_entry(raw: Mapping[str, Any]) -> ServiceIntentionsEntry:
    try:
        return ServiceIntentionsEntry.from_json(raw)
    except IntentionDecodeError as exc:
        raise HTTPError(400, f"Request decoding failed: {exc}") from None


def _can_read(authz: ACLAuthorizer, kind: str, name: str) -> bool:
    if kind == SERVICE_INTENTIONS:
        return authz.allowed("intention", "read", name)
    if kind in _SERVICE_KINDS:
        return authz.allowed("service", "read", name)
    if kind == PROXY_DEFAULTS:
        return True
    return authz.allowed("mesh", "read")


def _require_read(authz: ACLAuthorizer, kind: str, name: str) -> None:
    if kind == SERVICE_INTENTIONS:
        authz.require("intention", "read", name)
    elif kind in _SERVICE_KINDS:
        authz.require("service", "read", name)
    elif kind != PROXY_DEFAULTS:
        authz.require("mesh", "read")


def _require_write(authz: ACLAuthorizer, kind: str, name: str) -> None:
    if kind == SERVICE_INTENTIONS:
        authz.require("intention", "write", name)
    elif kind in _SERVICE_KINDS:
        authz.require("service", "write", name)
    else:
        authz.require("mesh", "write")


def _parse_cas(req: Request) -> int | None:
    raw = req.param("cas")
    if not raw:
        return None
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) >= 2**64:
        raise HTTPError(500, f"strconv.ParseUint: parsing {go_quote(raw)}: invalid syntax")
    return int(raw)


def _strip_indexes(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("CreateIndex", "ModifyIndex")}


# --------------------------------------------------------------------------------------------
# Routes


def register(router: Router, ctx: AgentContext) -> None:
    """Register ``/v1/config`` (PUT) and ``/v1/config/<kind>[/<name>]`` (GET, DELETE)."""

    @router.route("/v1/config", "PUT")
    async def apply(req: Request) -> Response:
        req.check_datacenter()
        req.reject_enterprise_tenancy()
        raw = decode_json_body(req.body, "Request decoding failed")
        if not isinstance(raw, dict):
            raise HTTPError(
                400,
                "Request decoding failed: json: cannot unmarshal "
                f"{go_json_kind(raw)} into Go value of type map[string]interface {{}}",
            )
        kind = get_ci(raw, "Kind")
        if not isinstance(kind, str) or not kind:
            raise HTTPError(
                400,
                "Request decoding failed: Payload does not contain a kind/Kind key at the "
                "top level",
            )
        if kind not in KNOWN_KINDS:
            raise HTTPError(400, f"Request decoding failed: invalid config entry kind: {kind}")
        name = _get_str(raw, "Name")
        cas = _parse_cas(req)
        authz = req.authz  # token resolution comes first, as in Consul

        intentions_entry: ServiceIntentionsEntry | None = None
        if kind == SERVICE_INTENTIONS:
            intentions_entry = _intentions_entry(raw).normalized()
            try:
                intentions_entry.validate()
            except IntentionValidationError as exc:
                raise HTTPError(500, str(exc)) from None
            doc = intentions_entry.to_json()
        elif kind == SERVICE_DEFAULTS:
            doc = _service_defaults(raw, name)
        elif kind == PROXY_DEFAULTS:
            doc = _proxy_defaults(raw, name)
        else:
            if not name:
                raise HTTPError(500, "Name is required")
            doc = _generic(raw, kind, name)
        _require_write(authz, kind, doc["Name"])

        name = doc["Name"]
        current = get_entry(ctx, kind, name)
        if cas is None and current is not None and _strip_indexes(current) == _strip_indexes(doc):
            # Consul skips writes that change nothing (no index bump, watchers stay asleep).
            return json_response(True)
        if cas is not None:
            if current is None and cas != 0:
                return json_response(False)
            if current is not None and current["ModifyIndex"] != cas:
                return json_response(False)
        check_l7_protocols(ctx, {(kind, name): doc})
        _put_entry(ctx, doc)
        return json_response(True)

    @router.route("/v1/config/", "GET", "DELETE")
    async def config(req: Request) -> Response:
        parts = req.suffix.split("/", 1)
        if req.method == "DELETE":
            return await _delete(req, parts)
        req.check_datacenter()
        req.reject_enterprise_tenancy()
        if len(parts) == 2:
            return await _get_one(req, parts[0], parts[1])
        return await _list(req, parts[0])

    async def _get_one(req: Request, kind: str, name: str) -> Response:
        if kind not in KNOWN_KINDS:
            raise HTTPError(500, f"invalid config entry kind: {kind}")
        _require_read(req.authz, kind, name)

        def run() -> tuple[int, Any]:
            return ctx.store.max_index(CONFIG_TABLE), get_entry(ctx, kind, name)

        index, entry = await blocking_query(req, [CONFIG_TABLE], run)
        if entry is None:
            # Consul sets the query meta before answering the 404.
            raise HTTPError(
                404,
                f"Config entry not found for {go_quote(kind)} / {go_quote(name)}",
                query_meta(req, index),
            )
        return query_response(req, entry, index)

    async def _list(req: Request, kind: str) -> Response:
        # An empty kind lists every entry, as Consul's List does without a kind.
        if kind and kind not in KNOWN_KINDS:
            raise HTTPError(500, f"invalid config entry kind: {kind}")
        authz = req.authz
        # Consul's List supports ?filter only for service-defaults (a plain error: 500).
        flt = None
        if req.options.filter:
            if kind != SERVICE_DEFAULTS:
                raise HTTPError(500, f"filtering not supported for config entry kind={kind}")
            try:
                flt = compile_filter(req.options.filter)
            except BexprError as exc:
                raise HTTPError(500, str(exc)) from None

        def run() -> tuple[int, Any]:
            if kind:
                entries = list_entries(ctx, kind)
            else:
                entries = sorted(
                    (dict(e) for e in ctx.store.table(CONFIG_TABLE).values()),
                    key=lambda e: (e["Kind"], e["Name"]),
                )
            visible = [e for e in entries if _can_read(authz, e["Kind"], e["Name"])]
            dropped = len(visible) != len(entries)
            if flt is not None:
                visible = flt.apply(visible)
            return ctx.store.max_index(CONFIG_TABLE), (visible, dropped)

        index, (visible, dropped) = await blocking_query(req, [CONFIG_TABLE], run)
        return query_response(req, visible, index, extra_headers=filtered_headers(authz, dropped))

    async def _delete(req: Request, parts: list[str]) -> Response:
        req.check_datacenter()
        if len(parts) != 2:
            raise HTTPError(404, "Must provide both a kind and name to delete")
        kind, name = parts
        if kind not in KNOWN_KINDS:
            raise HTTPError(400, f"invalid config entry kind: {kind}")
        req.reject_enterprise_tenancy()
        cas = _parse_cas(req)
        _require_write(req.authz, kind, name)
        current = get_entry(ctx, kind, name)
        if current is None:
            # Consul skips deleting what is not there: no write, no index bump, and a
            # CAS delete reports success whatever its index.
            return json_response(True if cas is not None else {})
        if cas is not None and current["ModifyIndex"] != cas:
            return json_response(False)
        check_l7_protocols(ctx, {(kind, name): None})
        delete_entry(ctx, kind, name)
        if cas is not None:
            return json_response(True)
        return json_response({})
