"""The background event loop that runs every watch of every Service in this process.

Sync programs (threads, WSGI) and async programs (any loop) share one Service
API: watches, heartbeats and agent calls run on a single asyncio loop in a
daemon thread, started when the first Service needs it and stopped when the
last one closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Runtime"]

T = TypeVar("T")

_JOIN_TIMEOUT = 10.0


class Runtime:
    """A reference-counted asyncio loop in a daemon thread (one per process)."""

    _lock = threading.Lock()
    _current: Runtime | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._refs = 0
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="consul-connect-runtime", daemon=True)
        self.thread.start()
        self._started.wait(_JOIN_TIMEOUT)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    @classmethod
    def acquire(cls) -> Runtime:
        """Return the process runtime, starting it if needed, and take a reference."""
        with cls._lock:
            rt = cls._current
            if rt is None or not rt.thread.is_alive():
                rt = cls._current = Runtime()
            rt._refs += 1
            return rt

    def release(self) -> None:
        """Drop a reference; the last one stops the loop and joins its thread."""
        with Runtime._lock:
            self._refs -= 1
            if self._refs > 0:
                return
            if Runtime._current is self:
                Runtime._current = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(_JOIN_TIMEOUT)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the runtime loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the runtime loop and wait (at most ``timeout`` s) for its result.

        Must not be called from the runtime thread itself. Raises ``TimeoutError``.
        """
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("Runtime.run called from the runtime thread")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"operation did not finish within {timeout:g}s") from None

    async def run_async(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Await ``coro`` on the runtime loop from another loop (or the same one)."""
        if asyncio.get_running_loop() is self.loop:
            return await asyncio.wait_for(coro, timeout)
        fut = asyncio.wrap_future(self.submit(coro))
        return await asyncio.wait_for(fut, timeout)
