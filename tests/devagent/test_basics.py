"""The dev agent's HTTP plumbing: status, unknown paths, wrong methods, common headers."""

from __future__ import annotations

import httpx

from consul_connect.devagent import DevAgent


def test_status_leader_answers_a_json_address(http: httpx.Client) -> None:
    r = http.get("/v1/status/leader")
    assert r.status_code == 200
    assert isinstance(r.json(), str) and r.json().endswith(":8300")
    assert r.headers["X-Consul-Default-ACL-Policy"] == "allow"


def test_status_peers_lists_the_leader(http: httpx.Client) -> None:
    assert http.get("/v1/status/peers").json() == [http.get("/v1/status/leader").json()]


def test_agent_self_names_datacenter_and_node(agent: DevAgent, http: httpx.Client) -> None:
    cfg = http.get("/v1/agent/self").json()["Config"]
    assert cfg["Datacenter"] == "dc1"
    assert cfg["NodeName"] == agent.config.node_name


def test_unknown_path_is_a_plain_text_404(http: httpx.Client) -> None:
    r = http.get("/v1/no/such/thing")
    assert r.status_code == 404
    assert r.text == "Invalid URL path: not a recognized HTTP API endpoint\n"
    assert r.headers["content-type"].startswith("text/plain")


def test_wrong_method_is_405_with_allow(http: httpx.Client) -> None:
    r = http.delete("/v1/status/leader")
    assert r.status_code == 405
    assert r.text == "method DELETE not allowed"
    assert r.headers["Allow"] == "GET,OPTIONS"


def test_options_lists_methods(http: httpx.Client) -> None:
    r = http.options("/v1/status/leader")
    assert r.status_code == 200
    assert r.headers["Allow"] == "GET,OPTIONS"
    assert r.content == b""


def test_agent_listens_on_loopback_free_port(agent: DevAgent) -> None:
    assert agent.address.startswith("127.0.0.1:")
    assert agent.port > 0
