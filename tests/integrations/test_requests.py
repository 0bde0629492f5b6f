"""The requests adapter: Consul names over Connect mTLS, failover, identity checks,
timeouts, trust limited to the Consul roots, and CA rotation under traffic."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from consul_connect.errors import DialError, NoInstancesError, ServerIdentityError
from consul_connect.integrations.asgi import serve
from consul_connect.integrations.requests import ConnectAdapter
from consul_connect.service import Service
from tests.integrations import (
    Mesh,
    RecordingApp,
    apply_get_only,
    decided,
    deny,
    mesh,
    register,
    rotate_ca,
    unused_port,
    wait_until,
    wait_until_async,
)

__all__ = ["mesh"]


def _session(service: Service, **kwargs: object) -> tuple[requests.Session, ConnectAdapter]:
    session = requests.Session()
    adapter = ConnectAdapter(service, **kwargs)  # type: ignore[arg-type]
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session, adapter


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never speaks TLS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


async def test_session_reaches_the_service_and_the_app_sees_the_caller(mesh: Mesh) -> None:
    def call() -> list[requests.Response]:
        session, _ = _session(mesh.web)
        with session:
            return [
                session.get("https://api.service.consul/a", timeout=5),
                session.post("http://api.connect.consul/b", json={"k": "v"}, timeout=5),
                session.get("https://api/c?x=1", timeout=5),
            ]

    responses = await asyncio.to_thread(call)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.json()["peer"] for r in responses} == {mesh.web.identity.uri}
    assert [s["path"] for s in mesh.app.scopes] == ["/a", "/b", "/c"]
    assert mesh.app.scopes[2]["query_string"] == b"x=1"
    assert dict(mesh.app.scopes[0]["headers"])[b"host"] == b"api.service.consul"


async def test_keepalive_connection_is_reused(mesh: Mesh) -> None:
    def call() -> None:
        session, _ = _session(mesh.web)
        with session:
            for _ in range(5):
                assert session.get("https://api.service.consul/", timeout=5).status_code == 200

    await asyncio.to_thread(call)
    assert len({s["client"] for s in mesh.app.scopes}) == 1


async def test_failover_and_all_down(mesh: Mesh) -> None:
    register(mesh.http, "api", unused_port(), "api-dead")
    register(mesh.http, "gone", unused_port(), "gone-1")

    def call() -> requests.ConnectionError:
        session, _ = _session(mesh.web)
        with session:
            for _ in range(10):
                r = session.get("https://api.service.consul/", headers={"Connection": "close"})
                assert r.status_code == 200
            with pytest.raises(requests.ConnectionError) as info:
                session.get("https://gone.service.consul/", timeout=5)
            return info.value

    error = await asyncio.to_thread(call)
    assert isinstance(error.__cause__, DialError)
    assert len(error.__cause__.failures) == 1
    assert mesh.app.calls == 10


async def test_wrong_server_identity_and_unknown_service_are_refused(mesh: Mesh) -> None:
    register(mesh.http, "db", mesh.server.port, "db-1")

    def call() -> tuple[requests.ConnectionError, requests.ConnectionError]:
        session, _ = _session(mesh.web)
        with session:
            with pytest.raises(requests.ConnectionError) as wrong:
                session.get("https://db.service.consul/", timeout=5)
            with pytest.raises(requests.ConnectionError) as missing:
                session.get("https://nothing.service.consul/", timeout=5)
            return wrong.value, missing.value

    wrong, missing = await asyncio.to_thread(call)
    assert isinstance(wrong.__cause__, ServerIdentityError)
    assert isinstance(missing.__cause__, NoInstancesError)
    assert mesh.app.calls == 0


async def test_timeouts_are_honoured(mesh: Mesh, silent_listener: int) -> None:
    register(mesh.http, "stall", silent_listener, "stall-1")

    def call() -> tuple[float, float]:
        session, _ = _session(mesh.web)
        with session:
            t0 = time.monotonic()
            with pytest.raises(requests.ConnectTimeout):
                session.get("https://stall.service.consul/", timeout=(0.5, 5))
            t1 = time.monotonic()
            with pytest.raises(requests.ReadTimeout):
                session.get("https://api.service.consul/stall", timeout=(5, 0.5))
            return t1 - t0, time.monotonic() - t1

    connect_took, read_took = await asyncio.to_thread(call)
    assert connect_took < 2.0
    assert read_took < 2.0


async def test_requests_ca_bundle_is_never_loaded_into_the_mesh_context(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    import certifi

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    before = mesh.web.client_context.current.client_context.cert_store_stats()  # type: ignore[attr-defined]

    def call() -> int:
        session, _ = _session(mesh.web)
        with session:
            return session.get("https://api.service.consul/", verify=True).status_code

    assert await asyncio.to_thread(call) == 200
    after = mesh.web.client_context.current.client_context.cert_store_stats()  # type: ignore[attr-defined]
    assert after["x509_ca"] == before["x509_ca"]


async def test_ca_rotation_under_traffic_fails_no_request(mesh: Mesh) -> None:
    old_api = mesh.api.statistics()
    old_web = mesh.web.statistics()

    def both_rotated() -> bool:
        api, web = mesh.api.statistics(), mesh.web.statistics()
        return (
            api.leaf_serial != old_api.leaf_serial
            and web.leaf_serial != old_web.leaf_serial
            and api.roots > old_api.roots
            and web.roots > old_web.roots
        )

    def traffic() -> tuple[list[int], list[BaseException]]:
        statuses: list[int] = []
        failures: list[BaseException] = []
        session, _ = _session(mesh.web, max_connection_age=None)
        with session:
            for _ in range(5):
                statuses.append(session.get("https://api.service.consul/", timeout=5).status_code)
            rotate_ca(mesh.http)
            after = 0
            deadline = time.monotonic() + 15
            while after < 20 and time.monotonic() < deadline:
                try:
                    statuses.append(
                        session.get("https://api.service.consul/loop", timeout=5).status_code
                    )
                except requests.RequestException as exc:
                    failures.append(exc)
                if both_rotated():
                    after += 1
            wait_until(both_rotated, timeout=1, what="both services rotated")
        return statuses, failures

    statuses, failures = await asyncio.to_thread(traffic)
    assert failures == []
    assert set(statuses) == {200}
    # New connections were made after the rotation: the app saw a new client port.
    assert len({s["client"] for s in mesh.app.scopes}) >= 2


async def test_denied_caller_is_refused_at_connect(mesh: Mesh) -> None:
    deny(mesh.http, "web", "api")
    await wait_until_async(decided(mesh.api, mesh.web.identity, False), what="deny applied")

    def call() -> None:
        session, _ = _session(mesh.web)
        with session, pytest.raises(requests.ConnectionError):
            session.get("https://api.service.consul/secret", timeout=5)

    await asyncio.to_thread(call)
    assert mesh.app.calls == 0
    assert mesh.api.statistics().rejected >= 1


async def test_l7_denied_request_gets_403_while_get_works_on_the_same_connection(
    mesh: Mesh,
) -> None:
    await apply_get_only(mesh.http, mesh.web, mesh.api)

    def call() -> list[requests.Response]:
        session, _ = _session(mesh.web)
        with session:
            return [
                session.get("https://api.service.consul/items", timeout=5),
                session.post("https://api.service.consul/items", data=b"x" * 100, timeout=5),
                session.get("https://api.service.consul/items/1", timeout=5),
            ]

    first, denied, again = await asyncio.to_thread(call)
    assert (first.status_code, denied.status_code, again.status_code) == (200, 403, 200)
    assert "Permissions[1]" in denied.text
    assert [s["method"] for s in mesh.app.scopes] == ["GET", "GET"]
    # Both allowed requests came from one client port: one keep-alive connection.
    assert len({s["client"] for s in mesh.app.scopes}) == 1


async def test_pool_of_an_instance_that_left_the_catalog_is_closed(mesh: Mesh) -> None:
    other_app = RecordingApp()
    other = await serve(other_app, mesh.api)
    try:
        register(mesh.http, "api", other.port, "api-2")

        def traffic() -> set[int]:
            session, adapter = _session(mesh.web)
            with session:
                for _ in range(8):
                    assert session.get("https://api.service.consul/", timeout=5).ok
                assert mesh.server.port in {k[1] for k in adapter._pools.entries}
                r = mesh.http.put("/v1/agent/service/deregister/api-1")
                assert r.status_code == 200, r.text
                # Discovery follows the catalog through a watch; each request re-resolves.
                deadline = time.monotonic() + 5
                while mesh.server.port in {k[1] for k in adapter._pools.entries}:
                    assert time.monotonic() < deadline, "pool of the removed instance kept"
                    assert session.get("https://api.service.consul/", timeout=5).ok
                served_before = mesh.app.calls
                for _ in range(6):
                    assert session.get("https://api.service.consul/", timeout=5).ok
                assert mesh.app.calls == served_before
                return {k[1] for k in adapter._pools.entries}

        assert await asyncio.to_thread(traffic) == {other.port}
    finally:
        other_app.release.set()
        await other.aclose()
