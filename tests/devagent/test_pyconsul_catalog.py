"""The unmodified third-party ``py-consul`` client works against the dev agent."""

from __future__ import annotations

import consul
import pytest

from consul_connect.devagent import DevAgent


@pytest.fixture
def client(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def test_agent_service_register_and_read_back(client: consul.Consul) -> None:
    assert client.agent.service.register(
        "web",
        service_id="web-1",
        port=8443,
        tags=["v1"],
        meta={"version": "1"},
        check=consul.Check.ttl("30s"),
        connect={"Native": True},
    )
    services = client.agent.services()
    assert services["web-1"]["Service"] == "web"
    assert services["web-1"]["Connect"] == {"Native": True}
    assert list(client.agent.services(filter_expr='Meta.version == "1"')) == ["web-1"]
    assert client.agent.service_definition("web-1")["ID"] == "web-1"


def test_ttl_pass_makes_health_passing(client: consul.Consul) -> None:
    client.agent.service.register(
        "web", service_id="web-1", port=8443, check=consul.Check.ttl("30s")
    )
    index, nodes = client.health.service("web", passing=True)
    assert nodes == []
    assert int(index) > 0
    assert client.agent.check.ttl_pass("service:web-1", "all good")
    index2, nodes = client.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    assert int(index2) > int(index)
    checks = client.agent.checks()
    assert checks["service:web-1"]["Status"] == "passing"
    assert checks["service:web-1"]["Output"] == "all good"


def test_ttl_warn_and_fail(client: consul.Consul) -> None:
    client.agent.service.register("web", service_id="web-1", port=1, check=consul.Check.ttl("30s"))
    assert client.agent.check.ttl_warn("service:web-1")
    assert client.agent.checks()["service:web-1"]["Status"] == "warning"
    assert client.agent.check.ttl_fail("service:web-1", "boom")
    assert client.agent.checks()["service:web-1"]["Output"] == "boom"


def test_health_connect_sees_native_and_proxy(client: consul.Consul) -> None:
    client.agent.service.register("web", service_id="web-1", port=8443, connect={"Native": True})
    client.agent.service.register(
        "web-proxy",
        service_id="web-proxy-1",
        port=21000,
        kind="connect-proxy",
        proxy={"DestinationServiceName": "web", "LocalServicePort": 8443},
    )
    client.agent.service.register("web", service_id="web-plain", port=8080)
    _, nodes = client.health.connect("web")
    assert sorted(n["Service"]["ID"] for n in nodes) == ["web-1", "web-proxy-1"]
    _, catalog_nodes = client.catalog.connect("web")
    assert sorted(n["ServiceID"] for n in catalog_nodes) == ["web-1", "web-proxy-1"]


def test_catalog_calls(client: consul.Consul, agent: DevAgent) -> None:
    client.agent.service.register("web", service_id="web-1", port=8443, tags=["v1"])
    _, services = client.catalog.services()
    assert services == {"web": ["v1"]}
    _, nodes = client.catalog.service("web")
    assert [n["ServiceID"] for n in nodes] == ["web-1"]
    _, node_list = client.catalog.nodes()
    assert [n["Node"] for n in node_list] == [agent.config.node_name]
    _, node = client.catalog.node(agent.config.node_name)
    assert "web-1" in node["Services"]
    assert client.catalog.datacenters() == ["dc1"]


def test_health_checks_state_node_and_blocking_index(
    client: consul.Consul, agent: DevAgent
) -> None:
    client.agent.service.register("web", service_id="web-1", port=1, check=consul.Check.ttl("30s"))
    _, checks = client.health.checks("web")
    assert [c["CheckID"] for c in checks] == ["service:web-1"]
    _, critical = client.health.state("critical")
    assert [c["CheckID"] for c in critical] == ["service:web-1"]
    _, node_checks = client.health.node(agent.config.node_name)
    assert {c["CheckID"] for c in node_checks} == {"serfHealth", "service:web-1"}
    index, _ = client.health.service("web")
    same, _ = client.health.service("web", index=index, wait="100ms")
    assert same == index


def test_deregister_and_check_register(client: consul.Consul) -> None:
    client.agent.service.register("web", service_id="web-1", port=1)
    assert client.agent.check.register("extra", check=consul.Check.ttl("10s"), service_id="web-1")
    assert "extra" in client.agent.checks()
    assert client.agent.check.deregister("extra")
    assert client.agent.service.deregister("web-1")
    assert client.agent.services() == {}
    # A second deregistration is Consul's 404, which py-consul reports as False.
    assert client.agent.service.deregister("web-1") is False
