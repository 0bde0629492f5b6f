"""Async drivers that turn a blocking agent endpoint into a stream of changed values.

:func:`watch` feeds :class:`~consul_connect.agent.blocking.BlockingState`;
:func:`watch_hash` feeds :class:`~consul_connect.agent.blocking.HashBlockingState`.
They own the only I/O of the loop: the caller's ``fetch``, the clock, randomness and
sleeping, all injectable so tests run without a network or real time.

Close a watch you stop consuming early with ``contextlib.aclosing`` (or by cancelling
the task that iterates it) so its in-flight request is abandoned promptly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from consul_connect.agent.blocking import Backoff, BlockingState, HashBlockingState, RateLimiter
from consul_connect.agent.client import QueryMeta
from consul_connect.errors import (
    AgentPermissionError,
    AgentRequestError,
    AgentResponseError,
    ConsulConnectError,
)

__all__ = ["watch", "watch_hash"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

ErrorHook = Callable[[BaseException], None]


def _report(on_error: ErrorHook | None, exc: BaseException) -> None:
    if on_error is None:
        logger.warning("agent watch failed, backing off: %s", exc)
        return
    try:
        on_error(exc)
    except Exception:
        # A broken observer must not stop certificates or roots from refreshing.
        logger.exception("agent watch on_error hook raised")


async def watch(
    fetch: Callable[[int, float], Awaitable[tuple[T, QueryMeta]]],
    *,
    wait: float = 300.0,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    on_error: ErrorHook | None = None,
    clock: Callable[[], float] = time.monotonic,
    backoff: Backoff | None = None,
    limiter: RateLimiter | None = None,
) -> AsyncGenerator[T, None]:
    """Yield the value of an index-blocking endpoint each time it changes.

    ``fetch(index, wait)`` performs one request (e.g.
    ``lambda i, w: client.ca_roots(index=i, wait=w)``) and returns ``(value, meta)``.
    The first value is always yielded; later ones only when they differ (``!=``) from
    the last yielded one, however often the index moves.

    Failures (:class:`~consul_connect.errors.ConsulConnectError`, e.g. agent down, 5xx,
    404, a response without ``X-Consul-Index``) are passed to ``on_error`` (logged when
    it is None) and retried after an exponential, jittered, capped back-off; the retry
    is a non-blocking read. :class:`~consul_connect.errors.AgentPermissionError` and
    :class:`~consul_connect.errors.AgentRequestError` (a filter the agent cannot compile)
    are not retried: they are raised to the consumer and end the iteration, as does any
    exception outside the library's tree (a bug in ``fetch``). Cancellation propagates.
    """
    state = BlockingState(backoff=backoff, limiter=limiter)
    while True:
        delay = state.before_request(clock())
        if delay > 0:
            await sleep(delay)
        try:
            value, meta = await fetch(state.index, wait)
        except (AgentPermissionError, AgentRequestError):
            raise
        except ConsulConnectError as exc:
            _report(on_error, exc)
            await sleep(state.on_error(rand()))
            continue
        # QueryMeta.index is 0 only when the header was absent or garbled.
        outcome = state.on_response(str(meta.index) if meta.index > 0 else None, value)
        if outcome.error is not None:
            _report(on_error, AgentResponseError(f"unusable blocking answer: {outcome.error}"))
            await sleep(state.on_error(rand()))
            continue
        if outcome.reset:
            logger.info("agent blocking index went backwards; restarting the watch at 0")
        if outcome.changed:
            yield value


async def watch_hash(
    fetch: Callable[[str | None, float], Awaitable[tuple[T, QueryMeta]]],
    *,
    wait: float = 300.0,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    on_error: ErrorHook | None = None,
    clock: Callable[[], float] = time.monotonic,
    backoff: Backoff | None = None,
    limiter: RateLimiter | None = None,
) -> AsyncGenerator[T, None]:
    """Like :func:`watch` for hash-blocking endpoints (``X-Consul-ContentHash``).

    ``fetch(hash, wait)`` gets None for a non-blocking read, e.g.
    ``lambda h, w: client.agent_service("web-1", hash=h, wait=w)``. Same error rules.
    """
    state = HashBlockingState(backoff=backoff, limiter=limiter)
    while True:
        delay = state.before_request(clock())
        if delay > 0:
            await sleep(delay)
        try:
            value, meta = await fetch(state.hash, wait)
        except (AgentPermissionError, AgentRequestError):
            raise
        except ConsulConnectError as exc:
            _report(on_error, exc)
            await sleep(state.on_error(rand()))
            continue
        outcome = state.on_response(meta.content_hash, value)
        if outcome.error is not None:
            _report(on_error, AgentResponseError(f"unusable blocking answer: {outcome.error}"))
            await sleep(state.on_error(rand()))
            continue
        if outcome.changed:
            yield value
