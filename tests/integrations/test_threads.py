"""Thread safety of the sync faces: many threads through one Service, one
``httpx.Client`` or one ``requests.Session`` while the runtime thread swaps material,
and ``close()`` racing with work that is already under way."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpcore
import httpx
import pytest
import requests
from cryptography.hazmat.primitives.serialization import Encoding

from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import AllowIdentities
from consul_connect.devagent import DevAgent
from consul_connect.discovery import Endpoint
from consul_connect.errors import DialError, PeerRejected
from consul_connect.integrations._common import PoolEntry
from consul_connect.integrations.httpx import ConnectTransport
from consul_connect.integrations.requests import ConnectAdapter
from consul_connect.service import Service, ServiceEvent
from consul_connect.testing import TestCA
from tests.core.support import force_leaf_renewal
from tests.integrations import Mesh, mesh, wait_until

__all__ = ["mesh"]

THREADS = 16


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads as often as CPython allows, so races show up."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _in_threads(work: Callable[[int], Any], calls: int) -> list[Any]:
    """``work(i)`` for ``i`` in ``range(calls)`` on :data:`THREADS` threads; every result."""
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(work, range(calls)))


# ------------------------------------------------------------------------- counters


class _Peer:
    """The server side of a finished handshake, as ``authorize_peer`` reads it."""

    def __init__(self, der: bytes) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self._der


def test_rejections_from_many_threads_are_all_counted_by_reason(
    busy_switching: None,
) -> None:
    # ConnectListener authorizes on a pool of workers and WSGI servers call
    # authorize_peer on their own threads: `by_reason[k] = by_reason.get(k, 0) + 1`
    # on two threads at once loses one of the two.
    ca = TestCA()
    stranger = ca.issue("stranger").certificate.public_bytes(Encoding.DER)
    only_web = AllowIdentities(ca.issue("web").identity)
    with Service.from_test_ca(ca, "api", authorizer=only_web) as api:

        def reject(_: int) -> None:
            with pytest.raises(PeerRejected):
                api.authorize_peer(_Peer(stranger))

        _in_threads(reject, THREADS * 200)
        stats = api.statistics()
    assert stats.rejected == THREADS * 200
    assert sum(stats.rejected_by_reason.values()) == THREADS * 200


# ------------------------------------------------------------------ close mid-request


async def test_closing_the_httpx_transport_mid_request_leaves_no_connection_open(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thread A takes an instance's pool; thread B closes the client (and so every
    # pool); A then sends on the closed httpcore pool, which happily dials a new
    # connection and keeps it idle in a pool that nobody will close again.
    transport = ConnectTransport(mesh.web)
    pools = transport._pools
    taken: list[PoolEntry[httpcore.ConnectionPool]] = []
    acquire = pools.acquire

    def acquire_then_close(*args: Any) -> Any:
        entry, due = acquire(*args)
        taken.append(entry)
        transport.close()  # "another thread", at the worst moment
        return entry, due

    monkeypatch.setattr(pools, "acquire", acquire_then_close)

    def call() -> None:
        # Cut off by the close, or not: fine, as long as nothing stays open.
        with httpx.Client(transport=transport) as client, contextlib.suppress(
            httpx.TransportError
        ):
            client.get("https://api.service.consul/", timeout=5)

    await asyncio.to_thread(call)
    assert taken
    assert [e.pool.connections for e in taken] == [[] for _ in taken]


async def test_a_request_racing_the_sessions_close_gets_a_requests_error(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thread A has resolved the name; thread B closes the Session (and so the adapter)
    # before A takes a pool. requests reports a closed pool as ConnectionError; A must
    # not get a bare RuntimeError that no requests caller catches.
    adapter = ConnectAdapter(mesh.web)
    resolve = adapter._resolve

    def resolve_then_close(*args: Any) -> list[Endpoint]:
        endpoints = resolve(*args)
        adapter.close()  # "another thread", at the worst moment
        return endpoints

    monkeypatch.setattr(adapter, "_resolve", resolve_then_close)

    def call() -> None:
        with requests.Session() as session:
            session.mount("https://", adapter)
            with pytest.raises(requests.ConnectionError, match="closed"):
                session.get("https://api.service.consul/", timeout=5)

    await asyncio.to_thread(call)


# -------------------------------------------------------------- Service.close() races


async def test_close_racing_a_resolve_of_a_new_name_stops_every_watch(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thread A: resolve("other") passes the closed check.  Thread B: close() stops the
    # watches on the runtime loop, one await per name.  A's lookup then runs on the
    # loop between two of those awaits and adds a watched name: close() iterated the
    # dict it grew ("dictionary changed size during iteration"), gave up before
    # releasing the agent hub, and A's new watch ran on for a closed Service.
    web = mesh.web

    def scenario() -> BaseException | None:
        web.resolve("api", timeout=5)
        first: Any = web._resolvers["api"]
        passed, go, closing = threading.Event(), threading.Event(), threading.Event()
        ran = asyncio.Event()
        check_open, resolve_on_loop, aclose = web._check_open, web._resolve, first.aclose

        def check_then_pause() -> None:
            check_open()
            if threading.current_thread().name == "A":
                passed.set()
                assert go.wait(10)

        async def resolve_and_signal(target: Any) -> list[Endpoint]:
            if target == "other":
                # Runs once the lookup has gone as far as it goes without waiting.
                asyncio.get_running_loop().call_soon(ran.set)
            return await resolve_on_loop(target)

        async def aclose_meanwhile() -> None:
            closing.set()
            await asyncio.wait_for(ran.wait(), 10)
            await aclose()

        monkeypatch.setattr(web, "_check_open", check_then_pause)
        monkeypatch.setattr(web, "_resolve", resolve_and_signal)
        monkeypatch.setattr(first, "aclose", aclose_meanwhile)
        outcome: list[BaseException | None] = []

        def resolve_other() -> None:
            try:
                web.resolve("other", timeout=5)
                outcome.append(None)
            except Exception as exc:
                outcome.append(exc)

        a = threading.Thread(target=resolve_other, name="A")
        a.start()
        assert passed.wait(10)
        b = threading.Thread(target=web.close, name="B")
        b.start()
        assert closing.wait(10)
        go.set()
        a.join(10)
        b.join(20)
        assert not a.is_alive() and not b.is_alive()
        return outcome[0]

    outcome = await asyncio.to_thread(scenario)
    assert isinstance(outcome, DialError)
    assert web._resolvers == {}
    assert web._hub is None


async def test_close_from_an_event_hook_stops_the_background_work(agent: DevAgent) -> None:
    # Hooks run on the runtime thread; close() there used to wait for the runtime loop
    # (itself), give up with a warning and leave the leaf watch and the agent hub running
    # for a closed Service.
    cfg = AgentConfig.from_address(agent.address)

    def scenario() -> Service:
        svc = Service("web", agent=cfg)
        svc.wait_ready(10)
        closed_on: list[str] = []

        def close_on_rotation(event: ServiceEvent) -> None:
            if event.kind == "leaf_rotated":
                closed_on.append(threading.current_thread().name)
                svc.close()

        svc.on_event(close_on_rotation)
        force_leaf_renewal(agent, "web")
        wait_until(lambda: svc._hub is None, what="background work stopped")
        assert closed_on == ["consul-connect-runtime"]
        return svc

    svc = await asyncio.to_thread(scenario)
    assert svc._tasks == []


# ------------------------------------------------------------ many threads, one client

PER_THREAD = 100


def _renew_leaf(m: Mesh) -> None:
    """Renew ``web``'s leaf and wait until the runtime thread has published it."""
    serial = m.web.statistics().leaf_serial
    force_leaf_renewal(m.agent, "web")
    wait_until(lambda: m.web.statistics().leaf_serial != serial, what="new leaf")


