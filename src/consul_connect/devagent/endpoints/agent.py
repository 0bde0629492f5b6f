"""Dev agent endpoints: agent services and checks (``/v1/agent/service*``, ``/v1/agent/check*``).

Registration, deregistration and reads of the agent's local services and
checks with Consul's validation texts, TTL check updates, hash-blocking
``/v1/agent/service/<id>``, and the aggregated ``/v1/agent/health/service/*``
answers. The TTL expiry task is registered in ``ctx.background`` here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from consul_connect.devagent.catalog_state import (
    AGENT_SERVICE_SCHEMA,
    CHECK_SCHEMA,
    OUTPUT_MAX,
    SIDECAR_PORT_RANGE,
    SIDECAR_SUFFIX,
    CatalogState,
    CheckDef,
    agent_service_json,
    apply_filter,
    catalog_state,
    check_json,
    check_record,
    content_hash,
    filtered_header,
    key,
    parse_check_def,
    parse_service_def,
    registration_errors,
    service_record,
    sidecar_definition,
    ttl_task,
    validate_for_agent,
)
from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.http import (
    HTTPError,
    Request,
    Response,
    Router,
    block_timeout,
    get_ci,
    go_json_kind,
    json_response,
)

__all__ = ["register"]

_STATUS_CODES = {"passing": 200, "warning": 429, "critical": 503, "maintenance": 503}


def _empty() -> Response:
    return Response(200, b"", {}, None)


def _multierror(errors: list[str]) -> str:
    noun = "error" if len(errors) == 1 else "errors"
    return f"{len(errors)} {noun} occurred:\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


def _with_hash(body: dict[str, Any], h: str) -> dict[str, Any]:
    # ContentHash sits after EnableTagOverride in Go's field order.
    out: dict[str, Any] = {}
    for k, v in body.items():
        out[k] = v
        if k == "EnableTagOverride":
            out["ContentHash"] = h
    return out


def _api_check(rec: dict[str, Any]) -> dict[str, Any]:
    """The ``api.HealthCheck`` the agent health endpoints build (only identity and status set)."""
    return {
        "Node": rec["Node"],
        "CheckID": rec["CheckID"],
        "Name": rec["Name"],
        "Status": rec["Status"],
        "Notes": rec["Notes"],
        "Output": rec["Output"],
        "ServiceID": rec["ServiceID"],
        "ServiceName": rec["ServiceName"],
        "ServiceTags": list(rec["ServiceTags"] or []),
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {
            "Interval": "0s",
            "Timeout": "0s",
            "DeregisterCriticalServiceAfter": "0s",
            "HTTP": "",
            "Header": None,
            "Method": "",
            "Body": "",
            "TLSServerName": "",
            "TLSSkipVerify": False,
            "TCP": "",
            "UDP": "",
            "GRPC": "",
            "OSService": "",
            "GRPCUseTLS": False,
            "IntervalDuration": 0,
            "TimeoutDuration": 0,
            "DeregisterCriticalServiceAfterDuration": 0,
        },
        "CreateIndex": 0,
        "ModifyIndex": 0,
    }


SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT_ID = "_node_maintenance"
_DEFAULT_REASON = (
    "Maintenance mode is enabled for this {}, but no reason was provided. "
    "This is a default message."
)
_GO_BOOL = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def _enable_param(req: Request) -> bool:
    """The ``enable`` query parameter of a maintenance request, as Go's ParseBool reads it."""
    if not req.has("enable"):
        raise HTTPError(400, "Missing value for enable")
    raw = req.param("enable")
    if raw not in _GO_BOOL:
        raise HTTPError(400, f'Invalid value for enable: "{raw}"')
    return _GO_BOOL[raw]


