"""One agent connection and one CA-roots watch per agent per process, shared by Services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from consul_connect.agent.client import AgentClient
from consul_connect.agent.config import AgentConfig
from consul_connect.agent.watch import watch
from consul_connect.certs import RootSet
from consul_connect.errors import AgentError, CertificateError

__all__ = ["AgentHub"]

log = logging.getLogger("consul_connect")

RootsListener = Callable[[RootSet], None]
ErrorListener = Callable[[BaseException], None]

_hubs: dict[Any, AgentHub] = {}


def _key(config: AgentConfig) -> Any:
    try:
        hash(config)
        return config
    except TypeError:
        return repr(config)


class AgentHub:
    """The shared agent client and CA-roots watch for one agent (runtime-loop only).

    Get one with :meth:`acquire`, give it back with :meth:`release`; the last
    release stops the watch and closes the client.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.client = AgentClient(config)
        self.roots: RootSet | None = None
        self.last_error: BaseException | None = None
        self._roots_listeners: list[RootsListener] = []
        self._error_listeners: list[ErrorListener] = []
        self._refs = 0
        self._task: asyncio.Task[None] | None = None
        self.roots_ready = asyncio.Event()

    @classmethod
    def acquire(cls, config: AgentConfig) -> AgentHub:
        """Return the hub for ``config`` (creating it) and take a reference."""
        key = _key(config)
        hub = _hubs.get(key)
        if hub is None:
            hub = _hubs[key] = AgentHub(config)
        hub._refs += 1
        if hub._task is None:
            hub._task = asyncio.get_running_loop().create_task(hub._watch_roots())
        return hub

    async def release(self) -> None:
        """Drop a reference; the last one stops the roots watch and closes the client."""
        self._refs -= 1
        if self._refs > 0:
            return
        _hubs.pop(_key(self.config), None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self.client.aclose()

    def add_listeners(self, on_roots: RootsListener, on_error: ErrorListener) -> None:
        """Be told of every new root set and of every roots-watch error."""
        self._roots_listeners.append(on_roots)
        self._error_listeners.append(on_error)
        if self.roots is not None:
            on_roots(self.roots)

    def remove_listeners(self, on_roots: RootsListener, on_error: ErrorListener) -> None:
        """Stop telling these listeners."""
        with contextlib.suppress(ValueError):
            self._roots_listeners.remove(on_roots)
        with contextlib.suppress(ValueError):
            self._error_listeners.remove(on_error)

    def _error(self, exc: BaseException) -> None:
        self.last_error = exc
        for cb in list(self._error_listeners):
            try:
                cb(exc)
            except Exception:
                log.exception("roots error listener failed")

    async def _watch_roots(self) -> None:
        client = self.client

        async def fetch(index: int, wait: float) -> tuple[Any, Any]:
            return await client.ca_roots(index=index, wait=wait)

        while True:
            try:
                async for data in watch(fetch, on_error=self._error):
                    try:
                        roots = RootSet.from_json(data)
                    except CertificateError as exc:
                        self._error(exc)
                        continue
                    if not roots.roots:
                        self._error(CertificateError("the agent has no CA roots yet"))
                        continue
                    self.roots = roots
                    self.last_error = None
                    self.roots_ready.set()
                    for cb in list(self._roots_listeners):
                        try:
                            cb(roots)
                        except Exception:
                            log.exception("roots listener failed")
            except asyncio.CancelledError:
                raise
            except AgentError as exc:
                # The roots endpoint needs no ACL; a permission error here is unexpected.
                self._error(exc)
                await asyncio.sleep(5.0)
