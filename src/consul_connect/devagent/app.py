"""The dev agent as an ASGI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from consul_connect.devagent import endpoints
from consul_connect.devagent.context import AgentContext, DevAgentConfig
from consul_connect.devagent.http import HTTPError, Request, Response, Router

__all__ = ["DevAgentApp"]

log = logging.getLogger("consul_connect.devagent")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_NOT_FOUND = "Invalid URL path: not a recognized HTTP API endpoint\n"
_NOT_API = (
    "Invalid URL path: if attempting to use the HTTP API, ensure the path starts with '/v1/'\n"
)
_INDEX = (
    "Consul Agent: UI disabled. To enable, set ui_config.enabled=true in the agent "
    "configuration and restart."
)
_MAX_BODY = 32 * 1024 * 1024


class DevAgentApp:
    """ASGI app answering Consul's HTTP API from an in-memory (optionally persisted) store."""

    def __init__(self, config: DevAgentConfig | None = None) -> None:
        self.config = config or DevAgentConfig()
        self.ctx = AgentContext(self.config)
        self.router = Router()
        endpoints.register_all(self.router, self.ctx)
        self._tasks: list[asyncio.Task[None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > _MAX_BODY:
                await self._send(send, Response(413, b"Request body too large", {}, "text/plain"))
                return
            if not msg.get("more_body", False):
                break
        resp = await self.handle(
            scope["method"],
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            bytes(body),
        )
        await self._send(send, resp)

    async def handle(
        self, method: str, path: str, raw_query: str, headers: dict[str, str], body: bytes
    ) -> Response:
        """Answer one request; never raises."""
        try:
            resp = await self._dispatch(method, path, raw_query, headers, body)
        except HTTPError as exc:
            resp = Response(
                exc.status, exc.text.encode(), dict(exc.headers), "text/plain; charset=utf-8"
            )
        except Exception as exc:  # a handler bug must not kill the agent nor leak a trace
            log.exception("internal error on %s %s", method, path)
            resp = Response(500, str(exc).encode(), {}, "text/plain; charset=utf-8")
        if self.router.resolve(path) is not None:
            # Only routed (wrapped) handlers send it; Consul's index/404 handler does not.
            resp.headers.setdefault("X-Consul-Default-ACL-Policy", self.ctx.acl.default_policy)
        return resp

    async def _dispatch(
        self, method: str, path: str, raw_query: str, headers: dict[str, str], body: bytes
    ) -> Response:
        found = self.router.resolve(path)
        if found is None:
            # Consul's catch-all index handler: the agent banner at "/", else a 404 that
            # tells API paths from others.
            if path == "/":
                return Response(200, _INDEX.encode(), {}, "text/plain; charset=utf-8")
            raise HTTPError(404, _NOT_FOUND if "/v1/" in path else _NOT_API)
        route, suffix = found
        # Consul lists the methods in registration order, OPTIONS last.
        allow = ",".join([*route.methods, "OPTIONS"])
        if method == "OPTIONS":
            return Response(200, b"", {"Allow": allow}, None)
        handler = route.methods.get(method)
        if handler is None:
            raise HTTPError(405, f"method {method} not allowed", {"Allow": allow})
        req = Request(self.ctx, method, path, raw_query, headers, body, suffix)
        return await handler(req)

    async def _send(self, send: Send, resp: Response) -> None:
        headers = [(k.lower().encode(), v.encode()) for k, v in resp.headers.items()]
        if resp.content_type:
            headers.append((b"content-type", resp.content_type.encode()))
        headers.append((b"vary", b"Accept-Encoding"))
        # The whole body is known: say so rather than answer chunked.
        headers.append((b"content-length", str(len(resp.body)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": resp.body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("dev agent failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Start the background tasks endpoint modules registered (TTL expiry, pruning)."""
        for fn in self.ctx.background:
            self._tasks.append(asyncio.create_task(fn(self.ctx)))

    async def shutdown(self) -> None:
        """Wake blocked queries and stop background tasks."""
        self.ctx.store.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
