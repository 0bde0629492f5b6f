"""``/v1/health/*`` of the dev agent: shapes, Connect selection, filters, blocking, ACLs."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.http import HTTPError


def register(http: httpx.Client, body: dict[str, Any]) -> None:
    r = http.put("/v1/agent/service/register", json=body)
    assert r.status_code == 200, r.text


@pytest.fixture
def mesh(http: httpx.Client) -> httpx.Client:
    """web: one native instance (passing TTL), one plain instance; a sidecar proxy for web; api."""
    register(
        http,
        {
            "Name": "web",
            "ID": "web-native",
            "Port": 8443,
            "Tags": ["v1"],
            "Connect": {"Native": True},
            "Check": {"TTL": "60s", "Status": "passing"},
        },
    )
    register(
        http,
        {"Name": "web", "ID": "web-plain", "Port": 8080, "Tags": ["v2"], "Meta": {"kind": "plain"}},
    )
    register(
        http,
        {
            "Name": "web-proxy",
            "ID": "web-proxy-1",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": "web"},
            "Check": {"TTL": "60s"},
        },
    )
    register(http, {"Name": "api", "Port": 9000})
    return http


def ids(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(e["Service"]["ID"] for e in entries)


def test_health_service_entry_shape(mesh: httpx.Client, agent: DevAgent) -> None:
    r = mesh.get("/v1/health/service/web")
    assert r.status_code == 200
    assert int(r.headers["X-Consul-Index"]) > 0
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-Effective-Consistency"] == "leader"
    entries = r.json()
    assert ids(entries) == ["web-native", "web-plain"]
    entry = next(e for e in entries if e["Service"]["ID"] == "web-native")
    node = entry["Node"]
    assert node["Node"] == agent.config.node_name
    assert node["Address"] == "127.0.0.1"
    assert node["Datacenter"] == "dc1"
    assert set(node) >= {"ID", "TaggedAddresses", "Meta", "CreateIndex", "ModifyIndex"}
    svc = entry["Service"]
    assert svc["Connect"] == {"Native": True}
    assert svc["Port"] == 8443
    assert svc["PeerName"] == ""
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "service:web-native"]
    serf = entry["Checks"][0]
    assert (serf["Name"], serf["Status"], serf["ServiceTags"]) == (
        "Serf Health Status",
        "passing",
        [],
    )
    plain = next(e for e in entries if e["Service"]["ID"] == "web-plain")
    assert plain["Service"]["Connect"] == {}


def test_health_connect_returns_native_and_proxies_only(mesh: httpx.Client) -> None:
    entries = mesh.get("/v1/health/connect/web").json()
    assert ids(entries) == ["web-native", "web-proxy-1"]
    proxy = next(e for e in entries if e["Service"]["ID"] == "web-proxy-1")
    assert proxy["Service"]["Kind"] == "connect-proxy"
    assert proxy["Service"]["Proxy"]["DestinationServiceName"] == "web"


def test_connect_name_match_is_case_insensitive(mesh: httpx.Client) -> None:
    assert ids(mesh.get("/v1/health/connect/WEB").json()) == ["web-native", "web-proxy-1"]


def test_unknown_service_is_an_empty_list_not_null(mesh: httpx.Client) -> None:
    for path in (
        "/v1/health/service/ghost",
        "/v1/health/connect/ghost",
        "/v1/health/connect/api",
        "/v1/health/checks/ghost",
        "/v1/health/node/ghost",
    ):
        r = mesh.get(path)
        assert (r.status_code, r.json()) == (200, []), path


def test_passing_drops_entries_with_any_non_passing_check(mesh: httpx.Client) -> None:
    assert ids(mesh.get("/v1/health/connect/web", params={"passing": ""}).json()) == ["web-native"]
    assert ids(mesh.get("/v1/health/connect/web", params={"passing": "false"}).json()) == [
        "web-native",
        "web-proxy-1",
    ]
    mesh.put("/v1/agent/check/warn/service:web-native")
    assert mesh.get("/v1/health/connect/web", params={"passing": "1"}).json() == []


def test_invalid_passing_value_is_400(mesh: httpx.Client) -> None:
    r = mesh.get("/v1/health/service/web", params={"passing": "maybe"})
    assert (r.status_code, r.text) == (400, "Invalid value for ?passing")


def test_tags_must_all_match(mesh: httpx.Client) -> None:
    assert ids(mesh.get("/v1/health/service/web", params={"tag": "v1"}).json()) == ["web-native"]
    r = mesh.get("/v1/health/service/web", params=[("tag", "v1"), ("tag", "v2")])
    assert r.json() == []


def test_filter_expression_on_entries(mesh: httpx.Client) -> None:
    r = mesh.get("/v1/health/service/web", params={"filter": 'Service.Meta.kind == "plain"'})
    assert ids(r.json()) == ["web-plain"]
    r = mesh.get("/v1/health/service/web", params={"filter": '"v1" in Service.Tags'})
    assert ids(r.json()) == ["web-native"]
    r = mesh.get("/v1/health/connect/web", params={"filter": 'Checks.Status == "critical"'})
    assert ids(r.json()) == ["web-proxy-1"]
    r = mesh.get("/v1/health/service/web", params={"filter": "Service.Nope == 1"})
    assert r.status_code == 500
    assert r.text.startswith("Failed to create boolean expression evaluator")


def test_node_meta_filter(mesh: httpx.Client) -> None:
    r = mesh.get("/v1/health/service/web", params={"node-meta": "consul-network-segment:"})
    assert ids(r.json()) == ["web-native", "web-plain"]
    assert mesh.get("/v1/health/service/web", params={"node-meta": "rack:a"}).json() == []


def test_other_datacenter_has_no_path(mesh: httpx.Client) -> None:
    r = mesh.get("/v1/health/service/web", params={"dc": "dc9"})
    assert (r.status_code, r.text) == (500, "No path to datacenter")


def test_stale_and_consistent_conflict(mesh: httpx.Client) -> None:
    r = mesh.get("/v1/health/service/web?stale&consistent")
    assert r.status_code == 400
    r = mesh.get("/v1/health/service/web?stale")
    assert r.headers["X-Consul-Effective-Consistency"] == "stale"


def test_near_is_accepted(mesh: httpx.Client) -> None:
    assert mesh.get("/v1/health/service/web", params={"near": "_agent"}).status_code == 200


def test_blocking_health_connect_times_out_with_same_index(mesh: httpx.Client) -> None:
    idx = mesh.get("/v1/health/connect/web").headers["X-Consul-Index"]
    start = time.monotonic()
    r = mesh.get("/v1/health/connect/web", params={"index": idx, "wait": "400ms"})
    elapsed = time.monotonic() - start
    assert r.headers["X-Consul-Index"] == idx
    assert 0.35 <= elapsed < 3


def test_unrelated_changes_do_not_wake_a_health_query(mesh: httpx.Client) -> None:
    idx = mesh.get("/v1/health/connect/web").headers["X-Consul-Index"]
    register(mesh, {"Name": "other", "Port": 1})
    start = time.monotonic()
    r = mesh.get("/v1/health/connect/web", params={"index": idx, "wait": "300ms"})
    assert r.headers["X-Consul-Index"] == idx
    assert time.monotonic() - start >= 0.25


def test_blocking_health_connect_returns_on_change(mesh: httpx.Client, agent: DevAgent) -> None:
    idx = mesh.get("/v1/health/connect/web").headers["X-Consul-Index"]
    result: dict[str, httpx.Response] = {}

    def block() -> None:
        with httpx.Client(base_url=agent.http_addr, timeout=30) as c:
            result["r"] = c.get("/v1/health/connect/web", params={"index": idx, "wait": "10s"})

    t = threading.Thread(target=block)
    start = time.monotonic()
    t.start()
    mesh.put("/v1/agent/check/pass/service:web-proxy-1")
    t.join(10)
    r = result["r"]
    assert time.monotonic() - start < 5
    assert int(r.headers["X-Consul-Index"]) > int(idx)
    proxy = next(e for e in r.json() if e["Service"]["ID"] == "web-proxy-1")
    assert proxy["Checks"][-1]["Status"] == "passing"


def test_ttl_expiry_wakes_a_blocking_health_query(http: httpx.Client) -> None:
    register(
        http,
        {
            "Name": "web",
            "Port": 1,
            "Connect": {"Native": True},
            "Check": {"TTL": "300ms", "Status": "passing"},
        },
    )
    r = http.get("/v1/health/connect/web", params={"passing": ""})
    assert len(r.json()) == 1
    start = time.monotonic()
    r = http.get(
        "/v1/health/connect/web",
        params={"index": r.headers["X-Consul-Index"], "wait": "5s", "passing": ""},
    )
    assert time.monotonic() - start < 3
    assert r.json() == []


def test_health_checks_node_and_state(mesh: httpx.Client, agent: DevAgent) -> None:
    checks = mesh.get("/v1/health/checks/web").json()
    assert [c["CheckID"] for c in checks] == ["service:web-native"]
    node_checks = mesh.get(f"/v1/health/node/{agent.config.node_name}").json()
    assert {c["CheckID"] for c in node_checks} == {
        "serfHealth",
        "service:web-native",
        "service:web-proxy-1",
    }
    critical = mesh.get("/v1/health/state/critical").json()
    assert [c["CheckID"] for c in critical] == ["service:web-proxy-1"]
    assert len(mesh.get("/v1/health/state/any").json()) == 3
    flt = mesh.get("/v1/health/state/any", params={"filter": 'ServiceName == "web-proxy"'}).json()
    assert [c["CheckID"] for c in flt] == ["service:web-proxy-1"]


def test_missing_names_are_400(http: httpx.Client) -> None:
    assert (http.get("/v1/health/service/").text, http.get("/v1/health/service/").status_code) == (
        "Missing service name",
        400,
    )
    assert http.get("/v1/health/node/").text == "Missing node name"
    assert http.get("/v1/health/state/").text == "Missing check state"


class _FakeAuthz:
    """Reads allowed on everything except the service ``secret`` (stands in for real ACLs)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.intention_default_allow = True

    @property
    def has_token(self) -> bool:
        return bool(self.token)

    def allowed(self, resource: str, level: str, name: str = "") -> bool:
        return not (resource == "service" and name == "secret")

    def require(self, resource: str, level: str, name: str = "") -> None:
        if not self.allowed(resource, level, name):
            raise HTTPError(403, "Permission denied")


def test_acl_filtering_drops_unreadable_entries_and_sets_header(
    agent: DevAgent, http: httpx.Client
) -> None:
    register(http, {"Name": "secret", "Port": 1, "Connect": {"Native": True}})
    register(
        http,
        {
            "Name": "secret-proxy",
            "Kind": "connect-proxy",
            "Port": 2,
            "Proxy": {"DestinationServiceName": "secret"},
        },
    )

    def install(ctx: AgentContext) -> None:
        ctx.acl.authorizer = _FakeAuthz  # type: ignore[method-assign,assignment]

    agent.call(install)
    r = http.get("/v1/health/service/secret", headers={"X-Consul-Token": "t"})
    assert (r.status_code, r.json()) == (200, [])
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    r = http.get("/v1/health/service/secret")
    assert r.json() == []
    assert "X-Consul-Results-Filtered-By-ACLs" not in r.headers
    r = http.get("/v1/health/connect/secret", headers={"X-Consul-Token": "t"})
    assert r.json() == []
    r = http.get("/v1/catalog/services", headers={"X-Consul-Token": "t"})
    assert "secret" not in r.json() and "secret-proxy" in r.json()
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
