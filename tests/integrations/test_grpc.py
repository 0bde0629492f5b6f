"""gRPC over Connect, end to end: real grpcio servers and channels, dev agent."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("grpc")

import grpc
import grpc.aio

from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.discovery import Endpoint
from consul_connect.integrations.grpc import (
    add_connect_port,
    connect_aio_channel,
    connect_aio_server,
    connect_channel,
    connect_server,
    peer_identity_of,
)
from consul_connect.service import Service

SERVICE = "test.Echo"


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.02)


def register(agent: DevAgent, name: str, port: int) -> None:
    r = httpx.put(
        f"{agent.http_addr}/v1/agent/service/register",
        json={"Name": name, "Port": port, "Address": "127.0.0.1", "Connect": {"Native": True}},
    )
    assert r.status_code == 200, r.text


def put_l7_intentions(agent: DevAgent) -> None:
    """web may call anything on api except /test.Echo/Admin."""
    with httpx.Client(base_url=agent.http_addr) as http:
        r = http.put(
            "/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "grpc"}
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
                            {"Action": "deny", "HTTP": {"PathExact": f"/{SERVICE}/Admin"}},
                            {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                        ],
                    }
                ],
            },
        )
        assert r.status_code == 200, r.text


class Recorder:
    """Servicer methods over raw bytes that record who called what."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def _answer(self, method: str, context: Any) -> bytes:
        peer = peer_identity_of(context)
        assert peer is not None
        self.calls.append((peer.service, method))
        pem = context.auth_context()["x509_pem_cert"][0]
        return f"{peer.service} {hashlib.sha256(pem).hexdigest()}".encode()

    def handler(self) -> Any:
        def method(name: str) -> Any:
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._answer(name, ctx))

        return grpc.method_handlers_generic_handler(
            SERVICE, {"WhoAmI": method("WhoAmI"), "Admin": method("Admin")}
        )

    def aio_handler(self) -> Any:
        def method(name: str) -> Any:
            async def behaviour(req: bytes, ctx: Any) -> bytes:
                return self._answer(name, ctx)

            return grpc.unary_unary_rpc_method_handler(behaviour)

        return grpc.method_handlers_generic_handler(
            SERVICE, {"WhoAmI": method("WhoAmI"), "Admin": method("Admin")}
        )


def call(channel: Any, method: str = "WhoAmI") -> bytes:
    result: bytes = channel.unary_unary(f"/{SERVICE}/{method}")(b"hi", timeout=10)
    return result


class Mesh:
    def __init__(self, agent: DevAgent) -> None:
        self.agent = agent
        cfg = AgentConfig.from_address(agent.address)
        self.services = {n: Service(n, agent=cfg) for n in ("api", "web", "evil")}
        for s in self.services.values():
            s.wait_ready(10)
        self.recorder = Recorder()
        self.server = connect_server(self.services["api"])
        self.server.add_generic_rpc_handlers((self.recorder.handler(),))
        self.port = add_connect_port(self.server, self.services["api"], "127.0.0.1:0")
        self.server.start()
        register(agent, "api", self.port)

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def close(self) -> None:
        self.server.stop(None).wait(5)
        for s in self.services.values():
            s.close()


@pytest.fixture
def mesh(agent: DevAgent) -> Iterator[Mesh]:
    m = Mesh(agent)
    yield m
    m.close()


def test_allowed_call_reaches_servicer_with_caller_identity(mesh: Mesh) -> None:
    with connect_channel(mesh["web"], "api.service.consul") as channel:
        assert call(channel).startswith(b"web ")
        assert channel.connections == 1
    assert mesh.recorder.calls == [("web", "WhoAmI")]


def test_denied_caller_gets_permission_denied_and_servicer_never_runs(mesh: Mesh) -> None:
    api, evil = mesh["api"], mesh["evil"]
    r = httpx.put(
        f"{mesh.agent.http_addr}/v1/connect/intentions/exact",
        params={"source": "evil", "destination": "api"},
        json={"Action": "deny"},
    )
    assert r.status_code == 200, r.text

    def denied() -> bool:
        decision = api.authorizer.decide(evil.identity)
        return decision is not None and not decision.allowed

    wait_until(denied, what="deny intention")
    with connect_channel(evil, "api") as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "evil" in str(caught.value.details())
    assert mesh.recorder.calls == []
    assert api.statistics().rejected >= 1


