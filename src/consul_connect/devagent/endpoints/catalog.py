"""Dev agent endpoints: ``/v1/catalog/*`` and ``/v1/health/*``.

Reads are index-blocking on the catalog tables, filtered by ``?filter=``,
``?tag=``, ``?node-meta=`` and ACLs (entries the token cannot read are
dropped, never a 403), and always answer ``[]`` rather than ``null``.
"""

from __future__ import annotations

from typing import Any

from consul_connect.devagent.catalog_state import (
    CHECK_SCHEMA,
    CHECK_SERVICE_NODE_SCHEMA,
    NODE_SCHEMA,
    NODE_SERVICE_SCHEMA,
    SERVICE_NODE_SCHEMA,
    T_CHECKS,
    T_INDEX,
    T_NODES,
    T_SERVICES,
    CatalogState,
    acl_filter_entries,
    catalog_state,
    check_json,
    check_record,
    check_service_nodes,
    compile_request_filter,
    filtered_header,
    health_index,
    key,
    node_json,
    node_meta_filter,
    node_service_json,
    parse_check_def,
    parse_service_def,
    select_services,
    service_node_json,
    service_record,
    validate_service,
)
from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.http import (
    HTTPError,
    Request,
    Response,
    Router,
    blocking_query,
    cache_headers,
    get_ci,
    go_json_kind,
    json_response,
    query_response,
)

__all__ = ["parse_bool_param", "register"]

_TABLES = (T_NODES, T_SERVICES, T_CHECKS, T_INDEX)
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_bool_param(req: Request, name: str) -> bool | None:
    """Go's ``getBoolQueryParam``: absent → False, empty → True, else ParseBool (None: invalid)."""
    if not req.has(name):
        return False
    raw = req.param(name)
    if raw == "":
        return True
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    return None


def _answer(
    req: Request,
    data: Any,
    index: int,
    headers: dict[str, str],
    *,
    cacheable: bool = False,
    backend: str = "blocking-query",
) -> Response:
    """A catalog/health read: query meta with the consistency level (these handlers record it),
    plus ``X-Cache`` for ``?cached`` reads of endpoints the agent cache serves."""
    if cacheable and req.options.cached:
        headers = {**headers, **cache_headers(req, index)}
    return query_response(
        req, data, index, extra_headers=headers, consistency=True, backend=backend
    )


def _streaming(req: Request) -> bool:
    """Whether Consul would serve this health read from the streaming view: blocking, no near."""
    return req.options.blocking and not req.has("near")


def _filter_non_passing(entries: list[Any]) -> list[Any]:
    """``?passing``: drop entries with any non-passing check, in Consul's order.

    agent/health_endpoint.go filterNonPassing removes an entry by moving the last one into
    its place, so the survivors are not left in catalog order.
    """
    out = list(entries)
    n = len(out)
    i = 0
    while i < n:
        if all(c["Status"] == "passing" for c in out[i]["Checks"]):
            i += 1
            continue
        out[i] = out[n - 1]
        n -= 1
    return out[:n]


def _reads_common(req: Request) -> None:
    req.reject_enterprise_tenancy()
    _ = req.options
    req.check_datacenter()
    _ = req.authz