def _maintenance_check(node: str, service: dict[str, Any] | None, reason: str) -> dict[str, Any]:
    """The critical check that keeps a service (or, without one, the node) out of queries."""
    return {
        "Node": node,
        "CheckID": SERVICE_MAINT_PREFIX + service["ID"] if service else NODE_MAINT_ID,
        "Name": "Service Maintenance Mode" if service else "Node Maintenance Mode",
        "Status": "critical",
        "Notes": reason or _DEFAULT_REASON.format("service" if service else "node"),
        "Output": "",
        "ServiceID": service["ID"] if service else "",
        "ServiceName": service["Service"] if service else "",
        "ServiceTags": list(service["Tags"]) if service else [],
        "Type": "maintenance",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "_ttl": 0.0,
        "_deregister_after": 0.0,
        "_critical_since": None,
        "_def": {},
    }


def _aggregated(checks: list[dict[str, Any]]) -> str:
    statuses = {c["Status"] for c in checks}
    if any(c["CheckID"].startswith((SERVICE_MAINT_PREFIX, NODE_MAINT_ID)) for c in checks):
        return "maintenance"
    for s in ("critical", "warning"):
        if s in statuses:
            return s
    return "passing"


def _wants_text(req: Request) -> bool:
    if req.headers.get("accept", "").startswith("text/plain"):
        return True
    fmt = req.param("format")
    return fmt == "text" if fmt else False