async def test_one_httpx_client_and_one_session_on_many_threads_across_a_leaf_renewal(
    mesh: Mesh, busy_switching: None
) -> None:
    calls = THREADS * PER_THREAD
    transport = ConnectTransport(mesh.web)
    adapter = ConnectAdapter(mesh.web, pool_maxsize=THREADS)
    rotations = mesh.web.statistics().leaf_rotations

    def scenario() -> tuple[list[int], list[int]]:
        with httpx.Client(transport=transport) as client, requests.Session() as session:
            session.mount("https://", adapter)

            def via_httpx(i: int) -> int:
                if i == calls // 2:
                    _renew_leaf(mesh)
                return client.get(f"https://api.service.consul/h{i}", timeout=10).status_code

            def via_requests(i: int) -> int:
                if i == calls // 2:
                    _renew_leaf(mesh)
                return session.get(f"https://api.service.consul/r{i}", timeout=10).status_code

            return _in_threads(via_httpx, calls), _in_threads(via_requests, calls)

    by_httpx, by_requests = await asyncio.to_thread(scenario)
    assert by_httpx == [200] * calls
    assert by_requests == [200] * calls
    assert len(mesh.app.scopes) == 2 * calls
    assert mesh.web.statistics().leaf_rotations == rotations + 2
    # Closing the client and the session left no pool behind.
    assert not transport._pools.entries and not transport._pools.retired
    assert not adapter._pools.entries and not adapter._pools.retired
