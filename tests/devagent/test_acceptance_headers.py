"""Acceptance: response headers per endpoint kind, tenancy rejections, consistency and dc.

Consul's rules (agent/http.go ``setMeta`` and the handlers): raft-backed reads carry
``X-Consul-Index`` (never 0), ``X-Consul-KnownLeader``, ``X-Consul-LastContact`` and
``X-Consul-Query-Backend``; only catalog, health, intention match and prepared-query
handlers record ``X-Consul-Effective-Consistency``; agent-local reads carry no index;
reads through the agent cache carry ``X-Cache``; every ``/v1/`` answer carries
``X-Consul-Default-ACL-Policy``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from consul_connect.devagent import DevAgent
from tests.devagent.acceptance_support import ok, snapshot

META = ("X-Consul-Index", "X-Consul-KnownLeader", "X-Consul-LastContact", "X-Consul-Query-Backend")


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[DevAgent, httpx.Client, str]]:
    """One agent with a native service, an intention, a legacy intention and a query."""
    with (
        DevAgent(leaf_root_change_jitter=0) as agent,
        httpx.Client(base_url=agent.http_addr, timeout=30) as c,
    ):
        r = c.put(
            "/v1/agent/service/register",
            json={"Name": "web", "Port": 8443, "Connect": {"Native": True}},
        )
        assert r.status_code == 200
        r = c.put(
            "/v1/config",
            json={
                "Kind": "service-intentions",
                "Name": "web",
                "Sources": [{"Name": "api", "Action": "allow"}],
            },
        )
        assert r.status_code == 200
        ok(
            c.post(
                "/v1/connect/intentions",
                json={"SourceName": "db", "DestinationName": "api", "Action": "allow"},
            )
        )
        qid = c.post("/v1/query", json={"Name": "q1", "Service": {"Service": "web"}}).json()["ID"]
        yield agent, c, qid


RAFT_WITH_CONSISTENCY = [
    "/v1/health/service/web",
    "/v1/health/connect/web",
    "/v1/health/checks/web",
    "/v1/health/state/any",
    "/v1/catalog/services",
    "/v1/catalog/service/web",
    "/v1/catalog/connect/web",
    "/v1/catalog/nodes",
    "/v1/connect/intentions/match?by=destination&name=web",
    "/v1/query",
    "/v1/query/q1/execute?connect=true",
]
RAFT_WITHOUT_CONSISTENCY = [
    "/v1/connect/ca/roots",
    "/v1/connect/ca/roots?pem=true",
    "/v1/connect/intentions",
    "/v1/connect/intentions/exact?source=api&destination=web",
    "/v1/config/service-intentions/web",
    "/v1/config/service-intentions",
]
AGENT_LOCAL = [
    "/v1/agent/self",
    "/v1/status/leader",
    "/v1/status/peers",
    "/v1/agent/services",
    "/v1/agent/checks",
    "/v1/connect/ca/configuration",
    "/v1/connect/intentions/check?source=api&destination=web",
]


@pytest.mark.parametrize("path", RAFT_WITH_CONSISTENCY)
def test_catalog_health_match_and_query_reads_carry_meta_and_consistency(
    mesh: tuple[DevAgent, httpx.Client, str], path: str
) -> None:
    _, c, _ = mesh
    r = c.get(path)
    assert r.status_code == 200, r.text
    for name in META:
        assert name in r.headers, name
    assert int(r.headers["X-Consul-Index"]) > 0
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-LastContact"] == "0"
    assert r.headers["X-Consul-Query-Backend"] == "blocking-query"
    assert r.headers["X-Consul-Effective-Consistency"] == "leader"
    assert r.headers["X-Consul-Default-ACL-Policy"] == "allow"
    assert "X-Cache" not in r.headers


@pytest.mark.parametrize("path", RAFT_WITHOUT_CONSISTENCY)
def test_other_raft_reads_carry_meta_but_no_consistency(
    mesh: tuple[DevAgent, httpx.Client, str], path: str
) -> None:
    _, c, _ = mesh
    r = c.get(path)
    assert r.status_code == 200, r.text
    for name in META:
        assert name in r.headers, name
    assert int(r.headers["X-Consul-Index"]) > 0
    assert "X-Consul-Effective-Consistency" not in r.headers
    assert r.headers["X-Consul-Default-ACL-Policy"] == "allow"


@pytest.mark.parametrize("path", AGENT_LOCAL)
def test_agent_local_reads_carry_no_index(
    mesh: tuple[DevAgent, httpx.Client, str], path: str
) -> None:
    _, c, _ = mesh
    r = c.get(path)
    assert r.status_code == 200, r.text
    for name in (*META, "X-Consul-Effective-Consistency", "X-Cache"):
        assert name not in r.headers, name
    assert r.headers["X-Consul-Default-ACL-Policy"] == "allow"


def test_prepared_query_get_carries_meta_and_consistency(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, qid = mesh
    r = c.get(f"/v1/query/{qid}")
    assert r.headers["X-Consul-Effective-Consistency"] == "leader"
    assert r.headers["X-Consul-Query-Backend"] == "blocking-query"


def test_hash_blocking_service_read_carries_a_content_hash_and_no_index(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, _ = mesh
    r = c.get("/v1/agent/service/web")
    assert r.headers["X-Consul-ContentHash"] == r.json()["ContentHash"]
    assert "X-Consul-Index" not in r.headers


def test_cached_agent_endpoints_answer_x_cache_miss_then_hit(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, _ = mesh
    roots = "/v1/agent/connect/ca/roots"
    first, second = c.get(roots), c.get(roots)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert "Age" not in first.headers
    assert int(second.headers["Age"]) >= 0
    assert int(second.headers["X-Consul-Index"]) > 0
    # Non-blocking leaf reads always revalidate (a MISS); a blocking read that the
    # cached leaf already satisfies is a HIT.
    leaf = c.get("/v1/agent/connect/ca/leaf/web")
    assert leaf.headers["X-Cache"] == "MISS"
    idx = int(leaf.headers["X-Consul-Index"])
    again = c.get("/v1/agent/connect/ca/leaf/web", params={"index": idx - 1})
    assert again.headers["X-Cache"] == "HIT"
    assert again.json()["SerialNumber"] == leaf.json()["SerialNumber"]
    authz = c.post(
        "/v1/agent/connect/authorize",
        json={
            "Target": "web",
            "ClientCertURI": "spiffe://11111111.consul/ns/default/dc/dc1/svc/api",
        },
    )
    assert authz.headers["X-Cache"] in ("MISS", "HIT")
    assert "X-Consul-Index" not in authz.headers


@pytest.mark.parametrize(
    "path",
    [
        "/v1/catalog/services",
        "/v1/catalog/service/web",
        "/v1/catalog/connect/web",
        "/v1/health/service/web",
        "/v1/health/connect/web",
        "/v1/query/q1/execute",
        "/v1/connect/intentions/match?by=destination&name=web",
    ],
)
def test_cached_param_goes_through_the_agent_cache(
    mesh: tuple[DevAgent, httpx.Client, str], path: str
) -> None:
    _, c, _ = mesh
    sep = "&" if "?" in path else "?"
    plain = c.get(path)
    assert "X-Cache" not in plain.headers
    first = c.get(f"{path}{sep}cached")
    second = c.get(f"{path}{sep}cached")
    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] == "HIT"
    assert second.json() == first.json()


def test_blocking_health_reads_use_the_streaming_backend(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, _ = mesh
    idx = c.get("/v1/health/service/web").headers["X-Consul-Index"]
    r = c.get("/v1/health/service/web", params={"index": idx, "wait": "20ms"})
    assert r.headers["X-Consul-Query-Backend"] == "streaming"
    assert r.headers["X-Consul-Index"] == idx
    assert r.headers["X-Cache"] in ("MISS", "HIT")
    catalog = c.get("/v1/catalog/service/web", params={"index": idx, "wait": "20ms"})
    assert catalog.headers["X-Consul-Query-Backend"] == "blocking-query"


def test_config_entry_404_still_carries_the_query_meta(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, _ = mesh
    r = c.get("/v1/config/service-defaults/ghost")
    assert r.status_code == 404
    assert r.text == 'Config entry not found for "service-defaults" / "ghost"'
    assert int(r.headers["X-Consul-Index"]) > 0


def test_handler_errors_are_plain_text_with_the_policy_header(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, _ = mesh
    for r in (c.delete("/v1/agent/services"), c.get("/v1/health/service/")):
        assert r.status_code in (400, 405)
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.headers["X-Consul-Default-ACL-Policy"] == "allow"
    assert c.delete("/v1/agent/services").headers["Allow"] == "GET,OPTIONS"


def test_unrouted_paths_get_the_index_handler_answers(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, _ = mesh
    api = c.get("/v1/nope")
    assert (api.status_code, api.text) == (
        404,
        "Invalid URL path: not a recognized HTTP API endpoint\n",
    )
    for path in ("/v2/status/leader", "/v1", "/ui/"):
        r = c.get(path)
        assert (r.status_code, r.text) == (
            404,
            "Invalid URL path: if attempting to use the HTTP API, ensure the path starts "
            "with '/v1/'\n",
        ), path
    root = c.get("/")
    assert root.status_code == 200
    assert root.text.startswith("Consul Agent: UI disabled.")
    # The index handler is not wrapped: no ACL policy header.
    for r in (api, root):
        assert "X-Consul-Default-ACL-Policy" not in r.headers


# -- consistency and datacenter ------------------------------------------------------------------

CONSISTENCY_PATHS = [
    "/v1/catalog/services",
    "/v1/catalog/service/web",
    "/v1/catalog/connect/web",
    "/v1/health/service/web",
    "/v1/health/connect/web",
    "/v1/health/checks/web",
]


@pytest.mark.parametrize("path", CONSISTENCY_PATHS)
def test_stale_and_consistent_modes_are_reported_and_conflict(
    mesh: tuple[DevAgent, httpx.Client, str], path: str
) -> None:
    _, c, _ = mesh
    base = c.get(path)
    for query, mode in (("stale", "stale"), ("consistent", "consistent"), ("leader", "leader")):
        r = c.get(f"{path}?{query}")
        assert r.status_code == 200
        assert r.headers["X-Consul-Effective-Consistency"] == mode
        assert r.headers["X-Consul-KnownLeader"] == "true"
        assert r.json() == base.json()
    assert c.get(f"{path}?max_stale=5s").headers["X-Consul-Effective-Consistency"] == "stale"
    both = c.get(f"{path}?stale&consistent")
    assert (both.status_code, both.text) == (
        400,
        "Cannot specify ?stale with ?consistent, conflicting semantics.",
    )
    cached = c.get(f"{path}?cached&consistent")
    assert (cached.status_code, cached.text) == (
        400,
        "Cannot specify ?cached with ?consistent, conflicting semantics.",
    )
    bad = c.get(f"{path}?max_stale=soon")
    assert (bad.status_code, bad.text) == (400, 'Invalid max_stale value "soon"')


@pytest.mark.parametrize("path", CONSISTENCY_PATHS)
def test_own_datacenter_answers_and_another_has_no_path(
    mesh: tuple[DevAgent, httpx.Client, str], path: str
) -> None:
    _, c, _ = mesh
    assert c.get(f"{path}?dc=dc1").json() == c.get(path).json()
    r = c.get(f"{path}?dc=elsewhere")
    assert (r.status_code, r.text) == (500, "No path to datacenter")


# -- enterprise tenancy ---------------------------------------------------------------------------

TENANCY_ENDPOINTS = [
    ("GET", "/v1/agent/connect/ca/leaf/web", None),
    ("POST", "/v1/agent/connect/authorize", {"Target": "web", "ClientCertURI": "x"}),
    ("GET", "/v1/connect/intentions", None),
    ("POST", "/v1/connect/intentions", {}),
    ("GET", "/v1/connect/intentions/exact?source=api&destination=web", None),
    ("PUT", "/v1/connect/intentions/exact?source=api&destination=web", {"Action": "deny"}),
    ("DELETE", "/v1/connect/intentions/exact?source=api&destination=web", None),
    ("GET", "/v1/connect/intentions/match?by=destination&name=web", None),
    ("GET", "/v1/connect/intentions/check?source=api&destination=web", None),
    ("PUT", "/v1/config", {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}),
    ("GET", "/v1/config/service-intentions/web", None),
    ("GET", "/v1/config/service-intentions", None),
    ("DELETE", "/v1/config/service-intentions/web", None),
    ("PUT", "/v1/agent/service/register", {"Name": "other", "Port": 1}),
    ("PUT", "/v1/agent/service/deregister/web", None),
    ("GET", "/v1/agent/services", None),
    ("GET", "/v1/agent/service/web", None),
    ("GET", "/v1/agent/checks", None),
    ("PUT", "/v1/agent/check/register", {"Name": "c", "TTL": "1h"}),
    ("PUT", "/v1/agent/check/update/none", {"Status": "passing"}),
    ("GET", "/v1/health/service/web", None),
    ("GET", "/v1/health/connect/web", None),
    ("GET", "/v1/health/checks/web", None),
    ("GET", "/v1/catalog/services", None),
    ("GET", "/v1/catalog/service/web", None),
    ("GET", "/v1/catalog/connect/web", None),
    ("PUT", "/v1/catalog/register", {"Node": "n", "Address": "1.2.3.4"}),
    ("GET", "/v1/query", None),
    ("POST", "/v1/query", {"Name": "qq", "Service": {"Service": "web"}}),
    ("GET", "/v1/query/q1/execute", None),
]


@pytest.mark.parametrize(("method", "path", "body"), TENANCY_ENDPOINTS)
def test_namespace_and_partition_are_refused_as_a_ce_agent_does(
    mesh: tuple[DevAgent, httpx.Client, str], method: str, path: str, body: object
) -> None:
    agent, c, _ = mesh
    before = snapshot(agent)
    sep = "&" if "?" in path else "?"
    for suffix, headers, text in (
        (f"{sep}ns=team", {}, 'Invalid query parameter: "ns" - Namespaces are a Consul '),
        (f"{sep}ns=default", {}, 'Invalid query parameter: "ns" - Namespaces are a Consul '),
        (f"{sep}partition=p", {}, 'Invalid query parameter: "partition" - Partitions are a '),
        ("", {"X-Consul-Namespace": "team"}, 'Invalid header: "X-Consul-Namespace" - Namespaces'),
        ("", {"X-Consul-Partition": "p"}, 'Invalid header: "X-Consul-Partition" - Partitions'),
    ):
        r = c.request(method, path + suffix, json=body, headers=headers)
        assert r.status_code == 400, (path, suffix, r.text)
        assert r.text.startswith(text), r.text
        assert r.text.endswith("are a Consul Enterprise feature")
    assert snapshot(agent) == before


@pytest.mark.parametrize(
    "path", ["/v1/agent/self", "/v1/status/leader", "/v1/agent/connect/ca/roots"]
)
def test_endpoints_that_parse_no_tenancy_ignore_it(
    mesh: tuple[DevAgent, httpx.Client, str], path: str
) -> None:
    _, c, _ = mesh
    assert c.get(f"{path}?ns=team&partition=p").status_code == 200
    assert c.get(path, headers={"X-Consul-Namespace": "team"}).status_code == 200


# -- bad common query values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/v1/health/service/web?index=abc", "Invalid index"),
        ("/v1/health/service/web?index=-1", "Invalid index"),
        ("/v1/catalog/services?wait=forever", "Invalid wait time"),
        ("/v1/catalog/services?wait=10", "Invalid wait time"),
        ("/v1/health/service/web?passing=maybe", "Invalid value for ?passing"),
        ("/v1/connect/ca/roots?pem=maybe", "The 'pem' query parameter must be a boolean value"),
        ("/v1/agent/connect/ca/roots?index=x", "Invalid index"),
        ("/v1/config/service-intentions?wait=1x", "Invalid wait time"),
    ],
)
def test_bad_query_values_are_a_plain_400(
    mesh: tuple[DevAgent, httpx.Client, str], path: str, text: str
) -> None:
    _, c, _ = mesh
    r = c.get(path)
    assert (r.status_code, r.text) == (400, text)


def test_an_unsupported_filter_is_consuls_500_with_its_text(
    mesh: tuple[DevAgent, httpx.Client, str],
) -> None:
    _, c, _ = mesh
    ok = c.get("/v1/health/service/web", params={"filter": "Service.Port == 8443"})
    assert ok.status_code == 200 and len(ok.json()) == 1
    for expr in ("Service.Port ==", "Nope.Field == 1", "Service.Port ~~ 1"):
        r = c.get("/v1/health/service/web", params={"filter": expr})
        assert r.status_code == 500, expr
        assert r.text.startswith("Failed to create boolean expression evaluator")
        assert "Traceback" not in r.text
