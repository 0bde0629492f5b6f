"""Running the dev agent: in a background thread (``DevAgent``) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType
from typing import Any

import uvicorn

from consul_connect.devagent.app import DevAgentApp
from consul_connect.devagent.context import DevAgentConfig

__all__ = ["DevAgent"]

log = logging.getLogger("consul_connect.devagent")

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


def _uvicorn_config(app: DevAgentApp, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="on",
        log_level=log_level
        if log_level in ("critical", "error", "warning", "info", "debug", "trace")
        else "warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=65,
        # Blocking queries hold many connections open at once.
        limit_concurrency=None,
        backlog=2048,
    )


class _Server(uvicorn.Server):
    """uvicorn's server with a prompt stop.

    uvicorn polls ``should_exit`` every 100 ms and sleeps a fixed 100 ms before
    draining connections; a test suite that starts an agent per test pays that on
    every teardown. Here a stop request wakes the main loop at once and draining
    polls every 10 ms, with the same graceful-shutdown bound.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request_exit(self) -> None:
        """Ask the server to stop (thread-safe)."""
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            # on_tick refreshes the Date header every tenth tick: keep ~100 ms ticks.
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.config.timeout_graceful_shutdown or 0)
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            if loop.time() >= deadline:
                for task in self.server_state.tasks:
                    task.cancel()
                break
            await asyncio.sleep(0.01)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only turns on TCP_NODELAY for accepted sockets
    # whose protocol says TCP, and without it Nagle's algorithm meets the client's
    # delayed ACK and every answer written in two parts (headers, body) waits ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class DevAgent:
    """An embedded Consul-compatible dev agent serving HTTP on loopback in a background thread.

    Use as ``with DevAgent() as agent:`` or ``async with DevAgent() as agent:``.
    ``port=0`` (the default) picks a free port; ``agent.address`` is ``host:port``
    and ``agent.http_addr`` the ``http://`` URL. Other keyword arguments are
    :class:`DevAgentConfig` fields (``acl_enabled``, ``data_dir``, ...).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        config.setdefault("log_level", "warning")
        base = DevAgentConfig(**config)
        self.config = replace(base, bind=host, http_port=port)
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._server: _Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None
        self.app: DevAgentApp | None = None

    @property
    def port(self) -> int:
        """The TCP port the agent listens on (valid once started)."""
        if self._sock is None:
            raise RuntimeError("DevAgent is not running")
        return int(self._sock.getsockname()[1])

    @property
    def address(self) -> str:
        """``host:port`` of the HTTP API, as ``CONSUL_HTTP_ADDR`` takes it."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    @property
    def http_addr(self) -> str:
        """``http://host:port`` of the HTTP API."""
        return f"http://{self.address}"

    def start(self) -> DevAgent:
        """Start serving; return once ``/v1/status/leader`` answers (or raise)."""
        if self._thread is not None:
            raise RuntimeError("DevAgent already started")
        self._sock = _bind(self._host, self._port)
        self.config = replace(self.config, http_port=self.port)
        self.app = DevAgentApp(self.config)
        self.app.ctx.http_address = self.address
        self._server = _Server(_uvicorn_config(self.app, self.config.log_level))
        self._thread = threading.Thread(
            target=self._run, name="consul-connect-devagent", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"dev agent failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("dev agent did not start in time")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        assert self._server is not None and self._sock is not None
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:
            self._error = exc
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def stop(self) -> None:
        """Stop serving and join the thread; blocked queries are released first."""
        server, thread, loop, app = self._server, self._thread, self._loop, self.app
        if server is not None:
            if loop is not None and app is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(app.ctx.store.close)
            server.request_exit()
        if thread is not None:
            thread.join(_STOP_TIMEOUT)
            if thread.is_alive():
                if server is not None:
                    server.force_exit = True
                thread.join(_STOP_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
        self._thread = None
        self._server = None
        self._loop = None

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(ctx, *args)`` on the agent's loop and return its result (test hook)."""
        if self._loop is None or self.app is None:
            raise RuntimeError("DevAgent is not running")
        ctx = self.app.ctx

        async def run() -> Any:
            result = fn(ctx, *args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def __enter__(self) -> DevAgent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> DevAgent:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def serve_forever(config: DevAgentConfig, announce: Callable[[str], None] | None = None) -> None:
    """Serve the dev agent in the foreground until interrupted (the ``dev`` command).

    ``announce`` is called with the ``host:port`` actually bound (useful with port 0)
    before serving starts. Raises ``OSError`` when the address cannot be bound or the
    data directory cannot be used, ``ValueError`` when its state file is damaged.
    """
    app = DevAgentApp(config)
    sock = _bind(config.bind, config.http_port)
    host = f"[{config.bind}]" if ":" in config.bind else config.bind
    app.ctx.http_address = f"{host}:{sock.getsockname()[1]}"
    if announce is not None:
        announce(app.ctx.http_address)
    server = _Server(_uvicorn_config(app, config.log_level))
    asyncio.run(server.serve(sockets=[sock]))
