"""The TLS layer: in-memory contexts, per-handshake rotation, and peer identity checks.

Everything runs real TLS over 127.0.0.1 with certificates from ``TestCA``, through both
asyncio streams and blocking sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import socket
import ssl
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from consul_connect import tls
from consul_connect.certs import Leaf, RootSet
from consul_connect.errors import CertificateError, DialError, PeerRejected, ServerIdentityError
from consul_connect.identity import ServiceIdentity
from consul_connect.testing.ca import BadCert, TestCA
from consul_connect.tls import (
    DynamicClientContext,
    DynamicServerContext,
    TLSMaterial,
    client_handshake,
    load_cert_chain_from_memory,
    peer_identity,
    server_handshake,
    verify_server_identity,
)

WAIT = 5.0  # upper bound for anything that should happen promptly


# ------------------------------------------------------------------------- helpers


class Holder:
    """What the service layer does: one reference, swapped whole."""

    def __init__(self, material: TLSMaterial) -> None:
        self.material = material

    def get(self) -> TLSMaterial:
        return self.material


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def roots(ca: TestCA) -> RootSet:
    return ca.roots()


@pytest.fixture(scope="module")
def api_material(ca: TestCA, roots: RootSet) -> TLSMaterial:
    return TLSMaterial.build(ca.issue("api"), roots)


@pytest.fixture(scope="module")
def web_material(ca: TestCA, roots: RootSet) -> TLSMaterial:
    return TLSMaterial.build(ca.issue("web"), roots)


def raw_client_context(roots: RootSet, cert: BadCert | Leaf | None) -> ssl.SSLContext:
    """A client context presenting ``cert`` as is (TLSMaterial would refuse bad ones)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots.cadata)
    if cert is not None:
        load_cert_chain_from_memory(ctx, cert.full_chain_pem, cert.private_key_pem)
    return ctx


def serial_of(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# Each wrong client certificate, and what refuses it: "handshake" means OpenSSL fails
# the handshake (the application callback never runs); otherwise the reason our
# identity check gives. OpenSSL 3.0 accepts a CA-flagged client leaf; our check must not.
BAD_CLIENTS: list[tuple[str, Callable[[TestCA], BadCert | Leaf | None], str]] = [
    ("no_client_cert", lambda ca: None, "handshake"),
    ("expired", lambda ca: ca.issue_expired("web"), "handshake"),
    ("not_yet_valid", lambda ca: ca.issue_not_yet_valid("web"), "handshake"),
    ("unknown_ca", lambda ca: ca.untrusted().issue("web"), "handshake"),
    ("ca_flag", lambda ca: ca.issue_with_ca_flag("web"), "CA certificate"),
    ("no_uri_san", lambda ca: ca.issue_without_uri_san("web"), "exactly one URI SAN, got 0"),
    ("two_uri_sans", lambda ca: ca.issue_with_two_uri_sans("web"), "exactly one URI SAN, got 2"),
    ("non_spiffe_uri", lambda ca: ca.issue_with_non_spiffe_uri("web"), "not a Consul SPIFFE ID"),
    ("agent_identity", lambda ca: ca.issue_agent_cert("node1"), "not a service identity"),
]

BAD_IDS = [case for case, _, _ in BAD_CLIENTS]

# What the blocking server reports for the certificates OpenSSL itself refuses.
SYNC_HANDSHAKE_REASONS = {
    "no_client_cert": "no client certificate",
    "expired": "certificate has expired",
    "not_yet_valid": "certificate is not yet valid",
    "unknown_ca": "unable to get local issuer certificate",
}


# --------------------------------------------------------------- asyncio test server


class AsyncServer:
    """An echo server that checks the peer first, like the service layer will."""

    def __init__(self) -> None:
        self.handler_calls = 0
        self.accepted: list[ServiceIdentity] = []
        self.rejections: list[str] = []
        self.received = bytearray()
        self.tasks: list[asyncio.Task[Any]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        self.writers.append(writer)
        self.handler_calls += 1
        try:
            ident = peer_identity(writer)
        except PeerRejected as exc:
            self.rejections.append(exc.reason)
            writer.close()
            return
        self.accepted.append(ident)
        try:
            while data := await reader.read(4096):
                self.received += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def wait_handlers(self) -> None:
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), WAIT)


