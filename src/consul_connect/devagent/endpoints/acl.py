"""Dev agent endpoints: ``/v1/acl/*`` (tokens, policies, bootstrap), consul-api.md §6.

Roles have their own module (:mod:`consul_connect.devagent.endpoints.acl_roles`); tokens link
them here.

With ACLs disabled every route answers 401 ``ACL support disabled``. Validation texts,
status codes and the token/policy JSON follow Consul CE; the rights themselves are
evaluated by :mod:`consul_connect.devagent.acl`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from consul_connect._goduration import format_duration, parse_duration
from consul_connect.devagent.acl import (
    ANONYMOUS_ACCESSOR_ID,
    GLOBAL_MANAGEMENT_POLICY_ID,
    META_TABLE,
    POLICIES_TABLE,
    RESERVED_ID_PREFIX,
    ROLES_TABLE,
    TOKENS_TABLE,
    ACLRulesError,
    ACLSystem,
    go_quote,
    is_uuid,
    parse_rules,
    policy_json,
    token_json,
)
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
    query_response,
)

__all__ = ["register"]

_MIN_TTL = 60.0
_MAX_TTL = 24 * 3600.0
# acl/validation.go; `\Z` because Go's `$` (unlike Python's) does not match before a final "\n".
_IDENTITY_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?\Z")
_POLICY_NAME_RE = re.compile(r"^[A-Za-z0-9\-_]{1,128}\Z")

Handler = Callable[[Request], Awaitable[Response]]


def _enabled(handler: Handler) -> Handler:
    async def wrapped(req: Request) -> Response:
        if not req.ctx.acl.enabled:
            raise HTTPError(401, "ACL support disabled")
        return await handler(req)

    return wrapped


def _body(req: Request, prefix: str, go_type: str) -> dict[str, Any]:
    raw = decode_json_body(req.body, prefix)
    if not isinstance(raw, dict):
        raise HTTPError(
            400,
            f"{prefix}: json: cannot unmarshal {go_json_kind(raw)} into Go value of type {go_type}",
        )
    return raw


def _typed(
    raw: dict[str, Any], key: str, kind: type | tuple[type, ...], prefix: str, go: str
) -> Any:
    value = get_ci(raw, key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HTTPError(
            400,
            f"{prefix}: json: cannot unmarshal {go_json_kind(value)} into Go struct field "
            f"{go}.{key} of type {_go_type_name(kind)}",
        )
    return value


def _go_type_name(kind: type | tuple[type, ...]) -> str:
    if kind is str:
        return "string"
    if kind is bool:
        return "bool"
    if kind is list:
        return "[]interface {}"
    return "interface {}"


def _check_id(value: str, what: str, system: ACLSystem) -> None:
    if not is_uuid(value):
        raise HTTPError(500, f"Invalid Token: {what} - not a valid UUID")
    if value.startswith(RESERVED_ID_PREFIX):
        raise HTTPError(
            500,
            f'Invalid Token: {what} - UUIDs with the prefix "{RESERVED_ID_PREFIX}" are reserved',
        )
    for rec in system.tokens.values():
        tok = rec["token"]
        if value in (tok["AccessorID"], tok["SecretID"]):
            raise HTTPError(500, f"Invalid Token: {what} is already in use")


def _links(
    raw: Any,
    prefix: str,
    kind: str,
    by_id: Callable[[str], bool],
    by_name: Callable[[str], dict[str, Any] | None],
) -> list[dict[str, str]]:
    """A token's ``Policies`` or ``Roles`` (``kind`` "policy" or "role"): each link
    resolved by ID or name, kept by ID, duplicates dropped (token_writer.go
    normalizePolicyLinks / normalizeRoleLinks)."""
    field, go_type = ("Policies", "Policy") if kind == "policy" else ("Roles", "Role")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise HTTPError(
            400,
            f"{prefix}: json: cannot unmarshal {go_json_kind(raw)} into Go struct field "
            f"ACLToken.{field} of type []structs.ACLToken{go_type}Link",
        )
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for link in raw:
        if not isinstance(link, dict):
            raise HTTPError(
                400,
                f"{prefix}: json: cannot unmarshal {go_json_kind(link)} into Go "
                f"struct field ACLToken.{field} of type structs.ACLToken{go_type}Link",
            )
        lid = str(get_ci(link, "ID") or "")
        name = str(get_ci(link, "Name") or "")
        if lid:
            if not by_id(lid):
                raise HTTPError(500, f"No such ACL {kind} with ID {go_quote(lid)}")
        else:
            found = by_name(name)
            if found is None:
                raise HTTPError(500, f"No such ACL {kind} with name {go_quote(name)}")
            lid = found["ID"]
        if lid not in seen:
            seen.add(lid)
            out.append({"ID": lid})
    return out


def _service_identities(raw: Any, local: bool, *, on: str = "token") -> list[dict[str, Any]]:
    """Validate and merge service identities (``on`` names the holder in the texts)."""
    if not raw:
        return []
    merged: dict[str, list[str]] = {}
    order: list[str] = []
    for ident in raw if isinstance(raw, list) else []:
        if not isinstance(ident, dict):
            continue
        name = get_ci(ident, "ServiceName", "service_name") or ""
        dcs = get_ci(ident, "Datacenters") or []
        if not name:
            raise HTTPError(500, f"Service identity is missing the service name field on this {on}")
        if not isinstance(name, str) or len(name) > 256 or not _IDENTITY_NAME_RE.match(name):
            raise HTTPError(
                500,
                f"Service identity {go_quote(str(name))} has an invalid name. Only lowercase "
                "alphanumeric characters, '-' and '_' are allowed",
            )
        if local and dcs:
            raise HTTPError(
                500,
                f"Service identity {go_quote(name)} cannot specify a list of datacenters on a "
                "local token",
            )
        if name not in merged:
            merged[name] = []
            order.append(name)
        for dc in dcs:
            if dc not in merged[name]:
                merged[name].append(dc)
    out: list[dict[str, Any]] = []
    for name in order:
        item: dict[str, Any] = {"ServiceName": name}
        if merged[name]:
            item["Datacenters"] = merged[name]
        out.append(item)
    return out


def _node_identities(raw: Any, *, on: str = "token") -> list[dict[str, str]]:
    """Validate and de-duplicate node identities (``on`` names the holder in the texts)."""
    out: list[dict[str, str]] = []
    for ident in raw if isinstance(raw, list) else []:
        if not isinstance(ident, dict):
            continue
        name = get_ci(ident, "NodeName", "node_name") or ""
        dc = get_ci(ident, "Datacenter") or ""
        if not name:
            raise HTTPError(500, f"Node identity is missing the node name field on this {on}")
        if not dc:
            raise HTTPError(500, f"Node identity is missing the datacenter field on this {on}")
        if not isinstance(name, str) or len(name) > 256 or not _IDENTITY_NAME_RE.match(name):
            raise HTTPError(
                500,
                "Node identity has an invalid name. Only lowercase alphanumeric characters, "
                "'-' and '_' are allowed",
            )
        item = {"NodeName": str(name), "Datacenter": str(dc)}
        if item not in out:
            out.append(item)
    return out


def _parse_ttl(raw: Any, prefix: str) -> float:
    if raw is None or raw == "" or raw == 0:
        return 0.0
    if isinstance(raw, bool):
        raise HTTPError(
            400,
            f"{prefix}: json: cannot unmarshal bool into Go struct field "
            "ACLToken.ExpirationTTL of type time.Duration",
        )
    if isinstance(raw, int | float):
        return float(raw) / 1e9
    if isinstance(raw, str):
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise HTTPError(400, f"{prefix}: {exc}") from None
    raise HTTPError(
        400,
        f"{prefix}: json: cannot unmarshal {go_json_kind(raw)} into Go struct "
        "field ACLToken.ExpirationTTL of type time.Duration",
    )


def _parse_time_ns(value: str, prefix: str) -> int:
    m = re.fullmatch(
        r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})", value
    )
    if m is None:
        raise HTTPError(400, f'{prefix}: parsing time "{value}" as RFC 3339: cannot parse')
    import calendar

    secs = calendar.timegm(
        (int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]), 0, 0, 0)
    )
    frac = int((m[7] or ".0")[1:].ljust(9, "0")[:9])
    if m[8] != "Z":
        sign = 1 if m[8][0] == "+" else -1
        secs -= sign * (int(m[8][1:3]) * 3600 + int(m[8][4:6]) * 60)
    return secs * 1_000_000_000 + frac


def _token_from_body(
    req: Request, raw: dict[str, Any], system: ACLSystem, *, existing: dict[str, Any] | None
) -> dict[str, Any]:
    """Validate a token create/update body; return the new stored record."""
    prefix = "Token decoding failed"
    description = _typed(raw, "Description", str, prefix, "ACLToken") or ""
    local = _typed(raw, "Local", bool, prefix, "ACLToken") or False
    accessor = _typed(raw, "AccessorID", str, prefix, "ACLToken") or ""
    secret = _typed(raw, "SecretID", str, prefix, "ACLToken") or ""
    ttl = _parse_ttl(get_ci(raw, "ExpirationTTL"), prefix)
    exp_raw = _typed(raw, "ExpirationTime", str, prefix, "ACLToken")
    exp_ns = _parse_time_ns(exp_raw, prefix) if exp_raw else None
    _typed(raw, "ServiceIdentities", list, prefix, "ACLToken")
    _typed(raw, "NodeIdentities", list, prefix, "ACLToken")

    now_ns = time.time_ns()
    if existing is None:
        if accessor:
            _check_id(accessor, "AccessorID", system)
        else:
            accessor = str(uuid.uuid4())
        if secret:
            _check_id(secret, "SecretID", system)
        else:
            secret = str(uuid.uuid4())
        if ttl < 0:
            raise HTTPError(500, f"Token Expiration TTL '{format_duration(ttl)}' should be > 0")
        if ttl > 0:
            if exp_ns is not None:
                raise HTTPError(500, "Token Expiration TTL and Expiration Time cannot both be set")
            exp_ns = now_ns + int(ttl * 1e9)
        if exp_ns is not None:
            if exp_ns < now_ns:
                raise HTTPError(500, "ExpirationTime cannot be before CreateTime")
            expires_in = (exp_ns - now_ns) / 1e9
            if expires_in > _MAX_TTL:
                raise HTTPError(
                    500,
                    "ExpirationTime cannot be more than 24h0m0s in the future "
                    f"(was {format_duration(expires_in)})",
                )
            if expires_in < _MIN_TTL:
                raise HTTPError(
                    500,
                    "ExpirationTime cannot be less than 1m0s in the future "
                    f"(was {format_duration(expires_in)})",
                )
        create_ns = now_ns
        create_index = None
    else:
        old = existing["token"]
        if secret and secret != old["SecretID"]:
            raise HTTPError(500, "Changing a token's SecretID is not permitted")
        secret = old["SecretID"]
        if bool(local) != bool(old.get("Local")):
            raise HTTPError(500, f"Cannot toggle local mode of {old['AccessorID']}")
        # token_writer.go Update: the expiry is fixed at creation; restating it is fine.
        if ttl != 0 or (exp_ns is not None and exp_ns != existing.get("expires_ns")):
            raise HTTPError(500, f"Cannot change expiration time of {old['AccessorID']}")
        exp_ns = existing.get("expires_ns")
        create_ns = _parse_time_ns(old["CreateTime"], prefix)
        create_index = old["CreateIndex"]

    policies = _links(
        get_ci(raw, "Policies"),
        prefix,
        "policy",
        system.policies.__contains__,
        system.policy_by_name,
    )
    roles = _links(
        get_ci(raw, "Roles"), prefix, "role", system.roles.__contains__, system.role_by_name
    )
    sids = _service_identities(get_ci(raw, "ServiceIdentities"), bool(local))
    nids = _node_identities(get_ci(raw, "NodeIdentities"))
    idx = req.ctx.store.next_index()
    tok = token_json(
        accessor=accessor,
        secret=secret,
        description=description,
        policies=policies,
        roles=roles,
        service_identities=sids,
        node_identities=nids,
        local=bool(local),
        create_ns=create_ns,
        expiration_ns=exp_ns,
        index=idx,
        create_index=create_index,
    )
    return {"token": tok, "expires_ns": exp_ns}


def register(router: Router, ctx: AgentContext) -> None:
    """Register the ACL token, policy and bootstrap routes."""
    system = ctx.acl

    def live_records() -> list[dict[str, Any]]:
        now = time.time_ns()
        recs = [
            r
            for r in system.tokens.values()
            if r.get("expires_ns") is None or r["expires_ns"] > now
        ]
        return sorted(recs, key=lambda r: str(r["token"]["AccessorID"]))

    # -- bootstrap -------------------------------------------------------------------------------

    @router.route("/v1/acl/bootstrap", "PUT")
    @_enabled
    async def bootstrap(req: Request) -> Response:
        idx = system.bootstrap_index
        if idx is not None:
            raise HTTPError(
                403, f"Permission denied: ACL bootstrap no longer allowed (reset index: {idx})"
            )
        secret = ""
        if req.body.strip():
            raw = _body(req, "Request decoding failed", "api.BootstrapRequest")
            secret = get_ci(raw, "BootstrapSecret") or ""
        new_idx = ctx.store.next_index()
        accessor = str(uuid.uuid4())
        tok = token_json(
            accessor=accessor,
            secret=secret or str(uuid.uuid4()),
            description="Bootstrap Token (Global Management)",
            policies=[{"ID": GLOBAL_MANAGEMENT_POLICY_ID}],
            create_ns=time.time_ns(),
            index=new_idx,
        )
        system.tokens[accessor] = {"token": tok, "expires_ns": None}
        ctx.store.table(META_TABLE)["bootstrap"] = {"index": new_idx}
        ctx.store.commit(TOKENS_TABLE, META_TABLE)
        view = system.token_view(system.tokens[accessor])
        return json_response({"ID": view["SecretID"], **view})

    # -- tokens ----------------------------------------------------------------------------------

    @router.route("/v1/acl/token", "PUT")
    @_enabled
    async def token_create(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        raw = _body(req, "Token decoding failed", "structs.ACLToken")
        req.authz.require("acl", "write")
        rec = _token_from_body(req, raw, system, existing=None)
        system.tokens[rec["token"]["AccessorID"]] = rec
        ctx.store.commit(TOKENS_TABLE)
        return json_response(system.token_view(rec))

    @router.route("/v1/acl/token/self", "GET")
    @_enabled
    async def token_self(req: Request) -> Response:
        _ = req.options
        secret = req.token

        def run() -> tuple[int, Any]:
            rec = system.find_by_secret(secret) if secret else None
            return ctx.store.max_index(TOKENS_TABLE), rec

        index, rec = await blocking_query(req, [TOKENS_TABLE, ROLES_TABLE], run)
        if rec is None:
            raise HTTPError(404, "Supplied token does not exist")
        return query_response(req, system.token_view(rec), index)

    @router.route("/v1/acl/tokens", "GET")
    @_enabled
    async def token_list(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        authz = req.authz
        authz.require("acl", "read")
        show_secret = authz.allowed("acl", "write")
        policy = req.param("policy")
        service = req.param("servicename")
        role = req.param("role")
        method = req.param("authmethod")

        def run() -> tuple[int, Any]:
            out = []
            for rec in live_records():
                tok = rec["token"]
                if policy and policy not in [p["ID"] for p in tok.get("Policies", [])]:
                    continue
                if service and service not in [
                    s["ServiceName"] for s in tok.get("ServiceIdentities", [])
                ]:
                    continue
                if role and role not in [r["ID"] for r in tok.get("Roles", [])]:
                    continue
                if method:
                    # The dev agent has no auth methods, so no token came from one.
                    continue
                out.append(system.token_view(rec, hide_secret=not show_secret))
            return ctx.store.max_index(TOKENS_TABLE, POLICIES_TABLE, ROLES_TABLE), out

        index, out = await blocking_query(req, [TOKENS_TABLE, POLICIES_TABLE, ROLES_TABLE], run)
        return query_response(req, out, index)

    @router.route("/v1/acl/token/", "GET", "PUT", "DELETE")
    @_enabled
    async def token_crud(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        accessor = req.suffix
        if req.method == "PUT" and accessor.endswith("/clone"):
            return _token_clone(req, accessor[: -len("/clone")])
        if not accessor and req.method != "PUT":
            raise HTTPError(400, "Missing token AccessorID")
        if req.method == "GET":
            return await _token_get(req, accessor)
        if req.method == "PUT":
            return _token_update(req, accessor)
        return _token_delete(req, accessor)

    async def _token_get(req: Request, accessor: str) -> Response:
        authz = req.authz
        authz.require("acl", "read")
        show_secret = authz.allowed("acl", "write")

        def run() -> tuple[int, Any]:
            rec = system.tokens.get(accessor)
            exp = None if rec is None else rec.get("expires_ns")
            if exp is not None and exp <= time.time_ns():
                rec = None
            return ctx.store.max_index(TOKENS_TABLE), rec

        index, rec = await blocking_query(req, [TOKENS_TABLE, ROLES_TABLE], run)
        if rec is None:
            raise HTTPError(404, "Requested token does not exist: ACL not found")
        return query_response(req, system.token_view(rec, hide_secret=not show_secret), index)

    def _token_update(req: Request, accessor: str) -> Response:
        raw = _body(req, "Token decoding failed", "structs.ACLToken")
        body_accessor = _typed(raw, "AccessorID", str, "Token decoding failed", "ACLToken") or ""
        if body_accessor and body_accessor != accessor:
            raise HTTPError(400, "Token Accessor ID in URL and payload do not match")
        req.authz.require("acl", "write")
        if not is_uuid(accessor):
            raise HTTPError(500, "Invalid Token: AccessorID - not a valid UUID")
        existing = system.tokens.get(accessor)
        if existing is None:
            raise HTTPError(500, f"Cannot find token {go_quote(accessor)}")
        rec = _token_from_body(req, raw, system, existing=existing)
        system.tokens[accessor] = rec
        ctx.store.commit(TOKENS_TABLE)
        return json_response(system.token_view(rec))

    def _token_clone(req: Request, accessor: str) -> Response:
        raw = _body(req, "Token decoding failed", "structs.ACLToken")
        req.authz.require("acl", "write")
        src = system.tokens.get(accessor)
        if src is None or not is_uuid(accessor):
            raise HTTPError(500, "Cannot clone a non-existent token")
        if accessor == ANONYMOUS_ACCESSOR_ID:
            raise HTTPError(500, "Cannot clone the anonymous token")
        old = src["token"]
        body: dict[str, Any] = {
            "Description": get_ci(raw, "Description") or old["Description"],
            "Policies": old.get("Policies", []),
            "Roles": [r for r in old.get("Roles", []) if r["ID"] in system.roles],
            "ServiceIdentities": old.get("ServiceIdentities", []),
            "NodeIdentities": old.get("NodeIdentities", []),
            "Local": old.get("Local", False),
        }
        rec = _token_from_body(req, body, system, existing=None)
        rec["expires_ns"] = src.get("expires_ns")
        if rec["expires_ns"] is not None:
            rec["token"]["ExpirationTime"] = old["ExpirationTime"]
        system.tokens[rec["token"]["AccessorID"]] = rec
        ctx.store.commit(TOKENS_TABLE)
        return json_response(system.token_view(rec))

    def _token_delete(req: Request, accessor: str) -> Response:
        if not is_uuid(accessor):
            raise HTTPError(500, "Accessor ID is missing or an invalid UUID")
        if accessor == ANONYMOUS_ACCESSOR_ID:
            raise HTTPError(500, "Delete operation not permitted on the anonymous token")
        try:
            req.authz.require("acl", "write")
        except HTTPError as exc:
            if "ACL not found" in exc.text:
                raise HTTPError(404, "Cannot find token to delete") from None
            raise
        rec = system.tokens.get(accessor)
        if rec is None:
            return json_response(True)
        if req.token and rec["token"]["SecretID"] == req.token:
            raise HTTPError(500, "Deletion of the request's authorization token is not permitted")
        del system.tokens[accessor]
        ctx.store.commit(TOKENS_TABLE)
        return json_response(True)

    # -- policies --------------------------------------------------------------------------------

    def policy_stub(pol: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in pol.items() if k != "Rules"}

    def write_policy(req: Request, policy_id: str, raw: dict[str, Any]) -> dict[str, Any]:
        prefix = "Policy decoding failed"
        name = _typed(raw, "Name", str, prefix, "ACLPolicy") or ""
        description = _typed(raw, "Description", str, prefix, "ACLPolicy") or ""
        rules = _typed(raw, "Rules", str, prefix, "ACLPolicy") or ""
        dcs = _typed(raw, "Datacenters", list, prefix, "ACLPolicy") or []
        req.authz.require("acl", "write")
        if not name:
            raise HTTPError(500, "Invalid Policy: no Name is set")
        if not _POLICY_NAME_RE.match(name):
            raise HTTPError(
                500,
                "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are "
                "allowed",
            )
        by_name = system.policy_by_name(name)
        existing = None
        if not policy_id:
            if by_name is not None:
                raise HTTPError(
                    500, f"Invalid Policy: A Policy with Name {go_quote(name)} already exists"
                )
            policy_id = str(uuid.uuid4())
        else:
            if not is_uuid(policy_id):
                raise HTTPError(500, "Policy ID invalid UUID")
            existing = system.policies.get(policy_id)
            if existing is None:
                raise HTTPError(500, f"cannot find policy {policy_id}")
            if existing["Name"] != name and by_name is not None:
                raise HTTPError(
                    500, f"Invalid Policy: A policy with name {go_quote(name)} already exists"
                )
            if policy_id == GLOBAL_MANAGEMENT_POLICY_ID:
                if dcs:
                    raise HTTPError(
                        500,
                        "Changing the Datacenters of the builtin global-management policy is "
                        "not permitted",
                    )
                if rules != existing["Rules"]:
                    raise HTTPError(
                        500,
                        "Changing the Rules for the builtin global-management policy is not "
                        "permitted",
                    )
        try:
            parse_rules(rules)
        except (ACLRulesError, json.JSONDecodeError) as exc:
            raise HTTPError(500, f"Failed to parse ACL rules: {exc}") from None
        idx = ctx.store.next_index()
        pol = policy_json(
            policy_id,
            name,
            description,
            rules,
            [str(d) for d in dcs],
            existing["CreateIndex"] if existing else idx,
            idx,
        )
        system.policies[policy_id] = pol
        ctx.store.commit(POLICIES_TABLE)
        return pol

    @router.route("/v1/acl/policy", "PUT")
    @_enabled
    async def policy_create(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        raw = _body(req, "Policy decoding failed", "structs.ACLPolicy")
        if get_ci(raw, "ID"):
            raise HTTPError(400, "Cannot specify the ID when creating a new policy")
        return json_response(write_policy(req, "", raw))

    @router.route("/v1/acl/policies", "GET")
    @_enabled
    async def policy_list(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        req.authz.require("acl", "read")

        def run() -> tuple[int, Any]:
            pols = sorted(system.policies.values(), key=lambda p: str(p["ID"]))
            return ctx.store.max_index(POLICIES_TABLE), [policy_stub(p) for p in pols]

        index, out = await blocking_query(req, [POLICIES_TABLE], run)
        return query_response(req, out, index)

    async def read_policy(req: Request, policy_id: str, name: str) -> Response:
        req.authz.require("acl", "read")

        def run() -> tuple[int, Any]:
            pol = system.policies.get(policy_id) if policy_id else system.policy_by_name(name)
            return ctx.store.max_index(POLICIES_TABLE), pol

        index, pol = await blocking_query(req, [POLICIES_TABLE], run)
        if pol is None:
            raise HTTPError(404, "Requested policy does not exist: ACL not found")
        return query_response(req, pol, index)

    @router.route("/v1/acl/policy/name/", "GET")
    @_enabled
    async def policy_by_name(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        if not req.suffix:
            raise HTTPError(400, "Missing policy Name")
        return await read_policy(req, "", req.suffix)

    @router.route("/v1/acl/policy/", "GET", "PUT", "DELETE")
    @_enabled
    async def policy_crud(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        policy_id = req.suffix
        if not policy_id and req.method != "PUT":
            raise HTTPError(400, "Missing policy ID")
        if req.method == "GET":
            return await read_policy(req, policy_id, "")
        if req.method == "PUT":
            raw = _body(req, "Policy decoding failed", "structs.ACLPolicy")
            body_id = get_ci(raw, "ID") or ""
            if body_id and body_id != policy_id:
                raise HTTPError(400, "Policy ID in URL and payload do not match")
            return json_response(write_policy(req, policy_id, raw))
        try:
            req.authz.require("acl", "write")
        except HTTPError as exc:
            if "ACL not found" in exc.text:
                raise HTTPError(404, "Cannot find policy to delete") from None
            raise
        pol = system.policies.get(policy_id)
        if pol is None:
            return json_response(True)
        if policy_id == GLOBAL_MANAGEMENT_POLICY_ID:
            raise HTTPError(
                500, "Delete operation not permitted on the builtin global-management policy"
            )
        del system.policies[policy_id]
        for rec in system.tokens.values():
            links = rec["token"].get("Policies")
            if links:
                rec["token"]["Policies"] = [p for p in links if p["ID"] != policy_id]
                if not rec["token"]["Policies"]:
                    del rec["token"]["Policies"]
        ctx.store.commit(POLICIES_TABLE, TOKENS_TABLE)
        return json_response(True)
