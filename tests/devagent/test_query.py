"""Prepared queries of the dev agent: CRUD, validation texts, execution (incl. ``connect=true``)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest


def register(http: httpx.Client, body: dict[str, Any]) -> None:
    r = http.put("/v1/agent/service/register", json=body)
    assert r.status_code == 200, r.text


def create(http: httpx.Client, body: dict[str, Any]) -> str:
    r = http.post("/v1/query", json=body)
    assert r.status_code == 200, r.text
    qid: str = r.json()["ID"]
    return qid


@pytest.fixture
def mesh(http: httpx.Client) -> httpx.Client:
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
        {
            "Name": "web",
            "ID": "web-plain",
            "Port": 8080,
            "Tags": ["v2"],
            "Check": {"TTL": "60s", "Status": "warning"},
        },
    )
    register(http, {"Name": "web", "ID": "web-down", "Port": 8081, "Check": {"TTL": "60s"}})
    register(
        http,
        {
            "Name": "web-proxy",
            "ID": "web-proxy-1",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": "web"},
        },
    )
    return http


def node_ids(body: dict[str, Any]) -> list[str]:
    return sorted(n["Service"]["ID"] for n in body["Nodes"])


def test_create_get_list_update_delete(http: httpx.Client) -> None:
    qid = create(
        http,
        {"Name": "web-q", "Service": {"Service": "web", "Tags": ["v1"]}, "DNS": {"TTL": "10s"}},
    )
    got = http.get(f"/v1/query/{qid}")
    assert got.status_code == 200
    assert int(got.headers["X-Consul-Index"]) > 0
    [q] = got.json()
    assert q["ID"] == qid
    assert q["Name"] == "web-q"
    assert q["Service"]["Service"] == "web"
    assert q["Service"]["Tags"] == ["v1"]
    assert q["DNS"] == {"TTL": "10s"}
    assert q["CreateIndex"] == q["ModifyIndex"] > 0
    assert [x["ID"] for x in http.get("/v1/query").json()] == [qid]
    r = http.put(f"/v1/query/{qid}", json={"Name": "web-q", "Service": {"Service": "api"}})
    assert (r.status_code, r.content) == (200, b"")
    [q2] = http.get(f"/v1/query/{qid}").json()
    assert q2["Service"]["Service"] == "api"
    assert q2["ModifyIndex"] > q2["CreateIndex"]
    assert http.delete(f"/v1/query/{qid}").status_code == 200
    assert http.get("/v1/query").json() == []
    r = http.get(f"/v1/query/{qid}")
    assert (r.status_code, r.text) == (404, "Query not found")


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"Name": "q"}, "Invalid prepared query: Must provide a Service name to query"),
        ({"Service": {"Service": "web"}}, "Invalid prepared query: Must be bound to a session"),
        (
            {"Name": "q", "Service": {"Service": "web", "Failover": {"NearestN": -1}}},
            "Invalid prepared query: Bad NearestN '-1', must be >= 0",
        ),
        (
            {"Name": "q", "Service": {"Service": "web"}, "DNS": {"TTL": "soon"}},
            "Invalid prepared query: Bad DNS TTL 'soon': time: invalid duration \"soon\"",
        ),
        (
            {"Name": "q", "Template": {"Type": "weird"}, "Service": {"Service": "web"}},
            "Invalid prepared query: Bad Template.Type 'weird'",
        ),
        (
            {"ID": "abc", "Name": "q", "Service": {"Service": "web"}},
            "ID must be empty when creating a new prepared query",
        ),
    ],
)
def test_create_validation_errors(http: httpx.Client, body: dict[str, Any], text: str) -> None:
    r = http.post("/v1/query", json=body)
    assert (r.status_code, r.text) == (500, text)
    assert http.get("/v1/query").json() == []


def test_duplicate_name_is_rejected(http: httpx.Client) -> None:
    create(http, {"Name": "q", "Service": {"Service": "web"}})
    r = http.post("/v1/query", json={"Name": "q", "Service": {"Service": "api"}})
    assert (r.status_code, r.text) == (500, "Name 'q' aliases an existing query name")


def test_bad_json_and_unknown_update_delete(http: httpx.Client) -> None:
    r = http.post("/v1/query", content=b"{")
    assert r.status_code == 400
    assert r.text.startswith("Request decode failed")
    r = http.put("/v1/query/nope", json={"Name": "q", "Service": {"Service": "web"}})
    assert (r.status_code, r.text) == (500, "Cannot modify non-existent prepared query: 'nope'")
    r = http.delete("/v1/query/nope")
    assert (r.status_code, r.text) == (500, "Cannot modify non-existent prepared query: 'nope'")


def test_execute_drops_critical_and_returns_shape(mesh: httpx.Client) -> None:
    create(mesh, {"Name": "web-q", "Service": {"Service": "web"}, "DNS": {"TTL": "5s"}})
    r = mesh.get("/v1/query/web-q/execute")
    assert r.status_code == 200
    body = r.json()
    assert body["Service"] == "web"
    assert body["Datacenter"] == "dc1"
    assert body["Failovers"] == 0
    assert body["DNS"] == {"TTL": "5s"}
    assert body["Index"] > 0
    assert node_ids(body) == ["web-native", "web-plain"]
    entry = next(n for n in body["Nodes"] if n["Service"]["ID"] == "web-native")
    assert set(entry) == {"Node", "Service", "Checks"}


def test_execute_only_passing_and_tags(mesh: httpx.Client) -> None:
    create(mesh, {"Name": "strict", "Service": {"Service": "web", "OnlyPassing": True}})
    assert node_ids(mesh.get("/v1/query/strict/execute").json()) == ["web-native"]
    create(mesh, {"Name": "not-v1", "Service": {"Service": "web", "Tags": ["!v1"]}})
    assert node_ids(mesh.get("/v1/query/not-v1/execute").json()) == ["web-plain"]


def test_execute_ignore_check_ids(mesh: httpx.Client) -> None:
    create(
        mesh, {"Name": "all", "Service": {"Service": "web", "IgnoreCheckIDs": ["service:web-down"]}}
    )
    assert node_ids(mesh.get("/v1/query/all/execute").json()) == [
        "web-down",
        "web-native",
        "web-plain",
    ]


def test_execute_connect_returns_connect_capable_instances(mesh: httpx.Client) -> None:
    qid = create(mesh, {"Name": "web-q", "Service": {"Service": "web"}})
    body = mesh.get(f"/v1/query/{qid}/execute", params={"connect": "true"}).json()
    assert node_ids(body) == ["web-native", "web-proxy-1"]
    create(mesh, {"Name": "web-c", "Service": {"Service": "web", "Connect": {"Enabled": True}}})
    assert node_ids(mesh.get("/v1/query/web-c/execute").json()) == ["web-native", "web-proxy-1"]


def test_execute_limit_and_param_errors(mesh: httpx.Client) -> None:
    create(mesh, {"Name": "web-q", "Service": {"Service": "web"}})
    assert len(mesh.get("/v1/query/web-q/execute", params={"limit": "1"}).json()["Nodes"]) == 1
    r = mesh.get("/v1/query/web-q/execute", params={"limit": "x"})
    assert r.status_code == 500
    assert r.text.startswith("Bad limit: ")
    r = mesh.get("/v1/query/web-q/execute", params={"connect": "maybe"})
    assert r.status_code == 500
    assert r.text.startswith("Error parsing 'connect' value: ")


def test_execute_unknown_query_is_404(http: httpx.Client) -> None:
    r = http.get("/v1/query/nope/execute")
    assert (r.status_code, r.text) == (404, "Query not found")


def test_execute_needs_get(http: httpx.Client) -> None:
    r = http.put("/v1/query/x/execute")
    assert r.status_code == 405


def test_template_query_interpolates_name(mesh: httpx.Client) -> None:
    create(
        mesh,
        {
            "Name": "geo-",
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "${name.suffix}"},
        },
    )
    assert node_ids(mesh.get("/v1/query/geo-web/execute").json()) == ["web-native", "web-plain"]
    explained = mesh.get("/v1/query/geo-web/explain").json()
    assert explained["Query"]["Service"]["Service"] == "web"


def test_empty_execution_lists_no_nodes(http: httpx.Client) -> None:
    create(http, {"Name": "nothing", "Service": {"Service": "ghost"}})
    assert http.get("/v1/query/nothing/execute").json()["Nodes"] == []