@contextlib.asynccontextmanager
async def async_server(
    ctx: ssl.SSLContext, *, handshake_timeout: float = tls.HANDSHAKE_TIMEOUT
) -> AsyncIterator[AsyncServer]:
    srv = AsyncServer()
    server = await asyncio.start_server(
        srv.handle, "127.0.0.1", 0, ssl=ctx, ssl_handshake_timeout=handshake_timeout
    )
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()
        for w in srv.writers:
            w.close()
        await srv.wait_handlers()
        await server.wait_closed()


async def dial(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=""), WAIT
    )


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), WAIT)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), WAIT)


async def attempt_as_refused_client(port: int, ctx: ssl.SSLContext) -> bytes | None:
    """Connect, send a request, read: what a refused client gets (None = handshake failed)."""
    try:
        reader, writer = await dial(port, ctx)
    except (ssl.SSLError, ConnectionError):
        return None
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(100), WAIT)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        await close(writer)


def server_serial(writer: asyncio.StreamWriter) -> int:
    return serial_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))


# ---------------------------------------------------------- blocking-socket server


class SyncServer:
    """A thread-per-connection echo server using server_handshake."""

    def __init__(self, ctx: ssl.SSLContext, timeout: float = tls.HANDSHAKE_TIMEOUT) -> None:
        self.ctx = ctx
        self.timeout = timeout
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # lets the accept loop notice stop
        self.port: int = self.listener.getsockname()[1]
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.received = bytearray()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._spawn(self._accept_loop)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        started = time.monotonic()
        try:
            ssock, ident = server_handshake(conn, self.ctx, self.timeout)
        except PeerRejected as exc:
            self.events.put(("rejected", (exc.reason, time.monotonic() - started)))
            return
        with self._lock:
            self._open.append(ssock)
        self.events.put(("accepted", ident))
        with ssock:
            while True:
                try:
                    data = ssock.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                with self._lock:
                    self.received += data
                ssock.sendall(data)
        self.events.put(("closed", None))

    def next_event(self) -> tuple[str, Any]:
        return self.events.get(timeout=WAIT)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(WAIT)
            assert not t.is_alive()


@pytest.fixture
def sync_server_factory() -> Iterator[Callable[..., SyncServer]]:
    servers: list[SyncServer] = []

    def make(ctx: ssl.SSLContext, timeout: float = tls.HANDSHAKE_TIMEOUT) -> SyncServer:
        srv = SyncServer(ctx, timeout)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


def dial_sync(
    port: int, ctx: ssl.SSLContext, expected: ServiceIdentity | None = None, timeout: float = WAIT
) -> tuple[ssl.SSLSocket, ServiceIdentity]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return client_handshake(sock, ctx, expected, timeout)


# ---------------------------------------------------------- loading from memory


class SpyContext(ssl.SSLContext):
    """Records what load_cert_chain saw: the path, and the file's and folder's modes."""

    seen: list[tuple[str, int, int | None, str]]

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        path = os.fspath(certfile)
        mode = os.stat(path).st_mode
        parent = None if path.startswith("/proc/") else os.stat(os.path.dirname(path)).st_mode
        target = os.readlink(path) if path.startswith("/proc/") else path
        self.seen.append((path, mode, parent, target))
        super().load_cert_chain(certfile, keyfile, password)


def test_chain_and_key_load_through_memfd_and_fd_is_closed(api_material: TLSMaterial) -> None:
    if not tls._memfd_available():
        pytest.skip("memfd_create is Linux-only")
    ctx = SpyContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.seen = []
    fds_before = set(os.listdir("/proc/self/fd"))
    leaf = api_material.leaf
    load_cert_chain_from_memory(ctx, leaf.full_chain_pem, leaf.private_key_pem)
    assert set(os.listdir("/proc/self/fd")) == fds_before
    [(path, _, _, target)] = ctx.seen
    assert path.startswith("/proc/self/fd/")
    # An anonymous memory file, not a path on any filesystem.
    assert target.startswith("/memfd:consul-connect-leaf")


