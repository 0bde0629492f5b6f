"""The asyncio faces of a Service on a uvloop event loop: dial, serve, peer identity."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consul_connect.authz.authorizers import AllowIdentities, AllowTrustDomain
from consul_connect.discovery import Endpoint
from consul_connect.errors import DialError
from consul_connect.service import Service, get_peer_identity
from consul_connect.testing import TestCA

uvloop = pytest.importorskip("uvloop")


def _on_uvloop(main: object) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)  # type: ignore[arg-type]


def test_dial_and_serve_on_uvloop_with_identities_on_both_sides() -> None:
    ca = TestCA()
    web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    api = Service.from_test_ca(ca, "api", authorizer=AllowIdentities(web.identity))
    seen: list[object] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(get_peer_identity(writer))
        seen.append(get_peer_identity(writer.transport))
        writer.write(await reader.read(16))
        await writer.drain()
        writer.close()

    async def main() -> list[bool]:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        server = await api.start_server(echo)
        port = server.sockets[0].getsockname()[1]
        reused = []
        try:
            for _ in range(2):
                reader, writer = await web.open_connection(
                    Endpoint("127.0.0.1", port, api.identity), timeout=5
                )
                assert get_peer_identity(writer) == api.identity
                assert get_peer_identity(writer.transport) == api.identity
                writer.write(b"ping")
                await writer.drain()
                assert await asyncio.wait_for(reader.read(16), 5) == b"ping"
                reused.append(writer.get_extra_info("ssl_object").session_reused)
                writer.close()
        finally:
            server.close()
            await server.wait_closed()
        return reused

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            reused = runner.run(main())
    finally:
        web.close()
        api.close()
    assert reused == [False, True]
    assert seen == [web.identity] * 4


def test_dial_on_uvloop_to_the_wrong_identity_is_refused() -> None:
    ca = TestCA()
    web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    api = Service.from_test_ca(ca, "api", authorizer=AllowTrustDomain(ca.trust_domain))
    other = ca.issue("billing").identity

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        server = await api.start_server(echo)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(DialError, match="billing"):
                await web.open_connection(Endpoint("127.0.0.1", port, other), timeout=5)
        finally:
            server.close()
            await server.wait_closed()

    try:
        _on_uvloop(main())
    finally:
        web.close()
        api.close()


@pytest.mark.parametrize("tls_transport", ["direct", "asyncio"])
def test_an_asgi_app_served_on_uvloop_sees_the_caller_and_refuses_strangers(
    tls_transport: str,
) -> None:
    from consul_connect.integrations.asgi import peer_identity_from_scope, serve

    ca = TestCA()
    web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    api = Service.from_test_ca(ca, "api", authorizer=AllowIdentities(web.identity))
    billing = Service.from_test_ca(ca, "billing", authorizer=AllowTrustDomain(ca.trust_domain))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        peer = peer_identity_from_scope(scope)
        body = (peer.uri if peer else "none").encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def get(caller: Service, port: int) -> bytes:
        reader, writer = await caller.open_connection(
            Endpoint("127.0.0.1", port, api.identity), timeout=5
        )
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    async def main() -> tuple[bytes, bytes]:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        server = await serve(app, api, tls_transport=tls_transport, enforce_intentions=False)  # type: ignore[arg-type]
        try:
            allowed = await get(web, server.port)
            try:
                refused = await get(billing, server.port)
            except (ConnectionError, OSError):
                refused = b""
            return allowed, refused
        finally:
            await server.aclose(5)

    try:
        allowed, refused = _on_uvloop_result(main())
    finally:
        for svc in (web, api, billing):
            svc.close()
    assert allowed.startswith(b"HTTP/1.1 200 ")
    assert web.identity.uri.encode() in allowed
    assert refused == b""
    assert api.statistics().rejected == 1


def _on_uvloop_result(main: Any) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
