"""Servers over time: shutting down with requests in flight, and intention changes that
must reach calls already running."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import AllowTrustDomain
from consul_connect.devagent import DevAgent
from consul_connect.service import Service
from consul_connect.testing import TestCA
from tests.integrations import (
    Mesh,
    allow,
    decided,
    deny,
    open_mesh,
    register,
    wait_until,
    wait_until_async,
)

grpc = pytest.importorskip("grpc")

from consul_connect.integrations.grpc import (  # noqa: E402
    add_connect_port,
    connect_aio_channel,
    connect_aio_server,
    connect_channel,
    connect_server,
)

ECHO = "/test.Echo/Echo"


def _run_asgi_tasks() -> list[asyncio.Task[Any]]:
    return [
        t for t in asyncio.all_tasks() if "run_asgi" in t.get_coro().__qualname__  # type: ignore[union-attr]
    ]


@pytest.fixture(params=["direct", "asyncio"])
async def mesh(agent: DevAgent, request: pytest.FixtureRequest) -> AsyncIterator[Mesh]:
    async with open_mesh(agent, tls_transport=request.param) as opened:
        allow(opened.http, "web", "api")
        await wait_until_async(decided(opened.api, opened.web.identity, True), what="allow")
        yield opened


async def test_asgi_aclose_cuts_off_a_request_still_busy_after_its_timeout(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", mesh.server.port, ssl=mesh.web.client_context, server_hostname=""
    )
    try:
        writer.write(b"GET /stall HTTP/1.1\r\nHost: api\r\n\r\n")
        await writer.drain()
        await wait_until_async(lambda: mesh.app.calls == 1, what="the request reached the app")
        assert mesh.api.statistics().active_connections == 1
        with caplog.at_level(logging.INFO):
            await asyncio.wait_for(mesh.server.aclose(timeout=0.5), 10)
            # The busy connection is cut off, not left open with its request running.
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert not mesh.server.serving
        assert _run_asgi_tasks() == []
        assert mesh.api.statistics().active_connections == 0
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert any("cutting off 1 connection" in r.getMessage() for r in caplog.records)
    finally:
        writer.close()


# ------------------------------------------------------------------------------ gRPC


class GrpcMesh:
    """``api`` and ``web`` on the dev agent, ``web`` allowed; an echo servicer for ``api``."""

    def __init__(self, agent: DevAgent) -> None:
        cfg = AgentConfig.from_address(agent.address)
        self.http = httpx.Client(base_url=agent.http_addr, timeout=10)
        self.api, self.web = Service("api", agent=cfg), Service("web", agent=cfg)
        self.served: list[bytes] = []
        self.api.wait_ready(10)
        self.web.wait_ready(10)
        allow(self.http, "web", "api")
        wait_until(decided(self.api, self.web.identity, True), what="allow")

    def close(self) -> None:
        self.web.close()
        self.api.close()
        self.http.close()

    def echo(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for r in requests:
            self.served.append(r)
            yield r

    async def aio_echo(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            self.served.append(r)
            yield r

    def handlers(self, fn: Callable[..., Any]) -> Any:
        return grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(fn)}
        )

    def deny_web(self) -> None:
        deny(self.http, "web", "api")
        wait_until(decided(self.api, self.web.identity, False), what="deny")


@pytest.fixture
def grpc_mesh(agent: DevAgent) -> Iterator[GrpcMesh]:
    g = GrpcMesh(agent)
    yield g
    g.close()


def test_grpc_stream_open_when_an_intention_turns_to_deny_is_cancelled(grpc_mesh: GrpcMesh) -> None:
    g = grpc_mesh
    server = connect_server(g.api)
    server.add_generic_rpc_handlers((g.handlers(g.echo),))
    port = add_connect_port(server, g.api, "127.0.0.1:0")
    server.start()
    try:
        register(g.http, "api", port)
        with connect_channel(g.web, "api") as channel:
            outgoing: queue.Queue[bytes | None] = queue.Queue()
            stream = channel.stream_stream(ECHO)(iter(outgoing.get, None), timeout=30)
            outgoing.put(b"one")
            assert next(stream) == b"one"
            assert g.api.statistics().active_connections == 1
            g.deny_web()
            outgoing.put(b"two")
            with pytest.raises(grpc.RpcError) as caught:
                next(stream)
            outgoing.put(None)
            assert caught.value.code() == grpc.StatusCode.CANCELLED
            assert g.served == [b"one"]
            wait_until(lambda: g.api.statistics().active_connections == 0, what="untracked")
    finally:
        server.stop(None).wait(5)


async def test_grpc_aio_stream_open_when_an_intention_turns_to_deny_is_ended(
    grpc_mesh: GrpcMesh,
) -> None:
    g = grpc_mesh
    server = connect_aio_server(g.api)
    server.add_generic_rpc_handlers((g.handlers(g.aio_echo),))
    port = add_connect_port(server, g.api, "127.0.0.1:0")
    await server.start()
    try:
        register(g.http, "api", port)
        async with connect_aio_channel(g.web, "api") as channel:
            call = channel.stream_stream(ECHO)(timeout=30)
            await call.write(b"one")
            assert await call.read() == b"one"
            await asyncio.to_thread(g.deny_web)
            # The server ends the call with a status (not a hang until the deadline).
            assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.CANCELLED
            assert g.served == [b"one"]
            await wait_until_async(
                lambda: g.api.statistics().active_connections == 0, what="untracked"
            )
    finally:
        await server.stop(None)


# ------------------------------------------------------------------ connection tracking


def test_each_tracked_connection_has_its_own_token_even_with_a_shared_close() -> None:
    ca = TestCA()
    svc = Service.from_test_ca(ca, "api", authorizer=AllowTrustDomain(ca.trust_domain))
    try:
        closed: list[int] = []
        lock = threading.Lock()

        def close() -> None:
            with lock:
                closed.append(1)

        first = svc.track_connection(svc.identity, close)
        second = svc.track_connection(svc.identity, close)
        assert first != second
        assert svc.statistics().active_connections == 2
        svc.untrack_connection(first)
        assert svc.statistics().active_connections == 1
    finally:
        svc.close()
