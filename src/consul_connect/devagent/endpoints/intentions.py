"""Dev agent endpoints: intentions (legacy ID API, exact API, match, check) and authorize.

Every intention lives in its destination's ``service-intentions`` config entry (see
:mod:`.config_entries`); the legacy and exact APIs are views onto those entries, exactly as
in Consul 1.9+. Decisions (check, authorize) use the shared pure model
(:class:`consul_connect.authz.intentions.IntentionSet`), so the dev agent and the library
apply one precedence implementation.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from consul_connect.authz.intentions import (
    WILDCARD,
    Intention,
    IntentionDecodeError,
    IntentionSet,
    IntentionValidationError,
    ServiceIntentionsEntry,
    SourceIntention,
    sort_intentions,
    validate_legacy_intention,
)
from consul_connect.devagent.acl import ACLAuthorizer, filtered_headers, go_quote, rfc3339_nano
from consul_connect.devagent.bexpr import MAP, BexprError, Schema, compile_filter
from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.endpoints.config_entries import (
    CONFIG_TABLE,
    SERVICE_INTENTIONS,
    all_intentions,
    apply_intentions_entry,
    get_entry,
    list_entries,
)
from consul_connect.devagent.http import (
    HTTPError,
    Request,
    Response,
    Router,
    blocking_query,
    cache_headers,
    decode_json_body,
    get_ci,
    go_json_kind,
    json_response,
    query_response,
)
from consul_connect.errors import IdentityError
from consul_connect.identity import ServiceIdentity, parse_spiffe_id

__all__ = ["register"]

_DEFAULT_NS = "default"
_PERMISSION_DENIED = "Permission denied"
_AUTHZ_CACHE_KEY = "intentions.authorize_cache"

_HEADER_SCHEMA: Schema = {
    k: None for k in ("Name", "Present", "Exact", "Prefix", "Suffix", "Regex", "Invert")
}
_PERMISSION_SCHEMA: Schema = {
    "Action": None,
    "HTTP": {
        "PathExact": None,
        "PathPrefix": None,
        "PathRegex": None,
        "Methods": [None],
        "Header": [_HEADER_SCHEMA],
    },
}
#: The fields ``?filter=`` may name on the intention list (``structs.Intention``).
INTENTION_SCHEMA: Schema = {
    **{
        k: None
        for k in (
            "ID",
            "Description",
            "SourcePeer",
            "SourceNS",
            "SourceName",
            "DestinationNS",
            "DestinationName",
            "SourcePartition",
            "DestinationPartition",
            "SourceType",
            "Action",
            "Precedence",
            "CreatedAt",
            "UpdatedAt",
            "Hash",
            "CreateIndex",
            "ModifyIndex",
        )
    },
    "Permissions": [_PERMISSION_SCHEMA],
    "Meta": MAP,
}


# --------------------------------------------------------------------------------------------
# Name parsing (Consul's parseIntentionStringComponent, CE rules)


@dataclass(frozen=True)
class _Name:
    peer: str
    partition: str
    namespace: str
    name: str


def _parse_component(text: str, *, allow_peer: bool) -> _Name:
    """``<name>`` | ``<ns>/<name>`` | ``<ap>/<ns>/<name>`` (| ``peer:<p>/...`` for sources)."""
    if text.startswith("peer:") and not allow_peer:
        raise ValueError("cannot specify a peer here")
    parts = text.split("/")
    if len(parts) == 1:
        if parts[0].startswith("peer:"):
            raise ValueError("need to specify the service name as well")
        return _Name("", "", "", parts[0])
    if len(parts) == 2:
        if parts[0].startswith("peer:"):
            return _Name(parts[0][len("peer:") :], "", "", parts[1])
        return _Name("", "", parts[0], parts[1])
    if len(parts) == 3:
        if parts[0].startswith("peer:"):
            return _Name(parts[0][len("peer:") :], "", parts[1], parts[2])
        return _Name("", parts[0], parts[1], parts[2])
    raise ValueError("input can contain at most two '/'")


def _ce_namespace_ok(ns: str) -> bool:
    return ns == "" or ns.lower() == _DEFAULT_NS


def _ce_partition_ok(ap: str) -> bool:
    return ap == "" or ap.lower() == "default"


def _required_param(req: Request, name: str, *, allow_empty: bool = True) -> str:
    values = req.params(name)
    if len(values) != 1 or (not allow_empty and values[0] == ""):
        raise HTTPError(500, f"required query parameter '{name}' not set")
    return values[0]


def _parse_param(req: Request, param: str, *, allow_peer: bool, allow_empty: bool) -> _Name:
    raw = _required_param(req, param, allow_empty=allow_empty)
    try:
        parsed = _parse_component(raw, allow_peer=allow_peer)
    except ValueError as exc:
        raise HTTPError(500, f"{param} {go_quote(raw)} is invalid: {exc}") from None
    return parsed


def _check_ce(parsed: _Name, label: str) -> None:
    if not _ce_partition_ok(parsed.partition):
        raise HTTPError(
            500,
            f"Invalid {label} partition {go_quote(parsed.partition)}: "
            "Partitions is a Consul Enterprise feature",
        )
    if not _ce_namespace_ok(parsed.namespace):
        raise HTTPError(
            500,
            f"Invalid {label} namespace {go_quote(parsed.namespace)}: "
            "Namespaces is a Consul Enterprise feature",
        )


# --------------------------------------------------------------------------------------------
# Views over the stored entries


def _intentions_for_destination(ctx: AgentContext, name: str) -> list[Intention]:
    """Intentions whose destination is ``name`` or ``*``, in evaluation order."""
    out: list[Intention] = []
    for dest in {name, WILDCARD}:
        raw = get_entry(ctx, SERVICE_INTENTIONS, dest)
        if raw is not None:
            out.extend(ServiceIntentionsEntry.from_json(raw).to_intentions())
    return sort_intentions(out)


def _intentions_for_source(ctx: AgentContext, name: str) -> list[Intention]:
    """Intentions whose source is ``name`` or ``*``, in evaluation order.

    As Consul's readSourceIntentionsFromConfigEntriesForServiceTxn: an entry is found
    through a local source of that name, and then every source of that name in it is
    returned, peered ones included.
    """
    out: list[Intention] = []
    for raw in list_entries(ctx, SERVICE_INTENTIONS):
        ixns = ServiceIntentionsEntry.from_json(raw).to_intentions()
        for wanted in {name, WILDCARD}:
            if any(not i.source_peer and i.source_name == wanted for i in ixns):
                out.extend(i for i in ixns if i.source_name == wanted)
    return sort_intentions(out)


def _find_legacy(ctx: AgentContext, legacy_id: str) -> tuple[ServiceIntentionsEntry, int] | None:
    for raw in list_entries(ctx, SERVICE_INTENTIONS):
        entry = ServiceIntentionsEntry.from_json(raw)
        for i, src in enumerate(entry.sources):
            if src.legacy_id == legacy_id:
                return entry, i
    return None


def _legacy_fields_all_set(entry: ServiceIntentionsEntry) -> bool:
    return all(s.legacy_id and s.legacy_create_time and s.legacy_update_time for s in entry.sources)


def _legacy_conflict(name: str) -> HTTPError:
    return HTTPError(
        500,
        "cannot use legacy intention API to edit intentions with a destination of "
        f"{go_quote(name)} after editing them via a service-intentions config entry",
    )


def _can_read(authz: ACLAuthorizer, ixn: Intention) -> bool:
    return authz.allowed("intention", "read", ixn.source_name) or authz.allowed(
        "intention", "read", ixn.destination_name
    )


def _uuid_error(value: str) -> str | None:
    if len(value) != 36:
        return "UUID must be 36 characters"
    if not re.fullmatch(
        r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", value
    ):
        return "UUID must be formatted as 8-4-4-4-12 hexadecimal characters"
    return None


def _decode_intention(req: Request, prefix: str, status: int) -> Intention:
    try:
        raw = decode_json_body(req.body, prefix)
    except HTTPError as exc:
        raise HTTPError(status, exc.text) from None
    if not isinstance(raw, dict):
        kind = go_json_kind(raw)
        raise HTTPError(
            status,
            f"{prefix}: json: cannot unmarshal {kind} into Go value of type structs.Intention",
        )
    try:
        return Intention.from_json(raw)
    except IntentionDecodeError as exc:
        raise HTTPError(status, f"{prefix}: {exc}") from None


def _refuse_source_peer(ixn: Intention) -> None:
    # Intention.Apply (agent/consul/intention_endpoint.go) refuses this before anything else,
    # for the legacy and the exact API alike.
    if ixn.source_peer:
        raise HTTPError(
            500, "SourcePeer field is not supported on this endpoint. Use config entries instead"
        )


def _now() -> str:
    return rfc3339_nano(time.time_ns())


# --------------------------------------------------------------------------------------------
# Routes


def register(router: Router, ctx: AgentContext) -> None:
    """Register the intention routes and ``/v1/agent/connect/authorize``."""

    # -- legacy list/create -------------------------------------------------------------------

    @router.route("/v1/connect/intentions", "GET", "POST")
    async def intentions_root(req: Request) -> Response:
        req.check_datacenter()
        req.reject_enterprise_tenancy()
        if req.method == "POST":
            return _legacy_create(req)
        try:
            # Consul's Intention.List returns filter errors as plain errors (500).
            flt = compile_filter(req.options.filter, INTENTION_SCHEMA)
        except BexprError as exc:
            raise HTTPError(500, str(exc)) from None
        authz = req.authz

        def run() -> tuple[int, Any]:
            items = all_intentions(ctx)
            visible = [i for i in items if _can_read(authz, i)]
            docs = flt.apply([i.to_json() for i in visible])
            return ctx.store.max_index(CONFIG_TABLE), (docs, len(visible) != len(items))

        index, (docs, dropped) = await blocking_query(req, [CONFIG_TABLE], run)
        return query_response(req, docs, index, extra_headers=filtered_headers(authz, dropped))

    def _legacy_create(req: Request) -> Response:
        ixn = _decode_intention(req, "Failed to decode request body", 500)
        if ixn.destination_partition not in ("", "default"):
            raise HTTPError(400, "Cannot specify a destination partition with this endpoint")
        if ixn.source_partition not in ("", "default"):
            raise HTTPError(400, "Cannot specify a source partition with this endpoint")
        for label, ns in (("SourceNS", ixn.source_ns), ("DestinationNS", ixn.destination_ns)):
            if not _ce_namespace_ok(ns):
                raise HTTPError(
                    400, f"Invalid {label}({ns}): Namespaces is a Consul Enterprise feature"
                )
        _refuse_source_peer(ixn)
        authz = req.authz
        if not ixn.destination_name or not authz.allowed(
            "intention", "write", ixn.destination_name
        ):
            raise HTTPError(403, _PERMISSION_DENIED)
        try:
            validate_legacy_intention(ixn, creating=True)
        except IntentionValidationError as exc:
            raise HTTPError(500, str(exc)) from None
        new_id = str(uuid.uuid4())
        now = _now()
        ixn = replace(
            ixn,
            id=new_id,
            created_at=now,
            updated_at=now,
            source_ns=_DEFAULT_NS,
            destination_ns=_DEFAULT_NS,
        )
        dest = ixn.destination_name
        prev_raw = get_entry(ctx, SERVICE_INTENTIONS, dest)
        src = ixn.to_source(legacy=True)
        if prev_raw is None:
            entry = ServiceIntentionsEntry(name=dest, sources=(src,))
        else:
            prev = ServiceIntentionsEntry.from_json(prev_raw)
            if not _legacy_fields_all_set(prev):
                raise _legacy_conflict(dest)
            entry = replace(prev, sources=(*prev.sources, src))
        apply_intentions_entry(ctx, entry, dest, legacy=True)
        return json_response({"ID": new_id})

    # -- legacy by ID ---------------------------------------------------------------------------

    @router.route("/v1/connect/intentions/", "GET", "PUT", "DELETE")
    async def intention_by_id(req: Request) -> Response:
        req.check_datacenter()
        req.reject_enterprise_tenancy()
        legacy_id = req.suffix
        if req.method == "GET":
            return await _legacy_get(req, legacy_id)
        if req.method == "PUT":
            return _legacy_update(req, legacy_id)
        return _legacy_delete(req, legacy_id)

    async def _legacy_get(req: Request, legacy_id: str) -> Response:
        authz = req.authz
        if legacy_id:
            err = _uuid_error(legacy_id)
            if err is not None:
                raise HTTPError(400, err)

        def run() -> tuple[int, Any]:
            found = _find_legacy(ctx, legacy_id) if legacy_id else None
            ixn = None if found is None else found[0].to_intentions()[found[1]]
            return ctx.store.max_index(CONFIG_TABLE), ixn

        index, ixn = await blocking_query(req, [CONFIG_TABLE], run)
        if ixn is None:
            raise HTTPError(404, "Intention not found")
        if not _can_read(authz, ixn):
            raise HTTPError(403, _PERMISSION_DENIED)
        return query_response(req, ixn.to_json(), index)

    def _legacy_update(req: Request, legacy_id: str) -> Response:
        ixn = _decode_intention(req, "Request decode failed", 400)
        _refuse_source_peer(ixn)
        authz = req.authz
        if not ixn.destination_name or not authz.allowed(
            "intention", "write", ixn.destination_name
        ):
            raise HTTPError(403, _PERMISSION_DENIED)
        if _uuid_error(legacy_id) is not None:
            raise HTTPError(500, f"Cannot modify non-existent intention: '{legacy_id}'")
        found = _find_legacy(ctx, legacy_id)
        if found is None:
            raise HTTPError(500, f"Cannot modify non-existent intention: '{legacy_id}'")
        entry, pos = found
        old = entry.to_intentions()[pos]
        if not authz.allowed("intention", "write", old.destination_name):
            raise HTTPError(403, _PERMISSION_DENIED)
        if (ixn.destination_ns, ixn.destination_name) != (old.destination_ns, old.destination_name):
            raise HTTPError(
                500,
                "Cannot modify DestinationNS or DestinationName for an intention once it exists.",
            )
        for label, ns in (("SourceNS", ixn.source_ns), ("DestinationNS", ixn.destination_ns)):
            if not _ce_namespace_ok(ns):
                raise HTTPError(
                    500, f"Invalid {label}({ns}): Namespaces is a Consul Enterprise feature"
                )
        ixn = replace(ixn, id=legacy_id, updated_at=_now(), created_at=old.created_at)
        try:
            validate_legacy_intention(ixn)
        except IntentionValidationError as exc:
            raise HTTPError(500, str(exc)) from None
        if not _legacy_fields_all_set(entry):
            raise _legacy_conflict(entry.name)
        sources = list(entry.sources)
        sources[pos] = ixn.to_source(legacy=True)
        apply_intentions_entry(ctx, replace(entry, sources=tuple(sources)), entry.name, legacy=True)
        return json_response({"ID": legacy_id})

    def _legacy_delete(req: Request, legacy_id: str) -> Response:
        authz = req.authz
        found = _find_legacy(ctx, legacy_id) if _uuid_error(legacy_id) is None else None
        if found is None:
            raise HTTPError(500, f"Cannot delete non-existent intention: '{legacy_id}'")
        entry, pos = found
        if not authz.allowed("intention", "write", entry.name):
            raise HTTPError(403, _PERMISSION_DENIED)
        if not _legacy_fields_all_set(entry):
            raise _legacy_conflict(entry.name)
        sources = entry.sources[:pos] + entry.sources[pos + 1 :]
        apply_intentions_entry(ctx, replace(entry, sources=sources), entry.name, legacy=True)
        return json_response(True)

    # -- exact ----------------------------------------------------------------------------------

    @router.route("/v1/connect/intentions/exact", "GET", "PUT", "DELETE")
    async def exact(req: Request) -> Response:
        req.check_datacenter()
        req.reject_enterprise_tenancy()
        if req.method == "GET":
            return await _exact_get(req)
        src = _parse_param(req, "source", allow_peer=False, allow_empty=False)
        dst = _parse_param(req, "destination", allow_peer=False, allow_empty=False)
        _check_ce(src, "source")
        _check_ce(dst, "destination")
        if req.method == "PUT":
            return _exact_put(req, src, dst)
        return _exact_delete(req, src, dst)

    async def _exact_get(req: Request) -> Response:
        _ = req.options  # option errors (400) come before parameter errors, as in Consul
        src = _parse_param(req, "source", allow_peer=True, allow_empty=True)
        dst = _parse_param(req, "destination", allow_peer=False, allow_empty=True)
        if not _ce_namespace_ok(src.namespace):
            raise HTTPError(
                500,
                f"Invalid SourceNS {go_quote(src.namespace)}: "
                "Namespaces is a Consul Enterprise feature",
            )
        if not _ce_namespace_ok(dst.namespace):
            raise HTTPError(
                500,
                f"Invalid DestinationNS {go_quote(dst.namespace)}: "
                "Namespaces is a Consul Enterprise feature",
            )
        authz = req.authz

        def run() -> tuple[int, Any]:
            found = None
            raw = get_entry(ctx, SERVICE_INTENTIONS, dst.name)
            if raw is not None:
                for ixn in ServiceIntentionsEntry.from_json(raw).to_intentions():
                    if ixn.source_name == src.name and ixn.source_peer == src.peer:
                        found = ixn
                        break
            return ctx.store.max_index(CONFIG_TABLE), found

        index, ixn = await blocking_query(req, [CONFIG_TABLE], run)
        if ixn is None:
            raise HTTPError(404, "Intention not found")
        if not _can_read(authz, ixn):
            raise HTTPError(403, _PERMISSION_DENIED)
        return query_response(req, ixn.to_json(), index)

    def _exact_put(req: Request, src: _Name, dst: _Name) -> Response:
        ixn = _decode_intention(req, "Request decode failed", 400)
        _refuse_source_peer(ixn)
        ixn = replace(
            ixn,
            id="",
            source_ns=_DEFAULT_NS,
            source_name=src.name,
            destination_ns=_DEFAULT_NS,
            destination_name=dst.name,
            source_partition="",
            destination_partition="",
            source_peer="",
            created_at="",
            updated_at="",
        )
        authz = req.authz
        prev_raw = get_entry(ctx, SERVICE_INTENTIONS, dst.name)
        new_src = ixn.to_source()
        if prev_raw is None:
            if ixn.meta:
                raise HTTPError(500, "Meta must not be specified")
            entry = ServiceIntentionsEntry(name=dst.name, sources=(new_src,))
        else:
            prev = ServiceIntentionsEntry.from_json(prev_raw)
            if ixn.meta and dict(ixn.meta) != dict(prev.meta):
                raise HTTPError(
                    500, "Meta must not be specified, or should be unchanged during an update."
                )
            sources = list(prev.sources)
            for i, s in enumerate(sources):
                if _same_source(s, new_src):
                    sources[i] = new_src
                    break
            else:
                sources.append(new_src)
            entry = replace(prev, sources=tuple(sources))
        apply_intentions_entry(ctx, entry, dst.name, legacy=False, authz=authz)
        return json_response(True)

    def _exact_delete(req: Request, src: _Name, dst: _Name) -> Response:
        authz = req.authz
        prev_raw = get_entry(ctx, SERVICE_INTENTIONS, dst.name)
        if prev_raw is None:
            return json_response(True)
        prev = ServiceIntentionsEntry.from_json(prev_raw)
        wanted = SourceIntention(name=src.name)
        pos = next((i for i, s in enumerate(prev.sources) if _same_source(s, wanted)), None)
        if pos is None:
            return json_response(True)  # nothing matched: a no-op, as in Consul
        # DeleteSourceByName removes the first match only.
        sources = prev.sources[:pos] + prev.sources[pos + 1 :]
        apply_intentions_entry(
            ctx, replace(prev, sources=sources), dst.name, legacy=False, authz=authz
        )
        return json_response(True)

    # -- match and check -------------------------------------------------------------------------

    @router.route("/v1/connect/intentions/match", "GET")
    async def match(req: Request) -> Response:
        req.check_datacenter()
        req.reject_enterprise_tenancy()
        _ = req.options
        by = req.params("by")
        if len(by) != 1:
            raise HTTPError(500, "required query parameter 'by' not set")
        if by[0] not in ("source", "destination"):
            raise HTTPError(500, "'by' parameter must be one of 'source' or 'destination'")
        names = req.params("name")
        if not names:
            raise HTTPError(500, "required query parameter 'name' not set")
        parsed: list[_Name] = []
        for n in names:
            try:
                parsed.append(_parse_component(n, allow_peer=False))
            except ValueError as exc:
                raise HTTPError(500, f"name {go_quote(n)} is invalid: {exc}") from None
        for p in parsed:
            if not _ce_namespace_ok(p.namespace):
                raise HTTPError(
                    500,
                    f"Invalid match entry namespace {go_quote(p.namespace)}: "
                    "Namespaces is a Consul Enterprise feature",
                )
        authz = req.authz
        for p in parsed:
            if p.name:
                authz.require("intention", "read", p.name)
        lookup = _intentions_for_source if by[0] == "source" else _intentions_for_destination

        def run() -> tuple[int, Any]:
            result = {
                n: [i.to_json() for i in lookup(ctx, p.name)]
                for n, p in zip(names, parsed, strict=True)
            }
            return ctx.store.max_index(CONFIG_TABLE), dict(sorted(result.items()))

        index, result = await blocking_query(req, [CONFIG_TABLE], run)
        # Only the match handler records its consistency level; ?cached goes through the cache.
        extra = cache_headers(req, index) if req.options.cached else None
        return query_response(req, result, index, extra_headers=extra, consistency=True)

    @router.route("/v1/connect/intentions/check", "GET")
    async def check(req: Request) -> Response:
        req.check_datacenter()
        req.reject_enterprise_tenancy()
        _ = req.options
        source_type = "consul"
        if req.params("source-type"):
            source_type = req.params("source-type")[0]
        src_raw = _required_param(req, "source")
        dst_raw = _required_param(req, "destination")
        src = _Name("", "", "", src_raw)
        if source_type == "consul":
            try:
                src = _parse_component(src_raw, allow_peer=False)
            except ValueError as exc:
                raise HTTPError(500, f"source {go_quote(src_raw)} is invalid: {exc}") from None
        try:
            dst = _parse_component(dst_raw, allow_peer=False)
        except ValueError as exc:
            raise HTTPError(500, f"destination {go_quote(dst_raw)} is invalid: {exc}") from None
        authz = req.authz
        _check_ce(src, "source")
        _check_ce(dst, "destination")
        if source_type != "consul":
            raise HTTPError(500, f"unsupported SourceType: {go_quote(source_type)}")
        if dst.name:
            authz.require("service", "read", dst.name)
        # Check runs on the server's current state and, for the default, consults the
        # anonymous token (so the agent-wide intention default), not the caller's token.
        decision = IntentionSet(
            _intentions_for_destination(ctx, dst.name),
            default_allow=ctx.acl.intention_default_allow,
        ).decide_l4(_DEFAULT_NS, src.name)
        return json_response({"Allowed": decision.allowed})

    # -- authorize -------------------------------------------------------------------------------

    @router.route("/v1/agent/connect/authorize", "POST")
    async def authorize(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        raw = req.json()
        if not isinstance(raw, dict):
            kind = go_json_kind(raw)
            raise HTTPError(
                400,
                "Request decode failed: json: cannot unmarshal "
                f"{kind} into Go value of type structs.ConnectAuthorizeRequest",
            )
        fields: dict[str, str] = {}
        for key in ("Target", "ClientCertURI", "ClientCertSerial"):
            value = get_ci(raw, key)
            if value is not None and not isinstance(value, str):
                raise HTTPError(
                    400,
                    "Request decode failed: json: cannot unmarshal "
                    f"{go_json_kind(value)} into Go struct field "
                    f"ConnectAuthorizeRequest.{key} of type string",
                )
            fields[key] = value or ""
        target = fields["Target"]
        if not target:
            raise HTTPError(400, "Target service must be specified")
        try:
            ident = parse_spiffe_id(fields["ClientCertURI"])
        except IdentityError:
            raise HTTPError(400, "ClientCertURI not a valid Connect identifier") from None
        if not isinstance(ident, ServiceIdentity):
            raise HTTPError(400, "ClientCertURI not a valid Service identifier")
        authz = req.authz
        authz.require("service", "write", target)
        # CE compares the URI's (lower-cased) partition with the target's, always
        # "default": a client from another partition is refused before any intention.
        partition = (ident.partition or "default").lower()
        if partition != "default":
            raise HTTPError(
                400, f"Mismatched partitions: {go_quote(partition)} != {go_quote('default')}"
            )

        headers = _cache_headers(ctx, target)
        decision = IntentionSet(
            _intentions_for_destination(ctx, target),
            default_allow=authz.intention_default_allow,
        ).decide_l4(ident.namespace, ident.service)
        return json_response(
            {"Authorized": decision.allowed, "Reason": decision.reason}, headers=headers
        )


def _same_source(a: SourceIntention, b: SourceIntention) -> bool:
    # Consul's UpsertSourceByName/DeleteSourceByName compare SourceServiceName() only: the
    # peer is not part of it, so the exact API's writes also hit a peered source of that name.
    return (a.partition or "default", a.namespace or _DEFAULT_NS, a.name) == (
        b.partition or "default",
        b.namespace or _DEFAULT_NS,
        b.name,
    )


def _cache_headers(ctx: AgentContext, target: str) -> dict[str, str]:
    """``X-Cache`` (and ``Age`` on a hit) as the agent cache of intention matches reports.

    A target's match result counts as cached until the config-entry table changes.
    """
    cache: dict[str, tuple[int, float]] = ctx.extensions.setdefault(_AUTHZ_CACHE_KEY, {})
    index = ctx.store.max_index(CONFIG_TABLE)
    now = time.monotonic()
    hit = cache.get(target)
    if hit is not None and hit[0] == index:
        return {"X-Cache": "HIT", "Age": str(int(now - hit[1]))}
    cache[target] = (index, now)
    return {"X-Cache": "MISS"}
