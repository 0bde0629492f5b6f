"""``/v1/catalog/*`` of the dev agent: service nodes, connect, nodes, writes, blocking."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent


def register(http: httpx.Client, body: dict[str, Any]) -> None:
    r = http.put("/v1/agent/service/register", json=body)
    assert r.status_code == 200, r.text


@pytest.fixture
def seeded(http: httpx.Client) -> httpx.Client:
    register(
        http,
        {
            "Name": "web",
            "ID": "web-1",
            "Port": 8443,
            "Tags": ["v1", "blue"],
            "Meta": {"version": "1"},
            "Connect": {"Native": True},
        },
    )
    register(http, {"Name": "web", "ID": "web-2", "Port": 8444, "Tags": ["v1"]})
    register(
        http,
        {
            "Name": "web-sidecar",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {
                "DestinationServiceName": "web",
                "DestinationServiceID": "web-2",
                "LocalServicePort": 8444,
            },
        },
    )
    return http


SERVICE_NODE_KEYS = [
    "ID",
    "Node",
    "Address",
    "Datacenter",
    "TaggedAddresses",
    "NodeMeta",
    "ServiceKind",
    "ServiceID",
    "ServiceName",
    "ServiceTags",
    "ServiceAddress",
    "ServiceWeights",
    "ServiceMeta",
    "ServicePort",
    "ServiceSocketPath",
    "ServiceEnableTagOverride",
    "ServiceProxy",
    "ServiceConnect",
    "ServiceLocality",
    "CreateIndex",
    "ModifyIndex",
]


def test_catalog_service_returns_flat_service_nodes(seeded: httpx.Client, agent: DevAgent) -> None:
    r = seeded.get("/v1/catalog/service/web")
    assert r.status_code == 200
    assert int(r.headers["X-Consul-Index"]) > 0
    nodes = r.json()
    assert [n["ServiceID"] for n in nodes] == ["web-1", "web-2"]
    first = nodes[0]
    assert list(first) == SERVICE_NODE_KEYS
    assert first["Node"] == agent.config.node_name
    assert agent.app is not None
    assert first["ID"] == agent.app.ctx.node_id
    assert first["ServiceConnect"] == {"Native": True}
    assert first["ServiceWeights"] == {"Passing": 1, "Warning": 1}
    assert first["ServiceMeta"] == {"version": "1"}
    assert nodes[1]["ServiceConnect"] == {}
    assert nodes[1]["ServiceProxy"] == {"Mode": "", "MeshGateway": {}, "Expose": {}}


def test_catalog_connect_selects_native_and_proxies(seeded: httpx.Client) -> None:
    nodes = seeded.get("/v1/catalog/connect/web").json()
    assert [n["ServiceID"] for n in nodes] == ["web-1", "web-sidecar"]
    proxy = nodes[1]
    assert proxy["ServiceKind"] == "connect-proxy"
    assert proxy["ServiceProxy"]["DestinationServiceName"] == "web"
    assert proxy["ServiceProxy"]["LocalServicePort"] == 8444


def test_catalog_service_tag_and_filter(seeded: httpx.Client) -> None:
    assert [
        n["ServiceID"] for n in seeded.get("/v1/catalog/service/web", params={"tag": "blue"}).json()
    ] == ["web-1"]
    r = seeded.get("/v1/catalog/service/web", params={"filter": "ServicePort == 8444"})
    assert [n["ServiceID"] for n in r.json()] == ["web-2"]
    r = seeded.get("/v1/catalog/service/web", params={"filter": "Bogus == 1"})
    assert r.status_code == 500
    assert r.text.startswith("Failed to create boolean expression evaluator")


def test_catalog_unknown_service_is_empty_list(seeded: httpx.Client) -> None:
    assert seeded.get("/v1/catalog/service/ghost").json() == []
    assert seeded.get("/v1/catalog/connect/ghost").json() == []


def test_catalog_services_maps_names_to_tags(seeded: httpx.Client) -> None:
    r = seeded.get("/v1/catalog/services")
    assert r.json() == {"web": ["v1", "blue"], "web-sidecar": []}
    assert int(r.headers["X-Consul-Index"]) > 0


def test_catalog_nodes_and_node(seeded: httpx.Client, agent: DevAgent) -> None:
    name = agent.config.node_name
    nodes = seeded.get("/v1/catalog/nodes").json()
    assert [n["Node"] for n in nodes] == [name]
    assert nodes[0]["Address"] == "127.0.0.1"
    node = seeded.get(f"/v1/catalog/node/{name}").json()
    assert node["Node"]["Node"] == name
    assert set(node["Services"]) == {"web-1", "web-2", "web-sidecar"}
    assert node["Services"]["web-1"]["Connect"] == {"Native": True}
    assert seeded.get("/v1/catalog/node/ghost").json() is None
    listed = seeded.get(f"/v1/catalog/node-services/{name}").json()
    assert sorted(s["ID"] for s in listed["Services"]) == ["web-1", "web-2", "web-sidecar"]


def test_catalog_datacenters(http: httpx.Client) -> None:
    assert http.get("/v1/catalog/datacenters").json() == ["dc1"]


def test_catalog_register_and_deregister_another_node(http: httpx.Client) -> None:
    body = {
        "Node": "ext-1",
        "Address": "192.0.2.10",
        "Service": {"Service": "legacy", "ID": "legacy-1", "Port": 80},
        "Check": {
            "CheckID": "legacy-alive",
            "Name": "alive",
            "Status": "passing",
            "ServiceID": "legacy-1",
        },
    }
    r = http.put("/v1/catalog/register", json=body)
    assert (r.status_code, r.json()) == (200, True)
    entries = http.get("/v1/health/service/legacy").json()
    assert len(entries) == 1
    assert entries[0]["Node"]["Address"] == "192.0.2.10"
    assert [c["Status"] for c in entries[0]["Checks"]] == ["passing"]
    assert {n["Node"] for n in http.get("/v1/catalog/nodes").json()} >= {"ext-1"}
    # not an agent-local service
    assert "legacy-1" not in http.get("/v1/agent/services").json()
    r = http.put("/v1/catalog/deregister", json={"Node": "ext-1"})
    assert (r.status_code, r.json()) == (200, True)
    assert http.get("/v1/catalog/service/legacy").json() == []


def test_catalog_register_errors(http: httpx.Client) -> None:
    r = http.put("/v1/catalog/register", json={"Address": "192.0.2.1"})
    assert (r.status_code, r.text) == (500, "Must provide node")
    r = http.put("/v1/catalog/register", json={"Node": "x"})
    assert (r.status_code, r.text) == (500, "Must provide address")
    r = http.put("/v1/catalog/register", content=b"[")
    assert r.status_code == 400
    r = http.put(
        "/v1/catalog/register",
        json={
            "Node": "ext-2",
            "Address": "192.0.2.2",
            "Check": {"Name": "c", "ServiceID": "ghost"},
        },
    )
    assert (r.status_code, r.text) == (500, 'Unknown service ID "ghost" for check ID "c"')
    assert "ext-2" not in {n["Node"] for n in http.get("/v1/catalog/nodes").json()}


def test_catalog_blocking_returns_on_change_and_times_out(seeded: httpx.Client) -> None:
    idx = seeded.get("/v1/catalog/service/web").headers["X-Consul-Index"]
    start = time.monotonic()
    r = seeded.get("/v1/catalog/service/web", params={"index": idx, "wait": "300ms"})
    assert r.headers["X-Consul-Index"] == idx
    assert time.monotonic() - start >= 0.25
    register(seeded, {"Name": "web", "ID": "web-3", "Port": 1})
    r = seeded.get("/v1/catalog/service/web", params={"index": idx, "wait": "5s"})
    assert int(r.headers["X-Consul-Index"]) > int(idx)
    assert len(r.json()) == 3


def test_catalog_services_index_follows_registrations(http: httpx.Client) -> None:
    first = int(http.get("/v1/catalog/services").headers["X-Consul-Index"])
    register(http, {"Name": "x", "Port": 1})
    second = int(http.get("/v1/catalog/services").headers["X-Consul-Index"])
    assert second > first
    http.put("/v1/agent/service/deregister/x")
    assert http.get("/v1/catalog/services").json() == {}
    assert int(http.get("/v1/catalog/services").headers["X-Consul-Index"]) > second


def test_catalog_reads_reject_enterprise_partition(http: httpx.Client) -> None:
    r = http.get("/v1/catalog/service/web", params={"partition": "default"})
    assert r.status_code == 400
    assert "Partitions are a Consul Enterprise feature" in r.text
