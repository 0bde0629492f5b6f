"""An ASGI application served as a Connect-native service, with an L7 intention.

``orders`` is a plain ASGI app (a FastAPI or Starlette app is passed the same way)
served on uvicorn by ``consul_connect.integrations.asgi.serve``; ``storefront`` calls it
with an ``httpx.AsyncClient`` whose transport is ``AsyncConnectTransport``. The app reads
the caller's verified identity from the ASGI scope.

Then an L7 intention is written as Consul config entries (``service-defaults`` with
``Protocol = "http"`` and ``service-intentions`` with HTTP permissions): ``storefront``
may GET but not POST. The server enforces it per request and answers 403.

Runs against the agent named by ``CONSUL_HTTP_ADDR`` when set, otherwise against an
embedded dev agent it starts itself. Exit status 0 means GET got 200 and POST got 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import httpx

from consul_connect import AgentConfig, DevAgent, Service
from consul_connect.integrations.asgi import peer_identity_from_scope, serve
from consul_connect.integrations.httpx import AsyncConnectTransport

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def orders_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A tiny ASGI app: answers with the method, the path and who called."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    caller = peer_identity_from_scope(scope)
    while (await receive()).get("more_body"):
        pass  # drain the request body
    body = json.dumps(
        {"method": scope["method"], "path": scope["path"], "caller": caller and caller.uri}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def consul_agent() -> Iterator[AgentConfig]:
    """The agent from ``CONSUL_*`` variables, or a throw-away embedded dev agent."""
    if os.environ.get("CONSUL_HTTP_ADDR"):
        yield AgentConfig.from_env()
        return
    with DevAgent(leaf_root_change_jitter=0.0) as dev:
        print(f"started an embedded dev agent on {dev.http_addr}")
        yield AgentConfig.from_address(dev.address)


def admin_client(cfg: AgentConfig) -> httpx.AsyncClient:
    headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
    return httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=10)


async def allow_get_only(admin: httpx.AsyncClient, source: str, destination: str) -> None:
    """The same entries ``consul config write`` would take as HCL."""
    entries: list[dict[str, Any]] = [
        {"Kind": "service-defaults", "Name": destination, "Protocol": "http"},
        {
            "Kind": "service-intentions",
            "Name": destination,
            "Sources": [
                {
                    "Name": source,
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"PathPrefix": "/", "Methods": ["GET"]}},
                        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                    ],
                }
            ],
        },
    ]
    for entry in entries:
        (await admin.put("/v1/config", json=entry)).raise_for_status()


async def remove_entries(admin: httpx.AsyncClient, name: str) -> None:
    for kind in ("service-intentions", "service-defaults"):
        with contextlib.suppress(httpx.HTTPError):
            await admin.delete(f"/v1/config/{kind}/{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get_with_retry(client: httpx.AsyncClient, url: str, timeout: float) -> httpx.Response:
    """GET ``url``; a just-registered instance takes a moment to pass its health check."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await client.get(url)
        except httpx.ConnectError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def main(cfg: AgentConfig) -> None:
    port = free_port()
    admin = admin_client(cfg)
    async with (
        admin,
        Service("orders", agent=cfg, register=True, port=port, address="127.0.0.1") as orders,
        Service("storefront", agent=cfg) as storefront,
    ):
        try:
            await allow_get_only(admin, "storefront", "orders")
            print("wrote service-defaults (http) and an L7 intention: storefront may only GET")

            # The intention reaches the server through its watch; wait until it applies.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 8
            await storefront.wait_ready_async(10)
            await orders.wait_ready_async(10)
            while orders.authorize_request(storefront.identity, "POST", "/", []).allowed:
                if loop.time() > deadline:
                    raise SystemExit("the L7 intention did not reach the server in time")
                await asyncio.sleep(0.05)

            async with (
                await serve(orders_app, orders, "127.0.0.1", port) as server,
                httpx.AsyncClient(transport=AsyncConnectTransport(storefront), timeout=5) as http,
            ):
                print(f"orders serving as {orders.identity.uri} on port {server.port}")
                got = await get_with_retry(http, "https://orders.service.consul/orders/7", 8)
                print(f"GET  /orders/7 -> {got.status_code} {got.json()}")
                posted = await http.post("https://orders.service.consul/orders", json={"n": 1})
                print(f"POST /orders   -> {posted.status_code} {posted.text.strip()}")
            me = storefront.identity.uri
        finally:
            await remove_entries(admin, "orders")

    if got.status_code != 200 or got.json()["caller"] != me:
        raise SystemExit("asgi example: GET was not served to storefront")
    if posted.status_code != 403:
        raise SystemExit("asgi example: POST was not refused")
    print("asgi example: OK (GET allowed, POST denied by the L7 intention)")


if __name__ == "__main__":
    with consul_agent() as agent_config:
        asyncio.run(asyncio.wait_for(main(agent_config), 25))
