"""``Service.start_server`` and ``Service.open_connection`` on either TLS transport: the
event loop's own TLS (the default) or OpenSSL on the socket (``tls_transport="direct"``);
the same guarantees on both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consul_connect.authz.authorizers import AllowIdentities, AllowTrustDomain
from consul_connect.discovery import Endpoint
from consul_connect.errors import ConfigError, DialError
from consul_connect.identity import ServiceIdentity
from consul_connect.service import Service, get_peer_identity
from consul_connect.testing import TestCA
from tests.integrations import wait_until_async

TRANSPORTS = ["asyncio", "direct"]


class Services:
    def __init__(self) -> None:
        self.ca = TestCA()
        domain = AllowTrustDomain(self.ca.trust_domain)
        self.web = Service.from_test_ca(self.ca, "web", authorizer=domain)
        self.billing = Service.from_test_ca(self.ca, "billing", authorizer=domain)
        self.api = Service.from_test_ca(
            self.ca, "api", authorizer=AllowIdentities(self.web.identity)
        )
        self.seen: list[ServiceIdentity | None] = []

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.seen.append(get_peer_identity(writer))
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def endpoint(self, server: Any) -> Endpoint:
        return Endpoint("127.0.0.1", server.sockets[0].getsockname()[1], self.api.identity)


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    s = Services()
    yield s
    for svc in (s.web, s.billing, s.api):
        await svc.aclose()


@pytest.mark.parametrize("client", TRANSPORTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_allowed_caller_is_served_with_its_identity_and_a_stranger_is_not(
    services: Services, transport: Any, client: Any
) -> None:
    server = await services.api.start_server(services.echo, tls_transport=transport)
    payload = bytes(range(256)) * 4096  # 1 MiB: flow control on both sides
    reader, writer = await services.web.open_connection(
        services.endpoint(server), timeout=5, tls_transport=client
    )
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
    writer.close()
    with contextlib.suppress(ConnectionError, DialError, OSError):
        r2, w2 = await services.billing.open_connection(
            services.endpoint(server), timeout=5, tls_transport=client
        )
        w2.write(b"let me in")
        assert await asyncio.wait_for(r2.read(), 5) == b""
        w2.close()
    await wait_until_async(lambda: services.api.statistics().rejected == 1, what="refused")
    assert services.seen == [services.web.identity]
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failed_handshake_is_counted_and_serving_goes_on(
    services: Services, transport: Any
) -> None:
    server = await services.api.start_server(services.echo, tls_transport=transport)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await wait_until_async(lambda: services.api.statistics().rejected == 1, what="counted")
    writer.transport.abort()
    reader, writer = await services.web.open_connection(services.endpoint(server), timeout=5)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    writer.close()
    server.close()
    await server.wait_closed()


async def test_the_direct_server_is_used_like_an_asyncio_server(services: Services) -> None:
    server = await services.api.start_server(services.echo, tls_transport="direct")
    assert server.is_serving() and server.get_loop() is asyncio.get_running_loop()
    forever = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0)
    assert not forever.done()
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forever
    assert not server.is_serving() and server.sockets == ()
    async with await services.api.start_server(
        services.echo, tls_transport="direct", limit=1024, backlog=10
    ) as second:
        assert second.is_serving()
    assert not second.is_serving()


async def test_closing_the_service_closes_its_direct_servers(services: Services) -> None:
    server = await services.api.start_server(services.echo, tls_transport="direct")
    endpoint = services.endpoint(server)
    await services.api.aclose()
    assert not server.is_serving()
    with pytest.raises(DialError):
        await services.web.open_connection(endpoint, timeout=5)


async def test_unknown_transports_and_options_are_config_errors(services: Services) -> None:
    with pytest.raises(ConfigError, match="'direct' or 'asyncio'"):
        await services.api.start_server(services.echo, tls_transport="kernel")  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="reuse_port"):
        await services.api.start_server(services.echo, tls_transport="direct", reuse_port=True)


async def test_a_direct_client_resumes_and_checks_the_server_identity(
    services: Services,
) -> None:
    server = await services.api.start_server(services.echo)
    reused = []
    for _ in range(2):
        reader, writer = await services.web.open_connection(
            services.endpoint(server), timeout=5, tls_transport="direct"
        )
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
        assert get_peer_identity(writer) == services.api.identity
        reused.append(writer.get_extra_info("ssl_object").session_reused)
        writer.close()
    assert reused == [False, True]
    impostor = Endpoint(
        "127.0.0.1", server.sockets[0].getsockname()[1], services.billing.identity
    )
    with pytest.raises(DialError, match="billing"):
        await services.web.open_connection(impostor, timeout=5, tls_transport="direct")
    server.close()
    await server.wait_closed()


async def test_a_direct_client_gives_up_on_a_silent_server_within_its_deadline(
    services: Services,
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # never answers the ClientHello; returns when the client goes
        finally:
            writer.close()  # Server.wait_closed() waits for its connections (3.12+)

    plain = await asyncio.start_server(silent, "127.0.0.1", 0)
    endpoint = Endpoint("127.0.0.1", plain.sockets[0].getsockname()[1], services.api.identity)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DialError):
        await services.web.open_connection(endpoint, timeout=0.5, tls_transport="direct")
    assert loop.time() - started < 5
    plain.close()
    await plain.wait_closed()
    with pytest.raises(ConfigError, match="ssl"):
        await services.web.open_connection(endpoint, tls_transport="direct", ssl=None)
