"""How to test your own Connect-native code: a real agent API per test, or no agent at all.

Installing consul-connect registers a pytest plugin, so these fixtures need no import:

* ``consul_dev_agent``: a fresh embedded dev agent (ACLs off) on a free loopback port,
  stopped after the test;
* ``consul_dev_agent_factory``: ``factory(**settings)`` starts agents with other
  settings (ACLs, datacenter, leaf TTL, ...), all stopped after the test.

``consul_connect.testing.TestCA`` issues certificates in memory for tests that should
not run an agent at all, including deliberately wrong ones.

The async tests assume pytest-asyncio with ``asyncio_mode = "auto"``; without it, mark
them with ``@pytest.mark.asyncio``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from consul_connect import (
    AgentConfig,
    AgentPermissionError,
    AllowIdentities,
    DevAgent,
    DialError,
    Service,
    StaticResolver,
    get_peer_identity,
)
from consul_connect.testing import TestCA


class EchoHandler:
    """A stream handler that echoes one line and remembers who called."""

    def __init__(self) -> None:
        self.callers: list[str] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = get_peer_identity(writer)
        self.callers.append(peer.service if peer else "?")
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()


async def serve_on_free_port(svc: Service, handler: EchoHandler) -> StaticResolver:
    """Start ``handler`` as ``svc`` on port 0; return a resolver pointing at it.

    A StaticResolver skips catalog registration, which keeps tests short; dial the
    service by name instead when discovery is what you are testing.
    """
    server = await svc.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return StaticResolver(("127.0.0.1", port), svc.identity)


async def test_caller_reaches_server_and_server_sees_its_identity(
    consul_dev_agent: DevAgent,
) -> None:
    cfg = AgentConfig.from_address(consul_dev_agent.address)
    handler = EchoHandler()
    async with Service("api", agent=cfg) as api, Service("web", agent=cfg) as web:
        target = await serve_on_free_port(api, handler)
        reader, writer = await web.open_connection(target, timeout=5)
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
        assert get_peer_identity(writer) == api.identity
        writer.close()
    assert handler.callers == ["web"]


async def test_denied_caller_never_reaches_the_handler(consul_dev_agent: DevAgent) -> None:
    # Write the intention before the services start: their first intention data
    # already holds the deny, so the test needs no waiting.
    with httpx.Client(base_url=consul_dev_agent.http_addr) as admin:
        admin.put(
            "/v1/connect/intentions/exact",
            params={"source": "web", "destination": "api"},
            json={"Action": "deny"},
        ).raise_for_status()
    cfg = AgentConfig.from_address(consul_dev_agent.address)
    handler = EchoHandler()
    async with Service("api", agent=cfg) as api, Service("web", agent=cfg) as web:
        target = await serve_on_free_port(api, handler)
        reader, writer = await web.open_connection(target, timeout=5)
        writer.write(b"ping\n")
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            answer = b""
        writer.close()
        assert answer == b""
        assert api.statistics().rejected == 1
    assert handler.callers == []


def test_service_without_a_token_is_refused_by_an_acl_agent(
    consul_dev_agent_factory: Callable[..., DevAgent],
) -> None:
    agent = consul_dev_agent_factory(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    anonymous = AgentConfig.from_address(agent.address)
    with Service("api", agent=anonymous) as api, pytest.raises(AgentPermissionError):
        api.wait_ready(10)
    with Service("api", agent=anonymous.replace(token="root")) as api:
        api.wait_ready(10)
        assert api.identity.service == "api"


async def test_certificate_from_another_ca_is_refused_without_any_agent() -> None:
    ca = TestCA()
    handler = EchoHandler()
    web_identity = ca.issue("web").identity
    only_web = AllowIdentities(web_identity)
    with (
        Service.from_test_ca(ca, "api", authorizer=only_web) as api,
        Service.from_test_ca(ca, "web", authorizer=only_web) as web,
        Service.from_test_ca(ca.untrusted(), "web", authorizer=only_web) as impostor,
    ):
        target = await serve_on_free_port(api, handler)
        reader, writer = await web.open_connection(target, timeout=5)
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
        writer.close()
        # Same name, same trust domain, different keys: the impostor's roots do not
        # vouch for api and api's roots do not vouch for it, so the dial fails.
        with pytest.raises(DialError):
            await impostor.open_connection(target, timeout=5)
    assert handler.callers == ["web"]