def test_fallback_uses_private_directory_and_leaves_nothing(
    api_material: TLSMaterial, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "_memfd_available", lambda: False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ctx = SpyContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.seen = []
    leaf = api_material.leaf
    load_cert_chain_from_memory(ctx, leaf.full_chain_pem, leaf.private_key_pem)
    [(path, mode, parent, _)] = ctx.seen
    assert path.startswith(str(tmp_path))
    assert stat.S_IMODE(mode) == 0o600
    assert parent is not None and stat.S_IMODE(parent) == 0o700
    assert list(tmp_path.iterdir()) == []  # file and directory removed
    assert ctx.cert_store_stats() is not None  # the context is usable


def test_building_material_writes_no_file_to_the_temp_dir(
    ca: TestCA, roots: RootSet, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not tls._memfd_available():
        pytest.skip("memfd_create is Linux-only")
    # A private temp dir: if anything in build() used tempfile, it would land here.
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    def no_files(ctx: ssl.SSLContext, data: bytes) -> None:
        raise AssertionError("the file fallback must not run on Linux")

    monkeypatch.setattr(tls, "_load_via_private_dir", no_files)
    fds_before = set(os.listdir("/proc/self/fd"))
    material = TLSMaterial.build(ca.issue("api"), roots)
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert material.server_context.verify_mode == ssl.CERT_REQUIRED


def certificates_sent_by(server: ssl.SSLContext) -> list[bytes]:
    """The DER certificates ``server`` sends in its Certificate message.

    A TLS 1.2 client (its certificate messages travel in the clear) over memory BIOs.
    """
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    with contextlib.suppress(ssl.SSLWantReadError):
        c.do_handshake()
    s_in.write(c_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        s.do_handshake()
    flight = s_out.read()
    handshake = b""
    while flight:  # TLS records: type, version, length
        kind, length = flight[0], int.from_bytes(flight[3:5], "big")
        if kind == 22:
            handshake += flight[5 : 5 + length]
        flight = flight[5 + length :]
    while handshake:  # handshake messages: type, 3-byte length
        kind, length = handshake[0], int.from_bytes(handshake[1:4], "big")
        body, handshake = handshake[4 : 4 + length], handshake[4 + length :]
        if kind == 11:  # Certificate: 3-byte list length, then 3-byte length + DER each
            ders, rest = [], body[3:]
            while rest:
                n = int.from_bytes(rest[:3], "big")
                ders.append(rest[3 : 3 + n])
                rest = rest[3 + n :]
            return ders
    raise AssertionError("no Certificate message in the server's first flight")


def test_a_leaf_without_chain_is_presented_with_its_root_chosen_once(
    ca: TestCA, roots: RootSet, api_material: TLSMaterial
) -> None:
    # What OpenSSL would otherwise complete on every handshake, verified once at build.
    [root] = roots.roots
    sent = certificates_sent_by(api_material.server_context)
    assert sent == [der_of(api_material.leaf.cert_pem), der_of(root.root_cert_pem)]


def test_a_leaf_with_its_own_chain_is_presented_as_issued() -> None:
    ca = TestCA()
    ca.rotate()
    leaf = ca.issue("api")
    assert leaf.chain  # the cross-signed new root
    material = TLSMaterial.build(leaf, ca.roots())
    sent = certificates_sent_by(material.server_context)
    assert sent == [der_of(leaf.cert_pem), *(der_of(c) for c in leaf.chain_pems)]


def test_key_that_does_not_match_the_leaf_raises_certificate_error(ca: TestCA) -> None:
    a, b = ca.issue("api"), ca.issue("web")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(CertificateError, match="does not match"):
        load_cert_chain_from_memory(ctx, a.full_chain_pem, b.private_key_pem)


def test_encrypted_key_is_refused_without_prompting(ca: TestCA) -> None:
    leaf = ca.issue("api")
    key = serialization.load_pem_private_key(leaf.private_key_pem.encode(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ).decode()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(CertificateError, match="encrypted"):
        load_cert_chain_from_memory(ctx, leaf.full_chain_pem, encrypted)


@pytest.mark.parametrize("case", ["garbage chain, truncated key", "header-only chain, no key"])
def test_garbage_pem_raises_certificate_error(case: str) -> None:
    key = TestCA().issue("web").private_key_pem
    chain, key = (
        ("not a pem", key.splitlines()[0] + "\n")
        if case.startswith("garbage")
        else ("-----BEGIN CERTIFICATE-----", "nokey")
    )
    with pytest.raises(CertificateError):
        load_cert_chain_from_memory(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, key)


# ------------------------------------------------------------------------ material


def test_material_contexts_require_peer_certs_and_tls12(api_material: TLSMaterial) -> None:
    s, c = api_material.server_context, api_material.client_context
    for ctx in (s, c):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.cert_store_stats()["x509_ca"] == 1
    assert s.protocol == ssl.PROTOCOL_TLS_SERVER and c.protocol == ssl.PROTOCOL_TLS_CLIENT
    assert c.check_hostname is False and s.check_hostname is False


def test_material_is_published_only_if_leaf_verifies_against_roots(
    ca: TestCA, roots: RootSet
) -> None:
    stranger = ca.untrusted().issue("api")
    with pytest.raises(CertificateError):
        TLSMaterial.build(stranger, roots)


def test_material_refuses_a_leaf_that_is_expired_at_build_time(ca: TestCA, roots: RootSet) -> None:
    leaf = ca.issue("api")
    with pytest.raises(CertificateError, match="expired"):
        TLSMaterial.build(leaf, roots, leaf.valid_before.replace(year=leaf.valid_before.year + 1))


def test_material_repr_never_shows_the_key(api_material: TLSMaterial) -> None:
    text = repr(api_material)
    assert "PRIVATE" not in text and api_material.leaf.private_key_pem[40:80] not in text
    assert api_material.leaf.serial_number in text


def test_dynamic_contexts_look_like_mtls_contexts(api_material: TLSMaterial) -> None:
    holder = Holder(api_material)
    server, client = DynamicServerContext(holder.get), DynamicClientContext(holder.get)
    assert isinstance(server, ssl.SSLContext) and isinstance(client, ssl.SSLContext)
    assert server.protocol == ssl.PROTOCOL_TLS_SERVER
    assert client.protocol == ssl.PROTOCOL_TLS_CLIENT and client.check_hostname is False
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert server.current is api_material


# ------------------------------------------------------------- peer identity rules


class FakeSSL:
    """Just enough of an SSLObject for the identity checks."""

    def __init__(self, der: bytes | None, server_side: bool = True) -> None:
        self.der = der
        self.server_side = server_side

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


class FakeTransport:
    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.obj if name == "ssl_object" else default


def der_of(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.DER
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ca: ca.issue_with_ca_flag("web"), "is a CA certificate"),
        (lambda ca: ca.issue_without_uri_san("web"), "expected exactly one URI SAN, got 0"),
        (lambda ca: ca.issue_with_two_uri_sans("web"), "expected exactly one URI SAN, got 2"),
        (lambda ca: ca.issue_with_non_spiffe_uri("web"), "not a Consul SPIFFE ID: https://"),
        (lambda ca: ca.issue_agent_cert("n1"), "not a service identity: spiffe://"),
    ],
)
def test_peer_identity_gives_a_reason_for_each_unusable_certificate(
    ca: TestCA, make: Callable[[TestCA], BadCert], reason: str
) -> None:
    bad = make(ca)
    with pytest.raises(PeerRejected) as info:
        peer_identity(FakeTransport(FakeSSL(der_of(bad.cert_pem))))
    assert reason in info.value.reason
    if "agent" in reason:
        assert "/agent/client/" in info.value.reason


def test_missing_peer_certificate_is_named_by_side() -> None:
    with pytest.raises(PeerRejected, match="no client certificate"):
        peer_identity(FakeSSL(None, server_side=True))
    with pytest.raises(PeerRejected, match="no server certificate"):
        peer_identity(FakeSSL(None, server_side=False))
    with pytest.raises(PeerRejected, match="not TLS"):
        peer_identity(FakeTransport(None))
    with pytest.raises(PeerRejected, match="not TLS"):  # a transport that has none
        peer_identity(None)  # type: ignore[arg-type]


def test_server_identity_tolerates_another_trust_domain(ca: TestCA) -> None:
    other = TestCA(datacenter="dc1").issue("api")  # same service, different trust domain
    expected = ServiceIdentity(ca.trust_domain, "default", "dc1", "api")
    got = verify_server_identity(FakeSSL(der_of(other.cert_pem), False), expected)
    assert got.trust_domain == other.identity.trust_domain != expected.trust_domain


@pytest.mark.parametrize(
    "expected",
    [
        ServiceIdentity("x.consul", "default", "dc1", "db"),
        ServiceIdentity("x.consul", "default", "dc2", "api"),
        ServiceIdentity("x.consul", "other", "dc1", "api"),
        ServiceIdentity("x.consul", "default", "dc1", "api", partition="ap1"),
    ],
)
def test_server_identity_mismatch_raises(
    api_material: TLSMaterial, expected: ServiceIdentity
) -> None:
    der = der_of(api_material.leaf.cert_pem)
    with pytest.raises(ServerIdentityError, match="peer certificate mismatch"):
        verify_server_identity(FakeSSL(der, False), expected)


def test_server_without_service_identity_raises_server_identity_error(ca: TestCA) -> None:
    agent = ca.issue_agent_cert("n1")
    expected = ServiceIdentity(ca.trust_domain, "default", "dc1", "api")
    with pytest.raises(ServerIdentityError, match="not a service identity"):
        verify_server_identity(FakeSSL(der_of(agent.cert_pem), False), expected)


# ------------------------------------------------------------ asyncio: handshakes


async def test_mutual_handshake_over_asyncio_streams_both_sides_see_identity(
    api_material: TLSMaterial, web_material: TLSMaterial
) -> None:
    async with async_server(DynamicServerContext(Holder(api_material).get)) as srv:
        reader, writer = await dial(srv.port, DynamicClientContext(Holder(web_material).get))
        got = verify_server_identity(writer, api_material.identity)
        assert got == api_material.identity
        assert await echo(reader, writer, b"ping") == b"ping"
        assert srv.accepted == [web_material.identity]
        await close(writer)


async def test_create_server_protocol_sees_identity_in_connection_made(
    api_material: TLSMaterial, web_material: TLSMaterial
) -> None:
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[ServiceIdentity] = loop.create_future()

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            seen.set_result(peer_identity(transport))
            transport.close()

    server = await loop.create_server(
        Proto, "127.0.0.1", 0, ssl=DynamicServerContext(Holder(api_material).get)
    )
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await dial(port, web_material.client_context)
        assert await asyncio.wait_for(seen, WAIT) == web_material.identity
        await close(writer)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("case", "make", "refused_by"), BAD_CLIENTS, ids=BAD_IDS)
async def test_denied_peer_gets_no_application_bytes(
    ca: TestCA,
    roots: RootSet,
    api_material: TLSMaterial,
    case: str,
    make: Callable[[TestCA], BadCert | Leaf | None],
    refused_by: str,
) -> None:
    ctx = raw_client_context(roots, make(ca))
    async with async_server(DynamicServerContext(Holder(api_material).get)) as srv:
        answer = await attempt_as_refused_client(srv.port, ctx)
        assert answer in (None, b"")  # EOF or a failed handshake: never an echo
        await srv.wait_handlers()
        assert srv.accepted == []
        assert srv.received == b""
        if refused_by == "handshake":
            assert srv.handler_calls == 0
        else:
            assert len(srv.rejections) == 1 and refused_by in srv.rejections[0]


async def test_garbage_and_silent_clients_are_bounded_by_the_handshake_deadline(
    api_material: TLSMaterial,
) -> None:
    ctx = DynamicServerContext(Holder(api_material).get)
    async with async_server(ctx, handshake_timeout=0.3) as srv:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # Garbage fails the handshake at once: the server drops the connection.
        assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        # Says nothing: the handshake deadline closes it.
        assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        assert time.monotonic() - started < 3.0
        writer.close()
        assert srv.handler_calls == 0


async def test_client_refuses_server_with_wrong_identity_before_writing(
    api_material: TLSMaterial, web_material: TLSMaterial
) -> None:
    async with async_server(DynamicServerContext(Holder(api_material).get)) as srv:
        _, writer = await dial(srv.port, web_material.client_context)
        expected = dataclasses.replace(api_material.identity, service="db")
        with pytest.raises(ServerIdentityError, match=r"expected .*/svc/db, got .*/svc/api"):
            verify_server_identity(writer, expected)
        await close(writer)
        await srv.wait_handlers()
        assert srv.received == b""


# -------------------------------------------------------------- asyncio: rotation


async def test_rotation_serves_new_leaf_and_roots_while_open_connection_keeps_working() -> None:
    ca = TestCA()
    roots1 = ca.roots()
    m1 = TLSMaterial.build(ca.issue("api"), roots1)
    holder = Holder(m1)
    old_client = TLSMaterial.build(ca.issue("web"), roots1)

    async with async_server(DynamicServerContext(holder.get)) as srv:
        r0, w0 = await dial(srv.port, old_client.client_context)
        assert server_serial(w0) == m1.leaf.certificate.serial_number
        assert await echo(r0, w0, b"before") == b"before"

        # 1. A renewed leaf, same roots: new handshakes present it.
        m2 = TLSMaterial.build(ca.issue("api"), roots1)
        holder.material = m2
        r, w = await dial(srv.port, old_client.client_context)
        assert server_serial(w) == m2.leaf.certificate.serial_number
        assert m2.leaf.certificate.serial_number != m1.leaf.certificate.serial_number
        await close(w)
        assert await echo(r0, w0, b"after-leaf") == b"after-leaf"

        # 2. CA rotation: new root active, old still trusted. A client that only knows
        #    the old root still accepts the server through the cross-signed cert.
        ca.rotate()
        roots2 = ca.roots()
        m3 = TLSMaterial.build(ca.issue("api"), roots2)
        holder.material = m3
        r, w = await dial(srv.port, old_client.client_context)
        assert server_serial(w) == m3.leaf.certificate.serial_number
        assert await echo(r, w, b"x") == b"x"
        await close(w)

        # 3. The old root is dropped: a client leaf from it is refused from now on,
        #    one from the new root is accepted.
        new_only = dataclasses.replace(roots2, roots=tuple(r for r in roots2.roots if r.active))
        holder.material = TLSMaterial.build(ca.issue("api"), new_only)
        accepted_before = len(srv.accepted)
        assert await attempt_as_refused_client(srv.port, old_client.client_context) in (None, b"")
        new_client = TLSMaterial.build(ca.issue("web"), new_only)
        r, w = await dial(srv.port, new_client.client_context)
        assert await echo(r, w, b"new") == b"new"
        await close(w)
        assert len(srv.accepted) == accepted_before + 1

        # The connection opened before every rotation still works.
        assert await echo(r0, w0, b"still-here") == b"still-here"
        await close(w0)


async def test_dynamic_client_context_presents_the_newest_leaf(
    ca: TestCA, roots: RootSet, api_material: TLSMaterial
) -> None:
    first = TLSMaterial.build(ca.issue("web"), roots)
    holder = Holder(first)
    client_ctx = DynamicClientContext(holder.get)
    serials: list[int] = []

    server_ctx = DynamicServerContext(Holder(api_material).get)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        serials.append(serial_of(der))
        writer.write(b"k")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(2):
            reader, writer = await dial(port, client_ctx)
            assert await asyncio.wait_for(reader.read(1), WAIT) == b"k"
            await close(writer)
            holder.material = TLSMaterial.build(ca.issue("web"), roots)
    finally:
        server.close()
        await server.wait_closed()
    assert serials[0] == first.leaf.certificate.serial_number
    assert serials[1] != serials[0]


# ---------------------------------------------------------- blocking sockets


def test_sync_mutual_handshake_both_sides_see_identity(
    sync_server_factory: Callable[..., SyncServer],
    api_material: TLSMaterial,
    web_material: TLSMaterial,
) -> None:
    srv = sync_server_factory(DynamicServerContext(Holder(api_material).get))
    ssock, got = dial_sync(
        srv.port, DynamicClientContext(Holder(web_material).get), api_material.identity
    )
    with ssock:
        assert got == api_material.identity
        assert srv.next_event() == ("accepted", web_material.identity)
        ssock.sendall(b"ping")
        assert ssock.recv(4) == b"ping"
        assert ssock.gettimeout() == WAIT  # the caller's timeout is restored


@pytest.mark.parametrize(("case", "make", "refused_by"), BAD_CLIENTS, ids=BAD_IDS)
def test_sync_server_refuses_each_bad_client_certificate(
    sync_server_factory: Callable[..., SyncServer],
    ca: TestCA,
    roots: RootSet,
    api_material: TLSMaterial,
    case: str,
    make: Callable[[TestCA], BadCert | Leaf | None],
    refused_by: str,
) -> None:
    srv = sync_server_factory(DynamicServerContext(Holder(api_material).get))
    ctx = raw_client_context(roots, make(ca))
    try:
        ssock, _ = dial_sync(srv.port, ctx, api_material.identity)
    except DialError:
        ssock = None  # refused inside the handshake (TLS 1.2-style)
    if ssock is not None:
        with ssock, contextlib.suppress(OSError):
            ssock.sendall(b"hello")
            assert ssock.recv(100) == b""
    kind, (reason, _) = srv.next_event()
    assert kind == "rejected"
    assert SYNC_HANDSHAKE_REASONS.get(case, refused_by) in reason
    assert srv.received == b""


def test_sync_garbage_bytes_are_refused_at_once(
    sync_server_factory: Callable[..., SyncServer], api_material: TLSMaterial
) -> None:
    srv = sync_server_factory(DynamicServerContext(Holder(api_material).get), timeout=WAIT)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        kind, (reason, elapsed) = srv.next_event()
    assert kind == "rejected" and "TLS handshake failed" in reason
    assert elapsed < 1.0


def test_sync_silent_client_is_cut_off_by_the_deadline(
    sync_server_factory: Callable[..., SyncServer], api_material: TLSMaterial
) -> None:
    srv = sync_server_factory(DynamicServerContext(Holder(api_material).get), timeout=0.3)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock:
        kind, (reason, elapsed) = srv.next_event()
        assert kind == "rejected" and "did not complete within 0.3s" in reason
        assert 0.25 <= elapsed < 2.0
        assert sock.recv(10) == b""  # the server closed the socket


def client_hello(ctx: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_sync_trickling_client_cannot_stretch_the_deadline(
    sync_server_factory: Callable[..., SyncServer],
    api_material: TLSMaterial,
    web_material: TLSMaterial,
) -> None:
    srv = sync_server_factory(DynamicServerContext(Holder(api_material).get), timeout=0.4)
    hello = client_hello(web_material.client_context)
    assert len(hello) > 100  # trickled at 20 ms per byte, that would take > 2 s
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock:

        def trickle() -> None:
            for byte in hello:
                if stop.wait(0.02):  # pacing the attacker, not synchronising the test
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            kind, (reason, elapsed) = srv.next_event()
        finally:
            stop.set()
            t.join(WAIT)
    assert kind == "rejected" and "did not complete within" in reason
    assert elapsed < 1.5


def test_sync_client_refuses_wrong_server_and_server_gets_no_bytes(
    sync_server_factory: Callable[..., SyncServer],
    api_material: TLSMaterial,
    web_material: TLSMaterial,
) -> None:
    srv = sync_server_factory(DynamicServerContext(Holder(api_material).get))
    expected = dataclasses.replace(api_material.identity, service="db")
    with pytest.raises(ServerIdentityError, match="peer certificate mismatch"):
        dial_sync(srv.port, web_material.client_context, expected)
    assert srv.next_event() == ("accepted", web_material.identity)
    assert srv.next_event() == ("closed", None)
    assert srv.received == b""


def test_sync_client_handshake_times_out_against_a_silent_server(
    web_material: TLSMaterial,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # never accepts, never speaks
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(DialError, match=r"did not complete within 0\.3s"):
            dial_sync(port, web_material.client_context, timeout=0.3)
        assert time.monotonic() - started < 2.0


def test_sync_rotation_new_handshakes_use_new_leaf_and_open_socket_survives(
    sync_server_factory: Callable[..., SyncServer], ca: TestCA, roots: RootSet,
    web_material: TLSMaterial,
) -> None:
    m1 = TLSMaterial.build(ca.issue("api"), roots)
    holder = Holder(m1)
    srv = sync_server_factory(DynamicServerContext(holder.get))
    s1, _ = dial_sync(srv.port, web_material.client_context)
    with s1:
        assert serial_of(s1.getpeercert(True)) == m1.leaf.certificate.serial_number
        m2 = TLSMaterial.build(ca.issue("api"), roots)
        holder.material = m2
        s2, _ = dial_sync(srv.port, web_material.client_context)
        with s2:
            assert serial_of(s2.getpeercert(True)) == m2.leaf.certificate.serial_number
        s1.sendall(b"old")
        assert s1.recv(3) == b"old"


def test_now_argument_is_used_for_verification(ca: TestCA, roots: RootSet) -> None:
    leaf = ca.issue("api")
    material = TLSMaterial.build(leaf, roots, datetime.now(UTC))
    assert material.leaf is leaf and material.roots is roots
