"""Serving an ASGI app on uvicorn as a Connect-native service: every connection is
authorized before HTTP is parsed, the caller is in the scope, L7 intentions per request."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from consul_connect.identity import ServiceIdentity
from consul_connect.integrations.asgi import (
    EXTENSION_KEY,
    IntentionsMiddleware,
    _authz_path,
    serve,
)
from consul_connect.integrations.httpx import AsyncConnectTransport
from consul_connect.tls import DynamicServerContext
from tests.integrations import (
    Mesh,
    RecordingApp,
    apply_get_only,
    decided,
    deny,
    open_mesh,
    wait_until_async,
)


@pytest.fixture(params=["h11", "httptools", "h11-loop-tls"])
async def mesh(agent: DevAgent, request: pytest.FixtureRequest) -> AsyncIterator[Mesh]:
    """The shared mesh, its ``api`` served with each of uvicorn's HTTP/1.1 parsers on
    the direct TLS transport, and with h11 on the event loop's own TLS."""
    http, _, loop_tls = str(request.param).partition("-")
    if http == "httptools":
        pytest.importorskip("httptools")
    transport = "asyncio" if loop_tls else "direct"
    async with open_mesh(agent, http=http, tls_transport=transport) as opened:
        yield opened


async def test_allowed_caller_reaches_app_with_its_identity_in_the_scope(mesh: Mesh) -> None:
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        r = await client.get("https://api.service.consul/hello")
    assert r.status_code == 200
    assert r.json()["peer"] == mesh.web.identity.uri
    peer = mesh.app.scopes[0]["extensions"][EXTENSION_KEY]
    assert isinstance(peer["peer_identity"], ServiceIdentity)
    assert peer["peer_identity"].service == "web"
    assert peer["peer_uri"] == mesh.web.identity.uri
    assert mesh.app.scopes[0]["scheme"] == "https"
    assert mesh.api.statistics().accepted >= 1


async def test_denied_caller_is_refused_at_connect_and_the_app_never_runs(mesh: Mesh) -> None:
    deny(mesh.http, "web", "api")
    await wait_until_async(decided(mesh.api, mesh.web.identity, False), what="deny applied")
    before = mesh.api.statistics().rejected
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("https://api.service.consul/secret")
    assert mesh.app.calls == 0
    assert mesh.api.statistics().rejected > before


async def test_client_without_a_certificate_gets_no_application_bytes(mesh: Mesh) -> None:
    # Trusts the mesh CA but presents no client certificate.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.web.client_context.current.roots.cadata)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", mesh.server.port, ssl=ctx, server_hostname=""
    )
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        try:
            data = await asyncio.wait_for(reader.read(1024), 5)
        except (ConnectionError, ssl.SSLError):
            data = b""
        assert data == b""
    finally:
        writer.transport.abort()
    assert mesh.app.calls == 0


