"""aiohttp over Connect, end to end: real aiohttp server and client, dev agent."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

pytest.importorskip("aiohttp")

from aiohttp import ClientError, ClientTimeout, web

from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.errors import ConfigError, ServerIdentityError
from consul_connect.integrations.aiohttp import (
    PEER_KEY,
    ConnectServer,
    ConnectSite,
    connect_session,
    peer_identity_of,
    serve,
)
from consul_connect.service import Service, ServiceEvent


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


def register(agent: DevAgent, name: str, port: int) -> None:
    r = httpx.put(
        f"{agent.http_addr}/v1/agent/service/register",
        json={"Name": name, "Port": port, "Address": "127.0.0.1", "Connect": {"Native": True}},
    )
    assert r.status_code == 200, r.text


class App:
    """An aiohttp app that records who called which path."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.app = web.Application()
        self.app.router.add_get("/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        peer = peer_identity_of(request)
        assert peer is not None and request[PEER_KEY] == peer
        self.calls.append((peer.service, request.path))
        ssl_obj = request.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        client_cert = hashlib.sha256(ssl_obj.getpeercert(binary_form=True)).hexdigest()
        return web.Response(text=f"{peer.service} {client_cert}")


@pytest.fixture(params=["direct", "asyncio"])
async def mesh(agent: DevAgent, request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """``api`` served on each TLS transport (OpenSSL on the socket, the loop's own TLS)."""
    cfg = AgentConfig.from_address(agent.address)
    services = {n: Service(n, agent=cfg) for n in ("api", "web", "evil")}
    for s in services.values():
        await s.wait_ready_async(10)
    app = App()
    server = await serve(app.app, services["api"], tls_transport=request.param)
    register(agent, "api", server.port)
    yield {"agent": agent, "app": app, "server": server, **services}
    await server.aclose()
    for s in services.values():
        await s.aclose()


async def test_allowed_caller_reaches_handler_with_its_identity(mesh: dict[str, Any]) -> None:
    async with (
        connect_session(mesh["web"]) as session,
        session.get("https://api.service.consul/hello") as resp,
    ):
        assert resp.status == 200
        assert (await resp.text()).startswith("web ")
    assert mesh["app"].calls == [("web", "/hello")]
    assert mesh["api"].statistics().accepted == 1


async def test_failed_handshakes_are_counted_with_their_reason(mesh: dict[str, Any]) -> None:
    api: Service = mesh["api"]
    events: list[ServiceEvent] = []
    api.on_event(events.append)
    _, writer = await asyncio.open_connection("127.0.0.1", mesh["server"].port)
    writer.write(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)  # a broken ClientHello
    await writer.drain()
    await wait_for(lambda: api.statistics().rejected == 1, what="bad handshake counted")
    writer.transport.abort()
    [event] = [e for e in events if e.kind == "peer_denied"]
    assert event.reason.startswith("handshake failed:")
    assert mesh["app"].calls == []
    async with (
        connect_session(mesh["web"]) as session,
        session.get("https://api.service.consul/after") as resp,
    ):
        assert resp.status == 200


async def test_denied_caller_gets_no_handler_run(mesh: dict[str, Any]) -> None:
    agent, api, evil = mesh["agent"], mesh["api"], mesh["evil"]
    r = httpx.put(
        f"{agent.http_addr}/v1/connect/intentions/exact",
        params={"source": "evil", "destination": "api"},
        json={"Action": "deny"},
    )
    assert r.status_code == 200, r.text
    await wait_for(
        lambda: api.authorizer.decide(evil.identity).allowed is False, what="deny intention"
    )
    async with connect_session(evil) as session:
        with pytest.raises(ClientError):
            async with session.get("https://api.service.consul/secret") as resp:
                await resp.read()
    assert mesh["app"].calls == []
    stats = api.statistics()
    assert stats.rejected >= 1 and stats.accepted == 0


async def put_l7_intentions(agent: DevAgent, api: Service, web_svc: Service) -> None:
    """web may call anything on api except /admin..."""
    with httpx.Client(base_url=agent.http_addr) as http:
        r = http.put(
            "/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
        )
        assert r.status_code == 200, r.text
        r = http.put(
            "/v1/config",
            json={
                "Kind": "service-intentions",
                "Name": "api",
                "Sources": [
                    {
                        "Name": "web",
                        "Permissions": [
                            {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                            {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                        ],
                    }
                ],
            },
        )
        assert r.status_code == 200, r.text
    await wait_for(
        lambda: not api.authorize_request(web_svc.identity, "GET", "/admin", []).allowed,
        what="L7 intention",
    )


async def test_l7_denied_request_gets_403_and_allowed_one_on_same_connection_succeeds(
    mesh: dict[str, Any],
) -> None:
    agent, api, web_svc = mesh["agent"], mesh["api"], mesh["web"]
    await put_l7_intentions(agent, api, web_svc)
    statuses = []
    async with connect_session(web_svc, connector_kwargs={"limit": 1}) as session:
        for n, path in enumerate(("/public", "/admin/users", "/public/again")):
            if n == 2:
                # An unrelated intention change must not drop a connection whose caller
                # is judged per request.
                before = api.authorizer.updates
                r = httpx.put(
                    f"{agent.http_addr}/v1/connect/intentions/exact",
                    params={"source": "other", "destination": "api"},
                    json={"Action": "allow"},
                )
                assert r.status_code == 200, r.text

                def updated(b: int = before) -> bool:
                    return bool(api.authorizer.updates > b)

                await wait_for(updated, what="intention update")
            async with session.get(f"https://api.service.consul{path}") as resp:
                statuses.append((resp.status, await resp.text()))
    assert [s for s, _ in statuses] == [200, 403, 200]
    assert "Permissions[0]" in statuses[1][1] and statuses[1][1].startswith("forbidden")
    assert [p for _, p in mesh["app"].calls] == ["/public", "/public/again"]
    # One TLS connection carried all three requests.
    assert api.statistics().accepted == 1


async def test_site_without_l7_middleware_refuses_callers_that_need_per_request_checks(
    agent: DevAgent,
) -> None:
    cfg = AgentConfig.from_address(agent.address)
    api, web_svc = Service("api", agent=cfg), Service("web", agent=cfg)
    app = App()
    runner = web.AppRunner(app.app)
    try:
        await api.wait_ready_async(10)
        await web_svc.wait_ready_async(10)
        await runner.setup()
        site = ConnectSite(runner, api)  # no connect_middleware on this app
        await site.start()
        register(agent, "api", site.port)
        await put_l7_intentions(agent, api, web_svc)
        async with connect_session(web_svc) as session:
            with pytest.raises(ClientError):
                async with session.get("https://api.service.consul/admin") as resp:
                    await resp.read()
        assert app.calls == []
        # (aiohttp retries an idempotent request once on a dropped connection)
        assert api.statistics().rejected_by_reason.get("Matched L7 intention", 0) >= 1
    finally:
        await runner.cleanup()
        await web_svc.aclose()
        await api.aclose()


async def test_an_unknown_tls_transport_is_a_config_error(agent: DevAgent) -> None:
    api = Service("api", agent=AgentConfig.from_address(agent.address))
    runner = web.AppRunner(App().app)
    try:
        await runner.setup()
        with pytest.raises(ConfigError, match="'direct' or 'asyncio'"):
            ConnectSite(runner, api, tls_transport="kernel")  # type: ignore[arg-type]
    finally:
        await runner.cleanup()
        await api.aclose()


async def test_rotation_mid_traffic_has_zero_failures(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(leaf_root_change_jitter=0.0)
    cfg = AgentConfig.from_address(agent.address)
    api, web_svc = Service("api", agent=cfg), Service("web", agent=cfg)
    app = App()
    server: ConnectServer | None = None
    try:
        await api.wait_ready_async(10)
        await web_svc.wait_ready_async(10)
        server = await serve(app.app, api)
        register(agent, "api", server.port)
        old = (api.statistics().leaf_serial, web_svc.statistics().leaf_serial)
        failures: list[BaseException] = []
        seen_client_certs: set[str] = set()
        rotated = False

        def both_rotated() -> bool:
            return (api.statistics().leaf_serial, web_svc.statistics().leaf_serial) != old and (
                api.statistics().leaf_rotations >= 1 and web_svc.statistics().leaf_rotations >= 1
            )

        async with connect_session(web_svc) as session:
            after = 0
            deadline = time.monotonic() + 15
            n = 0
            while after < 15 and time.monotonic() < deadline:
                n += 1
                if n == 5:
                    r = httpx.put(
                        f"{agent.http_addr}/v1/connect/ca/configuration",
                        json={
                            "Provider": "consul",
                            "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384},
                        },
                    )
                    assert r.status_code == 200, r.text
                # A new connection per request: every handshake uses the newest material.
                try:
                    async with session.get(
                        "https://api.service.consul/tick", headers={"Connection": "close"}
                    ) as resp:
                        assert resp.status == 200
                        seen_client_certs.add((await resp.text()).split()[1])
                except (ClientError, ConnectionError, AssertionError) as exc:
                    failures.append(exc)
                rotated = rotated or both_rotated()
                if rotated:
                    after += 1
                await asyncio.sleep(0.01)
        assert rotated, "the CA rotation did not reach both services in time"
        assert failures == []
        assert len(seen_client_certs) >= 2  # the server saw web's old and new leaf
    finally:
        if server is not None:
            await server.aclose()
        await web_svc.aclose()
        await api.aclose()


async def test_client_refuses_server_with_wrong_identity(agent: DevAgent) -> None:
    cfg = AgentConfig.from_address(agent.address)
    evil, web_svc = Service("evil", agent=cfg), Service("web", agent=cfg)
    app = App()
    try:
        await evil.wait_ready_async(10)
        await web_svc.wait_ready_async(10)
        async with await serve(app.app, evil) as server:
            # The catalog says "api" lives where evil listens.
            register(agent, "api", server.port)
            async with connect_session(web_svc) as session:
                with pytest.raises(ClientError, match="svc/api") as caught:
                    async with session.get("https://api.service.consul/") as resp:
                        await resp.read()
                assert isinstance(caught.value.__cause__, ServerIdentityError)
        assert app.calls == []
    finally:
        await web_svc.aclose()
        await evil.aclose()


async def test_agent_authorizer_admits_allowed_and_refuses_denied_callers(
    agent: DevAgent,
) -> None:
    r = httpx.put(
        f"{agent.http_addr}/v1/connect/intentions/exact",
        params={"source": "evil", "destination": "api"},
        json={"Action": "deny"},
    )
    assert r.status_code == 200, r.text
    cfg = AgentConfig.from_address(agent.address)
    api = Service("api", agent=cfg, authorizer="agent")
    web_svc, evil = Service("web", agent=cfg), Service("evil", agent=cfg)
    app = App()
    try:
        for s in (api, web_svc, evil):
            await s.wait_ready_async(10)
        async with await serve(app.app, api) as server:
            register(agent, "api", server.port)
            async with connect_session(web_svc) as session, session.get("https://api/x") as resp:
                assert resp.status == 200
            async with connect_session(evil) as session:
                with pytest.raises(ClientError):
                    async with session.get("https://api/x") as resp:
                        await resp.read()
        assert app.calls == [("web", "/x")]
    finally:
        for s in (api, web_svc, evil):
            await s.aclose()


def _leaf_sha256(service: Service) -> str:
    pem = service.client_context.current.leaf.cert_pem  # type: ignore[attr-defined]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


async def test_pooled_connection_is_replaced_after_rotation_with_zero_failures(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent(leaf_root_change_jitter=0.0)
    cfg = AgentConfig.from_address(agent.address)
    api, web_svc = Service("api", agent=cfg), Service("web", agent=cfg)
    app = App()
    try:
        await api.wait_ready_async(10)
        await web_svc.wait_ready_async(10)
        async with await serve(app.app, api) as server:
            register(agent, "api", server.port)
            old_web = web_svc.statistics().leaf_serial
            old_api = api.statistics().leaf_serial
            failures: list[BaseException] = []
            certs: list[str] = []
            # Keep-alive on, one connection at a time: without retirement every request
            # would ride the first connection, dialled with web's old leaf.
            async with connect_session(
                web_svc, max_connection_age=None, connector_kwargs={"limit": 1}
            ) as session:
                for _ in range(3):
                    async with session.get("https://api.service.consul/warm") as resp:
                        certs.append((await resp.text()).split()[1])
                r = httpx.put(
                    f"{agent.http_addr}/v1/connect/ca/configuration",
                    json={"Provider": "consul", "Config": {"PrivateKeyBits": 384}},
                )
                assert r.status_code == 200, r.text
                deadline = time.monotonic() + 15
                after = 0
                while after < 5 and time.monotonic() < deadline:
                    try:
                        async with session.get("https://api.service.consul/tick") as resp:
                            assert resp.status == 200
                            certs.append((await resp.text()).split()[1])
                    except (ClientError, AssertionError) as exc:
                        failures.append(exc)
                    rotated = (
                        web_svc.statistics().leaf_serial != old_web
                        and api.statistics().leaf_serial != old_api
                    )
                    after += rotated
                    await asyncio.sleep(0.01)
        assert failures == []
        assert after == 5, "the rotation did not reach both services in time"
        assert len(set(certs[:3])) == 1
        # The last requests ran on a connection dialled with web's new leaf.
        assert certs[-1] == _leaf_sha256(web_svc) != certs[0]
    finally:
        await web_svc.aclose()
        await api.aclose()


async def test_pooled_connection_to_an_instance_that_left_the_catalog_is_dropped(
    mesh: dict[str, Any],
) -> None:
    agent, api, web_svc = mesh["agent"], mesh["api"], mesh["web"]
    other_app = App()
    other = await serve(other_app.app, api)
    apps = {mesh["server"].port: mesh["app"], other.port: other_app}
    try:
        with httpx.Client(base_url=agent.http_addr) as http:
            # Replace the fixture's registration (ID "api") with one per instance.
            assert http.put("/v1/agent/service/deregister/api").status_code == 200
            for port in apps:
                r = http.put(
                    "/v1/agent/service/register",
                    json={
                        "Name": "api",
                        "ID": f"api-{port}",
                        "Port": port,
                        "Address": "127.0.0.1",
                        "Connect": {"Native": True},
                    },
                )
                assert r.status_code == 200, r.text
            async with connect_session(web_svc, connector_kwargs={"limit": 1}) as session:
                async with session.get("https://api.service.consul/first") as resp:
                    assert resp.status == 200
                used = next(p for p, a in apps.items() if a.calls)
                spare = next(p for p in apps if p != used)
                r = http.put(f"/v1/agent/service/deregister/api-{used}")
                assert r.status_code == 200, r.text
                deadline = time.monotonic() + 5
                while not apps[spare].calls:
                    assert time.monotonic() < deadline, "kept using the removed instance"
                    async with session.get("https://api.service.consul/next") as resp:
                        assert resp.status == 200
                served = len(apps[used].calls)
                for _ in range(5):
                    async with session.get("https://api.service.consul/more") as resp:
                        assert resp.status == 200
        assert len(apps[used].calls) == served
        assert len(apps[spare].calls) >= 6
    finally:
        await other.aclose()


async def test_connect_and_read_timeouts_are_honoured(mesh: dict[str, Any]) -> None:
    agent, web_svc = mesh["agent"], mesh["web"]
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    slow = web.Application()
    slow.router.add_get("/", stall)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        register(agent, "silent", silent.getsockname()[1])
        async with await serve(slow, mesh["api"]) as slow_server:
            register(agent, "slow", slow_server.port)
            try:
                timeout = ClientTimeout(sock_connect=0.5, sock_read=0.5)
                async with connect_session(web_svc, timeout=timeout) as session:
                    started = time.monotonic()
                    with pytest.raises(ClientError):
                        async with session.get("https://silent.service.consul/"):
                            pass
                    assert time.monotonic() - started < 2.0
                    started = time.monotonic()
                    with pytest.raises((ClientError, TimeoutError)):
                        async with session.get("https://slow.service.consul/") as resp:
                            await resp.read()
                    assert time.monotonic() - started < 2.0
            finally:
                release.set()
