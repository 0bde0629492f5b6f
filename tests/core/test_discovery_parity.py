"""Discovery against Consul's own rules: which instances, in which order, from which names.

Each test cites the Consul source (hashicorp/consul) whose behaviour it pins; all but the
name-parsing ones talk real HTTP to the dev agent on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from consul_connect.agent.client import AgentClient
from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.discovery import (
    CatalogResolver,
    PreparedQueryResolver,
    resolver_for_name,
)
from consul_connect.errors import ConfigError

TD = "11111111-2222-3333-4444-555555555555.consul"


@pytest.fixture
async def client(agent: DevAgent) -> AsyncIterator[AgentClient]:
    async with AgentClient(AgentConfig.from_address(agent.address), timeout=5) as c:
        yield c


def _http(agent: DevAgent, method: str, path: str, **kw: Any) -> httpx.Response:
    with httpx.Client(base_url=agent.http_addr, timeout=10) as http:
        return http.request(method, path, **kw)


async def http(agent: DevAgent, method: str, path: str, **kw: Any) -> httpx.Response:
    return await asyncio.to_thread(_http, agent, method, path, **kw)


async def native(client: AgentClient, sid: str, port: int, **extra: Any) -> None:
    await client.register_service(
        {
            "ID": sid,
            "Name": "db",
            "Port": port,
            "Address": "127.0.0.1",
            "Connect": {"Native": True},
            **extra,
        }
    )


# --------------------------------------------------------------------------------------------
# ?tag on /v1/health/connect


async def test_a_plain_connect_read_ignores_the_tag_parameter_like_consul(
    agent: DevAgent, client: AgentClient
) -> None:
    # agent/consul/health_endpoint.go Health.ServiceNodes: `case args.Connect:` picks
    # serviceNodesConnect before `case args.TagFilter:`, so the RPC path drops ?tag; only
    # the streaming view (agent/rpcclient/health/view.go serviceTagEvaluator), used for
    # blocking reads without ?near, applies it.
    await native(client, "db-1", 9001)
    await native(client, "db-canary", 9002, Tags=["Canary"])
    plain = await http(agent, "GET", "/v1/health/connect/db", params={"tag": "canary"})
    assert sorted(e["Service"]["ID"] for e in plain.json()) == ["db-1", "db-canary"]
    index = plain.headers["X-Consul-Index"]
    blocking = await http(
        agent, "GET", "/v1/health/connect/db", params={"tag": "canary", "index": "1"}
    )
    assert int(blocking.headers["X-Consul-Index"]) >= int(index)
    assert [e["Service"]["ID"] for e in blocking.json()] == ["db-canary"]


async def test_a_tagged_resolver_never_dials_an_untagged_instance_on_a_plain_read(
    client: AgentClient,
) -> None:
    # Same source as above: a real agent answers the first (non-blocking) read with every
    # Connect instance, so the tag must be enforced client-side.
    await native(client, "db-1", 9001)
    await native(client, "db-canary", 9002, Tags=["Canary"])
    r = resolver_for_name("canary.db.service.consul", client, TD)
    assert [ep.service_id for ep in await r.resolve()] == ["db-canary"]
    r2 = CatalogResolver(client, "db", tags=("CANARY",), trust_domain=TD)
    await r2.start()
    try:
        assert await r2.wait_changed(5)
        assert [ep.service_id for ep in await r2.resolve()] == ["db-canary"]
    finally:
        await r2.aclose()


# --------------------------------------------------------------------------------------------
# ?passing: which instances, and in what order


async def test_passing_filter_drops_warning_and_reorders_like_filter_non_passing(
    agent: DevAgent, client: AgentClient
) -> None:
    # agent/health_endpoint.go filterNonPassing: any check whose Status != "passing" (so a
    # warning one too) removes the entry, and the removal moves the last entry into the hole.
    for sid, port, status in (
        ("db-a", 9001, "warning"),
        ("db-b", 9002, "passing"),
        ("db-c", 9003, "passing"),
    ):
        check = {"CheckID": f"{sid}-ttl", "TTL": "60s", "Status": status}
        await native(client, sid, port, Check=check)
    everything = await http(agent, "GET", "/v1/health/connect/db")
    assert [e["Service"]["ID"] for e in everything.json()] == ["db-a", "db-b", "db-c"]
    passing = await http(agent, "GET", "/v1/health/connect/db", params={"passing": ""})
    assert [e["Service"]["ID"] for e in passing.json()] == ["db-c", "db-b"]
    eps = await CatalogResolver(client, "db", trust_domain=TD).resolve()
    assert sorted(ep.service_id for ep in eps) == ["db-b", "db-c"]


async def test_a_failing_node_check_hides_every_instance_on_the_node(
    agent: DevAgent, client: AgentClient
) -> None:
    # agent/consul/state/catalog.go parseCheckServiceNodes puts node checks (serfHealth or
    # any other node-level check) in every entry's Checks; filterNonPassing then drops them.
    await native(client, "db-1", 9001)
    node = agent.config.node_name
    registered = await http(
        agent,
        "PUT",
        "/v1/agent/check/register",
        json={"CheckID": "node-down", "Name": "node", "TTL": "60s", "Status": "critical"},
    )
    assert registered.status_code == 200, registered.text
    passing = await http(agent, "GET", "/v1/health/connect/db", params={"passing": "1"})
    assert passing.json() == []
    everything = (await http(agent, "GET", "/v1/health/connect/db")).json()
    assert {c["CheckID"] for c in everything[0]["Checks"]} >= {"node-down"}
    assert all(c["Node"] == node for c in everything[0]["Checks"])


# --------------------------------------------------------------------------------------------
# Prepared queries


async def test_prepared_query_names_are_looked_up_without_regard_to_case(
    agent: DevAgent, client: AgentClient
) -> None:
    # agent/consul/state/prepared_query.go preparedQueriesTableSchema: the "name" index is a
    # StringFieldIndex with Lowercase: true, and DNS lowercases the whole question
    # (agent/dns.go dispatch), so "DbQuery.query.consul" finds the query "DbQuery".
    await native(client, "db-1", 9001)
    created = await http(
        agent, "POST", "/v1/query", json={"Name": "DbQuery", "Service": {"Service": "db"}}
    )
    assert created.status_code == 200, created.text
    eps = await resolver_for_name("DbQuery.query.consul", client, TD).resolve()
    assert [ep.service_id for ep in eps] == ["db-1"]
    alias = await http(
        agent, "POST", "/v1/query", json={"Name": "dbquery", "Service": {"Service": "db"}}
    )
    assert alias.status_code == 500
    assert "aliases an existing query name" in alias.text


async def test_prepared_query_execute_response_has_consuls_fields(
    agent: DevAgent, client: AgentClient
) -> None:
    # agent/structs/prepared_query.go PreparedQueryExecuteResponse: Service, Nodes, DNS,
    # Datacenter, PeerName (no omitempty), Failovers, then the embedded QueryMeta fields
    # (agent/structs/structs.go QueryMeta, ending in ResultsFilteredByACLs).
    await native(client, "db-1", 9001)
    await native(client, "db-warn", 9002, Check={"CheckID": "w", "TTL": "60s", "Status": "warning"})
    await http(agent, "POST", "/v1/query", json={"Name": "q", "Service": {"Service": "db"}})
    body = (await http(agent, "GET", "/v1/query/q/execute", params={"connect": "true"})).json()
    assert list(body) == [
        "Service",
        "Nodes",
        "DNS",
        "Datacenter",
        "PeerName",
        "Failovers",
        "Index",
        "LastContact",
        "KnownLeader",
        "ConsistencyLevel",
        "NotModified",
        "Backend",
        "ResultsFilteredByACLs",
    ]
    # structs.CheckServiceNodes.FilterIgnore(OnlyPassing=false): warning stays, critical goes.
    assert sorted(e["Service"]["ID"] for e in body["Nodes"]) == ["db-1", "db-warn"]
    eps = await PreparedQueryResolver(client, "q", trust_domain=TD).resolve()
    assert sorted(ep.service_id for ep in eps) == ["db-1", "db-warn"]


# --------------------------------------------------------------------------------------------
# DNS grammar


@pytest.mark.parametrize(
    ("name", "service", "tags", "dc"),
    [
        # agent/dns_ce.go parseLocality: "<dc>.dc" after the kind label (Consul 1.13+).
        ("web.service.dc2.dc.consul", "web", (), "dc2"),
        ("web.connect.dc2.dc.consul", "web", (), "dc2"),
        ("v1.web.service.dc2.dc.consul.", "web", ("v1",), "dc2"),
        # a datacenter that happens to be called "dc" is still a bare datacenter label
        ("web.service.dc.consul", "web", (), "dc"),
    ],
)
def test_dc_locality_labels_are_understood(
    name: str, service: str, tags: tuple[str, ...], dc: str
) -> None:
    r = resolver_for_name(name, AgentClient(AgentConfig.from_address("127.0.0.1:1")), TD)
    assert isinstance(r, CatalogResolver)
    assert (r.service, r.tags, r.datacenter) == (service, tags, dc)


@pytest.mark.parametrize(
    "name",
    [
        # agent/dns.go dispatch: .query takes only a bare datacenter (parseDatacenter).
        "q.query.dc2.dc.consul",
        # agent/dns.go dispatch, case "connect": "Peering is not currently supported".
        "web.connect.p1.peer.consul",
        # agent/dns_ce.go parseLocality: any other pair of labels is invalid.
        "web.service.dc2.ns.consul",
    ],
)
def test_localities_consul_rejects_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError):
        resolver_for_name(name, AgentClient(AgentConfig.from_address("127.0.0.1:1")), TD)


def test_the_dns_domain_is_configurable() -> None:
    # agent/dns.go trimDomain: the agent's `domain` (and `alt_domain`) is stripped, whatever
    # it is; "consul" is only the default.
    c = AgentClient(AgentConfig.from_address("127.0.0.1:1"))
    r = resolver_for_name("web.service.dc2.example.internal.", c, TD, domain="example.internal")
    assert isinstance(r, CatalogResolver)
    assert (r.service, r.datacenter) == ("web", "dc2")
    q = resolver_for_name("q.query.Example.Internal", c, TD, domain="example.internal.")
    assert isinstance(q, PreparedQueryResolver)
    assert q.name == "q"
    with pytest.raises(ConfigError, match=r"example\.internal"):
        resolver_for_name("web.service.consul", c, TD, domain="example.internal")