async def test_failed_handshakes_are_counted_with_their_reason(mesh: Mesh) -> None:
    events: list[Any] = []
    mesh.api.on_event(events.append)
    before = mesh.api.statistics().rejected
    # Not TLS at all, then a TLS client that presents no certificate.
    _, writer = await asyncio.open_connection("127.0.0.1", mesh.server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
    await writer.drain()
    await wait_until_async(
        lambda: mesh.api.statistics().rejected == before + 1, what="garbage counted"
    )
    writer.transport.abort()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.web.client_context.current.roots.cadata)
    _, writer = await asyncio.open_connection(
        "127.0.0.1", mesh.server.port, ssl=ctx, server_hostname=""
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
    await wait_until_async(
        lambda: mesh.api.statistics().rejected == before + 2, what="no certificate counted"
    )
    writer.transport.abort()
    reasons = [e.reason for e in events if e.kind == "peer_denied"]
    assert len(reasons) == 2
    assert reasons[0].startswith("handshake failed:") and "http request" in reasons[0].lower()
    assert "did not return a certificate" in reasons[1]
    assert mesh.app.calls == 0
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        assert (await client.get("https://api.service.consul/after")).status_code == 200


async def test_l7_denied_request_gets_403_while_get_works_on_the_same_connection(
    mesh: Mesh,
) -> None:
    await apply_get_only(mesh.http, mesh.web, mesh.api)
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        first = await client.get("https://api.service.consul/items")
        denied = await client.post("https://api.service.consul/items", content=b"x" * 1000)
        again = await client.get("https://api.service.consul/items/1")
    assert first.status_code == 200
    assert denied.status_code == 403
    assert denied.headers["content-type"].startswith("text/plain")
    assert "Forbidden by Consul intentions" in denied.text
    assert "Permissions[1]" in denied.text
    assert again.status_code == 200
    streams = [r.extensions["network_stream"].get_extra_info("ssl_object") for r in (first, again)]
    streams.append(denied.extensions["network_stream"].get_extra_info("ssl_object"))
    assert streams[0] is streams[1] is streams[2], "all three requests share one connection"
    assert [s["method"] for s in mesh.app.scopes] == ["GET", "GET"]


async def test_l4_change_to_deny_is_enforced_on_open_keepalive_connections(mesh: Mesh) -> None:
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        assert (await client.get("https://api.service.consul/a")).status_code == 200
        deny(mesh.http, "web", "api")
        await wait_until_async(decided(mesh.api, mesh.web.identity, False), what="deny applied")
        # The Service aborts the open connection; a request racing that abort is judged
        # by the middleware. Either way the app never sees it.
        try:
            late = await client.get("https://api.service.consul/b")
        except httpx.TransportError:
            pass
        else:
            assert late.status_code == 403
    assert [s["path"] for s in mesh.app.scopes] == ["/a"]


async def test_server_reports_its_port_and_stops_cleanly(mesh: Mesh) -> None:
    server = await serve(RecordingApp(), mesh.api, port=0)
    assert server.port > 0 and server.serving
    assert server.url == f"https://127.0.0.1:{server.port}"
    await server.aclose()
    assert not server.serving
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_uvicorn_tls_options_are_refused(mesh: Mesh) -> None:
    from consul_connect.errors import ConfigError

    with pytest.raises(ConfigError, match="ssl_certfile"):
        await serve(RecordingApp(), mesh.api, ssl_certfile="/nope.pem")


async def test_an_admitted_caller_sending_bad_http_gets_400_and_the_server_keeps_serving(
    mesh: Mesh,
) -> None:
    reader, writer = await mesh.web.open_connection("api", timeout=10)
    try:
        writer.write(b"\x00\x01 NOT HTTP \xff\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.transport.abort()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert mesh.app.calls == 0
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        assert (await client.get("https://api.service.consul/after")).status_code == 200


async def test_streamed_and_large_bodies_arrive_whole_and_in_order(mesh: Mesh) -> None:
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        streamed = await client.get("https://api.service.consul/stream")
        big = await client.get("https://api.service.consul/big")
        small = await client.get("https://api.service.consul/small")
    assert streamed.text == "".join(f"chunk{i}\n" for i in range(5))
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert big.content == b"x" * (1 << 20)
    assert small.json()["path"] == "/small"


async def test_a_large_upload_and_pipelined_requests_are_read_whole_and_in_order(
    mesh: Mesh,
) -> None:
    # 4 MiB makes uvicorn pause reading while the app drains its buffer.
    payload = bytes(range(256)) * (16 * 1024)
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        r = await client.post("https://api.service.consul/upload", content=payload)
    assert r.text == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    # Four requests in one write: uvicorn handles them one at a time.
    requests = [b"GET /p%d HTTP/1.1\r\nHost: api\r\n\r\n" % i for i in range(3)]
    requests.append(b"GET /p3 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    reader, writer = await mesh.web.open_connection("api", timeout=10)
    try:
        writer.write(b"".join(requests))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's close
    finally:
        writer.transport.abort()
    assert answer.count(b"HTTP/1.1 200 ") == 4
    positions = [answer.index(b'"path": "/p%d"' % i) for i in range(4)]
    assert positions == sorted(positions)


async def test_a_response_before_connection_close_is_delivered_whole(mesh: Mesh) -> None:
    reader, writer = await mesh.web.open_connection("api", timeout=10)
    try:
        writer.write(b"GET /last HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's close
    finally:
        writer.transport.abort()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    # Chunked (the app sets no length): the last chunk arrives before the close.
    size, _, rest = body.partition(b"\r\n")
    assert json.loads(rest[: int(size, 16)])["path"] == "/last"
    assert rest[int(size, 16) :] == b"\r\n0\r\n\r\n"


async def test_auto_parses_http_with_httptools_when_it_is_installed(mesh: Mesh) -> None:
    pytest.importorskip("httptools")
    server = await serve(RecordingApp(), mesh.api, port=0)
    try:
        assert server._server.config.http.__name__ == "ConnectHttpToolsProtocol"
    finally:
        await server.aclose()


async def test_an_unknown_http_parser_or_tls_transport_is_a_config_error(mesh: Mesh) -> None:
    from consul_connect.errors import ConfigError

    with pytest.raises(ConfigError, match="'auto', 'h11' or 'httptools'"):
        await serve(RecordingApp(), mesh.api, http="h2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'direct' or 'asyncio'"):
        await serve(RecordingApp(), mesh.api, tls_transport="kernel")  # type: ignore[arg-type]


def test_server_context_is_the_services_dynamic_context(mesh: Mesh) -> None:
    assert isinstance(mesh.api.server_context, DynamicServerContext)


# ------------------------------------------------------------ middleware, no network


class _Decider:
    """A stand-in Service whose L7 decision is fixed."""

    name = "api"

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self.seen: list[tuple[str, str]] = []
        self.denied: list[str] = []

    def deny_request(self, identity: Any, reason: str) -> None:
        self.denied.append(reason)

    def authorize_request(self, identity: Any, method: str, path: str, headers: Any) -> Any:
        self.seen.append((method, path))

        class D:
            allowed = self.allowed
            reason = "Matched L7 intention: web => api, Permissions[0] (DENY)"

        return D()


async def _call(mw: IntentionsMiddleware, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await mw(scope, receive, send)
    return sent


def _scope(path: str, with_peer: bool = True) -> dict[str, Any]:
    ident = ServiceIdentity("td.consul", "default", "dc1", "web")
    ext = {EXTENSION_KEY: {"peer_identity": ident, "peer_uri": ident.uri}} if with_peer else {}
    return {"type": "http", "method": "GET", "path": path, "headers": [], "extensions": ext}


async def test_request_without_connect_identity_is_denied_by_the_middleware() -> None:
    app = RecordingApp()
    mw = IntentionsMiddleware(app, _Decider(True))  # type: ignore[arg-type]
    sent = await _call(mw, _scope("/x", with_peer=False))
    assert sent[0]["status"] == 403
    assert b"no Connect peer identity" in sent[1]["body"]
    assert app.calls == 0


async def test_middleware_hands_over_the_routed_path_and_answers_a_denial_with_403() -> None:
    decider = _Decider(False)
    mw = IntentionsMiddleware(RecordingApp(), decider)  # type: ignore[arg-type]
    sent = await _call(mw, _scope("/public/../admin"))
    assert decider.seen == [("GET", "/public/../admin")]  # decide_l7 normalizes it
    assert decider.denied == ["Matched L7 intention: web => api, Permissions[0] (DENY)"]
    assert sent[0]["status"] == 403
    body = sent[1]["body"].decode()
    assert body.startswith("Forbidden by Consul intentions:")
    assert json.dumps(body)  # plain text, one line


@pytest.mark.parametrize(
    ("decoded", "expected"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/./b/", "/a/./b/"),  # decide_l7 normalizes, and checks it as given too
        ("/items/5?x", "/items/5%3Fx"),  # a decoded %3F does not end the path
        ("/a#b", "/a%23b"),
        ("/100%", "/100%25"),
    ],
)
def test_authz_path_is_the_routed_path_with_its_delimiters_escaped(
    decoded: str, expected: str
) -> None:
    assert _authz_path({"path": decoded}) == expected


async def test_agent_authorizer_decides_each_connection_before_http_is_read(
    mesh: Mesh,
) -> None:
    from consul_connect.agent.config import AgentConfig
    from consul_connect.service import Service
    from tests.integrations import register

    deny(mesh.http, "web", "billing")
    cfg = AgentConfig.from_address(mesh.agent.address)
    billing = Service("billing", agent=cfg, authorizer="agent")
    admin = Service("admin", agent=cfg)
    app = RecordingApp()
    server = await serve(app, billing, ready_timeout=10)
    try:
        register(mesh.http, "billing", server.port)
        await admin.wait_ready_async(10)
        async with httpx.AsyncClient(transport=AsyncConnectTransport(admin)) as client:
            ok = await client.post("https://billing.service.consul/pay", content=b"1")
        assert ok.status_code == 200
        assert ok.json()["peer"] == admin.identity.uri
        async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
            with pytest.raises(httpx.TransportError):
                await client.get("https://billing.service.consul/pay")
        assert [s["path"] for s in app.scopes] == ["/pay"]
        assert billing.statistics().rejected == 1
    finally:
        await server.aclose()
        await admin.aclose()
        await billing.aclose()


async def test_a_starlette_app_is_served_with_the_caller_in_its_request_scope(
    mesh: Mesh,
) -> None:
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from consul_connect.agent.config import AgentConfig
    from consul_connect.integrations.asgi import peer_identity_from_scope
    from consul_connect.service import Service
    from tests.integrations import register

    async def whoami(request: Request) -> JSONResponse:
        peer = peer_identity_from_scope(request.scope)
        ext = request.scope["extensions"][EXTENSION_KEY]
        return JSONResponse(
            {"peer": peer.service if peer else None, "uri": ext["peer_uri"], "m": request.method}
        )

    started: list[bool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(True)
        yield

    app = Starlette(routes=[Route("/whoami", whoami, methods=["GET", "POST"])], lifespan=lifespan)
    shop = Service("shop", agent=AgentConfig.from_address(mesh.agent.address))
    server = await serve(app, shop, ready_timeout=10)
    try:
        register(mesh.http, "shop", server.port)
        await apply_get_only(mesh.http, mesh.web, shop)
        async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
            got = await client.get("https://shop.service.consul/whoami")
            posted = await client.post("https://shop.service.consul/whoami")
        assert started == [True]  # the app's lifespan ran
        assert got.status_code == 200
        assert got.json() == {"peer": "web", "uri": mesh.web.identity.uri, "m": "GET"}
        assert posted.status_code == 403
    finally:
        await server.aclose()
        await shop.aclose()


async def test_http_connections_advertise_no_alpn(mesh: Mesh) -> None:
    # uvicorn and the httpx transports speak HTTP/1.1 only: neither side may offer h2.
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        r = await client.get("https://api.service.consul/")
    ssl_obj = r.extensions["network_stream"].get_extra_info("ssl_object")
    assert ssl_obj.selected_alpn_protocol() is None
    h2 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    h2.check_hostname = False
    h2.verify_mode = ssl.CERT_NONE
    h2.set_alpn_protocols(["h2"])
    leaf = mesh.web.client_context.current.leaf  # type: ignore[attr-defined]
    from consul_connect.tls import load_cert_chain_from_memory

    load_cert_chain_from_memory(h2, leaf.full_chain_pem, leaf.private_key_pem)
    _, writer = await asyncio.open_connection(
        "127.0.0.1", mesh.server.port, ssl=h2, server_hostname=""
    )
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
    finally:
        writer.transport.abort()


async def test_l7_denied_requests_are_counted_as_deny_decisions(mesh: Mesh) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from consul_connect.metrics import instrument

    registry = CollectorRegistry()
    handle = instrument(mesh.api, registry)
    try:
        await apply_get_only(mesh.http, mesh.web, mesh.api)
        async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
            assert (await client.get("https://api.service.consul/a")).status_code == 200
            assert (await client.post("https://api.service.consul/a")).status_code == 403
            assert (await client.post("https://api.service.consul/b")).status_code == 403
    finally:
        handle.close()
    labels = {"service": "api", "decision": "deny", "reason": "l7_intention"}
    assert registry.get_sample_value("consul_connect_authz_decisions_total", labels) == 2
    allowed = {"service": "api", "result": "allowed"}
    assert registry.get_sample_value("consul_connect_handshakes_total", allowed) == 1
