"""Shared pieces of the HTTP integration tests: a recording ASGI app, a two-service mesh
on a dev agent (``web`` calls ``api``, served by uvicorn), and intention helpers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.identity import ServiceIdentity
from consul_connect.integrations.asgi import ConnectServer, peer_identity_from_scope, serve
from consul_connect.service import Service

__all__ = [
    "Mesh",
    "RecordingApp",
    "allow",
    "apply_get_only",
    "deny",
    "get_only",
    "mesh",
    "register",
    "rotate_ca",
    "unused_port",
    "wait_until",
]


@dataclass
class RecordingApp:
    """An ASGI app that answers with the caller's SPIFFE ID and records every scope.

    A request to ``/stall`` waits until :attr:`release` is set (for timeout tests);
    ``/stream`` answers ``chunk0`` to ``chunk4`` (one line each, a loop step apart) and
    ``/big`` 1 MiB of ``x`` in one body; ``/upload`` reads the whole request body and
    answers ``<size> <sha256 hex>``.
    """

    scopes: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.scopes.append(dict(scope))
        if scope["path"] == "/upload":
            digest, size = hashlib.sha256(), 0
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                digest.update(chunk)
                size += len(chunk)
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})
            answer = f"{size} {digest.hexdigest()}".encode()
            await send({"type": "http.response.body", "body": answer})
            return
        if scope["path"] == "/stall":
            await self.release.wait()
        if scope["path"] in ("/stream", "/big"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if scope["path"] == "/big":
                await send({"type": "http.response.body", "body": b"x" * (1 << 20)})
                return
            for i in range(5):
                await send({"type": "http.response.body", "body": b"chunk%d\n" % i,
                            "more_body": True})
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": b""})
            return
        identity = peer_identity_from_scope(scope)
        body = json.dumps(
            {
                "peer": identity.uri if identity else None,
                "method": scope["method"],
                "path": scope["path"],
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @property
    def calls(self) -> int:
        return len(self.scopes)


@dataclass
class Mesh:
    agent: DevAgent
    http: httpx.Client
    api: Service
    web: Service
    server: ConnectServer
    app: RecordingApp


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate!r}")
        time.sleep(0.01)


async def wait_until_async(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = ""
) -> None:
    """Async form of :func:`wait_until` (does not block the loop serving the app)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate!r}")
        await asyncio.sleep(0.01)


def register(http: httpx.Client, name: str, port: int, sid: str | None = None) -> None:
    """Register a Connect-native instance of ``name`` on 127.0.0.1:``port``."""
    r = http.put(
        "/v1/agent/service/register",
        json={
            "Name": name,
            "ID": sid or f"{name}-{port}",
            "Address": "127.0.0.1",
            "Port": port,
            "Connect": {"Native": True},
        },
    )
    assert r.status_code == 200, r.text


def _intention(http: httpx.Client, source: str, destination: str, action: str) -> None:
    r = http.put(
        "/v1/connect/intentions/exact",
        params={"source": source, "destination": destination},
        json={"Action": action},
    )
    assert r.status_code == 200, r.text


def allow(http: httpx.Client, source: str, destination: str) -> None:
    _intention(http, source, destination, "allow")


def deny(http: httpx.Client, source: str, destination: str) -> None:
    _intention(http, source, destination, "deny")


def get_only(http: httpx.Client, source: str, destination: str) -> None:
    """An L7 intention: ``source`` may GET anything on ``destination``; all else denied."""
    r = http.put(
        "/v1/config",
        json={"Kind": "service-defaults", "Name": destination, "Protocol": "http"},
    )
    assert r.status_code == 200, r.text
    r = http.put(
        "/v1/config",
        json={
            "Kind": "service-intentions",
            "Name": destination,
            "Sources": [
                {
                    "Name": source,
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"Methods": ["GET"]}},
                        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                    ],
                }
            ],
        },
    )
    assert r.status_code == 200, r.text


async def apply_get_only(http: httpx.Client, caller: Service, server: Service) -> None:
    """Write :func:`get_only` for ``caller`` => ``server`` and wait until ``server`` applies it."""
    get_only(http, caller.name, server.name)
    await wait_until_async(
        lambda: not server.authorize_request(caller.identity, "POST", "/x", []).allowed,
        what="L7 intention applied",
    )


def rotate_ca(http: httpx.Client) -> None:
    """Replace the active CA root (a new key type forces a new root, cross-signed)."""
    r = http.put(
        "/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
    )
    assert r.status_code == 200, r.text


def unused_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def decided(service: Service, caller: ServiceIdentity, allowed: bool) -> Callable[[], bool]:
    """A predicate: ``service`` now decides ``caller``'s connections as ``allowed``."""

    def check() -> bool:
        d = service.authorizer.decide(caller)
        return d is not None and d.allowed is allowed

    return check


@pytest.fixture
async def mesh(agent: DevAgent) -> AsyncIterator[Mesh]:
    """``api`` served by uvicorn (the recording app) and registered; ``web`` as the caller."""
    async with open_mesh(agent) as opened:
        yield opened


@contextlib.asynccontextmanager
async def open_mesh(agent: DevAgent, **serve_options: Any) -> AsyncIterator[Mesh]:
    """The :func:`mesh` fixture's mesh, with ``serve_options`` passed to ``serve()``."""
    cfg = AgentConfig.from_address(agent.address)
    http = httpx.Client(base_url=agent.http_addr, timeout=10)
    api = Service("api", agent=cfg)
    web = Service("web", agent=cfg)
    app = RecordingApp()
    server: ConnectServer | None = None
    try:
        await web.wait_ready_async(10)
        server = await serve(app, api, ready_timeout=10, **serve_options)
        register(http, "api", server.port, "api-1")
        yield Mesh(agent, http, api, web, server, app)
    finally:
        app.release.set()
        if server is not None:
            await server.aclose(timeout=5)
        await web.aclose()
        await api.aclose()
        http.close()
