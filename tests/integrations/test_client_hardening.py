"""The dialling side under attack and misuse: servers with another service's certificate
(also on resumed TLS sessions), redirects to other services and off the mesh, requests
cancelled mid-handshake, a closed Service, and callers naming ever new hosts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

import aiohttp
import httpx
import pytest
import requests

import consul_connect.service
from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.discovery import Endpoint
from consul_connect.errors import ConfigError, DialError, ServerIdentityError
from consul_connect.integrations.aiohttp import connect_session
from consul_connect.integrations.asgi import ConnectServer, serve
from consul_connect.integrations.httpx import AsyncConnectTransport, ConnectTransport
from consul_connect.integrations.requests import ConnectAdapter
from consul_connect.service import Service
from tests.integrations import Mesh, RecordingApp, mesh, register

__all__ = ["mesh"]

_GET = b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"


class SilentServer:
    """A loopback port that accepts TCP connections and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []

    async def accept(self) -> socket.socket:
        conn, _ = await asyncio.to_thread(self.sock.accept)
        self.accepted.append(conn)
        return conn

    def nobody_connected(self) -> bool:
        self.sock.setblocking(False)
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return True
        conn.close()
        return False

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _closed_by_peer(conn: socket.socket, timeout: float) -> bool:
    """Read (the client hello) until EOF; False if the peer keeps the socket open."""
    conn.settimeout(timeout)
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


# ----------------------------------------------------------------- cancellation


@pytest.mark.parametrize(
    "client", ["httpx", "aiohttp", "open_connection-asyncio", "open_connection-direct"]
)
async def test_a_request_cancelled_mid_handshake_closes_its_socket_at_once(
    mesh: Mesh, silent: SilentServer, client: str
) -> None:
    register(mesh.http, "stall", silent.port, "stall-1")
    web = mesh.web
    async with (
        httpx.AsyncClient(transport=AsyncConnectTransport(web)) as hc,
        connect_session(web) as ac,
    ):

        async def dial() -> object:
            if client == "httpx":
                return await hc.get("http://stall/")
            if client == "aiohttp":
                return await ac.get("http://stall/")
            if client.endswith("direct"):
                return await web.open_connection("stall", tls_transport="direct")
            return await web.open_connection("stall", tls_transport="asyncio")

        # No garbage collection may close a dropped socket for us.
        gc.disable()
        try:
            task = asyncio.ensure_future(dial())
            conn = await silent.accept()
            conn.settimeout(5)
            hello = await asyncio.to_thread(conn.recv, 5)
            assert hello[:1] == b"\x16"  # a TLS handshake record: the client hello
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(_closed_by_peer, conn, 5.0)
        finally:
            gc.enable()


# ----------------------------------------------------------------- redirects