def register(router: Router, ctx: AgentContext) -> None:
    """Register the agent service/check routes and the TTL background task."""
    st: CatalogState = catalog_state(ctx)
    if ttl_task not in ctx.background:
        ctx.background.append(ttl_task)
    node = ctx.config.node_name
    dc = ctx.config.datacenter

    # -- services --------------------------------------------------------------------------

    @router.route("/v1/agent/service/register", "PUT")
    async def service_register(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        raw = req.json()
        sd = parse_service_def(raw)
        if sd.name == "":
            raise HTTPError(400, "Missing service name")
        if sd.address in ("0.0.0.0", "::", "[::]"):
            raise HTTPError(400, "Invalid service address")
        authz = req.authz
        problem = registration_errors(sd)
        # ServiceDefinition.CheckTypes skips an empty ``Check`` but validates every ``Checks``
        # entry, so ``{}`` there fails CheckType.Validate (checked before the statuses).
        if (
            problem is None or problem.text.startswith("Status for checks")
        ) and _has_empty_checks_entry(raw):
            problem = HTTPError(400, "Invalid check: TTL must be > 0 for TTL checks")
        if problem is not None:
            raise problem
        _cap_output_sizes(sd.checks)
        if sd.sidecar is not None:
            _cap_output_sizes(sd.sidecar.checks)
        sid = sd.id or sd.name
        authz.require("service", "write", sd.name)
        existing = st.service(sid)
        if existing is not None:
            authz.require("service", "write", existing["Service"])
        if sd.kind == "connect-proxy":
            authz.require("service", "write", sd.proxy["DestinationServiceName"])
        sidecar = None
        if sd.sidecar is not None:
            old_sidecar = st.service(sid + SIDECAR_SUFFIX)
            used = [s["Port"] for s in st.local_services() if s["ID"] != sid + SIDECAR_SUFFIX]
            if (
                sd.sidecar.port < 1
                and old_sidecar is not None
                and (SIDECAR_PORT_RANGE[0] <= old_sidecar["Port"] <= SIDECAR_PORT_RANGE[1])
            ):
                # Keep an auto-assigned port across re-registrations.
                sd.sidecar.port = old_sidecar["Port"]
            sidecar = sidecar_definition(sd, used)
            errors = validate_for_agent(sidecar)
            if errors:
                raise HTTPError(400, f"Failed Validation: {_multierror(errors)}")
            authz.require("service", "write", sidecar.name)
            if sidecar.kind == "connect-proxy":
                authz.require("service", "write", sidecar.proxy["DestinationServiceName"])
        replace = req.has("replace-existing-checks") and req.param("replace-existing-checks") in (
            "",
            "true",
        )
        idx = ctx.store.next_index()
        rec = service_record(sd, node)
        changed = st.put_service(idx, rec, sd.checks, replace_checks=replace)
        sidecar_id = sid + SIDECAR_SUFFIX
        if sidecar is not None:
            srec = service_record(sidecar, node)
            srec["_sidecar_of"] = sid
            changed |= st.put_service(idx, srec, sidecar.checks, replace_checks=replace)
        else:
            old = st.service(sidecar_id)
            if old is not None and old.get("_sidecar_of") == sid:
                st.delete_service(idx, node, sidecar_id)
                changed = True
        if changed:
            st.commit()
        return _empty()

    def vet_service_update(req: Request, sid: str) -> dict[str, Any]:
        """The local service ``sid``, once the token may write it (Consul's 404 and 403)."""
        authz = req.authz
        svc = st.service(sid)
        if svc is None:
            raise HTTPError(
                404,
                f'Unknown service ID "{sid}". '
                "Ensure that the service ID is passed, not the service name.",
            )
        authz.require("service", "write", svc["Service"])
        return svc

    @router.route("/v1/agent/service/deregister/", "PUT")
    async def service_deregister(req: Request) -> Response:
        sid = req.suffix
        req.reject_enterprise_tenancy()
        vet_service_update(req, sid)
        st.delete_service(ctx.store.next_index(), node, sid)
        st.commit()
        return _empty()

    def set_maintenance(enable: bool, rec: dict[str, Any]) -> None:
        ck = key(node, rec["CheckID"])
        present = ck in st.checks
        if enable and not present:
            st.put_check(ctx.store.next_index(), rec)
        elif not enable and present:
            st.delete_check(ctx.store.next_index(), ck)
        else:
            return  # already in the asked-for mode: nothing changes, no index moves
        st.commit()

    @router.route("/v1/agent/service/maintenance/", "PUT")
    async def service_maintenance(req: Request) -> Response:
        sid = req.suffix
        req.reject_enterprise_tenancy()
        if not sid:
            raise HTTPError(400, "Missing service ID")
        enable = _enable_param(req)
        svc = vet_service_update(req, sid)
        set_maintenance(enable, _maintenance_check(node, svc, req.param("reason")))
        return _empty()

    @router.route("/v1/agent/maintenance", "PUT")
    async def node_maintenance(req: Request) -> Response:
        enable = _enable_param(req)
        req.authz.require("node", "write", node)
        set_maintenance(enable, _maintenance_check(node, None, req.param("reason")))
        return _empty()

    @router.route("/v1/agent/services", "GET")
    async def services(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        authz = req.authz
        items = [(s, agent_service_json(s, dc)) for s in st.local_services()]
        items = apply_filter(req, AGENT_SERVICE_SCHEMA, items, key=lambda p: p[1])
        kept = [p for p in items if authz.allowed("service", "read", p[0]["Service"])]
        headers = filtered_header(req, len(kept) != len(items))
        return json_response({s["ID"]: body for s, body in kept}, headers=headers)

    @router.route("/v1/agent/service/", "GET")
    async def service_get(req: Request) -> Response:
        sid = req.suffix
        opts = req.options
        req.reject_enterprise_tenancy()
        authz = req.authz

        def run() -> tuple[str, dict[str, Any]]:
            svc = st.service(sid)
            if svc is None:
                raise HTTPError(404, f"unknown service ID: {sid}")
            authz.require("service", "read", svc["Service"])
            body = agent_service_json(svc, dc)
            h = content_hash(body)
            return h, _with_hash(body, h)

        h, body = run()
        if opts.hash and h == opts.hash:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + block_timeout(opts.wait)
            while h == opts.hash:
                events = ctx.store.watch(["catalog.services"])
                remaining = deadline - loop.time()
                if remaining <= 0 or ctx.store.closed:
                    break
                await ctx.store.wait_any(events, remaining)
                h, body = run()
        return json_response(body, headers={"X-Consul-ContentHash": h})

    # -- agent health by service ----------------------------------------------------------------

    def service_health(sid: str) -> tuple[str, list[dict[str, Any]]]:
        checks = [c for c in st.local_checks() if c["ServiceID"] in (sid, "")]
        api = [_api_check(c) for c in checks]
        return _aggregated(checks), api

    @router.route("/v1/agent/health/service/id/", "GET")
    async def health_by_id(req: Request) -> Response:
        sid = req.suffix
        if sid == "":
            raise HTTPError(400, "Missing serviceID")
        req.reject_enterprise_tenancy()
        authz = req.authz
        svc = st.service(sid)
        if svc is not None:
            authz.require("service", "read", svc["Service"])
            status, api = service_health(sid)
            code = _STATUS_CODES[status]
            if _wants_text(req):
                return Response(code, status.encode(), {}, "text/plain")
            body = {
                "AggregatedStatus": status,
                "Service": agent_service_json(svc, dc),
                "Checks": api,
            }
            return json_response(body, status=code)
        reason = f"ServiceId {sid} not found"
        if _wants_text(req):
            return Response(404, reason.encode(), {}, "text/plain")
        return json_response(
            {"AggregatedStatus": "critical", "Service": None, "Checks": None}, status=404
        )

    @router.route("/v1/agent/health/service/name/", "GET")
    async def health_by_name(req: Request) -> Response:
        name = req.suffix
        if name == "":
            raise HTTPError(400, "Missing service Name")
        req.reject_enterprise_tenancy()
        req.authz.require("service", "read", name)
        code = 404
        status = f"ServiceName {name} Not Found"
        result = []
        for svc in st.local_services():
            if svc["Service"] != name:
                continue
            sstatus, api = service_health(svc["ID"])
            scode = _STATUS_CODES[sstatus]
            result.append(
                {"AggregatedStatus": sstatus, "Service": agent_service_json(svc, dc), "Checks": api}
            )
            if code == 404 or code < scode:
                code, status = scode, sstatus
        if _wants_text(req):
            return Response(code, status.encode(), {}, "text/plain")
        return json_response(result, status=code)

    # -- checks -----------------------------------------------------------------------------------

    @router.route("/v1/agent/checks", "GET")
    async def checks(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        authz = req.authz
        items = [(c, check_json(c)) for c in st.local_checks()]
        items = apply_filter(req, CHECK_SCHEMA, items, key=lambda p: p[1])

        def readable(c: dict[str, Any]) -> bool:
            if c["ServiceID"]:
                return authz.allowed("service", "read", c["ServiceName"])
            return authz.allowed("node", "read", c["Node"])

        kept = [p for p in items if readable(p[0])]
        headers = filtered_header(req, len(kept) != len(items))
        return json_response({c["CheckID"]: body for c, body in kept}, headers=headers)

    def vet_check_update(req: Request, check_id: str) -> dict[str, Any]:
        rec = st.local_check(check_id)
        if rec is None:
            raise HTTPError(
                404,
                f'Unknown check ID "{check_id}". '
                "Ensure that the check ID is passed, not the check name.",
            )
        if rec["ServiceID"]:
            req.authz.require("service", "write", rec["ServiceName"])
        else:
            req.authz.require("node", "write", rec["Node"])
        return rec

    @router.route("/v1/agent/check/register", "PUT")
    async def check_register(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(
                400,
                f"Request decode failed: json: cannot unmarshal {go_json_kind(body)} "
                "into Go value of type structs.CheckDefinition",
            )
        cd = parse_check_def(body, "CheckDefinition")
        if cd.name == "":
            raise HTTPError(400, "Missing check name")
        if cd.status and cd.status not in ("passing", "warning", "critical"):
            raise HTTPError(400, "Bad check status")
        authz = req.authz
        problem = cd.validate()
        if problem:
            raise HTTPError(400, f"Invalid check: {problem}")
        _cap_output_sizes([cd])
        svc = None
        if cd.service_id:
            svc = st.service(cd.service_id)
            if svc is None:
                raise HTTPError(404, f'ServiceID "{cd.service_id}" does not exist')
            authz.require("service", "write", svc["Service"])
        else:
            authz.require("node", "write", node)
        check_id = cd.check_id or cd.name
        existing = st.local_check(check_id)
        if existing is not None:
            if existing["ServiceID"]:
                authz.require("service", "write", existing["ServiceName"])
            else:
                authz.require("node", "write", node)
        rec = check_record(cd, node, svc, check_id, cd.name)
        # CheckDefinition.HealthCheck renders zero durations as Go does ("0s").
        rec["Interval"] = _go_dur(cd.interval)
        rec["Timeout"] = _go_dur(cd.timeout)
        if st.put_check(ctx.store.next_index(), rec):
            st.commit()
        return _empty()

    @router.route("/v1/agent/check/deregister/", "PUT")
    async def check_deregister(req: Request) -> Response:
        check_id = req.suffix
        req.reject_enterprise_tenancy()
        _ = req.authz
        vet_check_update(req, check_id)
        st.delete_check(ctx.store.next_index(), key(node, check_id))
        st.commit()
        return _empty()

    async def ttl_update(req: Request, check_id: str, status: str, output: str) -> Response:
        req.reject_enterprise_tenancy()
        _ = req.authz
        rec = vet_check_update(req, check_id)
        if not rec.get("_ttl"):
            raise HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
        ck = key(node, check_id)
        rec["_ttl_output"] = output
        st.set_check_status(ck, status, output)
        st.arm_ttl(ck)
        return _empty()

    def make_simple(status: str) -> Any:
        async def handler(req: Request) -> Response:
            return await ttl_update(req, req.suffix, status, req.param("note"))

        return handler

    router.add("/v1/agent/check/pass/", ["PUT"], make_simple("passing"))
    router.add("/v1/agent/check/warn/", ["PUT"], make_simple("warning"))
    router.add("/v1/agent/check/fail/", ["PUT"], make_simple("critical"))

    @router.route("/v1/agent/check/update/", "PUT")
    async def check_update(req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(
                400,
                f"Request decode failed: json: cannot unmarshal {go_json_kind(body)} "
                "into Go value of type agent.checkUpdate",
            )
        status = get_ci(body, "Status")
        output = get_ci(body, "Output")
        for name, v in (("Status", status), ("Output", output)):
            if v is not None and not isinstance(v, str):
                raise HTTPError(
                    400,
                    "Request decode failed: json: cannot unmarshal "
                    f"{go_json_kind(v)} into Go struct field "
                    f"checkUpdate.{name} of type string",
                )
        status = status or ""
        if status not in ("passing", "warning", "critical"):
            raise HTTPError(400, f"Invalid check status: '{status}'")
        return await ttl_update(req, req.suffix, status, output or "")


def _has_empty_checks_entry(raw: Any) -> bool:
    """Whether the registration body's ``Checks`` list holds a check that sets nothing."""
    many = get_ci(raw, "Checks") if isinstance(raw, dict) else None
    return isinstance(many, list) and any(
        parse_check_def(c, "ServiceDefinition.Checks").empty for c in many
    )


def _cap_output_sizes(checks: list[CheckDef]) -> None:
    """Apply the agent's ``check_output_max_size`` (4096): a check may only lower it.

    Consul's ``addCheck`` uses ``OutputMaxSize`` only when it is below the agent's limit.
    """
    for cd in checks:
        if cd.output_max_size > OUTPUT_MAX:
            cd.output_max_size = OUTPUT_MAX


def _go_dur(seconds: float) -> str:
    from consul_connect._goduration import format_duration

    return format_duration(seconds)
