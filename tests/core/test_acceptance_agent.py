"""Issue 3 acceptance through the Service API against the dev agent.

Complements tests/core/test_service_agent.py: asyncio both ways, deny before any byte
on the asyncio server, precedence with wildcards on real connections (both authorizers),
fail-over through the catalog, readiness before and after certificates, an agent
restart (leaf, intentions and registration recover), one roots watch per agent, every
event hook, and close() on the caller's loop.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from consul_connect import _hub
from consul_connect.devagent import DevAgent
from consul_connect.discovery import Endpoint
from consul_connect.errors import NoInstancesError, NotReadyError
from consul_connect.service import Service, ServiceEvent, get_peer_identity
from tests.core.support import EchoServer
from tests.core.support import cfg as _cfg
from tests.core.support import decides as _decides
from tests.core.support import force_leaf_renewal as _force_leaf_renewal
from tests.core.support import intention as _intention
from tests.core.support import put as _put
from tests.core.support import wait_for as _wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _round_trip(client: Service, target: Any, payload: bytes = b"ping") -> bool:
    """True when ``client`` reaches ``target`` and gets its bytes echoed."""
    try:
        with client.connect(target, timeout=5) as conn:
            conn.sendall(payload)
            return conn.recv(100) == payload
    except OSError:
        return False


async def _identity_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = get_peer_identity(writer)
    data = await reader.read(100)
    writer.write(data + b" from " + (peer.service.encode() if peer else b"?"))
    await writer.drain()
    writer.close()


# -- talking, refusing, deciding ------------------------------------------------------


async def test_two_services_talk_both_ways_over_asyncio(
    services: Callable[..., Service],
) -> None:
    web, api = services("web"), services("api")
    await web.wait_ready_async(15)
    await api.wait_ready_async(15)
    servers = {s.name: (s, await s.start_server(_identity_echo)) for s in (web, api)}
    try:
        for client, server_name in ((web, "api"), (api, "web")):
            svc, server = servers[server_name]
            port = server.sockets[0].getsockname()[1]
            reader, writer = await client.open_connection(Endpoint("127.0.0.1", port, svc.identity))
            assert get_peer_identity(writer) == svc.identity
            writer.write(b"hi")
            await writer.drain()
            got = await asyncio.wait_for(reader.read(100), 5)
            assert got == f"hi from {client.name}".encode()
            writer.close()
    finally:
        for _svc, server in servers.values():
            server.close()
            await server.wait_closed()
    assert web.statistics().accepted == 1 and api.statistics().accepted == 1
    assert web.statistics().dialed == 1 and api.statistics().dialed == 1


async def test_intention_deny_refuses_before_any_byte_on_the_asyncio_server(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    _intention(agent, "web", "api", "deny")
    web, api = services("web"), services("api")
    await web.wait_ready_async(15)
    await api.wait_ready_async(15)
    await asyncio.to_thread(_wait_for, _decides(api, web, False), 10.0, "the deny")
    reached: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append("handler")
        writer.close()

    events: list[ServiceEvent] = []
    api.on_event(events.append)
    server = await api.start_server(handler)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await web.open_connection(Endpoint("127.0.0.1", port, api.identity))
        writer.write(b"secret")
        try:
            got = await asyncio.wait_for(reader.read(100), 5)
        except (ConnectionError, OSError):
            got = b""
        assert got == b""
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert reached == []
    assert api.statistics().rejected == 1 and api.statistics().accepted == 0
    denied = [e for e in events if e.kind == "peer_denied"]
    assert len(denied) == 1 and denied[0].peer == web.identity
    assert "deny" in denied[0].reason.lower()


def test_precedence_with_wildcards_decides_real_connections_for_both_authorizers(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    # Exact source beats the wildcard source; the wildcard beats the default (allow,
    # ACLs are off). Both authorizers must admit and refuse the same callers.
    _intention(agent, "*", "api", "deny")
    _intention(agent, "web", "api", "allow")
    web, db, cache = services("web"), services("db"), services("cache")
    by_intentions = services("api")
    by_agent = services("api", authorizer="agent")
    for s in (web, db, cache, by_intentions, by_agent):
        s.wait_ready(15)
    _wait_for(_decides(by_intentions, db, False), what="the wildcard deny")
    servers = [EchoServer(by_intentions), EchoServer(by_agent)]
    try:
        for server in servers:
            assert _round_trip(web, server.endpoint), server.svc.authorizer.name
            assert not _round_trip(db, server.endpoint), server.svc.authorizer.name
            assert not _round_trip(cache, server.endpoint), server.svc.authorizer.name
        # An exact allow for db now outranks the wildcard deny, for both.
        _intention(agent, "db", "api", "allow")
        _wait_for(_decides(by_intentions, db, True), what="the exact allow")
        for server in servers:
            assert server.seen == ["web"]
            # The agent authorizer caches answers for a second; wait that out.
            _wait_for(partial(_round_trip, db, server.endpoint), what="db to be admitted")
            assert not _round_trip(cache, server.endpoint)
    finally:
        for server in servers:
            server.close()


async def test_refused_and_stalled_instances_fail_over_through_the_catalog(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    web, api = services("web"), services("api")
    await web.wait_ready_async(15)
    await api.wait_ready_async(15)
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)  # accepts TCP, never speaks TLS
    server = await api.start_server(_identity_echo)
    ports = {
        "refused": _free_port(),
        "stalled": stalled.getsockname()[1],
        "real": server.sockets[0].getsockname()[1],
    }
    for kind, port in ports.items():
        await asyncio.to_thread(
            _put,
            agent,
            "/v1/agent/service/register",
            {
                "ID": f"api-{kind}",
                "Name": "api",
                "Address": "127.0.0.1",
                "Port": port,
                "Connect": {"Native": True},
            },
        )
    try:
        # The catalog shuffles; whatever the order, one deadline covers them all.
        for _ in range(3):
            started = asyncio.get_running_loop().time()
            reader, writer = await web.open_connection("api", timeout=3)
            assert asyncio.get_running_loop().time() - started < 3
            assert get_peer_identity(writer) == api.identity
            writer.write(b"x")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(100), 5) == b"x from web"
            writer.close()
        # The name is now watched and cached, not queried per dial.
        assert web._resolvers["api"].watching  # type: ignore[attr-defined]
    finally:
        server.close()
        await server.wait_closed()
        stalled.close()


def test_dialling_an_unknown_service_names_it(services: Callable[..., Service]) -> None:
    web = services("web")
    web.wait_ready(15)
    with pytest.raises(NoInstancesError, match="no-such-service"):
        web.connect("no-such-service", timeout=3)
    assert web.statistics().dial_failures == 0  # nothing was tried: discovery said no


# -- readiness --------------------------------------------------------------------------


def test_readiness_is_false_before_certificates_and_true_after(
    start_agent: Callable[..., DevAgent],
) -> None:
    port = _free_port()
    svc = Service("web", agent=_cfg(f"127.0.0.1:{port}"), register=True, port=21001, check_ttl=1.5)
    try:
        assert not svc.ready
        assert not svc.statistics().ready and svc.statistics().leaf_serial == ""
        with pytest.raises(NotReadyError, match="unreachable"):
            svc.wait_ready(0.5)
        with pytest.raises(NotReadyError):
            _ = svc.identity
        agent = start_agent(port=port)
        svc.wait_ready(20)
        assert svc.ready and svc.statistics().ready and svc.statistics().leaf_serial
        started = time.monotonic()
        svc.wait_ready(0)
        assert time.monotonic() - started < 0.05
        # The registration that failed while the agent was down is retried, not dropped.
        _wait_for(
            lambda: httpx.get(f"{agent.http_addr}/v1/agent/service/web-21001").status_code == 200,
            timeout=20,
            what="the registration to be retried",
        )
    finally:
        svc.close()


# -- the agent goes away and comes back ------------------------------------------------


def test_agent_restart_keeps_serving_then_leaf_intentions_and_registration_recover(
    start_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    data_dir = str(tmp_path / "agent")
    agent = start_agent(data_dir=data_dir)
    port = agent.port
    _intention(agent, "web", "api", "allow")
    api = Service("api", agent=_cfg(agent), register=True, port=21000, check_ttl=1.5)
    web = Service("web", agent=_cfg(agent))
    server = None
    try:
        api.wait_ready(15)
        web.wait_ready(15)
        _wait_for(_decides(api, web, True), what="the allow")
        server = EchoServer(api)
        assert _round_trip(web, server.endpoint)
        serial_before = api.statistics().leaf_serial

        agent.stop()
        # Existing material keeps serving and authorizing while the agent is away.
        assert _round_trip(web, server.endpoint)
        assert api.authorizer.decide(web.identity).allowed  # type: ignore[union-attr]
        _wait_for(lambda: api.statistics().watch_errors > 0, what="a watch error")

        agent = start_agent(port=port, data_dir=data_dir)

        # Registration: the TTL check is heartbeated to passing on the new agent.
        def registered_and_passing() -> bool:
            r = httpx.get(f"{agent.http_addr}/v1/health/checks/api", timeout=5)
            return r.status_code == 200 and any(
                c["ServiceID"] == "api-21000" and c["Status"] == "passing" for c in r.json()
            )

        _wait_for(registered_and_passing, timeout=20, what="api to be registered and passing")
        # Leaf watch: the restarted agent issues a new leaf, then renewals still arrive.
        _wait_for(
            lambda: api.statistics().leaf_serial != serial_before,
            timeout=20,
            what="a leaf from the restarted agent",
        )
        # Roots watch: the restarted agent's CA key never reached the disk, so it serves
        # a fresh root beside the old one, and both services trust the two.
        _wait_for(
            lambda: api.statistics().roots == 2 and web.statistics().roots == 2,
            timeout=20,
            what="the old root and the restarted agent's fresh one",
        )
        assert _round_trip(web, server.endpoint)
        renewed_from = api.statistics().leaf_serial
        _force_leaf_renewal(agent, "api")
        _wait_for(lambda: api.statistics().leaf_serial != renewed_from, what="a renewed leaf")
        assert _round_trip(web, server.endpoint)
        # Intention watch: a change on the restarted agent reaches the authorizer.
        _intention(agent, "web", "api", "deny")
        _wait_for(_decides(api, web, False), timeout=20, what="the deny after restart")
        assert not _round_trip(web, server.endpoint)
    finally:
        if server is not None:
            server.close()
        web.close()
        api.close()


# -- sharing and hooks -------------------------------------------------------------------


def test_one_roots_watch_per_agent_shared_by_all_services(agent: DevAgent) -> None:
    made = [Service(name, agent=_cfg(agent)) for name in ("web", "api", "db")]
    try:
        for s in made:
            s.wait_ready(15)
        hubs = {id(s._hub) for s in made}
        assert len(hubs) == 1  # equal configs, built separately, share one hub
        hub = made[0]._hub
        assert [h for h in _hub._hubs.values() if h.config == _cfg(agent)] == [hub]
        assert hub._refs == 3 and hub._task is not None and not hub._task.done()
        assert all(s.statistics().roots == 1 for s in made)
        made.pop().close()
        made.pop().close()
        assert not hub._task.done() and made[0].statistics().ready
    finally:
        for s in made:
            s.close()
    assert not any(h.config == _cfg(agent) for h in _hub._hubs.values())


def test_event_hooks_fire_for_every_kind(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent()
    web = Service("web", agent=_cfg(agent))
    api = Service("api", agent=_cfg(agent))
    events: list[ServiceEvent] = []
    api.on_event(events.append)
    server = None

    def kinds() -> set[str]:
        return {e.kind for e in events}

    try:
        web.wait_ready(15)
        api.wait_ready(15)
        server = EchoServer(api)
        assert _round_trip(web, server.endpoint)
        _wait_for(lambda: "peer_allowed" in kinds(), what="peer_allowed")
        _intention(agent, "web", "api", "deny")
        _wait_for(_decides(api, web, False), what="the deny")
        assert not _round_trip(web, server.endpoint)
        _wait_for(lambda: "peer_denied" in kinds(), what="peer_denied")
        _force_leaf_renewal(agent, "api")
        _wait_for(lambda: "leaf_rotated" in kinds(), what="leaf_rotated")
        _put(
            agent,
            "/v1/connect/ca/configuration",
            {"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
        )
        _wait_for(lambda: "roots_changed" in kinds(), what="roots_changed")
        agent.stop()
        _wait_for(lambda: "watch_error" in kinds(), what="watch_error")
    finally:
        if server is not None:
            server.close()
        web.close()
        api.close()
    by_kind = {e.kind: e for e in events}
    assert by_kind["peer_allowed"].peer == web.identity
    assert by_kind["peer_denied"].peer == web.identity and by_kind["peer_denied"].reason
    assert by_kind["leaf_rotated"].serial
    assert by_kind["roots_changed"].reason  # the new active root's id
    assert by_kind["watch_error"].error is not None
    stats = api.statistics()
    assert stats.leaf_rotations >= 1 and stats.roots_changes >= 1 and stats.watch_errors >= 1


# -- closing -------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> set[int | None]:
    # The caller loop's default executor (asyncio.to_thread) lives until that loop
    # closes; it belongs to the loop, not to the Service.
    return {t.ident for t in threading.enumerate() if not t.name.startswith("asyncio_")}


async def test_aclose_ends_tasks_servers_connections_watches_and_registration(
    agent: DevAgent,
) -> None:
    loop = asyncio.get_running_loop()
    gc.collect()
    threads_before = _threads()
    fds_before = _fds()
    tasks_before = asyncio.all_tasks()
    api_port = _free_port()
    api = Service("api", agent=_cfg(agent), register=True, port=api_port)
    web = Service("web", agent=_cfg(agent))
    await api.wait_ready_async(15)
    await web.wait_ready_async(15)
    holding = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holding.set()
        await reader.read()  # until the peer or close() cuts the connection

    server = await api.start_server(hold, port=api_port)

    async def passing() -> bool:
        async with httpx.AsyncClient(base_url=agent.http_addr) as http:
            r = await http.get("/v1/health/service/api", params={"passing": "1"})
            return r.status_code == 200 and len(r.json()) == 1

    deadline = loop.time() + 10
    while not await passing():
        assert loop.time() < deadline, "api never became healthy"
        await asyncio.sleep(0.05)
    reader, writer = await web.open_connection("api.service.consul", timeout=5)
    await asyncio.wait_for(holding.wait(), 5)
    assert api.statistics().active_connections == 1

    await api.aclose()
    # The accepted connection was cut, the server closed and the service deregistered.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert not server.is_serving()
    async with httpx.AsyncClient(base_url=agent.http_addr) as http:
        assert "api-" + str(api_port) not in (await http.get("/v1/agent/services")).json()
    writer.close()
    await web.aclose()
    web.close()  # idempotent

    async def settled() -> bool:
        leftover = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
        return not leftover

    deadline = loop.time() + 5
    while not await settled():
        assert loop.time() < deadline, f"tasks left: {asyncio.all_tasks() - tasks_before}"
        await asyncio.sleep(0.02)
    gc.collect()
    deadline = loop.time() + 5
    while not (_threads() <= threads_before and _fds() <= fds_before):
        assert loop.time() < deadline, (
            f"threads {[t.name for t in threading.enumerate()]}, fds {_fds()} > {fds_before}"
        )
        await asyncio.sleep(0.02)
    assert not [h for h in _hub._hubs.values() if h.config == _cfg(agent)]