def test_l7_denied_method_is_refused_while_allowed_one_on_same_channel_succeeds(
    mesh: Mesh,
) -> None:
    api, web = mesh["api"], mesh["web"]
    put_l7_intentions(mesh.agent)
    wait_until(
        lambda: not api.authorize_request(web.identity, "POST", f"/{SERVICE}/Admin", []).allowed,
        what="L7 intention",
    )
    with connect_channel(web, "api.service.consul") as channel:
        assert call(channel).startswith(b"web ")
        with pytest.raises(grpc.RpcError) as caught:
            call(channel, "Admin")
        assert call(channel).startswith(b"web ")
        assert channel.connections == 1  # all three calls on one connection
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Permissions[0]" in str(caught.value.details())
    assert mesh.recorder.calls == [("web", "WhoAmI"), ("web", "WhoAmI")]


async def test_aio_server_and_channel_enforce_l7_per_call(agent: DevAgent) -> None:
    cfg = AgentConfig.from_address(agent.address)
    api, web = Service("api", agent=cfg), Service("web", agent=cfg)
    recorder = Recorder()
    server = connect_aio_server(api)
    try:
        await api.wait_ready_async(10)
        await web.wait_ready_async(10)
        server.add_generic_rpc_handlers((recorder.aio_handler(),))
        port = add_connect_port(server, api, "127.0.0.1:0")
        await server.start()
        register(agent, "api", port)
        put_l7_intentions(agent)
        deadline = time.monotonic() + 10
        while api.authorize_request(web.identity, "POST", f"/{SERVICE}/Admin", []).allowed:
            assert time.monotonic() < deadline, "L7 intention never arrived"
            await asyncio.sleep(0.02)
        async with connect_aio_channel(web, "api.service.consul") as channel:
            who = channel.unary_unary(f"/{SERVICE}/WhoAmI")
            admin = channel.unary_unary(f"/{SERVICE}/Admin")
            assert (await who(b"x", timeout=10)).startswith(b"web ")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin(b"x", timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await who(b"x", timeout=10)).startswith(b"web ")
            assert channel.connections == 1
        assert recorder.calls == [("web", "WhoAmI"), ("web", "WhoAmI")]
    finally:
        await server.stop(None)
        await web.aclose()
        await api.aclose()


def test_rotation_mid_traffic_has_zero_failures(start_agent: Callable[..., DevAgent]) -> None:
    m = Mesh(start_agent(leaf_root_change_jitter=0.0))
    try:
        api, web = m["api"], m["web"]
        old_leaves = (api.statistics().leaf_serial, web.statistics().leaf_serial)
        failures: list[BaseException] = []
        fresh_client_certs: set[str] = set()

        def rotated() -> bool:
            return (
                api.statistics().leaf_rotations >= 1
                and web.statistics().leaf_rotations >= 1
                and (api.statistics().leaf_serial, web.statistics().leaf_serial) != old_leaves
            )

        with connect_channel(web, "api") as steady:
            n = after = 0
            deadline = time.monotonic() + 15
            while after < 10 and time.monotonic() < deadline:
                n += 1
                if n == 3:
                    r = httpx.put(
                        f"{m.agent.http_addr}/v1/connect/ca/configuration",
                        json={
                            "Provider": "consul",
                            "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384},
                        },
                    )
                    assert r.status_code == 200, r.text
                try:
                    # An established connection keeps working...
                    call(steady)
                    # ...and a new one handshakes with whatever is newest.
                    with connect_channel(web, "api") as fresh:
                        fresh_client_certs.add(call(fresh).split()[1].decode())
                except grpc.RpcError as exc:
                    failures.append(exc)
                if rotated():
                    after += 1
            assert rotated(), "the CA rotation did not reach both services in time"
        assert failures == []
        assert len(fresh_client_certs) >= 2  # the server saw web's old and new leaf
        # The gRPC server's TLS followed the rotation too: it now presents the new leaf.
        with web.connect(Endpoint("127.0.0.1", m.port, api.identity), timeout=5) as sock:
            presented = sock.getpeercert(binary_form=True)
        assert presented == ssl.PEM_cert_to_DER_cert(api._current_material().leaf.cert_pem)
    finally:
        m.close()


