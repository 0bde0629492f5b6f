"""aiohttp on both ends: a Connect-native aiohttp server and an aiohttp client.

``inventory`` is an ``aiohttp.web`` application served with
``consul_connect.integrations.aiohttp.serve`` (TLS with the Service's leaf, the caller
authorized before aiohttp reads a byte); ``warehouse`` calls it with a
``connect_session``, a ``ClientSession`` that dials Consul names over Connect mTLS.

Needs the optional ``aiohttp`` package; without it the example says so and exits 0.
Runs against the agent named by ``CONSUL_HTTP_ADDR`` when set, otherwise against an
embedded dev agent it starts itself. Exit status 0 means the call was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Iterator

import httpx

from consul_connect import AgentConfig, DevAgent, Service

try:
    import aiohttp
    from aiohttp import web

    from consul_connect.integrations.aiohttp import connect_session, peer_identity_of, serve
except ImportError:
    print("aiohttp example: skipped, aiohttp is not installed (pip install aiohttp)")
    sys.exit(0)


async def stock(request: web.Request) -> web.Response:
    caller = peer_identity_of(request)
    item = request.match_info["item"]
    return web.json_response({"item": item, "in_stock": 3, "caller": caller and caller.uri})


@contextlib.contextmanager
def consul_agent() -> Iterator[AgentConfig]:
    """The agent from ``CONSUL_*`` variables, or a throw-away embedded dev agent."""
    if os.environ.get("CONSUL_HTTP_ADDR"):
        yield AgentConfig.from_env()
        return
    with DevAgent(leaf_root_change_jitter=0.0) as dev:
        print(f"started an embedded dev agent on {dev.http_addr}")
        yield AgentConfig.from_address(dev.address)


@contextlib.contextmanager
def intention(cfg: AgentConfig, source: str, destination: str, action: str) -> Iterator[None]:
    """Create ``source => destination`` (as ``consul intention create`` does), then remove it.

    The dev agent allows everything by default; a real cluster often denies by default.
    """
    headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
    params = {"source": source, "destination": destination}
    with httpx.Client(base_url=cfg.base_url, headers=headers, timeout=10) as admin:
        admin.put(
            "/v1/connect/intentions/exact", params=params, json={"Action": action}
        ).raise_for_status()
        try:
            yield
        finally:
            admin.delete("/v1/connect/intentions/exact", params=params)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(cfg: AgentConfig) -> None:
    port = free_port()
    app = web.Application()
    app.router.add_get("/stock/{item}", stock)
    async with (
        Service("inventory", agent=cfg, register=True, port=port, address="127.0.0.1") as inv,
        Service("warehouse", agent=cfg) as warehouse,
    ):
        server = await serve(app, inv, "127.0.0.1", port)
        print(f"inventory serving as {inv.identity.uri} on port {server.port}")
        await warehouse.wait_ready_async(10)
        me = warehouse.identity.uri
        try:
            async with connect_session(warehouse) as session:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 8
                while True:
                    try:
                        async with session.get("https://inventory.service.consul/stock/bolts") as r:
                            status, answer = r.status, await r.json()
                        break
                    except aiohttp.ClientError as exc:
                        # A just-registered instance takes a moment to pass its check.
                        if loop.time() > deadline:
                            raise
                        print(f"warehouse: not yet ({type(exc.__cause__).__name__}), retrying")
                        await asyncio.sleep(0.1)
        finally:
            await server.aclose()
    print(f"warehouse: GET /stock/bolts -> {status} {answer}")
    if status != 200 or answer["caller"] != me:
        raise SystemExit("aiohttp example: unexpected answer")
    print("aiohttp example: OK")


if __name__ == "__main__":
    with consul_agent() as agent_config, intention(agent_config, "warehouse", "inventory", "allow"):
        asyncio.run(asyncio.wait_for(main(agent_config), 20))
