"""``consul-connect demo``: the project's main job, end to end, in one command.

It starts the embedded dev agent (or uses a real agent when ``CONSUL_HTTP_ADDR``
is set), runs two Connect-native services (``api``, an ASGI app on uvicorn, and
``web``, an httpx client), and shows: calls succeeding with both identities, an
intention turned to deny (the next call refused and the open connection cut),
an L7 rule allowing GET and denying POST, and a CA root rotation with calls
continuing. It ends with a summary of timings; exit status 0 means every step
behaved as expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["DemoFailed", "run_demo"]

Scope = MutableMapping[str, Any]

_GREEN = "\033[32m" if sys.stdout.isatty() else ""
_RED = "\033[31m" if sys.stdout.isatty() else ""
_DIM = "\033[2m" if sys.stdout.isatty() else ""
_RESET = "\033[0m" if sys.stdout.isatty() else ""


class DemoFailed(Exception):
    """A demo step did not behave as expected."""


@dataclass
class _Step:
    name: str
    seconds: float
    detail: str


@dataclass
class _Report:
    quiet: bool
    steps: list[_Step] = field(default_factory=list)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[list[str]]:
        detail: list[str] = []
        self.say(f"{_DIM}…{_RESET} {name}")
        started = time.perf_counter()
        try:
            yield detail
        except Exception as exc:
            self.say(f"{_RED}✗ {name}: {exc}{_RESET}")
            raise
        took = time.perf_counter() - started
        self.steps.append(_Step(name, took, "; ".join(detail)))
        self.say(f"{_GREEN}✓{_RESET} {name} {_DIM}({took * 1000:.0f} ms){_RESET}")
        for line in detail:
            self.say(f"    {line}")


async def _api_app(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """The demo's API: tells the caller who it is, and accepts orders."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    from consul_connect.integrations.asgi import peer_identity_from_scope

    peer = peer_identity_from_scope(scope)
    while (await receive()).get("more_body"):
        pass
    body: dict[str, Any] = {"caller": peer.uri if peer else None, "path": scope["path"]}
    status = 201 if scope["method"] == "POST" else 200
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _demo(report: _Report, agent_addr: str | None) -> None:
    from consul_connect.agent.config import AgentConfig
    from consul_connect.integrations.asgi import serve
    from consul_connect.integrations.httpx import AsyncConnectTransport
    from consul_connect.service import Service

    dev = None
    # On the embedded agent the services are plainly "api" and "web". On a real agent
    # they get unique names, so the demo's intentions and config entries can never touch
    # real services, and are removed afterwards.
    api_name, web_name = "api", "web"
    if agent_addr is not None:
        suffix = secrets.token_hex(3)
        api_name, web_name = f"demo-api-{suffix}", f"demo-web-{suffix}"
    api_url = f"https://{api_name}.service.consul"
    if agent_addr is None:
        from consul_connect.devagent import DevAgent

        async with report.step("start the embedded dev agent") as d:
            dev = await asyncio.to_thread(DevAgent(leaf_root_change_jitter=0.0).start)
            cfg = AgentConfig.from_address(dev.address)
            d.append(f"Consul-compatible HTTP API on {dev.http_addr}")
    else:
        cfg = AgentConfig.from_env()
        report.say(f"using the Consul agent at {cfg.base_url} (services {api_name}, {web_name})")
        try:
            async with httpx.AsyncClient(base_url=cfg.base_url, timeout=5) as probe:
                (await probe.get("/v1/status/leader")).raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoFailed(f"the Consul agent at {cfg.base_url} is unreachable: {exc}") from exc
    headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
    admin = httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=30)
    port = _free_port()
    api = web = None
    server = None
    try:
        async with report.step("start two Connect-native services: api (ASGI) and web") as d:
            api = Service(api_name, agent=cfg, register=True, port=port, address="127.0.0.1")
            web = Service(web_name, agent=cfg)
            await api.wait_ready_async(30)
            await web.wait_ready_async(30)
            server = await serve(_api_app, api, "127.0.0.1", port)
            d.append(f"api  = {api.identity.uri} on 127.0.0.1:{port}")
            d.append(f"web  = {web.identity.uri}")
            d.append(
                f"trust domain {api.identity.trust_domain}, leaf serials "
                f"{api.statistics().leaf_serial} / {web.statistics().leaf_serial}"
            )

        client = httpx.AsyncClient(transport=AsyncConnectTransport(web), timeout=10)

        async with report.step("web calls api by name over mutual TLS") as d:
            await _wait(lambda: bool(api.statistics().ready), 30, "api to be ready")
            r = await _retry_get(client, f"{api_url}/hello", 15)
            caller = r.json()["caller"]
            if r.status_code != 200 or caller != web.identity.uri:
                raise DemoFailed(f"unexpected answer {r.status_code} {r.text}")
            d.append(f"GET /hello -> {r.status_code}; api saw caller {caller}")
            d.append("web verified the server is api (SPIFFE ID check) before sending")

        async with report.step(
            "intention web -> api set to deny: refused, open connection cut"
        ) as d:
            reader, writer = await web.open_connection(api_name, timeout=10)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
            await writer.drain()
            first = b""
            while not first.endswith(b"}"):
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    break
                first += chunk
            if b"200" not in first.split(b"\r\n", 1)[0]:
                raise DemoFailed("the long-lived connection did not work before the deny")
            r = await admin.put(
                "/v1/connect/intentions/exact",
                params={"source": web_name, "destination": api_name},
                json={"Action": "deny"},
            )
            r.raise_for_status()

            def denied() -> bool:
                dec = api.authorizer.decide(web.identity)
                return dec is not None and not dec.allowed

            await _wait(denied, 15, "the deny to reach api")
            cut = await asyncio.wait_for(reader.read(65536), 10)
            if cut != b"":
                raise DemoFailed("the open connection was not cut")
            writer.close()
            d.append("the connection web had open was closed by api")
            try:
                r = await client.get(f"{api_url}/hello")
            except httpx.HTTPError as exc:
                d.append(f"next call refused: {type(exc).__name__}")
            else:
                raise DemoFailed(f"a denied call got an answer: {r.status_code}")
            reason = api.authorizer.decide(web.identity)
            d.append(f"api's reason: {reason.reason if reason else '?'}")

        async with report.step("L7 intention: GET allowed, POST denied (same connection)") as d:
            r = await admin.put(
                "/v1/config",
                json={"Kind": "service-defaults", "Name": api_name, "Protocol": "http"},
            )
            r.raise_for_status()
            r = await admin.put(
                "/v1/config",
                json={
                    "Kind": "service-intentions",
                    "Name": api_name,
                    "Sources": [
                        {
                            "Name": web_name,
                            "Permissions": [
                                {
                                    "Action": "allow",
                                    "HTTP": {"PathPrefix": "/", "Methods": ["GET"]},
                                },
                                {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                            ],
                        }
                    ],
                },
            )
            r.raise_for_status()

            def l7() -> bool:
                dec = api.authorize_request(web.identity, "GET", "/hello", [])
                return dec.allowed

            await _wait(l7, 15, "the L7 rule to reach api")
            got = await _retry_get(client, f"{api_url}/orders", 15)
            posted = await client.post(f"{api_url}/orders", json={"n": 1})
            again = await client.get(f"{api_url}/orders")
            if (got.status_code, posted.status_code, again.status_code) != (200, 403, 200):
                raise DemoFailed(
                    f"GET {got.status_code}, POST {posted.status_code}, GET {again.status_code}"
                )
            streams = {id(_tls_of(r)) for r in (got, posted, again)}
            d.append(f"GET /orders -> {got.status_code}")
            d.append(f"POST /orders -> {posted.status_code} ({posted.text.strip()})")
            d.append(f"GET /orders -> {again.status_code}")
            if len(streams) == 1:
                d.append("all three on one keep-alive connection: judged per request")

        if dev is not None:
            async with report.step("CA root rotation while web keeps calling") as d:
                old_root = (await admin.get("/v1/connect/ca/roots")).json()["ActiveRootID"]
                old_serial = api.statistics().leaf_serial
                failures = 0
                calls = 0
                stop = asyncio.Event()

                async def keep_calling() -> None:
                    nonlocal failures, calls
                    while not stop.is_set() and calls < 20000:
                        try:
                            r = await client.get(f"{api_url}/hello")
                            if r.status_code != 200:
                                failures += 1
                        except httpx.HTTPError:
                            failures += 1
                        calls += 1

                caller = asyncio.create_task(keep_calling())
                r = await admin.put(
                    "/v1/connect/ca/configuration",
                    json={
                        "Provider": "consul",
                        "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384},
                    },
                )
                r.raise_for_status()
                await _wait(
                    lambda: (
                        api.statistics().leaf_serial != old_serial and web.statistics().roots == 2
                    ),
                    30,
                    "leaves re-issued under the new root",
                )
                before = calls
                await _wait(lambda: calls > before + 10, 15, "calls after the rotation")
                stop.set()
                await caller
                new_root = (await admin.get("/v1/connect/ca/roots")).json()["ActiveRootID"]
                if failures:
                    raise DemoFailed(f"{failures} of {calls} calls failed during the rotation")
                d.append(f"root {old_root[:11]}… -> {new_root[:11]}… (cross-signed)")
                d.append(f"api leaf {old_serial} -> {api.statistics().leaf_serial}")
                d.append(f"{calls} calls during the rotation, 0 failed")
        else:
            report.say(
                "- CA root rotation skipped: it would rotate the real cluster's CA "
                "(run without CONSUL_HTTP_ADDR to see it on the embedded agent)"
            )
        await client.aclose()
    finally:
        if dev is None:
            # Leave nothing behind on a real agent (the names are the demo's own).
            for kind in ("service-intentions", "service-defaults"):
                with contextlib.suppress(httpx.HTTPError):
                    await admin.delete(f"/v1/config/{kind}/{api_name}")
        if server is not None:
            await server.aclose()
        for svc in (web, api):
            if svc is not None:
                await svc.aclose()
        await admin.aclose()
        if dev is not None:
            await asyncio.to_thread(dev.stop)


def _tls_of(response: httpx.Response) -> object:
    """The TLS object of the connection that carried ``response``."""
    stream = response.extensions.get("network_stream")
    return stream.get_extra_info("ssl_object") if stream is not None else response


async def _retry_get(client: httpx.AsyncClient, url: str, timeout: float) -> httpx.Response:
    """GET ``url``, retrying connection errors until ``timeout`` (discovery may lag)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.get(url)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def run_demo(json_output: bool = False) -> int:
    """Run the demo; returns the process exit status (0 when every step behaved)."""
    report = _Report(quiet=json_output)
    agent_addr = os.environ.get("CONSUL_HTTP_ADDR") or None
    report.say("consul-connect demo: two Connect-native Python services, no sidecar\n")
    started = time.perf_counter()
    try:
        asyncio.run(_demo(report, agent_addr))
    except Exception as exc:
        total = time.perf_counter() - started
        if json_output:
            print(json.dumps({"ok": False, "error": str(exc), "seconds": round(total, 3)}))
        else:
            what = str(exc) if isinstance(exc, DemoFailed) else f"{type(exc).__name__}: {exc}"
            print(f"\n{_RED}demo failed: {what}{_RESET}", file=sys.stderr)
        return 1
    total = time.perf_counter() - started
    if json_output:
        print(
            json.dumps(
                {
                    "ok": True,
                    "seconds": round(total, 3),
                    "steps": [
                        {"name": s.name, "ms": round(s.seconds * 1000, 1), "detail": s.detail}
                        for s in report.steps
                    ],
                },
                indent=2,
            )
        )
    else:
        report.say("\nsummary")
        for s in report.steps:
            report.say(f"  {s.seconds * 1000:8.0f} ms  {s.name}")
        report.say(f"  {total * 1000:8.0f} ms  total: every step behaved as expected")
    return 0
