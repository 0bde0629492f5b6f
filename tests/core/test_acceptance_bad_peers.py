"""Bad peers against a Service's sync listener and asyncio server (issue 3 acceptance).

Each kind of wrong client (no certificate, expired, not yet valid, unknown CA, CA flag,
no URI SAN, two URI SANs, non-SPIFFE URI, agent identity, garbage bytes, a handshake
that never completes) gets no application byte, never reaches the application, is
counted and reported with a reason, and the server keeps serving: a good client
succeeds right afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from consul_connect.authz.authorizers import AllowTrustDomain
from consul_connect.certs import Leaf
from consul_connect.discovery import Endpoint
from consul_connect.service import Service, ServiceEvent, get_peer_identity
from consul_connect.testing import BadCert, TestCA
from consul_connect.tls import load_cert_chain_from_memory

HANDSHAKE_DEADLINE = 0.5


@dataclass(frozen=True)
class BadPeer:
    """How one kind of bad client behaves, and what the server should say about it."""

    kind: str
    reason: str  # regex the server's refusal reason must match
    cert: Callable[[TestCA], Leaf | BadCert | None] | None = None
    raw: bytes | None = None  # plain bytes instead of a TLS client
    stall: bool = False  # open TCP and say nothing


BAD_PEERS = [
    BadPeer("no client cert", r"did not return a certificate", cert=lambda ca: None),
    BadPeer("expired", r"certificate has expired", cert=lambda ca: ca.issue_expired("web")),
    BadPeer("not yet valid", r"not yet valid", cert=lambda ca: ca.issue_not_yet_valid("web")),
    BadPeer(
        "unknown CA",
        r"unable to get local issuer certificate",
        cert=lambda ca: ca.untrusted().issue("web"),
    ),
    BadPeer(
        "CA flag on leaf", r"is a CA certificate", cert=lambda ca: ca.issue_with_ca_flag("web")
    ),
    BadPeer("no URI SAN", r"one URI SAN, got 0", cert=lambda ca: ca.issue_without_uri_san("web")),
    BadPeer(
        "two URI SANs", r"one URI SAN, got 2", cert=lambda ca: ca.issue_with_two_uri_sans("web")
    ),
    BadPeer(
        "non-spiffe URI",
        r"not a Consul SPIFFE ID",
        cert=lambda ca: ca.issue_with_non_spiffe_uri("web"),
    ),
    BadPeer(
        "agent identity",
        r"not a service identity",
        cert=lambda ca: ca.issue_agent_cert("node-1"),
    ),
    BadPeer(
        "garbage bytes",
        r"handshake failed: .*http request",
        raw=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4,
    ),
    BadPeer(
        "handshake never completes",
        r"handshake failed: (timed out|did not complete)",
        stall=True,
    ),
]


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def server_and_client(ca: TestCA) -> Iterator[tuple[Service, Service]]:
    api = Service.from_test_ca(ca, "api", authorizer=AllowTrustDomain(ca.trust_domain))
    web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    yield api, web
    web.close()
    api.close()


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _client_context(ca: TestCA, cert: Leaf | BadCert | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # Connect leaves carry no DNS name
    ctx.load_verify_locations(cadata=ca.roots().cadata)
    if cert is not None:
        load_cert_chain_from_memory(ctx, cert.full_chain_pem, cert.private_key_pem)
    return ctx


def _bad_attempt(port: int, peer: BadPeer, ca: TestCA) -> bytes:
    """Act as ``peer`` against the server; return every byte the server sent back.

    An honest refusal is an empty answer (EOF, reset or a TLS alert): the server must
    never echo what the client sent.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with raw:
        if peer.stall:
            raw.settimeout(HANDSHAKE_DEADLINE * 10)
            # The server must cut us off after its handshake deadline.
            try:
                return raw.recv(100)
            except (ConnectionError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    raise AssertionError("the server never cut off a silent client") from exc
                return b""
        if peer.raw is not None:
            raw.sendall(peer.raw)
            got = b""
            with contextlib.suppress(OSError):
                while chunk := raw.recv(4096):
                    got += chunk
            # A TLS server answers plain text with at most an alert record (0x15).
            return b"" if got[:1] in (b"", b"\x15") else got
        assert peer.cert is not None
        ctx = _client_context(ca, peer.cert(ca))
        try:
            with ctx.wrap_socket(raw, server_hostname=None) as tls:
                tls.sendall(b"secret")
                return tls.recv(100)
        except (ssl.SSLError, OSError):
            return b""


class SyncEcho:
    """A Service's blocking listener with an accept loop that echoes on a thread."""

    def __init__(self, svc: Service) -> None:
        self.listener = svc.listen(handshake_timeout=HANDSHAKE_DEADLINE)
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.listener.address[1]

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            for sock, identity in self.listener:
                self.seen.append(identity.service)
                with contextlib.suppress(OSError), sock:
                    sock.sendall(sock.recv(100))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def _good_round_trip(web: Service, api: Service, port: int) -> None:
    with web.connect(Endpoint("127.0.0.1", port, api.identity), timeout=5) as conn:
        conn.sendall(b"ping")
        assert conn.recv(10) == b"ping"
        assert get_peer_identity(conn) == api.identity


def _assert_refused(api: Service, events: list[ServiceEvent], peer: BadPeer) -> None:
    _wait_for(lambda: api.statistics().rejected == 1, what="the refusal to be counted")
    stats = api.statistics()
    assert stats.accepted == 0
    assert sum(stats.rejected_by_reason.values()) == 1
    denied = [e for e in events if e.kind == "peer_denied"]
    assert len(denied) == 1
    assert re.search(peer.reason, denied[0].reason), denied[0].reason


@pytest.mark.parametrize("peer", BAD_PEERS, ids=[p.kind for p in BAD_PEERS])
def test_bad_peer_never_reaches_the_sync_listener_and_it_keeps_serving(
    ca: TestCA, server_and_client: tuple[Service, Service], peer: BadPeer
) -> None:
    api, web = server_and_client
    events: list[ServiceEvent] = []
    api.on_event(events.append)
    server = SyncEcho(api)
    try:
        assert _bad_attempt(server.port, peer, ca) == b""
        _assert_refused(api, events, peer)
        assert server.seen == []
        _good_round_trip(web, api, server.port)
        assert server.seen == ["web"]
        assert api.statistics().accepted == 1
    finally:
        server.close()


def test_stalled_handshake_does_not_stop_a_good_client_on_the_sync_listener(
    ca: TestCA, server_and_client: tuple[Service, Service]
) -> None:
    api, web = server_and_client
    server = SyncEcho(api)
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        started = time.monotonic()
        _good_round_trip(web, api, server.port)
        # Served at most one handshake deadline late, not never.
        assert time.monotonic() - started < HANDSHAKE_DEADLINE + 3
        assert server.seen == ["web"]
    finally:
        stalled.close()
        server.close()


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


# uvloop runs server handshakes in its own code: both loops must refuse and report.
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("peer", BAD_PEERS, ids=[p.kind for p in BAD_PEERS])
def test_bad_peer_never_reaches_the_asyncio_handler_and_it_keeps_serving(
    ca: TestCA, server_and_client: tuple[Service, Service], peer: BadPeer, loop: str
) -> None:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(_bad_peer_on_the_asyncio_server(ca, *server_and_client, peer))


async def _bad_peer_on_the_asyncio_server(
    ca: TestCA, api: Service, web: Service, peer: BadPeer
) -> None:
    events: list[ServiceEvent] = []
    api.on_event(events.append)
    seen: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        identity = get_peer_identity(writer)
        seen.append(identity.service if identity else "?")
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await api.start_server(echo, ssl_handshake_timeout=HANDSHAKE_DEADLINE)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await asyncio.to_thread(_bad_attempt, port, peer, ca) == b""
        await asyncio.to_thread(_assert_refused, api, events, peer)
        assert seen == []
        reader, writer = await web.open_connection(Endpoint("127.0.0.1", port, api.identity))
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(100), 5) == b"ping"
        writer.close()
        assert seen == ["web"]
        assert api.statistics().accepted == 1
    finally:
        server.close()
        await server.wait_closed()
