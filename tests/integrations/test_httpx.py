"""httpx transports: Consul names over Connect mTLS, failover, identity checks, timeouts,
instances leaving the catalog, and CA rotation under traffic."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509

from consul_connect.errors import (
    ConfigError,
    DialError,
    NoInstancesError,
    ServerIdentityError,
)
from consul_connect.integrations.asgi import serve
from consul_connect.integrations.httpx import AsyncConnectTransport, ConnectTransport
from consul_connect.service import Service
from tests.integrations import (
    Mesh,
    RecordingApp,
    mesh,
    register,
    rotate_ca,
    unused_port,
    wait_until_async,
)

__all__ = ["mesh"]


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never speaks TLS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def _server_cert(response: httpx.Response) -> x509.Certificate:
    ssl_obj = response.extensions["network_stream"].get_extra_info("ssl_object")
    return x509.load_der_x509_certificate(ssl_obj.getpeercert(binary_form=True))


def _leaf_cert(service: Service) -> x509.Certificate:
    pem = service.client_context.current.leaf.cert_pem  # type: ignore[attr-defined]
    return x509.load_pem_x509_certificates(pem.encode())[0]


async def test_consul_names_and_both_schemes_reach_the_service(mesh: Mesh) -> None:
    r = mesh.http.post("/v1/query", json={"Name": "apiq", "Service": {"Service": "api"}})
    assert r.status_code == 200, r.text
    urls = [
        "https://api.service.consul/a",
        "http://api.service.consul/b",
        "https://api.connect.consul/c",
        "https://api.service.dc1.consul/d",
        "http://api/e",
        "https://apiq.query.consul/f",
    ]
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        for url in urls:
            resp = await client.get(url)
            assert resp.status_code == 200, url
            assert resp.json()["peer"] == mesh.web.identity.uri
    assert [s["path"] for s in mesh.app.scopes] == ["/a", "/b", "/c", "/d", "/e", "/f"]
    # The logical name travels as the Host header, not the instance address.
    assert dict(mesh.app.scopes[0]["headers"])[b"host"] == b"api.service.consul"


async def test_sync_transport_reaches_the_service(mesh: Mesh) -> None:
    def call() -> httpx.Response:
        with httpx.Client(transport=ConnectTransport(mesh.web)) as client:
            client.get("https://api.service.consul/one")
            return client.post("https://api.service.consul/two", json={"x": 1})

    resp = await asyncio.to_thread(call)
    assert resp.status_code == 200
    assert resp.json() == {"peer": mesh.web.identity.uri, "method": "POST", "path": "/two"}


async def test_failover_skips_an_instance_that_refuses_connections(mesh: Mesh) -> None:
    register(mesh.http, "api", unused_port(), "api-dead")
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        for _ in range(12):
            # A fresh connection each time, so the dead instance is tried half the time.
            resp = await client.get("https://api.service.consul/", headers={"Connection": "close"})
            assert resp.status_code == 200
    assert mesh.app.calls == 12


async def test_all_instances_down_is_a_connect_error_listing_each(mesh: Mesh) -> None:
    register(mesh.http, "gone", unused_port(), "gone-1")
    register(mesh.http, "gone", unused_port(), "gone-2")
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get("https://gone.service.consul/")
    cause = info.value.__cause__
    assert isinstance(cause, DialError)
    assert len(cause.failures) == 2


async def test_server_with_the_wrong_identity_gets_no_request(mesh: Mesh) -> None:
    # "db" is registered at api's address: the server proves to be api, not db.
    register(mesh.http, "db", mesh.server.port, "db-1")
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get("https://db.service.consul/")
    assert isinstance(info.value.__cause__, ServerIdentityError)
    assert mesh.app.calls == 0


async def test_unknown_service_and_foreign_names_are_connect_errors(mesh: Mesh) -> None:
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
        with pytest.raises(httpx.ConnectError) as missing:
            await client.get("https://nothing.service.consul/")
        with pytest.raises(httpx.ConnectError) as foreign:
            await client.get("https://example.com/")
    assert isinstance(missing.value.__cause__, NoInstancesError)
    assert isinstance(foreign.value.__cause__, ConfigError)


async def test_silent_server_hits_the_connect_timeout(mesh: Mesh, silent_listener: int) -> None:
    register(mesh.http, "stall", silent_listener, "stall-1")
    timeout = httpx.Timeout(5.0, connect=0.5)
    transport = AsyncConnectTransport(mesh.web)
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout):
            await client.get("https://stall.service.consul/")
        assert time.monotonic() - started < 2.0

    def sync_call() -> float:
        with httpx.Client(transport=ConnectTransport(mesh.web), timeout=timeout) as c:
            t0 = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                c.get("https://stall.service.consul/")
            return time.monotonic() - t0

    assert await asyncio.to_thread(sync_call) < 2.0


async def test_stalled_response_hits_the_read_timeout(mesh: Mesh) -> None:
    timeout = httpx.Timeout(0.5, connect=5.0)
    async with httpx.AsyncClient(
        transport=AsyncConnectTransport(mesh.web), timeout=timeout
    ) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get("https://api.service.consul/stall")
        assert time.monotonic() - started < 2.0

    def sync_call() -> float:
        with httpx.Client(transport=ConnectTransport(mesh.web), timeout=timeout) as c:
            t0 = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                c.get("https://api.service.consul/stall")
            return time.monotonic() - t0

    assert await asyncio.to_thread(sync_call) < 2.0


async def test_pool_of_an_instance_that_left_the_catalog_is_closed(mesh: Mesh) -> None:
    other_app = RecordingApp()
    other = await serve(other_app, mesh.api)
    try:
        register(mesh.http, "api", other.port, "api-2")
        transport = AsyncConnectTransport(mesh.web)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(8):
                assert (await client.get("https://api.service.consul/")).status_code == 200
            ports = {k[1] for k in transport._pools.entries}
            assert mesh.server.port in ports
            r = mesh.http.put("/v1/agent/service/deregister/api-1")
            assert r.status_code == 200, r.text
            # Discovery may lag the catalog (a watch); each request re-resolves.
            deadline = time.monotonic() + 5
            while mesh.server.port in {k[1] for k in transport._pools.entries}:
                assert time.monotonic() < deadline, "pool of the removed instance kept"
                assert (await client.get("https://api.service.consul/")).status_code == 200
            served_before = mesh.app.calls
            for _ in range(6):
                assert (await client.get("https://api.service.consul/")).status_code == 200
            assert mesh.app.calls == served_before
            assert {k[1] for k in transport._pools.entries} == {other.port}
    finally:
        other_app.release.set()
        await other.aclose()


async def test_idle_connection_the_server_closed_is_replaced_without_a_failure(
    mesh: Mesh,
) -> None:
    app = RecordingApp()
    short = await serve(app, mesh.api, timeout_keep_alive=0.2)
    try:
        register(mesh.http, "api", short.port, "api-1")  # the same instance, new port
        async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as client:
            await wait_until_async(
                lambda: mesh.web.resolve("api")[0].port == short.port, what="new port seen"
            )
            accepted = mesh.api.statistics().accepted
            first = await client.get("https://api.service.consul/one")
            assert first.status_code == 200
            assert mesh.api.statistics().accepted == accepted + 1
            # uvicorn ends the idle keep-alive connection (TLS close_notify); the pool must
            # see that before reusing it.
            stream = first.extensions["network_stream"]
            await wait_until_async(
                lambda: bool(stream.get_extra_info("is_readable")), what="server closed it"
            )
            assert (await client.get("https://api.service.consul/two")).status_code == 200
            assert mesh.api.statistics().accepted == accepted + 2
    finally:
        app.release.set()
        await short.aclose()


async def test_ca_rotation_under_traffic_fails_no_request(mesh: Mesh) -> None:
    transport = AsyncConnectTransport(mesh.web, max_connection_age=None)
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        first = await client.get("https://api.service.consul/warmup")
        assert first.status_code == 200
        old_server_cert = _server_cert(first)
        old_api = mesh.api.statistics()
        old_web = mesh.web.statistics()

        failures: list[BaseException] = []
        statuses: list[int] = []
        rotated = asyncio.Event()

        async def worker() -> None:
            after = 0
            deadline = time.monotonic() + 15
            while after < 15 and time.monotonic() < deadline:
                try:
                    resp = await client.get("https://api.service.consul/loop")
                    statuses.append(resp.status_code)
                except httpx.HTTPError as exc:
                    failures.append(exc)
                if rotated.is_set():
                    after += 1

        def both_rotated() -> bool:
            api, web = mesh.api.statistics(), mesh.web.statistics()
            return (
                api.leaf_serial != old_api.leaf_serial
                and web.leaf_serial != old_web.leaf_serial
                and api.roots > old_api.roots
                and web.roots > old_web.roots
            )

        async def rotate() -> None:
            await asyncio.sleep(0.2)  # let traffic flow on the old material first
            await asyncio.to_thread(rotate_ca, mesh.http)
            await wait_until_async(both_rotated, timeout=10, what="both services rotated")
            rotated.set()

        await asyncio.gather(rotate(), *(worker() for _ in range(4)))
        last = await client.get("https://api.service.consul/final")

    assert failures == []
    assert len(statuses) >= 4 * 15 and set(statuses) == {200}
    # The warm-up connection (old leaf) was retired: the last request ran on a connection
    # dialled with the client's new material.
    ssl_first = first.extensions["network_stream"].get_extra_info("ssl_object")
    ssl_last = last.extensions["network_stream"].get_extra_info("ssl_object")
    assert ssl_last is not ssl_first
    assert all(
        e.material is mesh.web.client_context.current  # type: ignore[attr-defined]
        for e in transport._pools.entries.values()
    )
    # Fresh connections now meet the server's new leaf.
    async with httpx.AsyncClient(transport=AsyncConnectTransport(mesh.web)) as fresh:
        assert _server_cert(await fresh.get("https://api.service.consul/")) == _leaf_cert(
            mesh.api
        )
    assert _leaf_cert(mesh.api) != old_server_cert
