"""Discovery: static, catalog (health/connect), prepared-query resolvers and DNS-style names."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import httpx
import pytest

from consul_connect.agent.client import AgentClient, QueryMeta
from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.discovery import (
    CatalogResolver,
    Endpoint,
    PreparedQueryResolver,
    Resolver,
    StaticResolver,
    endpoints_from_health,
    resolver_for_name,
)
from consul_connect.errors import (
    AgentNotFoundError,
    AgentRequestError,
    AgentUnavailableError,
    ConfigError,
    IdentityError,
    NoInstancesError,
)
from consul_connect.identity import ServiceIdentity

TD = "11111111-2222-3333-4444-555555555555.consul"


def native(
    sid: str,
    service: str,
    *,
    addr: str = "",
    port: int = 8443,
    node: str = "n1",
    node_addr: str = "10.0.0.1",
    dc: str = "dc1",
) -> dict[str, Any]:
    return {
        "Node": {"Node": node, "Address": node_addr, "Datacenter": dc},
        "Service": {
            "ID": sid,
            "Service": service,
            "Address": addr,
            "Port": port,
            "Connect": {"Native": True},
            "Proxy": {},
        },
        "Checks": [],
    }


def sidecar(
    sid: str,
    dest: str,
    *,
    port: int = 21000,
    node: str = "n2",
    node_addr: str = "10.0.0.2",
    dc: str = "dc1",
) -> dict[str, Any]:
    return {
        "Node": {"Node": node, "Address": node_addr, "Datacenter": dc},
        "Service": {
            "ID": sid,
            "Service": f"{dest}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Address": "",
            "Port": port,
            "Connect": {},
            "Proxy": {"DestinationServiceName": dest},
        },
        "Checks": [],
    }


class FakeAgent:
    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        self.config = AgentConfig.from_address("127.0.0.1:1")
        self.entries = list(entries or [])
        self.index = 5
        self.changed = asyncio.Event()
        self.calls: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.query: dict[str, Any] | None = None

    def set_entries(self, entries: list[dict[str, Any]]) -> None:
        self.entries = list(entries)
        self.index += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def health_connect(
        self,
        service: str,
        passing: bool = True,
        dc: str | None = None,
        filter: str | None = None,
        index: int = 0,
        wait: float | None = None,
        stale: bool = True,
        near: str | None = None,
        tags: Sequence[str] = (),
    ) -> tuple[list[dict[str, Any]], QueryMeta]:
        call: dict[str, Any] = {
            "service": service,
            "passing": passing,
            "dc": dc,
            "filter": filter,
            "index": index,
            "stale": stale,
        }
        if tags:
            call["tags"] = list(tags)
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        if index >= self.index:
            event = self.changed
            try:
                async with asyncio.timeout(wait or 1.0):
                    await event.wait()
            except TimeoutError:
                pass
            if self.error is not None:
                raise self.error
        return list(self.entries), QueryMeta(index=self.index)

    async def prepared_query_execute(
        self,
        name_or_id: str,
        connect: bool = True,
        *,
        dc: str | None = None,
        near: str | None = None,
        limit: int | None = None,
    ) -> tuple[dict[str, Any], QueryMeta]:
        self.calls.append({"query": name_or_id, "connect": connect, "dc": dc})
        if self.query is None:
            raise AgentNotFoundError("Query not found", status=404)
        return self.query, QueryMeta()


def as_client(fake: FakeAgent) -> AgentClient:
    return cast(AgentClient, fake)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------------------------
# Static


async def test_static_resolver_returns_its_endpoint_unchanged() -> None:
    identity = ServiceIdentity(TD, "default", "dc1", "db")
    r = StaticResolver("127.0.0.1:9000", identity)
    assert await r.resolve() == [Endpoint("127.0.0.1", 9000, identity)]
    r6 = StaticResolver("[::1]:9000", identity.uri)
    (ep,) = await r6.resolve()
    assert (ep.host, ep.port, ep.identity) == ("::1", 9000, identity)
    assert ep.address == "[::1]:9000"
    assert isinstance(r, Resolver)


@pytest.mark.parametrize("bad", ["127.0.0.1", "host:port", ":80", "h:0", "::1:80", "[::1]"])
def test_static_resolver_rejects_malformed_addresses(bad: str) -> None:
    with pytest.raises(ConfigError):
        StaticResolver(bad, ServiceIdentity(TD, "default", "dc1", "db"))


def test_static_resolver_rejects_non_service_identity() -> None:
    with pytest.raises(IdentityError):
        StaticResolver("127.0.0.1:1", "spiffe://x.consul/agent/server/dc/dc1")


# --------------------------------------------------------------------------------------------
# Mapping health entries


def test_native_and_sidecar_entries_expect_the_destination_identity() -> None:
    entries = [
        native("db-1", "db", addr="10.1.1.1", dc="dc2"),
        sidecar("db-2-sidecar-proxy", "db"),
        {"Node": {}, "Service": {"ID": "plain", "Service": "db", "Port": 1, "Connect": {}}},
        native("db-sock", "db", port=0),
        "garbage",
    ]
    eps = endpoints_from_health(entries, "db", TD)
    assert eps == [
        Endpoint("10.1.1.1", 8443, ServiceIdentity(TD, "default", "dc2", "db"), "n1", "db-1"),
        Endpoint(
            "10.0.0.2",
            21000,
            ServiceIdentity(TD, "default", "dc1", "db"),
            "n2",
            "db-2-sidecar-proxy",
        ),
    ]


def test_enterprise_namespace_and_partition_come_from_the_entry() -> None:
    entry = native("db-1", "db")
    entry["Service"].update(Namespace="team", Partition="p1")
    (ep,) = endpoints_from_health([entry], "db", TD, namespace="default")
    assert ep.identity == ServiceIdentity(TD, "team", "dc1", "db", "p1")
    assert ep.identity.uri == f"spiffe://{TD}/ap/p1/ns/team/dc/dc1/svc/db"


def test_terminating_gateway_presents_the_requested_service() -> None:
    entry = native("tgw", "tgw")
    entry["Service"].update(Kind="terminating-gateway", Connect={})
    (ep,) = endpoints_from_health([entry], "legacy-db", TD)
    assert ep.identity.service == "legacy-db"


# --------------------------------------------------------------------------------------------
# CatalogResolver (unit)


async def test_catalog_resolver_queries_passing_stale_with_filter_and_dc() -> None:
    fake = FakeAgent([native("db-1", "db")])
    r = CatalogResolver(
        as_client(fake),
        "db",
        datacenter="dc1",
        filter='Service.Meta.v == "2"',
        trust_domain=lambda: TD,
    )
    (ep,) = await r.resolve()
    assert ep.identity.trust_domain == TD
    assert fake.calls == [
        {
            "service": "db",
            "passing": True,
            "dc": "dc1",
            "filter": 'Service.Meta.v == "2"',
            "index": 0,
            "stale": True,
        }
    ]


async def test_catalog_resolver_shuffles_per_call() -> None:
    fake = FakeAgent([native(f"db-{i}", "db", port=8000 + i) for i in range(8)])
    r = CatalogResolver(as_client(fake), "db", rng=random.Random(7))
    orders = {tuple(ep.port for ep in await r.resolve()) for _ in range(10)}
    assert len(orders) > 1
    assert all(sorted(o) == list(range(8000, 8008)) for o in orders)


async def test_no_instances_is_an_error_naming_the_service_and_filter() -> None:
    r = CatalogResolver(as_client(FakeAgent([])), "db", filter="Service.Tags contains x")
    with pytest.raises(NoInstancesError, match=r"'db'.*filter"):
        await r.resolve()


async def test_watch_mode_serves_the_cache_and_follows_changes() -> None:
    fake = FakeAgent([native("db-1", "db", port=1)])
    errors: list[BaseException] = []
    r = CatalogResolver(as_client(fake), "db", on_error=errors.append)
    await r.start()
    try:
        assert r.watching
        await until(lambda: len(fake.calls) >= 2)  # first answer in, now blocking
        calls = len(fake.calls)
        assert [ep.port for ep in await r.resolve()] == [1]
        assert len(fake.calls) == calls, "resolve must not query the agent while watching"
        fake.set_entries([native("db-1", "db", port=1), native("db-2", "db", port=2)])
        await until(lambda: len(r._cache or []) == 2)
        assert sorted(ep.port for ep in await r.resolve()) == [1, 2]
        # Agent gone: the last answer stays in use.
        fake.error = AgentUnavailableError("down")
        fake.set_entries([])
        await until(lambda: bool(errors))
        assert sorted(ep.port for ep in await r.resolve()) == [1, 2]
    finally:
        await r.aclose()
    assert not r.watching


async def test_cached_answers_only_from_a_live_watch_and_follows_changes() -> None:
    fake = FakeAgent([native("db-1", "db", port=1)])
    r = CatalogResolver(as_client(fake), "db")
    assert r.cached() is None  # no watch yet
    await r.start()
    try:
        await until(lambda: r.cached() is not None)
        first = r.cached()
        assert first is not None and [ep.port for ep in first] == [1]
        assert first is not r.cached()  # a fresh list each time: callers may reorder it
        fake.set_entries([native("db-1", "db", port=1), native("db-2", "db", port=2)])
        await until(lambda: len(r.cached() or []) == 2)
        fake.set_entries([])
        await until(lambda: r.cached() is None)  # nothing usable: resolve() says why
        with pytest.raises(NoInstancesError):
            await r.resolve()
    finally:
        await r.aclose()
    assert r.cached() is None


# --------------------------------------------------------------------------------------------
# PreparedQueryResolver (unit)


async def test_prepared_query_resolver_maps_nodes() -> None:
    fake = FakeAgent()
    fake.query = {
        "Service": "db",
        "Nodes": [native("db-1", "db"), sidecar("sc", "db")],
        "DNS": {"TTL": ""},
        "Datacenter": "dc1",
        "Failovers": 0,
    }
    r = PreparedQueryResolver(as_client(fake), "db-query", datacenter="dc1", trust_domain=TD)
    eps = await r.resolve()
    assert {ep.service_id for ep in eps} == {"db-1", "sc"}
    assert all(ep.identity == ServiceIdentity(TD, "default", "dc1", "db") for ep in eps)
    assert fake.calls == [{"query": "db-query", "connect": True, "dc": "dc1"}]
    fake.query = {"Service": "db", "Nodes": []}
    with pytest.raises(NoInstancesError):
        await r.resolve()


# --------------------------------------------------------------------------------------------
# DNS-style names


@pytest.mark.parametrize(
    ("name", "target", "tags", "dc"),
    [
        ("v1.foo.service.consul", "foo", ("v1",), None),
        ("V1.foo.service.dc2.consul.", "foo", ("v1",), "dc2"),
        ("_foo._v1.service.consul", "foo", ("v1",), None),
        ("_foo._tcp.service.dc2.consul", "foo", (), "dc2"),
        ("foo.service.consul", "foo", (), None),
    ],
)
def test_tagged_dns_names_narrow_the_catalog_query(
    name: str, target: str, tags: tuple[str, ...], dc: str | None
) -> None:
    r = resolver_for_name(name, as_client(FakeAgent()), TD)
    assert isinstance(r, CatalogResolver)
    assert (r.service, r.tags, r.datacenter) == (target, tags, dc)


@pytest.mark.parametrize(
    ("name", "kind", "target", "dc"),
    [
        ("foo.service.consul", CatalogResolver, "foo", None),
        ("foo.query.consul", PreparedQueryResolver, "foo", None),
        ("foo.service.dc2.consul", CatalogResolver, "foo", "dc2"),
        ("foo.query.dc2.consul", PreparedQueryResolver, "foo", "dc2"),
        ("foo.connect.consul", CatalogResolver, "foo", None),
        ("foo.connect.dc1.consul", CatalogResolver, "foo", "dc1"),
        ("FOO.Service.Consul.", CatalogResolver, "foo", None),
        ("foo.service.consul:8443", CatalogResolver, "foo", None),
        ("foo", CatalogResolver, "foo", None),
    ],
)
def test_consul_dns_names_map_to_resolvers(
    name: str, kind: type, target: str, dc: str | None
) -> None:
    r = resolver_for_name(name, as_client(FakeAgent()), TD)
    assert isinstance(r, kind)
    if isinstance(r, CatalogResolver):
        assert (r.service, r.datacenter) == (target, dc)
    else:
        assert isinstance(r, PreparedQueryResolver)
        assert (r.name, r.datacenter) == (target, dc)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("%%%", "invalid"),
        ("foo.service.my-consul.com", "invalid"),
        ("example.com", "invalid"),
        ("v1.foo.connect.consul", "only accepted on"),
        ("v1.foo.query.dc1.consul", "only accepted on"),
        ("_foo.bar.service.consul", "invalid"),
        ("foo.node.consul", "unsupported"),
        ("a.b.c.service.consul", "unsupported"),
        ("foo.bar.query.x.consul", "only accepted on"),
        ("10.0.0.1", "IP address"),
        ("[::1]:80", "IP address"),
        ("", "empty"),
    ],
)
def test_unsupported_names_raise_config_error(name: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        resolver_for_name(name, as_client(FakeAgent()), TD)


# --------------------------------------------------------------------------------------------
# Against the dev agent (real HTTP)


@pytest.fixture
async def client(agent: DevAgent) -> AsyncIterator[AgentClient]:
    async with AgentClient(AgentConfig.from_address(agent.address), timeout=5) as c:
        yield c


async def register_db_fleet(client: AgentClient) -> None:
    """Two healthy native instances, one failing native, a sidecar, and a plain instance."""
    for sid, port, version in (("db-1", 9001, "1"), ("db-2", 9002, "2")):
        await client.register_service(
            {
                "ID": sid,
                "Name": "db",
                "Port": port,
                "Address": "127.0.0.1",
                "Meta": {"version": version},
                "Connect": {"Native": True},
            }
        )
    await client.register_service(
        {
            "ID": "db-sick",
            "Name": "db",
            "Port": 9003,
            "Address": "127.0.0.1",
            "Connect": {"Native": True},
            "Check": {"CheckID": "db-sick-ttl", "TTL": "30s", "Status": "critical"},
        }
    )
    await client.register_service({"ID": "legacy-db", "Name": "legacy-db", "Port": 5432})
    await client.register_service(
        {
            "ID": "legacy-db-sidecar-proxy",
            "Name": "legacy-db-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Address": "127.0.0.2",
            "Proxy": {"DestinationServiceName": "legacy-db", "LocalServicePort": 5432},
        }
    )
    await client.register_service({"ID": "plain-db", "Name": "db", "Port": 9009})


async def test_catalog_resolver_finds_healthy_native_instances(
    agent: DevAgent, client: AgentClient
) -> None:
    await register_db_fleet(client)
    r = CatalogResolver(client, "db", trust_domain=TD)
    eps = await r.resolve()
    assert sorted(ep.service_id for ep in eps) == ["db-1", "db-2"]
    dc = agent.config.datacenter
    assert all(ep.identity == ServiceIdentity(TD, "default", dc, "db") for ep in eps)
    assert all(ep.host == "127.0.0.1" for ep in eps)

    with_sick = CatalogResolver(client, "db", passing=False)
    assert sorted(ep.service_id for ep in await with_sick.resolve()) == ["db-1", "db-2", "db-sick"]


async def test_catalog_resolver_maps_sidecars_to_the_destination_identity(
    client: AgentClient,
) -> None:
    await register_db_fleet(client)
    (ep,) = await CatalogResolver(client, "legacy-db").resolve()
    assert (ep.host, ep.port, ep.service_id) == ("127.0.0.2", 21000, "legacy-db-sidecar-proxy")
    assert ep.identity.service == "legacy-db"


async def test_catalog_resolver_filter_narrows_and_empty_is_an_error(client: AgentClient) -> None:
    await register_db_fleet(client)
    r = CatalogResolver(client, "db", filter='Service.Meta.version == "2"')
    assert [ep.service_id for ep in await r.resolve()] == ["db-2"]
    nothing = CatalogResolver(client, "db", filter='Service.Meta.version == "9"')
    with pytest.raises(NoInstancesError):
        await nothing.resolve()
    with pytest.raises(NoInstancesError):
        await CatalogResolver(client, "no-such-service").resolve()
    # A filter the agent cannot compile is a clear, non-retryable error.
    with pytest.raises(AgentRequestError, match="rejected the filter"):
        await CatalogResolver(client, "db", filter="Service.Nope ==").resolve()


async def test_a_watch_with_a_filter_the_agent_cannot_compile_stops_instead_of_retrying(
    client: AgentClient,
) -> None:
    await register_db_fleet(client)
    errors: list[BaseException] = []
    r = CatalogResolver(client, "db", filter="Service.Nope ==", on_error=errors.append)
    await r.start()
    try:
        deadline = time.monotonic() + 5
        while r.watching:
            assert time.monotonic() < deadline, "the watch kept retrying a bad filter"
            await asyncio.sleep(0.01)
        assert len(errors) == 1 and isinstance(errors[0], AgentRequestError)
        with pytest.raises(AgentRequestError, match="rejected the filter"):
            await r.resolve()
    finally:
        await r.aclose()


async def test_a_tagged_name_finds_only_instances_with_that_tag(client: AgentClient) -> None:
    await register_db_fleet(client)
    await client.register_service(
        {"ID": "db-canary", "Name": "db", "Port": 9005, "Address": "127.0.0.1",
         "Tags": ["Canary"], "Connect": {"Native": True}}
    )
    canary = resolver_for_name("canary.db.service.consul", client, TD)
    assert [ep.service_id for ep in await canary.resolve()] == ["db-canary"]
    assert [ep.service_id for ep in await canary.resolve()] == ["db-canary"]
    with pytest.raises(NoInstancesError, match="tagged blue"):
        await resolver_for_name("blue.db.service.consul", client, TD).resolve()
    with pytest.raises(ConfigError, match="not a string"):
        CatalogResolver(client, "db", tags="canary")


async def test_catalog_watch_sees_new_instances(client: AgentClient) -> None:
    await register_db_fleet(client)
    r = CatalogResolver(client, "db")
    await r.start()
    try:
        assert await r.wait_changed(5)
        await client.register_service(
            {"ID": "db-3", "Name": "db", "Port": 9004, "Connect": {"Native": True}}
        )
        deadline = time.monotonic() + 5
        while "db-3" not in {ep.service_id for ep in await r.resolve()}:
            assert time.monotonic() < deadline, "watch did not deliver the new instance"
            await r.wait_changed(1)
    finally:
        await r.aclose()


async def create_query(agent: DevAgent, body: dict[str, Any]) -> str:
    def post() -> str:
        with httpx.Client(base_url=agent.http_addr, timeout=10) as http:
            response = http.post("/v1/query", json=body)
            response.raise_for_status()
            return str(response.json()["ID"])

    return await asyncio.to_thread(post)


async def test_prepared_query_resolver_by_name_and_id(agent: DevAgent, client: AgentClient) -> None:
    await register_db_fleet(client)
    query_id = await create_query(
        agent, {"Name": "db-query", "Service": {"Service": "db", "OnlyPassing": True}}
    )
    for name in ("db-query", query_id):
        eps = await PreparedQueryResolver(client, name, trust_domain=TD).resolve()
        assert sorted(ep.service_id for ep in eps) == ["db-1", "db-2"]
        assert all(ep.identity.service == "db" for ep in eps)
    with pytest.raises(AgentNotFoundError):
        await PreparedQueryResolver(client, "no-such-query").resolve()


async def test_dns_style_names_resolve_against_the_agent(
    agent: DevAgent, client: AgentClient
) -> None:
    await register_db_fleet(client)
    await create_query(agent, {"Name": "db-query", "Service": {"Service": "db"}})
    dc = agent.config.datacenter
    for name in ("db.service.consul", f"db.connect.{dc}.consul", "db-query.query.consul", "db"):
        eps = await resolver_for_name(name, client, TD).resolve()
        assert {ep.identity.service for ep in eps} == {"db"}, name
        assert {ep.service_id for ep in eps} >= {"db-1", "db-2"}, name
