"""Pieces every integration shares: the current TLS snapshot, per-instance pool
bookkeeping, trying instances in turn, and the errors a failed dial becomes.

Private: the integrations' public modules are the contract.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consul_connect.discovery import Endpoint
from consul_connect.errors import (
    ConsulConnectError,
    DialError,
    NoInstancesError,
    NotReadyError,
    ServerIdentityError,
)
from consul_connect.identity import ServiceIdentity
from consul_connect.service import Service
from consul_connect.tls import DynamicClientContext, TLSMaterial

__all__ = [
    "EndpointKey",
    "PoolSet",
    "current_material",
    "dial_error",
    "endpoint_key",
    "material_token",
    "request_denied",
    "resolve_failure",
    "routed_path",
    "try_endpoints",
]

P = TypeVar("P")
T = TypeVar("T")

EndpointKey = tuple[str, int, str]


def current_material(service: Service) -> TLSMaterial:
    """The Service's current (leaf, roots) snapshot; raises NotReadyError before it has one."""
    ctx = service.client_context
    assert isinstance(ctx, DynamicClientContext)
    return ctx.current


def material_token(service: Service) -> object:
    """An object that changes identity whenever the Service's leaf or roots change."""
    ctx = service.client_context
    if isinstance(ctx, DynamicClientContext):
        return ctx.current
    return ctx


def endpoint_key(ep: Endpoint) -> EndpointKey:
    """What makes two discovery answers the same instance: address and identity."""
    return (ep.host, ep.port, ep.identity.uri.lower())


def routed_path(path: str) -> str:
    """The decoded path an application routes on, as a target for ``decide_l7``.

    ``%``, ``?`` and ``#`` are escaped so that they stay characters of the path (a decoded
    ``%3F`` must not end it). Not normalized: ``decide_l7`` normalizes as Envoy does and
    then requires the path as given to be allowed too, so ``/admin/../public`` (which an
    application may route to an ``/admin`` handler) does not pass as ``/public``.
    """
    return path.replace("%", "%25").replace("?", "%3F").replace("#", "%23")


def request_denied(service: Service, identity: ServiceIdentity, reason: str) -> None:
    """Count and report one request that L7 intentions refused (the connection stays open)."""
    service.deny_request(identity, reason)


def dial_error(target: str, failures: list[tuple[str, str]], identity_failures: int) -> DialError:
    """The error for a dial where every instance failed (``ServerIdentityError`` when
    every one of them presented the wrong identity)."""
    detail = "; ".join(f"{addr}: {why}" for addr, why in failures) or "no instance was tried"
    message = f"could not connect to {target!r}: {detail}"
    if failures and identity_failures == len(failures):
        return ServerIdentityError(message, failures=failures)
    return DialError(message, failures=failures)


def _budget(remaining: float, left: int) -> float:
    """This attempt's share of the time left, so one stalled instance cannot use it all."""
    if left <= 1:
        return remaining
    return min(remaining, max(0.25, remaining / left))


