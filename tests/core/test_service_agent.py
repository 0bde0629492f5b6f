"""Services against the dev agent: identity, authorization, rotation, failure, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.discovery import Endpoint
from consul_connect.errors import AgentPermissionError, NotReadyError, ServerIdentityError
from consul_connect.service import Service, ServiceEvent, get_peer_identity
from tests.core.support import EchoServer
from tests.core.support import cfg as _cfg
from tests.core.support import decides as _decides
from tests.core.support import force_leaf_renewal as _force_leaf_renewal
from tests.core.support import intention as _intention
from tests.core.support import wait_for as _wait_for


def test_two_services_talk_both_ways_through_the_agent(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    web, api = services("web"), services("api")
    web.wait_ready(15)
    api.wait_ready(15)
    servers = [EchoServer(api), EchoServer(web)]
    try:
        for client, server in ((web, servers[0]), (api, servers[1])):
            with client.connect(server.endpoint, timeout=5) as conn:
                conn.sendall(b"hi")
                assert conn.recv(10) == b"hi"
        assert servers[0].seen == ["web"] and servers[1].seen == ["api"]
        assert web.identity.trust_domain == api.identity.trust_domain
        assert web.identity.uri.endswith("/ns/default/dc/dc1/svc/web")
    finally:
        for s in servers:
            s.close()


async def test_two_services_talk_by_name_over_asyncio(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    web = services("web")
    api = services("api")
    await web.wait_ready_async(15)
    await api.wait_ready_async(15)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = get_peer_identity(writer)
        writer.write(f"hello {peer.service if peer else '?'}".encode())
        await writer.drain()
        writer.close()

    server = await api.start_server(handler)
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=agent.http_addr) as http:
        r = await http.put(
            "/v1/agent/service/register",
            json={"Name": "api", "ID": "api-1", "Port": port, "Connect": {"Native": True}},
        )
        assert r.status_code == 200, r.text
    try:
        reader, writer = await web.open_connection("api.service.consul", timeout=10)
        assert await asyncio.wait_for(reader.read(100), 5) == b"hello web"
        assert get_peer_identity(writer) == api.identity
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_watched_name_resolves_from_memory_without_the_runtime_thread(
    agent: DevAgent, services: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    web = services("web")
    await web.wait_ready_async(15)
    async with httpx.AsyncClient(base_url=agent.http_addr) as http:
        for i, port in enumerate((9001, 9002)):
            r = await http.put(
                "/v1/agent/service/register",
                json={"Name": "db", "ID": f"db-{i}", "Port": port, "Connect": {"Native": True}},
            )
            assert r.status_code == 200, r.text
    first = await web.resolve_async("db", timeout=10)  # starts the watch
    assert sorted(ep.port for ep in first) == [9001, 9002]
    deadline = time.monotonic() + 10
    while web._resolved_locally("db") is None:  # the watch's first answer
        assert time.monotonic() < deadline, "watch delivered nothing"
        await asyncio.sleep(0.01)
    hops: list[object] = []
    original = web._runtime.run_async

    async def counting(coro: Any, timeout: float | None = None) -> Any:
        hops.append(coro)
        return await original(coro, timeout)

    monkeypatch.setattr(web._runtime, "run_async", counting)
    for _ in range(5):
        eps = await web.resolve_async("db")
        assert sorted(ep.port for ep in eps) == [9001, 9002]
        assert all(ep.identity.service == "db" for ep in eps)
    assert sorted(ep.port for ep in web.resolve("db")) == [9001, 9002]
    assert hops == []


def test_intention_deny_refuses_a_peer_before_any_byte(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    _intention(agent, "web", "api", "deny")
    web, api = services("web"), services("api")
    web.wait_ready(15)
    api.wait_ready(15)
    _wait_for(_decides(api, web, False), what="deny to reach the authorizer")
    server = EchoServer(api)
    try:
        conn = web.connect(server.endpoint, timeout=5)
        with conn:
            with contextlib.suppress(OSError):
                conn.sendall(b"secret")
            try:
                got = conn.recv(10)
            except OSError:
                got = b""
        assert got == b""
        assert server.seen == []
        _wait_for(lambda: api.statistics().rejected >= 1, what="the rejection to be counted")
        assert api.statistics().rejected_by_reason
    finally:
        server.close()


def test_changing_an_intention_to_deny_cuts_open_connections(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    web, api = services("web"), services("api")
    web.wait_ready(15)
    api.wait_ready(15)
    events: list[ServiceEvent] = []
    api.on_event(events.append)
    server = EchoServer(api)
    try:
        conn = web.connect(server.endpoint, timeout=5)
        conn.sendall(b"one")
        assert conn.recv(10) == b"one"
        _intention(agent, "web", "api", "deny")
        _wait_for(_decides(api, web, False), what="deny to reach the authorizer")
        conn.settimeout(5)
        try:
            data = conn.recv(10)
        except OSError:
            data = b""
        assert data == b""
        assert any(e.kind == "peer_denied" and e.peer == web.identity for e in events)
        conn.close()
    finally:
        server.close()


def test_wrong_server_identity_is_refused(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    web, api, db = services("web"), services("api"), services("db")
    for s in (web, api, db):
        s.wait_ready(15)
    server = EchoServer(api)
    try:
        host, port = server.listener.address
        with pytest.raises(ServerIdentityError):
            web.connect(Endpoint(host, port, db.identity), timeout=5)
    finally:
        server.close()


def test_readiness_is_truthful(agent: DevAgent) -> None:
    svc = Service("web", agent=_cfg(agent))
    try:
        svc.wait_ready(15)
        assert svc.ready and svc.statistics().ready
        started = time.monotonic()
        svc.wait_ready(15)
        assert time.monotonic() - started < 0.5
    finally:
        svc.close()


def test_unreachable_agent_gives_a_not_ready_error_naming_the_cause() -> None:
    svc = Service("web", agent=AgentConfig.from_address("127.0.0.1:1"))
    try:
        assert not svc.ready
        with pytest.raises(NotReadyError) as info:
            svc.wait_ready(1.5)
        assert "unreachable" in str(info.value)
    finally:
        svc.close()


def test_token_without_service_write_gives_the_typed_error(start_agent: Any) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root-token"
    )
    r = httpx.put(
        f"{agent.http_addr}/v1/acl/token",
        json={"ServiceIdentities": [{"ServiceName": "other"}]},
        headers={"X-Consul-Token": "root-token"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    token = r.json()["SecretID"]
    svc = Service("web", agent=_cfg(agent, token))
    try:
        with pytest.raises(AgentPermissionError) as info:
            svc.wait_ready(15)
        assert "service:write" in str(info.value)
    finally:
        svc.close()


def test_a_token_granted_service_write_later_still_registers_and_gets_its_leaf(
    start_agent: Any,
) -> None:
    # e.g. a token created just before the service starts, whose policy is fixed, or that
    # reaches the agent's servers late: the 403 is reported, then retried, not final.
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root-token"
    )
    root = {"X-Consul-Token": "root-token"}
    r = httpx.put(
        f"{agent.http_addr}/v1/acl/token",
        json={"ServiceIdentities": [{"ServiceName": "other"}]},
        headers=root,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    token = r.json()
    svc = Service("web", agent=_cfg(agent, token["SecretID"]), register=True, port=21002)
    try:
        with pytest.raises(AgentPermissionError):
            svc.wait_ready(15)
        r = httpx.put(
            f"{agent.http_addr}/v1/acl/token/{token['AccessorID']}",
            json={"ServiceIdentities": [{"ServiceName": "web"}]},
            headers=root,
            timeout=10,
        )
        assert r.status_code == 200, r.text
        # wait_ready raises the 403 at once while it is the latest word; readiness comes
        # with the next retry.
        _wait_for(lambda: svc.ready, timeout=60, what="the retried leaf and registration")
        assert svc.identity.service == "web"
        r = httpx.get(f"{agent.http_addr}/v1/agent/service/web-21002", headers=root, timeout=5)
        assert r.status_code == 200, r.text
    finally:
        svc.close()


def _rotate_ca(agent: DevAgent) -> None:
    r = httpx.put(
        f"{agent.http_addr}/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_leaf_renewal_and_root_rotation_under_load_fail_no_connection(
    start_agent: Any,
) -> None:
    agent = start_agent(leaf_root_change_jitter=0.0)
    web = Service("web", agent=_cfg(agent))
    api = Service("api", agent=_cfg(agent))
    server = None
    try:
        web.wait_ready(15)
        api.wait_ready(15)
        server = EchoServer(api)
        old_conn = web.connect(server.endpoint, timeout=5)
        first_serial = api.statistics().leaf_serial
        first_key = api._current_material().leaf.private_key_pem
        failures: list[str] = []
        done = threading.Event()
        count = 0

        def hammer() -> None:
            nonlocal count
            while not done.is_set() and count < 5000:
                try:
                    with web.connect(server.endpoint, timeout=5) as c:
                        c.sendall(b"x")
                        if c.recv(1) != b"x":
                            failures.append("bad echo")
                except Exception as exc:
                    failures.append(repr(exc))
                count += 1

        t = threading.Thread(target=hammer)
        t.start()
        try:
            _wait_for(lambda: count > 5, what="traffic")
            _force_leaf_renewal(agent, "api")
            _wait_for(lambda: api.statistics().leaf_serial != first_serial, what="leaf renewal")
            renewed = api.statistics().leaf_serial
            n = count
            _wait_for(lambda: count > n + 5, what="traffic after renewal")
            _rotate_ca(agent)
            _wait_for(lambda: api.statistics().roots == 2, what="new roots")
            _wait_for(
                lambda: api.statistics().leaf_serial not in (first_serial, renewed),
                what="leaf re-issued after rotation",
            )
            n = count
            _wait_for(lambda: count > n + 5, what="traffic after rotation")
        finally:
            done.set()
            t.join(30)
        assert failures == []
        assert api._current_material().leaf.private_key_pem != first_key
        # The connection opened before everything still works.
        old_conn.sendall(b"still")
        assert old_conn.recv(10) == b"still"
        old_conn.close()
        # New handshakes present the new leaf.
        with web.connect(server.endpoint, timeout=5) as c:
            presented = c.getpeercert(binary_form=True)
        assert presented is not None
        from cryptography import x509

        from consul_connect.certs import serial_to_colon_hex

        cert = x509.load_der_x509_certificate(presented)
        assert serial_to_colon_hex(cert.serial_number) == api.statistics().leaf_serial
    finally:
        if server is not None:
            server.close()
        web.close()
        api.close()


def test_existing_material_keeps_serving_while_the_agent_is_down(start_agent: Any) -> None:
    agent = start_agent()
    _intention(agent, "web", "api", "allow")
    web = Service("web", agent=_cfg(agent))
    api = Service("api", agent=_cfg(agent))
    server = None
    try:
        web.wait_ready(15)
        api.wait_ready(15)
        _wait_for(_decides(api, web, True), what="allow to reach the authorizer")
        server = EchoServer(api)
        agent.stop()
        with web.connect(server.endpoint, timeout=5) as c:
            c.sendall(b"up")
            assert c.recv(10) == b"up"
        _wait_for(lambda: api.statistics().watch_errors > 0, what="a watch error")
        assert api.authorizer.decide(web.identity) is not None
    finally:
        if server is not None:
            server.close()
        web.close()
        api.close()


def test_close_leaves_no_thread_task_or_socket(agent: DevAgent) -> None:
    import os

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()
    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = fds()
    svc = Service("web", agent=_cfg(agent))
    svc.wait_ready(15)
    listener = svc.listen()
    assert listener.address[1] > 0
    svc.close()
    gc.collect()
    _wait_for(
        lambda: {t.ident for t in threading.enumerate()} <= threads_before,
        what="threads to end",
    )
    _wait_for(lambda: fds() <= fds_before, what="sockets to close")


def _config_entry(agent: DevAgent, body: dict[str, Any]) -> None:
    r = httpx.put(f"{agent.http_addr}/v1/config", json=body, timeout=10)
    assert r.status_code == 200, r.text


def test_l7_callers_are_admitted_only_for_per_request_judging(
    agent: DevAgent, services: Callable[..., Service]
) -> None:
    web, api = services("web"), services("api")
    web.wait_ready(15)
    api.wait_ready(15)
    _config_entry(agent, {"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
    _config_entry(
        agent,
        {
            "Kind": "service-intentions",
            "Name": "api",
            "Sources": [
                {
                    "Name": "web",
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"Methods": ["GET"]}},
                        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                    ],
                }
            ],
        },
    )

    def l7_seen() -> bool:
        d = api.authorizer.decide(web.identity)
        return d is not None and d.intention is not None and d.intention.is_l7

    _wait_for(l7_seen, what="the L7 intention")
    assert api.authorize_request(web.identity, "GET", "/", []).allowed
    assert not api.authorize_request(web.identity, "POST", "/", []).allowed
    closed: list[str] = []
    api.track_connection(web.identity, lambda: closed.append("l7"), per_request_l7=True)
    api.track_connection(web.identity, lambda: closed.append("l4"))
    # An unrelated change re-checks tracked connections: only the L4-admitted one goes.
    _intention(agent, "db", "api", "allow")
    _wait_for(lambda: closed == ["l4"], what="the L4-tracked connection to be cut")
    # Turning the caller's intention into an L4 deny cuts the per-request one too.
    _intention(agent, "web", "api", "deny")
    _wait_for(lambda: closed == ["l4", "l7"], what="the per-request connection to be cut")