def test_client_refuses_server_with_wrong_identity(agent: DevAgent) -> None:
    cfg = AgentConfig.from_address(agent.address)
    evil, web = Service("evil", agent=cfg), Service("web", agent=cfg)
    recorder = Recorder()
    server = connect_server(evil)
    try:
        evil.wait_ready(10)
        web.wait_ready(10)
        server.add_generic_rpc_handlers((recorder.handler(),))
        port = add_connect_port(server, evil, "127.0.0.1:0")
        server.start()
        register(agent, "api", port)  # the catalog says "api" lives where evil listens
        with connect_channel(web, "api.service.consul") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                call(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "svc/api" in channel.last_error and "svc/evil" in channel.last_error
            assert channel.connections == 0
        assert recorder.calls == []
    finally:
        server.stop(None).wait(5)
        web.close()
        evil.close()


def test_dial_timeout_bounds_a_dial_to_a_server_that_never_speaks_tls(agent: DevAgent) -> None:
    web = Service("web", agent=AgentConfig.from_address(agent.address))
    with socket.socket() as silent:  # accepts TCP (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        register(agent, "api", silent.getsockname()[1])
        try:
            web.wait_ready(10)
            with connect_channel(web, "api.service.consul", dial_timeout=0.5) as channel:
                began = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    call(channel)  # the RPC itself may wait 10 s
                took = time.monotonic() - began
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "timed out" in channel.last_error or "deadline" in channel.last_error
                assert channel.connections == 0
            assert took < 8, f"the dial was not bounded by dial_timeout ({took:.1f} s)"
        finally:
            web.close()


def test_agent_authorizer_decides_calls_through_the_agent(agent: DevAgent) -> None:
    r = httpx.put(
        f"{agent.http_addr}/v1/connect/intentions/exact",
        params={"source": "evil", "destination": "api"},
        json={"Action": "deny"},
    )
    assert r.status_code == 200, r.text
    cfg = AgentConfig.from_address(agent.address)
    api = Service("api", agent=cfg, authorizer="agent")
    web, evil = Service("web", agent=cfg), Service("evil", agent=cfg)
    recorder = Recorder()
    server = connect_server(api)
    try:
        for s in (api, web, evil):
            s.wait_ready(10)
        server.add_generic_rpc_handlers((recorder.handler(),))
        register(agent, "api", add_connect_port(server, api, "127.0.0.1:0"))
        server.start()
        with connect_channel(web, "api") as channel:
            assert call(channel).startswith(b"web ")
        with connect_channel(evil, "api") as channel, pytest.raises(grpc.RpcError) as caught:
            call(channel)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert recorder.calls == [("web", "WhoAmI")]
    finally:
        server.stop(None).wait(5)
        for s in (api, web, evil):
            s.close()


def test_grpc_connections_negotiate_h2_and_http_ones_do_not(mesh: Mesh) -> None:
    from consul_connect.integrations.grpc import _h2_context

    web = mesh["web"]
    endpoint = Endpoint("127.0.0.1", mesh.port, mesh["api"].identity)
    # The channel's bridge dials with an h2-only context; the gRPC server agrees on h2.
    with (
        socket.create_connection(("127.0.0.1", mesh.port), timeout=5) as raw,
        _h2_context(web).wrap_socket(raw, server_hostname=None) as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
    # The Service's own contexts (used for HTTP/1.1 and raw TCP) offer no ALPN at all.
    with web.connect(endpoint, timeout=5) as sock:
        assert sock.selected_alpn_protocol() is None


def test_server_recycles_old_connections_without_failing_calls(agent: DevAgent) -> None:
    cfg = AgentConfig.from_address(agent.address)
    api, web = Service("api", agent=cfg), Service("web", agent=cfg)
    recorder = Recorder()
    server = connect_server(api, max_connection_age=0.3)
    try:
        api.wait_ready(10)
        web.wait_ready(10)
        server.add_generic_rpc_handlers((recorder.handler(),))
        register(agent, "api", add_connect_port(server, api, "127.0.0.1:0"))
        server.start()
        with connect_channel(web, "api") as channel:
            deadline = time.monotonic() + 10
            calls = 0
            while channel.connections < 3:
                assert time.monotonic() < deadline, "the server never recycled a connection"
                assert call(channel).startswith(b"web ")  # no call may fail meanwhile
                calls += 1
                time.sleep(0.02)
        assert len(recorder.calls) == calls
    finally:
        server.stop(None).wait(5)
        web.close()
        api.close()
