"""Dev agent endpoints: prepared queries (``/v1/query`` and ``/v1/query/<id>[/execute|/explain]``).

Queries live in the ``query.prepared`` store table. Execution selects the
service's instances exactly like ``/v1/health/service`` (or, with
``?connect=true`` / ``Service.Connect``, like ``/v1/health/connect``), drops
instances with critical checks (and warning ones with ``OnlyPassing``),
applies tag and metadata filters, shuffles, and honours ``?limit``. There are
no other datacenters, so failover never finds anything (``Failovers: 0``).
"""

from __future__ import annotations

import random
import re
import uuid
from typing import Any

from consul_connect._goduration import parse_duration
from consul_connect.devagent.catalog_state import (
    CatalogState,
    catalog_state,
    check_service_nodes,
    filtered_header,
    select_services,
    validate_meta,
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

__all__ = ["T_QUERIES", "register"]

T_QUERIES = "query.prepared"
_NOT_FOUND = "Query not found"
_REDACTED = "<hidden>"
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def _decode_err(v: Any, where: str, gotype: str) -> HTTPError:
    kind = (
        "bool"
        if isinstance(v, bool)
        else "number"
        if isinstance(v, (int, float))
        else "string"
        if isinstance(v, str)
        else "array"
        if isinstance(v, list)
        else "object"
    )
    return HTTPError(
        400,
        f"Request decode failed: json: cannot unmarshal {kind} "
        f"into Go struct field {where} of type {gotype}",
    )


def _s(obj: dict[str, Any], where: str, name: str) -> str:
    v = get_ci(obj, name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _decode_err(v, where, "string")
    return v


def _o(obj: dict[str, Any], where: str, name: str) -> dict[str, Any]:
    v = get_ci(obj, name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _decode_err(v, where, "object")
    return v


def _strlist_or_none(obj: dict[str, Any], where: str, name: str) -> list[str] | None:
    v = get_ci(obj, name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _decode_err(v, where, "[]string")
    return list(v)


def _strmap_or_none(obj: dict[str, Any], where: str, name: str) -> dict[str, str] | None:
    v = get_ci(obj, name)
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _decode_err(v, where, "map[string]string")
    return dict(v)


def parse_query(raw: Any) -> dict[str, Any]:
    """Decode a prepared query body into its stored (JSON) shape; 400 on type errors."""
    if not isinstance(raw, dict):
        raise HTTPError(
            400,
            f"Request decode failed: json: cannot unmarshal {go_json_kind(raw)} into Go "
            "value of type structs.PreparedQuery",
        )
    svc = _o(raw, "PreparedQuery.Service", "Service")
    failover = _o(svc, "ServiceQuery.Failover", "Failover")
    tmpl = _o(raw, "PreparedQuery.Template", "Template")
    dns = _o(raw, "PreparedQuery.DNS", "DNS")
    connect = _o(svc, "ServiceQuery.Connect", "Connect")
    nearest = get_ci(failover, "NearestN")
    if nearest is not None and (isinstance(nearest, bool) or not isinstance(nearest, int)):
        raise _decode_err(nearest, "QueryFailoverOptions.NearestN", "int")
    only = get_ci(svc, "OnlyPassing")
    if only is not None and not isinstance(only, bool):
        raise _decode_err(only, "ServiceQuery.OnlyPassing", "bool")
    enabled = get_ci(connect, "Enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise _decode_err(enabled, "QueryConnect.Enabled", "bool")
    remove_empty = get_ci(tmpl, "RemoveEmptyTags")
    targets = get_ci(failover, "Targets")
    fo: dict[str, Any] = {
        "NearestN": nearest or 0,
        "Datacenters": _strlist_or_none(
            failover, "QueryFailoverOptions.Datacenters", "Datacenters"
        ),
    }
    if isinstance(targets, list) and targets:
        fo["Targets"] = targets
    return {
        "ID": _s(raw, "PreparedQuery.ID", "ID"),
        "Name": _s(raw, "PreparedQuery.Name", "Name"),
        "Session": _s(raw, "PreparedQuery.Session", "Session"),
        "Token": _s(raw, "PreparedQuery.Token", "Token"),
        "Template": {
            "Type": _s(tmpl, "QueryTemplateOptions.Type", "Type"),
            "Regexp": _s(tmpl, "QueryTemplateOptions.Regexp", "Regexp"),
            "RemoveEmptyTags": bool(remove_empty),
        },
        "Service": {
            "Service": _s(svc, "ServiceQuery.Service", "Service"),
            "Failover": fo,
            "OnlyPassing": bool(only),
            "IgnoreCheckIDs": _strlist_or_none(
                svc, "ServiceQuery.IgnoreCheckIDs", "IgnoreCheckIDs"
            ),
            "Near": _s(svc, "ServiceQuery.Near", "Near"),
            "Tags": _strlist_or_none(svc, "ServiceQuery.Tags", "Tags"),
            "NodeMeta": _strmap_or_none(svc, "ServiceQuery.NodeMeta", "NodeMeta"),
            "ServiceMeta": _strmap_or_none(svc, "ServiceQuery.ServiceMeta", "ServiceMeta"),
            "Peer": _s(svc, "ServiceQuery.Peer", "Peer"),
            "Connect": {"Enabled": bool(enabled)},
        },
        "DNS": {"TTL": _s(dns, "QueryDNSOptions.TTL", "TTL")},
        "CreateIndex": 0,
        "ModifyIndex": 0,
    }


def validation_error(q: dict[str, Any]) -> str | None:
    """Consul's ``parseQuery`` error (without the ``Invalid prepared query:`` prefix), or None."""
    tmpl = q["Template"]
    if tmpl["Type"] not in ("", "name_prefix_match"):
        return f"Bad Template.Type '{tmpl['Type']}'"
    if tmpl["Regexp"]:
        try:
            re.compile(tmpl["Regexp"])
        except re.error as exc:
            return f"Bad Regexp: {exc}"
    if q["Name"] == "" and tmpl["Type"] == "" and q["Session"] == "":
        return "Must be bound to a session"
    if q["Token"] == _REDACTED:
        return (
            f"Bad Token '{_REDACTED}', it looks like a query definition "
            "with a redacted token was submitted"
        )
    svc = q["Service"]
    if svc["Service"] == "":
        return "Must provide a Service name to query"
    fo = svc["Failover"]
    if fo["NearestN"] < 0:
        return f"Bad NearestN '{fo['NearestN']}', must be >= 0"
    if (fo["NearestN"] != 0 or fo["Datacenters"]) and fo.get("Targets"):
        return "Targets cannot be populated with NearestN or Datacenters"
    if svc["NodeMeta"]:
        problem = validate_meta(
            {k: v for k, v in svc["NodeMeta"].items() if not k.startswith("consul-")}
        )
        if problem:
            return problem
    ttl = q["DNS"]["TTL"]
    if ttl:
        try:
            seconds = parse_duration(ttl)
        except ValueError:
            return f"Bad DNS TTL '{ttl}': time: invalid duration \"{ttl}\""
        if seconds < 0:
            return f"DNS TTL '{round(seconds * 1e9)}', must be >=0"
    return None


def _interpolate(q: dict[str, Any], name: str) -> dict[str, Any]:
    """Render a ``name_prefix_match`` template for the looked-up ``name``."""
    prefix = q["Name"]
    groups: list[str] = []
    if q["Template"]["Regexp"]:
        m = re.search(q["Template"]["Regexp"], name)
        if m is not None:
            groups = [m.group(0), *[g or "" for g in m.groups()]]
    values = {
        "name.full": name,
        "name.prefix": prefix,
        "name.suffix": name[len(prefix) :] if name.startswith(prefix) else name,
        "agent.segment": "",
    }

    def render(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            expr = m.group(1).strip()
            mm = re.fullmatch(r"match\((\d+)\)", expr)
            if mm:
                i = int(mm.group(1))
                return groups[i] if i < len(groups) else ""
            return values.get(expr) or ""

        return re.sub(r"\$\{([^}]*)\}", sub, text)

    out = {**q, "Service": dict(q["Service"])}
    svc = out["Service"]
    svc["Service"] = render(svc["Service"])
    svc["Near"] = render(svc["Near"])
    if svc["Tags"]:
        tags = [render(t) for t in svc["Tags"]]
        if q["Template"]["RemoveEmptyTags"]:
            tags = [t for t in tags if t]
        svc["Tags"] = tags
    for field in ("NodeMeta", "ServiceMeta"):
        if svc[field]:
            svc[field] = {k: render(v) for k, v in svc[field].items()}
    return out


def register(router: Router, ctx: AgentContext) -> None:
    """Register the prepared query routes."""
    st: CatalogState = catalog_state(ctx)
    store = ctx.store
    store.table(T_QUERIES)

    def queries() -> dict[str, Any]:
        return store.table(T_QUERIES)

    def present(req: Request, q: dict[str, Any]) -> dict[str, Any]:
        out = dict(q)
        if out["Token"] and ctx.acl.enabled and not req.authz.allowed("acl", "write"):
            out["Token"] = _REDACTED
        return out

    def readable(req: Request, q: dict[str, Any]) -> bool:
        prefix = q["Name"] if q["Name"] else None
        return prefix is None or req.authz.allowed("query", "read", prefix)

    def resolve(id_or_name: str) -> dict[str, Any] | None:
        # The state store indexes names lowercased (agent/consul/state/prepared_query.go:
        # "name" is a StringFieldIndex with Lowercase, templates too), so lookups by name
        # ignore case, as DNS (which lowercases the whole question) relies on.
        qs = queries()
        if id_or_name in qs:
            return dict(qs[id_or_name])
        lname = id_or_name.lower()
        for q in qs.values():
            if q["Name"].lower() == lname and q["Template"]["Type"] == "":
                return dict(q)
        best = None
        for q in qs.values():
            if (
                q["Template"]["Type"] == "name_prefix_match"
                and lname.startswith(q["Name"].lower())
                and (best is None or len(q["Name"]) > len(best["Name"]))
            ):
                best = q
        return _interpolate(dict(best), id_or_name) if best is not None else None

    def check_unique_name(q: dict[str, Any]) -> None:
        if not q["Name"]:
            return
        for other in queries().values():
            if other["ID"] == q["ID"]:
                continue
            if other["Name"].lower() == q["Name"].lower():
                raise HTTPError(500, f"Name '{q['Name']}' aliases an existing query name")
            if other["ID"] == q["Name"]:
                raise HTTPError(500, f"Name '{q['Name']}' aliases an existing query ID")

    def write_checks(req: Request, q: dict[str, Any]) -> None:
        if q["Name"]:
            req.authz.require("query", "write", q["Name"])
        problem = validation_error(q)
        if problem:
            raise HTTPError(500, f"Invalid prepared query: {problem}")

    # -- /v1/query ------------------------------------------------------------------------

    @router.route("/v1/query", "GET", "POST")
    async def general(req: Request) -> Response:
        req.reject_enterprise_tenancy()
        if req.method == "POST":
            req.check_datacenter()
            q = parse_query(req.json())
            _ = req.authz
            if q["ID"]:
                raise HTTPError(500, "ID must be empty when creating a new prepared query")
            q["ID"] = str(uuid.uuid4())
            write_checks(req, q)
            check_unique_name(q)
            idx = store.next_index()
            q["CreateIndex"] = q["ModifyIndex"] = idx
            queries()[q["ID"]] = q
            store.commit(T_QUERIES)
            return json_response({"ID": q["ID"]})
        _ = req.options
        req.check_datacenter()
        _ = req.authz

        def run() -> tuple[int, tuple[list[Any], bool]]:
            all_q = sorted(queries().values(), key=lambda q: q["ID"])
            kept = [present(req, q) for q in all_q if readable(req, q)]
            return store.max_index(T_QUERIES), (kept, len(kept) != len(all_q))

        idx, (out, dropped) = await blocking_query(req, [T_QUERIES], run)
        return query_response(
            req, out, idx, extra_headers=filtered_header(req, dropped), consistency=True
        )

    # -- /v1/query/<id>[/execute|/explain] ---------------------------------------------------------

    @router.route("/v1/query/", "GET", "PUT", "DELETE")
    async def specific(req: Request) -> Response:
        path = req.suffix
        req.reject_enterprise_tenancy()
        if path.endswith("/execute") or path.endswith("/explain"):
            if req.method != "GET":
                raise HTTPError(405, f"method {req.method} not allowed", {"Allow": "GET,OPTIONS"})
            ident, _, action = path.rpartition("/")
            return await (execute(req, ident) if action == "execute" else explain(req, ident))
        if req.method == "GET":
            return await get_one(req, path)
        if req.method == "PUT":
            return update(req, path)
        return delete(req, path)

    async def get_one(req: Request, qid: str) -> Response:
        _ = req.options
        req.check_datacenter()
        _ = req.authz

        def run() -> tuple[int, list[Any]]:
            q = queries().get(qid)
            if q is None:
                raise HTTPError(404, _NOT_FOUND)
            if not readable(req, q):
                req.authz.require("query", "read", q["Name"])
            return store.max_index(T_QUERIES), [present(req, q)]

        idx, out = await blocking_query(req, [T_QUERIES], run)
        return query_response(req, out, idx, consistency=True)

    def update(req: Request, qid: str) -> Response:
        req.check_datacenter()
        q = parse_query(req.json()) if req.body.strip() else parse_query({})
        _ = req.authz
        q["ID"] = qid
        write_checks(req, q)
        old = queries().get(qid)
        if old is None:
            raise HTTPError(500, f"Cannot modify non-existent prepared query: '{qid}'")
        if old["Name"]:
            req.authz.require("query", "write", old["Name"])
        check_unique_name(q)
        idx = store.next_index()
        q["CreateIndex"] = old["CreateIndex"]
        q["ModifyIndex"] = idx
        queries()[qid] = q
        store.commit(T_QUERIES)
        return Response(200, b"", {}, None)

    def delete(req: Request, qid: str) -> Response:
        req.check_datacenter()
        _ = req.authz
        old = queries().get(qid)
        if old is None:
            raise HTTPError(500, f"Cannot modify non-existent prepared query: '{qid}'")
        if old["Name"]:
            req.authz.require("query", "write", old["Name"])
        del queries()[qid]
        store.commit(T_QUERIES)
        return Response(200, b"", {}, None)

    def parse_limit(req: Request) -> int:
        raw = req.param("limit")
        if raw == "":
            return 0
        if not re.fullmatch(r"[+-]?[0-9]+", raw):
            raise HTTPError(500, f'Bad limit: strconv.Atoi: parsing "{raw}": invalid syntax')
        return int(raw)

    def parse_connect(req: Request) -> bool:
        raw = req.param("connect")
        if raw == "":
            return False
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise HTTPError(
            500,
            f"Error parsing 'connect' value: strconv.ParseBool: parsing \"{raw}\": invalid syntax",
        )

    def meta(consistency: str, index: int) -> dict[str, Any]:
        return {
            "Index": max(index, 1),
            "LastContact": 0,
            "KnownLeader": True,
            "ConsistencyLevel": consistency,
            "NotModified": False,
            "Backend": 0,
        }

    async def execute(req: Request, ident: str) -> Response:
        opts = req.options
        req.check_datacenter()
        limit = parse_limit(req)
        connect = parse_connect(req)
        _ = req.authz
        q = resolve(ident)
        if q is None:
            raise HTTPError(404, _NOT_FOUND)
        svc = q["Service"]
        use_connect = connect or svc["Connect"]["Enabled"]
        pairs = select_services(st, svc["Service"], connect=use_connect)
        entries = check_service_nodes(st, pairs)
        ignore = set(svc["IgnoreCheckIDs"] or [])

        def healthy(e: dict[str, Any]) -> bool:
            for c in e["Checks"]:
                if c["CheckID"] in ignore:
                    continue
                if c["Status"] == "critical" or (svc["OnlyPassing"] and c["Status"] == "warning"):
                    return False
            return True

        entries = [e for e in entries if healthy(e)]
        if svc["NodeMeta"]:
            entries = [
                e
                for e in entries
                if all(
                    e["Node"]["Meta"].get(k) == v and k in e["Node"]["Meta"]
                    for k, v in svc["NodeMeta"].items()
                )
            ]
        if svc["ServiceMeta"]:
            entries = [
                e
                for e in entries
                if all(
                    e["Service"]["Meta"].get(k) == v and k in e["Service"]["Meta"]
                    for k, v in svc["ServiceMeta"].items()
                )
            ]
        if svc["Tags"]:
            must = [t.lower() for t in svc["Tags"] if not t.startswith("!")]
            nots = [t[1:].lower() for t in svc["Tags"] if t.startswith("!")]

            def tags_ok(e: dict[str, Any]) -> bool:
                have = {t.lower() for t in e["Service"]["Tags"]}
                return all(t in have for t in must) and not any(t in have for t in nots)

            entries = [e for e in entries if tags_ok(e)]
        authz = req.authz
        before = len(entries)
        entries = [
            e
            for e in entries
            if authz.allowed("node", "read", e["Node"]["Node"])
            and authz.allowed("service", "read", e["Service"]["Service"])
        ]
        dropped = len(entries) != before
        random.shuffle(entries)
        near = req.param("near") or svc["Near"]
        if near == "_agent":
            near = ctx.config.node_name
        if near:
            for i, e in enumerate(entries[:10]):
                if e["Node"]["Node"].lower() == near.lower():
                    entries[0], entries[i] = entries[i], entries[0]
                    break
        if limit > 0:
            entries = entries[:limit]
        index = store.max_index(
            *(t for t in ("catalog.services", "catalog.checks", "catalog.nodes"))
        )
        body = {
            "Service": svc["Service"],
            "Nodes": entries,
            "DNS": {"TTL": q["DNS"]["TTL"]},
            "Datacenter": ctx.config.datacenter,
            # structs.PreparedQueryExecuteResponse: PeerName has no omitempty.
            "PeerName": "",
            "Failovers": 0,
            **meta(opts.consistency, index),
            # Execute filters Nodes directly (filterACL(token, &reply.Nodes)), which
            # never sets the QueryMeta flag.
            "ResultsFilteredByACLs": False,
        }
        headers = filtered_header(req, dropped)
        if opts.cached:
            headers.update(cache_headers(req, index))
        return query_response(req, body, index, extra_headers=headers, consistency=True)

    async def explain(req: Request, ident: str) -> Response:
        opts = req.options
        req.check_datacenter()
        parse_limit(req)
        _ = req.authz
        q = resolve(ident)
        if q is None:
            raise HTTPError(404, _NOT_FOUND)
        if not readable(req, q):
            req.authz.require("query", "read", q["Name"])
        index = store.max_index(T_QUERIES)
        body = {"Query": present(req, q), **meta(opts.consistency, index)}
        return query_response(req, body, index, consistency=True)
