"""A synchronous ``requests`` client calling a Connect-native ASGI service.

``billing`` is an ASGI app served with ``consul_connect.integrations.asgi.serve``. In
real life it is another process; here it runs on an event loop in a background thread
so the example is one file. ``reports`` is an ordinary synchronous program: a
``requests.Session`` with a ``ConnectAdapter`` mounted, calling ``billing`` by its
Consul name. The adapter resolves the name, dials an instance with ``reports``'
certificate and checks the server's identity before sending a byte.

Runs against the agent named by ``CONSUL_HTTP_ADDR`` when set, otherwise against an
embedded dev agent it starts itself. Exit status 0 means the call was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import httpx
import requests

from consul_connect import AgentConfig, DevAgent, Service
from consul_connect.integrations.asgi import peer_identity_from_scope, serve
from consul_connect.integrations.requests import ConnectAdapter

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def billing_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request with an invoice total and the caller's identity."""
    if scope["type"] != "http":
        return  # lifespan and anything else: nothing to set up
    caller = peer_identity_from_scope(scope)
    body = json.dumps({"total": 42, "caller": caller and caller.uri}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serve_in_thread(service: Service, port: int) -> Iterator[None]:
    """Run ``billing_app`` as ``service`` on an event loop in a thread until the block ends."""
    started = threading.Event()
    failed: list[BaseException] = []
    stop: list[Callable[[], object]] = []

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop.append(lambda: loop.call_soon_threadsafe(stopping.set))
        try:
            async with await serve(billing_app, service, "127.0.0.1", port, lifespan="off"):
                started.set()
                await stopping.wait()
        except BaseException as exc:
            failed.append(exc)
            started.set()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    if not started.wait(20) or failed:
        raise RuntimeError(f"billing did not start: {failed}")
    try:
        yield
    finally:
        stop[0]()
        thread.join(10)


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


def get_with_retry(session: requests.Session, url: str, timeout: float) -> requests.Response:
    """GET ``url``; a just-registered instance takes a moment to pass its health check."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return session.get(url, timeout=5)
        except requests.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise
            print(f"reports: not yet ({exc.__cause__!r:.60}), retrying")
            time.sleep(0.1)


def main(cfg: AgentConfig) -> None:
    port = free_port()
    with (
        Service("billing", agent=cfg, register=True, port=port, address="127.0.0.1") as billing,
        Service("reports", agent=cfg) as reports,
        serve_in_thread(billing, port),
        requests.Session() as session,
    ):
        print(f"billing serving as {billing.identity.uri} on 127.0.0.1:{port}")
        adapter = ConnectAdapter(reports)
        # Both schemes go over Connect mTLS; mount only the Consul names you mean.
        session.mount("https://", adapter)
        session.mount("http://", adapter)

        r = get_with_retry(session, "https://billing.service.consul/invoices/7", 8)
        print(f"reports: GET /invoices/7 -> {r.status_code} {r.json()}")
        if r.status_code != 200 or r.json()["caller"] != reports.identity.uri:
            raise SystemExit("requests example: unexpected answer")
    print("requests example: OK")


if __name__ == "__main__":
    with consul_agent() as agent_config, intention(agent_config, "reports", "billing", "allow"):
        main(agent_config)