def register(router: Router, ctx: AgentContext) -> None:
    """Register the catalog and health routes."""
    st: CatalogState = catalog_state(ctx)
    store = ctx.store

    # -- health ---------------------------------------------------------------------------------

    def health_nodes(req: Request, prefix_connect: bool) -> Any:
        name = req.suffix
        if name == "":
            raise HTTPError(400, "Missing service name")
        passing = parse_bool_param(req, "passing")
        if passing is None:
            raise HTTPError(400, "Invalid value for ?passing")
        flt = compile_request_filter(req, CHECK_SERVICE_NODE_SCHEMA)
        tags = req.params("tag") if req.has("tag") else None
        if prefix_connect and not _streaming(req):
            # Health.ServiceNodes (agent/consul/health_endpoint.go) chooses
            # serviceNodesConnect before serviceNodesTagFilter: over RPC a Connect read
            # ignores ?tag. Only the streaming view (blocking reads) applies it.
            tags = None
        meta = node_meta_filter(req)
        authz = req.authz

        def run() -> tuple[int, tuple[list[Any], bool]]:
            idx = health_index(st, name, prefix_connect)
            if prefix_connect and not authz.allowed("service", "read", name):
                return idx, ([], authz.has_token)
            pairs = select_services(st, name, connect=prefix_connect, tags=tags, node_meta=meta)
            entries = flt.apply(check_service_nodes(st, pairs))
            entries, dropped = acl_filter_entries(
                req, entries, lambda e: e["Node"]["Node"], lambda e: e["Service"]["Service"]
            )
            if passing:
                entries = _filter_non_passing(entries)
            return idx, (entries, dropped)

        return run

    async def health_service_like(req: Request, connect: bool) -> Response:
        _reads_common(req)
        run = health_nodes(req, connect)
        idx, (entries, dropped) = await blocking_query(req, _TABLES, run)
        # With use_streaming_backend (on by default) Consul serves blocking health reads
        # from a materialized view through the agent cache; other reads go over RPC,
        # through the cache only with ?cached.
        streaming = _streaming(req)
        headers = filtered_header(req, dropped)
        if streaming or req.options.cached:
            headers.update(cache_headers(req, idx))
        return _answer(
            req, entries, idx, headers, backend="streaming" if streaming else "blocking-query"
        )

    @router.route("/v1/health/service/", "GET")
    async def health_service(req: Request) -> Response:
        return await health_service_like(req, False)

    @router.route("/v1/health/connect/", "GET")
    async def health_connect(req: Request) -> Response:
        return await health_service_like(req, True)

    @router.route("/v1/health/ingress/", "GET")
    async def health_ingress(req: Request) -> Response:
        # No ingress gateways exist in a dev agent: an empty, index-blocking answer.
        _reads_common(req)
        if req.suffix == "":
            raise HTTPError(400, "Missing service name")
        if parse_bool_param(req, "passing") is None:
            raise HTTPError(400, "Invalid value for ?passing")
        idx, _ = await blocking_query(req, _TABLES, lambda: (store.max_index(T_SERVICES), None))
        return _answer(req, [], idx, {})

    def checks_answer(req: Request, pick: Any, index_of: Any) -> Any:
        flt = compile_request_filter(req, CHECK_SCHEMA)
        meta = node_meta_filter(req)

        def run() -> tuple[int, tuple[list[Any], bool]]:
            out = []
            for c in sorted(st.checks.values(), key=lambda c: (c["Node"], c["CheckID"])):
                if not pick(c):
                    continue
                if meta:
                    n = st.nodes.get(c["Node"]) or {}
                    if not all(
                        (n.get("Meta") or {}).get(k) == v and k in (n.get("Meta") or {})
                        for k, v in meta.items()
                    ):
                        continue
                out.append(check_json(c))
            out = flt.apply(out)
            out, dropped = acl_filter_entries(
                req, out, lambda c: c["Node"], lambda c: c["ServiceName"]
            )
            return index_of(), (out, dropped)

        return run

    @router.route("/v1/health/checks/", "GET")
    async def health_checks(req: Request) -> Response:
        _reads_common(req)
        name = req.suffix
        if name == "":
            raise HTTPError(400, "Missing service name")
        lname = name.lower()
        run = checks_answer(
            req,
            lambda c: c["ServiceName"].lower() == lname and c["ServiceID"] != "",
            lambda: health_index(st, name, False),
        )
        idx, (out, dropped) = await blocking_query(req, _TABLES, run)
        return _answer(req, out, idx, filtered_header(req, dropped))

    @router.route("/v1/health/node/", "GET")
    async def health_node(req: Request) -> Response:
        _reads_common(req)
        name = req.suffix
        if name == "":
            raise HTTPError(400, "Missing node name")
        lname = name.lower()
        run = checks_answer(
            req, lambda c: c["Node"].lower() == lname, lambda: store.max_index(T_CHECKS)
        )
        idx, (out, dropped) = await blocking_query(req, _TABLES, run)
        return _answer(req, out, idx, filtered_header(req, dropped))

    @router.route("/v1/health/state/", "GET")
    async def health_state(req: Request) -> Response:
        _reads_common(req)
        state = req.suffix
        if state == "":
            raise HTTPError(400, "Missing check state")
        run = checks_answer(
            req, lambda c: state == "any" or c["Status"] == state, lambda: store.max_index(T_CHECKS)
        )
        idx, (out, dropped) = await blocking_query(req, _TABLES, run)
        return _answer(req, out, idx, filtered_header(req, dropped))

    # -- catalog reads ----------------------------------------------------------------------------

    @router.route("/v1/catalog/datacenters", "GET")
    async def datacenters(req: Request) -> Response:
        return json_response([ctx.config.datacenter])

    @router.route("/v1/catalog/nodes", "GET")
    async def nodes(req: Request) -> Response:
        _reads_common(req)
        flt = compile_request_filter(req, NODE_SCHEMA)
        meta = node_meta_filter(req)

        def run() -> tuple[int, tuple[list[Any], bool]]:
            out = [node_json(n) for n in sorted(st.nodes.values(), key=lambda n: n["Node"])]
            if meta:
                out = [
                    n
                    for n in out
                    if all(k in n["Meta"] and n["Meta"][k] == v for k, v in meta.items())
                ]
            out = flt.apply(out)
            out, dropped = acl_filter_entries(req, out, lambda n: n["Node"], lambda n: "")
            return store.max_index(T_NODES), (out, dropped)

        idx, (out, dropped) = await blocking_query(req, _TABLES, run)
        return _answer(req, out, idx, filtered_header(req, dropped))

    @router.route("/v1/catalog/services", "GET")
    async def services(req: Request) -> Response:
        _reads_common(req)
        flt = compile_request_filter(req, SERVICE_NODE_SCHEMA)
        meta = node_meta_filter(req)

        def run() -> tuple[int, tuple[dict[str, list[str]], bool]]:
            result: dict[str, list[str]] = {}
            dropped = False
            for svc in sorted(
                st.services.values(), key=lambda s: (s["Service"], s["Node"], s["ID"])
            ):
                n = st.nodes.get(svc["Node"])
                if n is None:
                    continue
                if meta and not all(k in n["Meta"] and n["Meta"][k] == v for k, v in meta.items()):
                    continue
                if not flt.matches(service_node_json(svc, n)):
                    continue
                if not req.authz.allowed("service", "read", svc["Service"]):
                    dropped = True
                    continue
                tags = result.setdefault(svc["Service"], [])
                for t in svc["Tags"]:
                    if t not in tags:
                        tags.append(t)
            return store.max_index(T_SERVICES), (result, dropped)

        idx, (out, dropped) = await blocking_query(req, _TABLES, run)
        return _answer(req, out, idx, filtered_header(req, dropped), cacheable=True)

    async def catalog_service_like(req: Request, connect: bool) -> Response:
        _reads_common(req)
        name = req.suffix
        if name == "":
            raise HTTPError(400, "Missing service name")
        flt = compile_request_filter(req, SERVICE_NODE_SCHEMA)
        tags = req.params("tag") if req.has("tag") else None
        meta = node_meta_filter(req)
        authz = req.authz

        def run() -> tuple[int, tuple[list[Any], bool]]:
            idx = health_index(st, name, connect)
            if connect and not authz.allowed("service", "read", name):
                return idx, ([], authz.has_token)
            pairs = select_services(st, name, connect=connect, tags=tags, node_meta=meta)
            out = flt.apply([service_node_json(s, n) for s, n in pairs])
            out, dropped = acl_filter_entries(
                req, out, lambda e: e["Node"], lambda e: e["ServiceName"]
            )
            return idx, (out, dropped)

        idx, (out, dropped) = await blocking_query(req, _TABLES, run)
        return _answer(req, out, idx, filtered_header(req, dropped), cacheable=True)

    @router.route("/v1/catalog/service/", "GET")
    async def catalog_service(req: Request) -> Response:
        return await catalog_service_like(req, False)

    @router.route("/v1/catalog/connect/", "GET")
    async def catalog_connect(req: Request) -> Response:
        return await catalog_service_like(req, True)

    def node_services(req: Request, as_list: bool) -> Any:
        name = req.suffix
        if name == "":
            raise HTTPError(400, "Missing node name")
        flt = compile_request_filter(req, NODE_SERVICE_SCHEMA)
        authz = req.authz

        def run() -> tuple[int, tuple[Any, bool]]:
            idx = max(store.max_index(T_NODES), store.max_index(T_SERVICES))
            n = next((x for x in st.nodes.values() if x["Node"].lower() == name.lower()), None)
            if n is None or not authz.allowed("node", "read", n["Node"]):
                if as_list:
                    return idx, ({"Node": None, "Services": []}, n is not None)
                return idx, (None, n is not None)
            svcs = sorted(
                (s for s in st.services.values() if s["Node"] == n["Node"]), key=lambda s: s["ID"]
            )
            bodies = flt.apply([node_service_json(s) for s in svcs])
            kept = [b for b in bodies if authz.allowed("service", "read", b["Service"])]
            dropped = len(kept) != len(bodies)
            if as_list:
                return idx, ({"Node": node_json(n), "Services": kept}, dropped)
            return idx, ({"Node": node_json(n), "Services": {b["ID"]: b for b in kept}}, dropped)

        return run

    @router.route("/v1/catalog/node/", "GET")
    async def catalog_node(req: Request) -> Response:
        _reads_common(req)
        idx, (out, dropped) = await blocking_query(req, _TABLES, node_services(req, False))
        return _answer(req, out, idx, filtered_header(req, dropped))

    @router.route("/v1/catalog/node-services/", "GET")
    async def catalog_node_services(req: Request) -> Response:
        _reads_common(req)
        idx, (out, dropped) = await blocking_query(req, _TABLES, node_services(req, True))
        return _answer(req, out, idx, filtered_header(req, dropped))

    # -- catalog writes --------------------------------------------------------------------------

    @router.route("/v1/catalog/register", "PUT")
    async def catalog_register(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        req.check_datacenter()
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(
                400,
                f"Request decode failed: json: cannot unmarshal {go_json_kind(body)} into Go "
                "value of type structs.RegisterRequest",
            )
        authz = req.authz
        node_name = get_ci(body, "Node")
        address = get_ci(body, "Address")
        if not isinstance(node_name, str) or node_name == "":
            raise HTTPError(500, "Must provide node")
        svc_raw = get_ci(body, "Service")
        sd = None
        if svc_raw is not None:
            if (
                isinstance(svc_raw, dict)
                and get_ci(svc_raw, "Service") is not None
                and get_ci(svc_raw, "Name") is None
            ):
                svc_raw = {**svc_raw, "Name": get_ci(svc_raw, "Service")}
            sd = parse_service_def(svc_raw, "RegisterRequest.Service")
            if sd.id and sd.name == "":
                raise HTTPError(
                    500, "Must provide service name (Service.Service) with ID (Service.ID)"
                )
            if sd.address in ("0.0.0.0", "::", "[::]"):
                raise HTTPError(500, "Invalid service address")
            errors = validate_service(sd)
            if errors:
                raise HTTPError(500, errors[0])
        existing_node = st.nodes.get(node_name)
        skip_node = bool(get_ci(body, "SkipNodeUpdate")) and existing_node is not None
        if not skip_node and (not isinstance(address, str) or address == ""):
            raise HTTPError(500, "Must provide address")
        if not skip_node:
            authz.require("node", "write", node_name)
        if sd is not None and sd.name:
            authz.require("service", "write", sd.name)
        checks_raw: list[Any] = []
        one = get_ci(body, "Check")
        if one is not None:
            checks_raw.append(one)
        many = get_ci(body, "Checks")
        if isinstance(many, list):
            checks_raw.extend(many)
        check_defs = [parse_check_def(c, "RegisterRequest.Check") for c in checks_raw]
        new_sid = (sd.id or sd.name) if sd is not None else ""
        for cd in check_defs:
            if cd.status and cd.status not in ("passing", "warning", "critical"):
                raise HTTPError(500, f"Invalid check status: {cd.status}")
            # Validate before writing anything: a bad request must leave the catalog as it was.
            if (
                cd.service_id
                and cd.service_id != new_sid
                and st.service(cd.service_id, node_name) is None
            ):
                raise HTTPError(
                    500,
                    f'Unknown service ID "{cd.service_id}" for check ID "{cd.check_id or cd.name}"',
                )
        idx = store.next_index()
        if not skip_node:
            node_id = get_ci(body, "ID") or (existing_node or {}).get("ID") or ""
            tagged = get_ci(body, "TaggedAddresses") or {}
            meta = get_ci(body, "NodeMeta") or {}
            rec = {
                "ID": node_id,
                "Node": node_name,
                "Address": address,
                "Datacenter": ctx.config.datacenter,
                "TaggedAddresses": dict(tagged) if isinstance(tagged, dict) else {},
                "Meta": dict(meta) if isinstance(meta, dict) else {},
            }
            if existing_node is None:
                st.nodes[node_name] = {**rec, "CreateIndex": idx, "ModifyIndex": idx}
            elif any(existing_node.get(k) != v for k, v in rec.items()):
                st.nodes[node_name] = {
                    **rec,
                    "CreateIndex": existing_node["CreateIndex"],
                    "ModifyIndex": idx,
                }
                st.bump_node(idx, node_name)
        svc_rec = None
        if sd is not None and sd.name:
            svc_rec = service_record(sd, node_name)
            st.put_service(idx, svc_rec, [], replace_checks=False)
        for cd, raw in zip(check_defs, checks_raw, strict=True):
            sid = cd.service_id
            svc = st.service(sid, node_name) if sid else None
            crec = check_record(cd, node_name, svc, cd.check_id or cd.name, cd.name)
            crec["Output"] = (get_ci(raw, "Output") or "") if isinstance(raw, dict) else ""
            crec["Type"] = ""
            old = st.checks.get(key(node_name, crec["CheckID"]))
            st.checks[key(node_name, crec["CheckID"])] = {
                **crec,
                "CreateIndex": old["CreateIndex"] if old else idx,
                "ModifyIndex": idx,
            }
            if svc is not None:
                st.bump(idx, st.index_keys(svc))
            else:
                st.bump_node(idx, node_name)
        st.commit()
        return json_response(True)

    @router.route("/v1/catalog/deregister", "PUT")
    async def catalog_deregister(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        req.check_datacenter()
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(
                400,
                f"Request decode failed: json: cannot unmarshal {go_json_kind(body)} into Go "
                "value of type structs.DeregisterRequest",
            )
        authz = req.authz
        node_name = get_ci(body, "Node")
        if not isinstance(node_name, str) or node_name == "":
            raise HTTPError(500, "Must provide node")
        sid = get_ci(body, "ServiceID") or ""
        cid = get_ci(body, "CheckID") or ""
        idx = store.next_index()
        if sid:
            svc = st.service(sid, node_name)
            if svc is not None:
                authz.require("service", "write", svc["Service"])
                st.delete_service(idx, node_name, sid)
        elif cid:
            rec = st.checks.get(key(node_name, cid))
            if rec is not None:
                if rec["ServiceID"]:
                    authz.require("service", "write", rec["ServiceName"])
                else:
                    authz.require("node", "write", node_name)
                st.delete_check(idx, key(node_name, cid))
        else:
            if node_name in st.nodes:
                authz.require("node", "write", node_name)
                for s in [s for s in st.services.values() if s["Node"] == node_name]:
                    st.delete_service(idx, node_name, s["ID"])
                for ck in [k for k, c in st.checks.items() if c["Node"] == node_name]:
                    st.delete_check(idx, ck)
                del st.nodes[node_name]
        st.commit()
        return json_response(True)
