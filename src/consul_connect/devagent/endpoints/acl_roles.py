"""Dev agent endpoints: ``/v1/acl/role*`` (ACL roles), consul-api.md §6.

A role names a set of policy links, service identities and node identities; a token that
links the role gains all of them (see :meth:`ACLSystem.rules_for`). Routes, status codes and
texts follow Consul CE (``agent/acl_endpoint.go`` for HTTP, ``agent/consul/acl_endpoint.go``
``RoleSet``/``RoleDelete``/``RoleRead``/``RoleList`` for validation):

* ``GET /v1/acl/roles[?policy=<id>]`` (``acl:read``): full roles sorted by ID.
* ``PUT /v1/acl/role`` creates, ``PUT /v1/acl/role/<id>`` replaces (``acl:write``).
* ``GET /v1/acl/role/<id>`` and ``GET /v1/acl/role/name/<name>`` (``acl:read``): 404
  ``Requested role does not exist: ACL not found`` when missing.
* ``DELETE /v1/acl/role/<id>`` (``acl:write``): ``true``, also for an unknown role.

Validation failures are plain 500s, as Consul's RPC errors are.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from consul_connect.devagent.acl import (
    POLICIES_TABLE,
    ROLES_TABLE,
    ACLSystem,
    go_quote,
    is_uuid,
    role_json,
)
from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.endpoints.acl import (
    _body,
    _enabled,
    _node_identities,
    _service_identities,
    _typed,
)
from consul_connect.devagent.http import (
    HTTPError,
    Request,
    Response,
    Router,
    blocking_query,
    get_ci,
    go_json_kind,
    json_response,
    query_response,
)

__all__ = ["register"]

_PREFIX = "Role decoding failed"
# acl/validation.go validRoleName (`\Z`: Go's `$` does not match before a final "\n").
_ROLE_NAME_RE = re.compile(r"^[A-Za-z0-9\-_]{1,256}\Z")


def _policy_links(raw: Any, system: ACLSystem) -> tuple[list[dict[str, str]], list[str]]:
    """RoleSet's policy links: names resolved to IDs, de-duplicated by ID.

    Returns the links and the IDs that name no policy: Consul checks those only later, in
    the state store (after the identities), so the caller raises for them.
    """
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise HTTPError(
            400,
            f"{_PREFIX}: json: cannot unmarshal {go_json_kind(raw)} into Go struct field "
            "ACLRole.Policies of type []structs.ACLRolePolicyLink",
        )
    out: list[dict[str, str]] = []
    missing: list[str] = []
    for link in raw:
        if not isinstance(link, dict):
            raise HTTPError(
                400,
                f"{_PREFIX}: json: cannot unmarshal {go_json_kind(link)} into Go "
                "struct field ACLRole.Policies of type structs.ACLRolePolicyLink",
            )
        pid = str(get_ci(link, "ID") or "")
        if not pid:
            name = str(get_ci(link, "Name") or "")
            pol = system.policy_by_name(name)
            if pol is None:
                raise HTTPError(500, f"No such ACL policy with name {go_quote(name)}")
            pid = pol["ID"]
        elif pid not in system.policies and pid not in missing:
            missing.append(pid)
        if all(p["ID"] != pid for p in out):
            out.append({"ID": pid})
    return out, missing


def _write_role(
    req: Request, system: ACLSystem, role_id: str, raw: dict[str, Any]
) -> dict[str, Any]:
    """ACL.RoleSet: validate ``raw`` as the whole new role ``role_id`` (new when empty)."""
    name = _typed(raw, "Name", str, _PREFIX, "ACLRole") or ""
    description = _typed(raw, "Description", str, _PREFIX, "ACLRole") or ""
    _typed(raw, "ServiceIdentities", list, _PREFIX, "ACLRole")
    _typed(raw, "NodeIdentities", list, _PREFIX, "ACLRole")
    req.authz.require("acl", "write")
    if not name:
        raise HTTPError(500, "Invalid Role: no Name is set")
    if not _ROLE_NAME_RE.match(name):
        raise HTTPError(
            500,
            "Invalid Role: invalid Name. Only alphanumeric characters, '-' and '_' are allowed",
        )
    by_name = system.role_by_name(name)
    existing = None
    if not role_id:
        role_id = str(uuid.uuid4())
        if by_name is not None:
            raise HTTPError(500, f"Invalid Role: A Role with Name {go_quote(name)} already exists")
    else:
        if not is_uuid(role_id):
            raise HTTPError(500, "Role ID invalid UUID")
        existing = system.roles.get(role_id)
        if existing is None:
            raise HTTPError(500, f"cannot find role {role_id}")
        if existing["Name"] != name and by_name is not None:
            raise HTTPError(500, f"Invalid Role: A role with name {go_quote(name)} already exists")
    policies, missing = _policy_links(get_ci(raw, "Policies"), system)
    sids = _service_identities(get_ci(raw, "ServiceIdentities"), False, on="role")
    nids = _node_identities(get_ci(raw, "NodeIdentities"), on="role")
    if missing:
        # state/acl.go resolveRolePolicyLinks, wrapped by RoleSet's raftApply error.
        raise HTTPError(
            500, f"Failed to apply role upsert request: No such policy with ID: {missing[0]}"
        )
    store = req.ctx.store
    idx = store.next_index()
    role = role_json(
        role_id,
        name,
        description,
        policies=policies,
        service_identities=sids,
        node_identities=nids,
        create_index=existing["CreateIndex"] if existing else idx,
        modify_index=idx,
    )
    system.roles[role_id] = role
    store.commit(ROLES_TABLE)
    return system.role_view(role)


def register(router: Router, ctx: AgentContext) -> None:
    """Register the ACL role routes."""
    system = ctx.acl

    @router.route("/v1/acl/roles", "GET")
    @_enabled
    async def role_list(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        req.authz.require("acl", "read")
        policy = req.param("policy")

        def run() -> tuple[int, Any]:
            out = []
            for role in sorted(system.roles.values(), key=lambda r: str(r["ID"])):
                if policy and policy not in [p["ID"] for p in role.get("Policies", [])]:
                    continue
                out.append(system.role_view(role))
            return ctx.store.max_index(ROLES_TABLE, POLICIES_TABLE), out

        index, out = await blocking_query(req, [ROLES_TABLE, POLICIES_TABLE], run)
        return query_response(req, out, index)

    @router.route("/v1/acl/role", "PUT")
    @_enabled
    async def role_create(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        return _put(req, "")

    def _put(req: Request, role_id: str) -> Response:
        raw = _body(req, _PREFIX, "structs.ACLRole")
        body_id = _typed(raw, "ID", str, _PREFIX, "ACLRole") or ""
        if body_id and body_id != role_id:
            raise HTTPError(400, "Role ID in URL and payload do not match")
        return json_response(_write_role(req, system, role_id, raw))

    async def read_role(req: Request, role_id: str, name: str) -> Response:
        req.authz.require("acl", "read")

        def run() -> tuple[int, Any]:
            role = system.roles.get(role_id) if role_id else system.role_by_name(name)
            view = None if role is None else system.role_view(role)
            return ctx.store.max_index(ROLES_TABLE), view

        index, role = await blocking_query(req, [ROLES_TABLE, POLICIES_TABLE], run)
        if role is None:
            raise HTTPError(404, "Requested role does not exist: ACL not found")
        return query_response(req, role, index)

    @router.route("/v1/acl/role/name/", "GET")
    @_enabled
    async def role_by_name(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        if not req.suffix:
            raise HTTPError(400, "Missing role Name")
        return await read_role(req, "", req.suffix)

    @router.route("/v1/acl/role/", "GET", "PUT", "DELETE")
    @_enabled
    async def role_crud(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        role_id = req.suffix
        if not role_id and req.method != "PUT":
            raise HTTPError(400, "Missing role ID")
        if req.method == "GET":
            return await read_role(req, role_id, "")
        if req.method == "PUT":
            return _put(req, role_id)
        try:
            req.authz.require("acl", "write")
        except HTTPError as exc:
            if "ACL not found" in exc.text:
                raise HTTPError(404, "Cannot find role to delete") from None
            raise
        if role_id in system.roles:
            # Tokens keep their link; reads drop it and it grants nothing from now on.
            del system.roles[role_id]
            ctx.store.commit(ROLES_TABLE)
        return json_response(True)
