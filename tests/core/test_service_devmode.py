"""A Service built from a test CA (no agent): accepting, dialling, refusing, closing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from consul_connect.authz.authorizers import AllowIdentities, AllowTrustDomain
from consul_connect.discovery import Endpoint
from consul_connect.errors import ConfigError, DialError, NotReadyError, ServerIdentityError
from consul_connect.service import Service, ServiceEvent, get_peer_identity
from consul_connect.testing import TestCA


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def pair(ca: TestCA) -> Iterator[tuple[Service, Service]]:
    web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    api_auth = AllowIdentities(ca.issue("web").identity)
    api = Service.from_test_ca(ca, "api", authorizer=api_auth)
    yield web, api
    web.close()
    api.close()


def _echo_once(listener_accept: object) -> None:
    sock, _identity = listener_accept()  # type: ignore[operator]
    with sock:
        data = sock.recv(1024)
        sock.sendall(data.upper())


def test_two_services_talk_over_sync_sockets(pair: tuple[Service, Service]) -> None:
    web, api = pair
    with api.listen() as listener:
        host, port = listener.address
        seen: list[str] = []

        def serve() -> None:
            sock, identity = listener.accept(timeout=10)
            seen.append(identity.service)
            with sock:
                sock.sendall(sock.recv(1024).upper())

        t = threading.Thread(target=serve)
        t.start()
        target = Endpoint(host, port, api.identity)
        with web.connect(target, timeout=5) as conn:
            conn.sendall(b"hello")
            assert conn.recv(1024) == b"HELLO"
            assert get_peer_identity(conn) == api.identity
        t.join(10)
    assert seen == ["web"]
    assert api.statistics().accepted == 1


async def test_two_services_talk_over_asyncio(pair: tuple[Service, Service]) -> None:
    web, api = pair
    callers: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = get_peer_identity(writer)
        assert peer is not None
        callers.append(peer.service)
        writer.write((await reader.read(100)).upper())
        await writer.drain()
        writer.close()

    server = await api.start_server(handler)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await web.open_connection(Endpoint("127.0.0.1", port, api.identity))
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(100), 5) == b"PING"
    writer.close()
    server.close()
    await server.wait_closed()
    assert callers == ["web"]


async def test_unlisted_identity_gets_no_application_bytes(
    ca: TestCA, pair: tuple[Service, Service]
) -> None:
    _web, api = pair
    intruder = Service.from_test_ca(ca, "intruder", authorizer=AllowTrustDomain(ca.trust_domain))
    events: list[ServiceEvent] = []
    api.on_event(events.append)
    reached = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.set()
        writer.close()

    server = await api.start_server(handler)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await intruder.open_connection(Endpoint("127.0.0.1", port, api.identity))
        writer.write(b"secret")
        with pytest.raises((ConnectionError, ssl.SSLError)):
            data = await asyncio.wait_for(reader.read(100), 5)
            if data == b"":
                raise ConnectionResetError("closed")
        writer.close()
    finally:
        intruder.close()
        server.close()
        await server.wait_closed()
    assert not reached.is_set()
    stats = api.statistics()
    assert stats.rejected == 1 and stats.accepted == 0
    assert [e.kind for e in events] == ["peer_denied"]
    assert events[0].peer is not None and events[0].peer.service == "intruder"


def test_wrong_server_identity_is_refused(ca: TestCA, pair: tuple[Service, Service]) -> None:
    web, api = pair
    with api.listen() as listener:
        host, port = listener.address
        t = threading.Thread(target=lambda: _accept_quietly(listener), daemon=True)
        t.start()
        expected_db = ca.issue("db").identity
        with pytest.raises(ServerIdentityError) as info:
            web.connect(Endpoint(host, port, expected_db), timeout=5)
        assert info.value.failures and "api" in info.value.failures[0][1]
        t.join(10)


def _accept_quietly(listener: object) -> None:
    try:
        sock, _ = listener.accept(timeout=5)  # type: ignore[attr-defined]
        sock.close()
    except (OSError, TimeoutError):
        pass


def test_refused_and_stalled_instances_fail_over_within_the_deadline(
    pair: tuple[Service, Service],
) -> None:
    web, api = pair
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()  # nothing listens: connection refused
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)  # accepts TCP but never speaks TLS
    from consul_connect.discovery import Endpoint as E

    class Fixed:
        def __init__(self, eps: list[E]) -> None:
            self.eps = eps

        async def resolve(self) -> list[E]:
            return list(self.eps)

    with api.listen() as listener:
        host, port = listener.address
        t = threading.Thread(target=lambda: _accept_quietly(listener), daemon=True)
        t.start()
        eps = [
            E("127.0.0.1", refused_port, api.identity),
            E("127.0.0.1", stalled.getsockname()[1], api.identity),
            E(host, port, api.identity),
        ]
        # One short deadline for all: the stalled instance must not eat all of it.
        started = time.monotonic()
        with web.connect(Fixed(eps), timeout=1.5) as conn:
            assert get_peer_identity(conn) == api.identity
        assert time.monotonic() - started < 1.5
        t.join(10)
        # With nothing healthy left, the error lists every instance and why it failed.
        with pytest.raises(DialError) as info:
            web.connect(Fixed(eps[:2]), timeout=1.0)
        assert "connection refused" in info.value.failures[0][1]
        assert "timed out" in info.value.failures[1][1]
    stalled.close()


def test_dev_mode_requires_an_explicit_authorizer(ca: TestCA) -> None:
    with pytest.raises(ConfigError):
        Service.from_test_ca(ca, "web", authorizer="intentions")  # type: ignore[arg-type]


def test_ready_service_returns_from_wait_ready_at_once(pair: tuple[Service, Service]) -> None:
    web, _ = pair
    assert web.ready
    web.wait_ready(timeout=0)
    assert web.statistics().ready


def test_close_leaves_no_thread_behind(ca: TestCA) -> None:
    before = {t.name for t in threading.enumerate()}
    svc = Service.from_test_ca(ca, "solo", authorizer=AllowTrustDomain(ca.trust_domain))
    listener = svc.listen()
    svc.close()
    after = {t.name for t in threading.enumerate()}
    assert "consul-connect-runtime" not in after - before
    with pytest.raises(OSError):
        listener.accept(timeout=0.1)


async def test_a_closed_service_opens_no_new_server(ca: TestCA) -> None:
    svc = Service.from_test_ca(ca, "solo", authorizer=AllowTrustDomain(ca.trust_domain))
    svc.close()
    with pytest.raises(NotReadyError, match="closed"):
        svc.listen()
    with pytest.raises(NotReadyError, match="closed"):
        await svc.start_server(lambda r, w: None)


def test_refusals_are_counted_by_rule_not_by_peer(ca: TestCA) -> None:
    api = Service.from_test_ca(
        ca,
        "api",
        authorizer=AllowIdentities(f"spiffe://{ca.trust_domain}/ns/default/dc/dc1/svc/ops"),
    )
    listener = api.listen()
    try:
        for name in ("web", "billing"):
            caller = Service.from_test_ca(ca, name, authorizer=AllowTrustDomain(ca.trust_domain))
            try:
                # The handshake completes; the refusal is a close right after it.
                conn = caller.connect(Endpoint(*listener.address, api.identity), timeout=5)
                with conn:
                    conn.settimeout(5)
                    with contextlib.suppress(OSError):
                        conn.recv(1)
            finally:
                caller.close()
        deadline = time.monotonic() + 10
        while api.statistics().rejected < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert api.statistics().rejected_by_reason == {
            "identity <peer> is not in the allowed list": 2
        }
    finally:
        listener.close()
        api.close()


def test_a_silent_client_does_not_hold_up_the_sync_listener(
    pair: tuple[Service, Service],
) -> None:
    web, api = pair
    with api.listen(handshake_timeout=30) as listener:
        host, port = listener.address
        silent = socket.create_connection((host, port))  # connects, never speaks TLS
        try:
            accepted: list[str] = []

            def serve() -> None:
                sock, identity = listener.accept(timeout=10)
                accepted.append(identity.service)
                sock.close()

            t = threading.Thread(target=serve)
            t.start()
            started = time.monotonic()
            with web.connect(Endpoint(host, port, api.identity), timeout=5):
                pass
            t.join(10)
            assert accepted == ["web"]
            assert time.monotonic() - started < 5  # far below the 30 s handshake deadline
        finally:
            silent.close()


def test_closing_a_listener_ends_its_threads(ca: TestCA) -> None:
    svc = Service.from_test_ca(ca, "solo2", authorizer=AllowTrustDomain(ca.trust_domain))
    try:
        listener = svc.listen()
        names = {t.name for t in threading.enumerate()}
        assert "consul-connect-accept" in names
        listener.close()
        deadline = time.monotonic() + 10
        while any(
            t.name == "consul-connect-accept" or t.name.startswith("consul-connect-handshake")
            for t in threading.enumerate()
        ):
            assert time.monotonic() < deadline, "listener threads still running"
            time.sleep(0.02)
        with pytest.raises(OSError):
            listener.accept(timeout=0.1)
    finally:
        svc.close()


def test_second_dial_to_the_same_instance_resumes_the_session(
    pair: tuple[Service, Service],
) -> None:
    web, api = pair
    with api.listen() as listener:
        host, port = listener.address
        served: list[bool] = []

        def serve(n: int) -> None:
            for _ in range(n):
                sock, _identity = listener.accept(timeout=10)
                with sock:
                    served.append(bool(sock.session_reused))
                    sock.sendall(sock.recv(16))

        t = threading.Thread(target=serve, args=(2,))
        t.start()
        target = Endpoint(host, port, api.identity)
        reused = []
        for _ in range(2):
            with web.connect(target, timeout=5) as conn:
                conn.sendall(b"x")
                assert conn.recv(16) == b"x"  # tickets arrive with the first read
                reused.append(conn.session_reused)
                assert get_peer_identity(conn) == api.identity
        t.join(10)
    assert reused == [False, True]
    assert served == [False, True]


async def _echo_dials(web: Service, api: Service, n: int) -> list[bool]:
    """Dial ``api`` ``n`` times from ``web`` (one echo each); which handshakes resumed."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(16))
        await writer.drain()
        writer.close()

    server = await api.start_server(echo)
    port = server.sockets[0].getsockname()[1]
    target = Endpoint("127.0.0.1", port, api.identity)
    reused = []
    try:
        for _ in range(n):
            reader, writer = await web.open_connection(target)
            writer.write(b"y")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(16), 5) == b"y"
            reused.append(writer.get_extra_info("ssl_object").session_reused)
            assert get_peer_identity(writer) == api.identity
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return reused