async def try_endpoints(
    target: str,
    endpoints: list[Endpoint],
    deadline: float,
    dial: Callable[[Endpoint, float], Awaitable[T]],
) -> T:
    """``await dial(ep, budget)`` on each instance in turn until one succeeds.

    ``deadline`` is in ``loop.time()``. ``dial`` must clean up after itself when it
    raises. Raises :func:`dial_error`'s error listing every failure.
    """
    loop = asyncio.get_running_loop()
    failures: list[tuple[str, str]] = []
    identity_failures = 0
    for n, ep in enumerate(endpoints):
        remaining = deadline - loop.time()
        if remaining <= 0:
            failures.append((ep.address, "deadline exceeded before trying"))
            continue
        try:
            return await dial(ep, _budget(remaining, len(endpoints) - n))
        except ServerIdentityError as exc:
            identity_failures += 1
            failures.append((ep.address, str(exc)))
        except (TimeoutError, OSError, ConsulConnectError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            failures.append((ep.address, why or type(exc).__name__))
    raise dial_error(target, failures, identity_failures)


# ------------------------------------------------------------------ pool bookkeeping


@dataclass(eq=False)
class PoolEntry(Generic[P]):
    """One instance's pool, the material it was made under, and who is using it."""

    key: EndpointKey
    pool: P
    material: object
    created: float
    active: int = 0
    retired: bool = False


@dataclass
class PoolSet(Generic[P]):
    """Which pool serves which instance, and which pools are due to be closed.

    Thread-safe and I/O-free: methods return the pools the caller must close (outside
    the lock; closing an async pool needs an ``await``). A pool is closed only when no
    request is using it, because closing a pool aborts its busy connections.
    """

    max_age: float | None
    entries: dict[EndpointKey, PoolEntry[P]] = field(default_factory=dict)
    targets: dict[str, frozenset[EndpointKey]] = field(default_factory=dict)
    retired: list[PoolEntry[P]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    key = staticmethod(endpoint_key)

    def _retire(self, entry: PoolEntry[P], due: list[P]) -> None:
        if entry.retired:
            return
        entry.retired = True
        self.entries.pop(entry.key, None)
        if entry.active == 0:
            due.append(entry.pool)
        else:
            self.retired.append(entry)

    def observe(self, target: str, endpoints: list[Endpoint]) -> list[P]:
        """Record the instances ``target`` resolves to now; retire pools of vanished ones."""
        due: list[P] = []
        keys = frozenset(endpoint_key(ep) for ep in endpoints)
        with self.lock:
            previous = self.targets.get(target, frozenset())
            self.targets[target] = keys
            gone = previous - keys
            if gone:
                still_used = frozenset().union(*self.targets.values())
                for k in gone - still_used:
                    entry = self.entries.get(k)
                    if entry is not None:
                        self._retire(entry, due)
        return due

    def acquire(
        self, ep: Endpoint, material: object, factory: Callable[[Endpoint], P]
    ) -> tuple[PoolEntry[P], list[P]]:
        """The pool to use for ``ep`` (made fresh when missing, stale or too old)."""
        due: list[P] = []
        now = time.monotonic()
        k = endpoint_key(ep)
        with self.lock:
            if self.closed:
                raise RuntimeError("the transport is closed")
            entry = self.entries.get(k)
            if entry is not None and (
                entry.material is not material
                or (self.max_age is not None and now - entry.created >= self.max_age)
            ):
                self._retire(entry, due)
                entry = None
            if entry is None:
                entry = PoolEntry(k, factory(ep), material, now)
                self.entries[k] = entry
            entry.active += 1
        return entry, due

    def release(self, entry: PoolEntry[P]) -> list[P]:
        """A request on ``entry`` finished; return its pool if it is now due to close."""
        with self.lock:
            entry.active -= 1
            if self.closed and entry.active == 0:
                # close() closed this pool while a request held it; the request may
                # have dialled a new connection into it since, which only closing it
                # again ends (closing twice is harmless).
                return [entry.pool]
            if entry.retired and entry.active == 0 and entry in self.retired:
                self.retired.remove(entry)
                return [entry.pool]
        return []

    def close(self) -> list[P]:
        """Every pool (the transport is closing; busy requests are cut off)."""
        with self.lock:
            self.closed = True
            pools = [e.pool for e in self.entries.values()] + [e.pool for e in self.retired]
            self.entries.clear()
            self.retired.clear()
            self.targets.clear()
        return pools


def resolve_failure(exc: BaseException, target: str) -> tuple[str, bool]:
    """The message for a discovery failure, and whether it counts as a connect timeout."""
    if isinstance(exc, NotReadyError | TimeoutError):
        return f"could not resolve {target!r} in time: {exc}", True
    if isinstance(exc, NoInstancesError):
        return str(exc), False
    return f"could not resolve {target!r}: {exc}", False