async def _redirector(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with a 307 to the ``to`` query parameter."""
    if scope["type"] != "http":
        return
    to = parse_qs(scope["query_string"].decode())["to"][0]
    await send(
        {
            "type": "http.response.start",
            "status": 307,
            "headers": [(b"location", to.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


@dataclass
class Hops:
    web: Service
    landed: RecordingApp


@pytest.fixture
async def hops(agent: DevAgent) -> AsyncIterator[Hops]:
    """``hop`` redirects wherever it is told; ``other`` records what reaches it."""
    cfg = AgentConfig.from_address(agent.address)
    http = httpx.Client(base_url=agent.http_addr, timeout=10)
    services = [Service(name, agent=cfg) for name in ("web", "hop", "other")]
    web, hop, other = services
    landed = RecordingApp()
    servers: list[ConnectServer] = []
    try:
        await web.wait_ready_async(10)
        servers.append(await serve(_redirector, hop, ready_timeout=10))
        servers.append(await serve(landed, other, ready_timeout=10))
        register(http, "hop", servers[0].port, "hop-1")
        register(http, "other", servers[1].port, "other-1")
        yield Hops(web, landed)
    finally:
        for server in servers:
            await server.aclose(timeout=5)
        for svc in services:
            await svc.aclose()
        http.close()


def _requests_session(service: Service) -> requests.Session:
    session = requests.Session()
    adapter = ConnectAdapter(service)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


async def _follow(client: str, web: Service, to: str) -> int:
    """POST to ``hop`` (redirected to ``to``) with ``client``; return the final status."""
    url = "http://hop/go"
    if client == "requests":

        def call() -> int:
            with _requests_session(web) as session:
                resp = session.post(url, params={"to": to}, data=b"body", timeout=5)
                return resp.status_code

        return await asyncio.to_thread(call)
    if client == "httpx":
        transport = AsyncConnectTransport(web)
        async with httpx.AsyncClient(transport=transport, follow_redirects=True) as hc:
            return (await hc.post(url, params={"to": to}, content=b"body")).status_code
    async with connect_session(web) as ac, ac.post(url, params={"to": to}, data=b"body") as r:
        return r.status


@pytest.mark.parametrize("client", ["requests", "httpx", "aiohttp"])
async def test_a_redirect_to_another_service_sends_that_services_host(
    hops: Hops, client: str
) -> None:
    assert await _follow(client, hops.web, "http://other/landed") == 200
    [scope] = hops.landed.scopes
    assert scope["path"] == "/landed"
    assert dict(scope["headers"])[b"host"] == b"other"


_REFUSED: dict[str, type[BaseException]] = {
    "requests": requests.ConnectionError,
    "httpx": httpx.ConnectError,
    "aiohttp": ConfigError,  # documented: a host that is not a Consul name
}


@pytest.mark.parametrize("client", ["requests", "httpx", "aiohttp"])
async def test_a_redirect_off_the_mesh_opens_no_connection(
    hops: Hops, silent: SilentServer, client: str
) -> None:
    with pytest.raises(_REFUSED[client]):
        await _follow(client, hops.web, f"http://127.0.0.1:{silent.port}/")
    assert silent.nobody_connected()


# ------------------------------------------------------- identity on resumed sessions


async def test_a_resumed_session_to_a_server_with_another_identity_is_refused_everywhere(
    mesh: Mesh,
) -> None:
    # "db" is registered at api's address: the server there can resume the sessions of
    # earlier connections to api, and must still be refused as db on every path.
    register(mesh.http, "db", mesh.server.port, "db-1")
    web = mesh.web
    offered = web.client_context.sessions_offered

    def sync_paths() -> None:
        reused = []
        for _ in range(2):
            with web.connect("api") as sock:
                reused.append(sock.session_reused)
                sock.sendall(_GET)
                while sock.recv(65536):
                    pass
        assert reused == [False, True]
        with pytest.raises(ServerIdentityError):
            web.connect("db")
        ep = web.resolve("db")[0]
        with pytest.raises(ServerIdentityError):
            web.connect(Endpoint(ep.host, ep.port, ep.identity))
        with (
            httpx.Client(transport=ConnectTransport(web)) as hc,
            pytest.raises(httpx.ConnectError) as sync_httpx,
        ):
            hc.get("http://db/")
        assert isinstance(sync_httpx.value.__cause__, ServerIdentityError)
        with _requests_session(web) as session, pytest.raises(requests.ConnectionError):
            session.get("http://db/", timeout=5)

    await asyncio.to_thread(sync_paths)
    kinds: tuple[Literal["asyncio", "direct"], ...] = ("asyncio", "direct")
    for kind in kinds:
        with pytest.raises(ServerIdentityError):
            await web.open_connection("db", tls_transport=kind)
    async with httpx.AsyncClient(transport=AsyncConnectTransport(web)) as hc:
        with pytest.raises(httpx.ConnectError) as async_httpx:
            await hc.get("http://db/")
    assert isinstance(async_httpx.value.__cause__, ServerIdentityError)
    async with connect_session(web) as ac:
        with pytest.raises(aiohttp.ClientError) as aio:
            await ac.get("http://db/")
    assert isinstance(aio.value.__cause__, ServerIdentityError)
    assert web.client_context.sessions_offered >= offered + 6
    assert mesh.app.calls == 2  # the two warm-up requests to api, nothing as db


async def test_failover_past_a_wrong_identity_instance_sends_it_nothing(mesh: Mesh) -> None:
    cfg = AgentConfig.from_address(mesh.agent.address)
    async with Service("db", agent=cfg) as db:
        db_app = RecordingApp()
        server = await serve(db_app, db, ready_timeout=10)
        try:
            register(mesh.http, "db", mesh.server.port, "db-impostor")  # api's server
            register(mesh.http, "db", server.port, "db-1")
            async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as hc:
                for _ in range(8):
                    resp = await hc.post(
                        "http://db/", content=b"secret", headers={"Connection": "close"}
                    )
                    assert resp.status_code == 200
        finally:
            await server.aclose(timeout=5)
    assert db_app.calls == 8
    assert mesh.app.calls == 0


# ------------------------------------------------------------------ closing, bounds


async def test_a_closed_service_refuses_to_dial_with_dial_error(mesh: Mesh) -> None:
    web = mesh.web
    ep = (await web.resolve_async("api"))[0]
    await web.aclose()

    def sync_paths() -> None:
        for target in ("api", Endpoint(ep.host, ep.port, ep.identity)):
            with pytest.raises(DialError, match="closed"):
                web.connect(target, timeout=2)
        with (
            httpx.Client(transport=ConnectTransport(web), timeout=2) as hc,
            pytest.raises(httpx.ConnectError) as info,
        ):
            hc.get("http://api/")
        assert isinstance(info.value.__cause__, DialError)

    await asyncio.to_thread(sync_paths)
    with pytest.raises(DialError, match="closed"):
        await web.open_connection("api", timeout=2)
    assert mesh.app.calls == 0


async def _discovery_watches(prefix: str) -> int:
    return sum(
        1
        for t in asyncio.all_tasks()
        if not t.done() and t.get_name().startswith(f"consul-connect discovery {prefix}")
    )


async def test_the_names_a_service_keeps_watched_are_bounded(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consul_connect.service, "_MAX_WATCHED_NAMES", 3)
    web = mesh.web
    async with httpx.AsyncClient(transport=AsyncConnectTransport(web)) as hc:
        for i in range(8):
            with contextlib.suppress(httpx.ConnectError):
                await hc.get(f"http://nowhere{i}/")
        assert (await hc.get("http://api/")).status_code == 200
    watching = await web._runtime.run_async(_discovery_watches("nowhere"), 5)
    assert watching <= 2  # three names at most, "api" one of them
