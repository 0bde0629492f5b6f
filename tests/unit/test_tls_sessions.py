"""Client-side TLS session resumption in ``DynamicClientContext``.

Real TLS 1.3 over 127.0.0.1 with ``TestCA`` certificates: a second connection to the
same server resumes, nothing is resumed across a change of material (new leaf or new
roots), and the server identity check still runs on resumed connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from consul_connect.certs import RootSet
from consul_connect.errors import ServerIdentityError
from consul_connect.identity import ServiceIdentity
from consul_connect.testing.ca import TestCA
from consul_connect.tls import (
    DynamicClientContext,
    DynamicServerContext,
    TLSMaterial,
    _SessionCache,
    client_handshake,
    peer_identity,
    server_handshake,
    verify_server_identity,
)

WAIT = 5.0


class Holder:
    """One reference to the current material, swapped whole (as the service layer does)."""

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


@pytest.fixture
def web(ca: TestCA, roots: RootSet) -> Holder:
    return Holder(TLSMaterial.build(ca.issue("web"), roots))


def ident(ca: TestCA, service: str) -> ServiceIdentity:
    return ca.issue(service).identity


@contextlib.asynccontextmanager
async def echo_server(material: TLSMaterial | Holder) -> AsyncIterator[int]:
    """An asyncio echo server on the given server material; yields its port."""
    holder = material if isinstance(material, Holder) else Holder(material)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer_identity(writer)
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=DynamicServerContext(holder.get)
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def round_trip(port: int, ctx: ssl.SSLContext) -> tuple[bool, Any]:
    """Connect, echo once (so the server's tickets arrive), close; (reused?, ssl object)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=""), WAIT
    )
    obj = writer.get_extra_info("ssl_object")
    try:
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"ping"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), WAIT)
    return bool(obj.session_reused), obj


async def test_second_connection_to_the_same_server_resumes(
    api_material: TLSMaterial, web: Holder, ca: TestCA
) -> None:
    client = DynamicClientContext(web.get)
    async with echo_server(api_material) as port:
        ctx = client.for_endpoint(("127.0.0.1", port))
        first, _ = await round_trip(port, ctx)
        second, obj = await round_trip(port, ctx)
        third, _ = await round_trip(port, client.for_endpoint(("127.0.0.1", port)))
    assert (first, second, third) == (False, True, True)
    assert client.sessions_offered == 2
    # The resumed connection still shows the server certificate of the full handshake.
    assert verify_server_identity(obj, ident(ca, "api")) == ident(ca, "api")


async def test_context_used_directly_or_with_resumption_off_never_resumes(
    api_material: TLSMaterial, web: Holder
) -> None:
    client = DynamicClientContext(web.get)
    off = DynamicClientContext(web.get, resume_sessions=False)
    async with echo_server(api_material) as port:
        direct = [(await round_trip(port, client))[0] for _ in range(2)]
        disabled = [(await round_trip(port, off.for_endpoint(port)))[0] for _ in range(2)]
    assert direct == [False, False]
    assert disabled == [False, False]
    assert off.sessions_offered == 0


async def test_sessions_are_kept_per_endpoint_key(
    api_material: TLSMaterial, web: Holder
) -> None:
    client = DynamicClientContext(web.get)
    async with echo_server(api_material) as port:
        await round_trip(port, client.for_endpoint("a"))
        other_key_first, _ = await round_trip(port, client.for_endpoint("b"))
        same_key_again, _ = await round_trip(port, client.for_endpoint("a"))
    assert other_key_first is False
    assert same_key_again is True


async def test_new_leaf_never_resumes_a_session_of_the_old_one(
    api_material: TLSMaterial, web: Holder, ca: TestCA, roots: RootSet
) -> None:
    client = DynamicClientContext(web.get)
    async with echo_server(api_material) as port:
        ctx = client.for_endpoint(("127.0.0.1", port))
        await round_trip(port, ctx)
        assert (await round_trip(port, ctx))[0] is True
        web.material = TLSMaterial.build(ca.issue("web"), roots)  # leaf renewal
        after_renewal, obj = await round_trip(port, ctx)
        again, _ = await round_trip(port, ctx)
    assert after_renewal is False
    assert obj.context is web.material.client_context
    assert again is True


async def test_root_rotation_never_resumes_a_session_from_before() -> None:
    ca = TestCA()
    api = TLSMaterial.build(ca.issue("api"), ca.roots())
    web = Holder(TLSMaterial.build(ca.issue("web"), ca.roots()))
    client = DynamicClientContext(web.get)
    async with echo_server(api) as port:
        ctx = client.for_endpoint(("127.0.0.1", port))
        await round_trip(port, ctx)
        assert (await round_trip(port, ctx))[0] is True
        ca.rotate()
        # The client now trusts the old and the new root; its leaf is unchanged.
        web.material = TLSMaterial.build(web.material.leaf, ca.roots(2))
        offered = client.sessions_offered
        after_rotation, _ = await round_trip(port, ctx)
    assert after_rotation is False
    assert client.sessions_offered == offered  # nothing was even offered


async def test_identity_check_still_runs_on_a_resumed_connection(
    api_material: TLSMaterial, web: Holder, ca: TestCA
) -> None:
    client = DynamicClientContext(web.get)
    async with echo_server(api_material) as port:
        ctx = client.for_endpoint(("127.0.0.1", port))
        await round_trip(port, ctx)
        reused, obj = await round_trip(port, ctx)
    assert reused is True
    assert peer_identity(obj) == ident(ca, "api")
    with pytest.raises(ServerIdentityError, match="mismatch"):
        verify_server_identity(obj, ident(ca, "db"))