async def test_second_async_dial_resumes_and_still_checks_identity(
    pair: tuple[Service, Service],
) -> None:
    web, api = pair
    assert await _echo_dials(web, api, 2) == [False, True]


async def test_with_resumption_off_every_async_dial_is_a_full_handshake(ca: TestCA) -> None:
    web = Service.from_test_ca(
        ca, "web", authorizer=AllowTrustDomain(ca.trust_domain), resume_sessions=False
    )
    api = Service.from_test_ca(ca, "api", authorizer=AllowTrustDomain(ca.trust_domain))
    try:
        assert await _echo_dials(web, api, 3) == [False, False, False]
    finally:
        await web.aclose()
        await api.aclose()
    assert web.client_context.sessions_offered == 0


async def test_a_server_without_session_tickets_never_lets_a_caller_resume(ca: TestCA) -> None:
    web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    api = Service.from_test_ca(
        ca, "api", authorizer=AllowTrustDomain(ca.trust_domain), session_tickets=False
    )
    try:
        assert await _echo_dials(web, api, 3) == [False, False, False]
        assert api._current_material().server_context.num_tickets == 0
    finally:
        await web.aclose()
        await api.aclose()
    assert api.statistics().accepted == 3


def test_a_resumed_session_with_a_since_expired_certificate_is_refused(ca: TestCA) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from consul_connect.service import _expired_resumption

    expired = ca.issue_expired("web")
    fresh = ca.issue("web")

    class Resumed:
        session_reused = True

        def __init__(self, pem: str) -> None:
            cert = x509.load_pem_x509_certificate(pem.encode())
            self._der = cert.public_bytes(serialization.Encoding.DER)

        def getpeercert(self, binary_form: bool = False) -> bytes:
            return self._der

    assert _expired_resumption(Resumed(expired.cert_pem)) is not None
    assert _expired_resumption(Resumed(fresh.cert_pem)) is None