async def test_server_with_new_ticket_keys_costs_one_full_handshake(
    api_material: TLSMaterial, web: Holder, ca: TestCA, roots: RootSet
) -> None:
    client = DynamicClientContext(web.get)
    server = Holder(api_material)
    async with echo_server(server) as port:
        ctx = client.for_endpoint(("127.0.0.1", port))
        await round_trip(port, ctx)
        before = (await round_trip(port, ctx))[0]
        # The server renews its leaf: a new context with new ticket keys.
        server.material = TLSMaterial.build(ca.issue("api"), roots)
        stale, _ = await round_trip(port, ctx)
        fresh, _ = await round_trip(port, ctx)
    assert (before, stale, fresh) == (True, False, True)


# ---------------------------------------------------------------- blocking sockets


@contextlib.contextmanager
def sync_echo_server(material: TLSMaterial, connections: int) -> Iterator[int]:
    """A thread that serves ``connections`` blocking TLS echo connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    ctx = DynamicServerContext(Holder(material).get)

    def serve() -> None:
        for _ in range(connections):
            try:
                raw, _ = listener.accept()
                ssock, _ = server_handshake(raw, ctx, timeout=WAIT)
            except OSError:
                return
            with ssock:
                ssock.settimeout(WAIT)
                with contextlib.suppress(OSError):
                    while data := ssock.recv(4096):
                        ssock.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(WAIT)


def test_blocking_client_handshake_resumes_with_a_session_key(
    api_material: TLSMaterial, web: Holder, ca: TestCA
) -> None:
    client = DynamicClientContext(web.get)
    reused = []
    with sync_echo_server(api_material, 3) as port:
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            ssock, who = client_handshake(
                raw, client, ident(ca, "api"), WAIT, session_key=("127.0.0.1", port)
            )
            with ssock:
                ssock.sendall(b"ping")
                assert ssock.recv(4) == b"ping"
                reused.append(ssock.session_reused)
            assert who == ident(ca, "api")
    assert reused == [False, True, True]


# ------------------------------------------------------------- cache rules (no TLS)


class FakeSession:
    def __init__(self, *, ticket: bool = True, lifetime: int = 7200) -> None:
        self.has_ticket = ticket
        self.time = int(time.time())
        self.timeout = lifetime


class FakeConnection:
    def __init__(self, session: FakeSession | None, not_after: str) -> None:
        self.session = session
        self._not_after = not_after

    session_reused = False

    def version(self) -> str:
        return "TLSv1.3"

    def getpeercert(self) -> dict[str, str]:
        return {"notAfter": self._not_after}


LATER = time.strftime("%b %d %H:%M:%S %Y GMT", time.gmtime(time.time() + 86400))
EARLIER = time.strftime("%b %d %H:%M:%S %Y GMT", time.gmtime(time.time() - 60))


def test_session_is_not_offered_once_the_server_certificate_has_expired(
    api_material: TLSMaterial,
) -> None:
    cache = _SessionCache(8)
    cache.track(api_material, "k", FakeConnection(FakeSession(), EARLIER))
    assert cache.take(api_material, "k") is None
    cache.track(api_material, "k", FakeConnection(FakeSession(), LATER))
    assert cache.take(api_material, "k") is not None


def test_session_without_a_ticket_or_past_its_lifetime_is_not_offered(
    api_material: TLSMaterial,
) -> None:
    cache = _SessionCache(8)
    cache.track(api_material, "k", FakeConnection(FakeSession(ticket=False), LATER))
    assert cache.take(api_material, "k") is None
    cache.track(api_material, "k", FakeConnection(FakeSession(lifetime=-1), LATER))
    assert cache.take(api_material, "k") is None


def test_least_recently_used_endpoint_is_forgotten_past_the_bound(
    api_material: TLSMaterial,
) -> None:
    cache = _SessionCache(2)
    for key in ("a", "b", "c"):
        cache.track(api_material, key, FakeConnection(FakeSession(), LATER))
    assert cache.take(api_material, "a") is None
    assert cache.take(api_material, "b") is not None
    assert cache.take(api_material, "c") is not None


def test_session_of_a_connection_made_on_another_thread_is_not_read_here(
    api_material: TLSMaterial,
) -> None:
    cache = _SessionCache(8)
    conn = FakeConnection(FakeSession(), LATER)
    thread = threading.Thread(target=cache.track, args=(api_material, "k", conn))
    thread.start()
    thread.join(WAIT)
    assert cache.take(api_material, "k") is None


class BrokenConnection(FakeConnection):
    """A connection whose session cannot be read (CPython: ``i2d() failed``)."""

    @property
    def session(self) -> FakeSession:
        raise ValueError("i2d() failed")

    @session.setter
    def session(self, value: object) -> None:
        pass


def test_connection_whose_session_cannot_be_read_is_skipped(api_material: TLSMaterial) -> None:
    cache = _SessionCache(8)
    cache.track(api_material, "k", FakeConnection(FakeSession(), LATER))
    good = cache.take(api_material, "k")
    cache.track(api_material, "k", BrokenConnection(None, LATER))
    assert cache.take(api_material, "k") is good


def test_server_context_sends_one_ticket_per_handshake(api_material: TLSMaterial) -> None:
    assert api_material.server_context.num_tickets == 1
    assert not api_material.server_context.options & ssl.OP_NO_TICKET
