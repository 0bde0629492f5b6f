"""``Service``: a Connect-native identity that accepts and dials mTLS connections.

A Service fetches its leaf certificate and the CA roots from the local agent
and keeps both fresh with blocking queries (one roots watch per agent per
process, shared by every Service), decides who may connect (by default from
locally cached intentions, with no agent call on the connection path), finds
other services, and optionally registers itself. The same object serves sync
and async programs: watches run on a background loop; ``listen``/``connect``
work on the caller's thread and ``start_server``/``open_connection`` on the
caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import queue
import re
import selectors
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, overload

from consul_connect._runtime import Runtime
from consul_connect._tlsserver import TLSServer, bind_socket, check_transport, open_stream
from consul_connect.agent.blocking import RateLimiter
from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import AgentAuthorizer, Authorizer, IntentionAuthorizer
from consul_connect.authz.intentions import Decision
from consul_connect.certs import Leaf, RootSet
from consul_connect.discovery import Endpoint, Resolver, StaticResolver, resolver_for_name
from consul_connect.errors import (
    AgentError,
    AgentNotFoundError,
    AgentPermissionError,
    AgentUnavailableError,
    CertificateError,
    ConfigError,
    DialError,
    NoInstancesError,
    NotReadyError,
    PeerRejected,
    ServerIdentityError,
)
from consul_connect.identity import ServiceIdentity
from consul_connect.tls import (
    HANDSHAKE_TIMEOUT,
    DynamicClientContext,
    DynamicServerContext,
    TLSMaterial,
    peer_identity,
    verify_server_identity,
)

__all__ = [
    "ConnectListener",
    "Service",
    "ServiceEvent",
    "ServiceStatistics",
    "get_peer_identity",
]

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""What :meth:`Service.start_server` calls for each authorized connection."""

log = logging.getLogger("consul_connect")

EventKind = Literal[
    "leaf_rotated", "roots_changed", "peer_allowed", "peer_denied", "request_denied", "watch_error"
]
EventHook = Callable[["ServiceEvent"], None]

_LEAF_WAIT = 300.0
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 30.0
_CLOSE_TIMEOUT = 10.0
_SPIFFE_URI = re.compile(r"spiffe://\S+")
_MAX_WATCHED_NAMES = 128
"""Names whose instances a Service keeps watched; beyond this the oldest watch stops.

Every name dialled starts a watch (a long-poll on the agent) that lasts until close():
without a bound, a caller (or a server's redirects) naming ever new hosts would hold
ever more connections open.
"""

# The peer identity of connections this library accepted or dialled, keyed by
# the object the application holds (StreamWriter, transport or SSLSocket) and by the
# connection's SSLObject (uvloop's transports cannot be weakly referenced).
_peer_identities: weakref.WeakKeyDictionary[Any, ServiceIdentity] = weakref.WeakKeyDictionary()


def _remember_peer(identity: ServiceIdentity, *conns: Any) -> None:
    for conn in conns:
        with contextlib.suppress(TypeError):  # not weakly referenceable
            _peer_identities[conn] = identity


def _remember_stream_peer(identity: ServiceIdentity, writer: asyncio.StreamWriter) -> None:
    _remember_peer(identity, writer, writer.transport, writer.get_extra_info("ssl_object"))


def _lookup_peer(conn: Any) -> ServiceIdentity | None:
    try:
        return _peer_identities.get(conn)
    except TypeError:
        return None


def get_peer_identity(conn: Any) -> ServiceIdentity | None:
    """Return the verified peer identity of a connection a Service accepted or dialled.

    ``conn`` is an ``asyncio.StreamWriter``, its transport, or an ``ssl.SSLSocket``.
    Returns None for connections that did not come from a Service.
    """
    found = _lookup_peer(conn)
    if found is None and isinstance(conn, asyncio.StreamWriter):
        found = _lookup_peer(conn.transport)
    if found is None and hasattr(conn, "get_extra_info"):
        found = _lookup_peer(conn.get_extra_info("ssl_object"))
    return found


@dataclass(frozen=True)
class ServiceEvent:
    """Something a Service noticed: ``kind`` plus details (identity, reason, serial, error)."""

    kind: EventKind
    service: str
    peer: ServiceIdentity | None = None
    reason: str = ""
    serial: str = ""
    error: BaseException | None = None


@dataclass(frozen=True)
class ServiceStatistics:
    """A frozen snapshot of a Service's state and counters."""

    name: str
    ready: bool
    leaf_serial: str
    leaf_valid_before: datetime | None
    trust_domain: str
    roots: int
    active_connections: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    dialed: int
    dial_failures: int
    requests_denied: int
    leaf_rotations: int
    roots_changes: int
    watch_errors: int
    last_error: str


@dataclass
class _Counters:
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    dialed: int = 0
    dial_failures: int = 0
    requests_denied: int = 0
    leaf_rotations: int = 0
    roots_changes: int = 0
    watch_errors: int = 0


@dataclass
class _Tracked:
    identity: ServiceIdentity
    close: Callable[[], None]
    per_request_l7: bool = False


def _l7_match(decision: Decision) -> bool:
    """True when the decision came from an intention with L7 permissions."""
    return decision.intention is not None and decision.intention.is_l7


class Service:
    """A Connect-native service identity: leaf, roots, authorizer, resolvers, registration.

    ``Service("web")`` talks to the agent named by ``CONSUL_*`` variables (or
    ``agent=AgentConfig(...)``) and starts its watches at once; call
    :meth:`wait_ready` (or ``await`` :meth:`wait_ready_async`) before serving.
    ``authorizer`` is ``"intentions"`` (default: local intention evaluation),
    ``"agent"`` (ask the agent's authorize endpoint) or an :class:`Authorizer`.
    With ``register=True`` and a ``port`` the Service registers itself as a
    Connect-native instance with a TTL check it keeps passing.
    ``close_denied_connections`` closes accepted connections whose peer a later
    intention change denies. ``resume_sessions`` lets dials offer the TLS session of
    an earlier connection to the same instance (``False``: every dial makes a full
    handshake). ``session_tickets=False`` makes this Service's listeners send no
    TLS 1.3 session tickets: no caller can resume, and each full handshake costs
    the server less (for services whose callers never resume).
    """

    def __init__(
        self,
        name: str,
        *,
        agent: AgentConfig | None = None,
        authorizer: Authorizer | Literal["intentions", "agent"] = "intentions",
        register: bool = False,
        port: int | None = None,
        address: str = "",
        service_id: str | None = None,
        tags: tuple[str, ...] = (),
        meta: dict[str, str] | None = None,
        check_ttl: float = 15.0,
        close_denied_connections: bool = True,
        resume_sessions: bool = True,
        session_tickets: bool = True,
        _static: tuple[Leaf, RootSet] | None = None,
    ) -> None:
        if not name:
            raise ConfigError("a Service needs a name")
        if register and port is None:
            raise ConfigError("register=True needs the port the service listens on")
        self.name = name
        self._material: TLSMaterial | None = None
        self._leaf: Leaf | None = None
        self._roots: RootSet | None = None
        self._hooks: list[EventHook] = []
        self._counters = _Counters()
        # Counters are bumped from the runtime thread, listener workers and callers'
        # threads at once; `d[k] = d.get(k, 0) + 1` unlocked loses updates.
        self._counters_lock = threading.Lock()
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._closed = False
        self._ready = threading.Event()
        self._ready_changed = threading.Condition()
        self._tracked: dict[int, _Tracked] = {}
        self._tokens = itertools.count(1)
        self._tracked_lock = threading.Lock()
        self._close_denied = close_denied_connections
        self._session_tickets = session_tickets
        self._listeners: list[ConnectListener] = []
        self._servers: list[tuple[asyncio.AbstractEventLoop, asyncio.AbstractServer]] = []
        self._resolvers: dict[str, Resolver] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing: asyncio.Task[None] | None = None
        self._hub: Any = None
        self._registration: Any = None
        self._server_ctx = DynamicServerContext(
            self._current_material, on_handshake_failure=self._handshake_failed
        )
        self._client_ctx = DynamicClientContext(
            self._current_material, resume_sessions=resume_sessions
        )

        self._runtime = Runtime.acquire()
        self._agent_config: AgentConfig | None = None
        try:
            if _static is not None:
                self._authorizer: Authorizer = self._static_authorizer(authorizer)
                self._set_roots(_static[1])
                self._set_leaf(_static[0])
            else:
                self._agent_config = agent if agent is not None else AgentConfig.from_env()
                self._runtime.run(
                    self._start_agent_mode(
                        authorizer,
                        register=register,
                        port=port,
                        address=address,
                        service_id=service_id,
                        tags=tags,
                        meta=meta,
                        check_ttl=check_ttl,
                    ),
                    timeout=_CLOSE_TIMEOUT,
                )
        except BaseException:
            self._runtime.release()
            raise

    # -- construction helpers -------------------------------------------------

    @classmethod
    def from_pem(
        cls,
        name: str,
        *,
        cert_pem: str,
        key_pem: str,
        roots_pem: str,
        authorizer: Authorizer,
        close_denied_connections: bool = True,
        resume_sessions: bool = True,
        session_tickets: bool = True,
    ) -> Service:
        """A Service with fixed certificate material and no agent (dev mode, tests).

        ``cert_pem`` is the leaf followed by any intermediates. ``authorizer`` is
        required (there is no intention data without an agent); see
        :func:`consul_connect.authz.authorizers.AllowIdentities`. Raises
        :class:`CertificateError` if the leaf does not verify against ``roots_pem``.
        """
        leaf = Leaf.from_pem(cert_pem, key_pem)
        roots = _roots_from_pem(roots_pem, leaf.identity.trust_domain)
        return cls(
            name,
            authorizer=authorizer,
            close_denied_connections=close_denied_connections,
            resume_sessions=resume_sessions,
            session_tickets=session_tickets,
            _static=(leaf, roots),
        )

    @classmethod
    def from_test_ca(
        cls,
        ca: Any,
        name: str,
        *,
        authorizer: Authorizer,
        resume_sessions: bool = True,
        session_tickets: bool = True,
    ) -> Service:
        """A Service whose leaf is issued by a :class:`consul_connect.testing.TestCA`."""
        leaf = ca.issue(name)
        return cls(
            name,
            authorizer=authorizer,
            resume_sessions=resume_sessions,
            session_tickets=session_tickets,
            _static=(leaf, ca.roots()),
        )

    def _static_authorizer(self, authorizer: Authorizer | str) -> Authorizer:
        if isinstance(authorizer, str):
            raise ConfigError(
                "a Service without an agent needs an explicit authorizer "
                "(for example AllowIdentities(...)); there is no intention data"
            )
        return authorizer

    async def _start_agent_mode(
        self,
        authorizer: Authorizer | str,
        *,
        register: bool,
        port: int | None,
        address: str,
        service_id: str | None,
        tags: tuple[str, ...],
        meta: dict[str, str] | None,
        check_ttl: float,
    ) -> None:
        from consul_connect._hub import AgentHub

        assert self._agent_config is not None
        hub = AgentHub.acquire(self._agent_config)
        self._hub = hub
        client = hub.client
        if authorizer == "intentions":
            # Intention-watch trouble reaches statistics() and the watch_error hook too.
            self._authorizer = IntentionAuthorizer(client, self.name, on_error=self._on_watch_error)
        elif authorizer == "agent":
            self._authorizer = AgentAuthorizer(client, self.name)
        elif isinstance(authorizer, str):
            raise ConfigError(f"unknown authorizer {authorizer!r}: use 'intentions' or 'agent'")
        else:
            self._authorizer = authorizer
        self._authorizer.add_listener(self._on_authz_change)
        hub.add_listeners(self._on_hub_roots, self._on_watch_error)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._leaf_loop()))
        self._tasks.append(loop.create_task(self._start_authorizer()))
        if register:
            from consul_connect.registration import Registration

            assert port is not None
            self._registration = Registration(
                client,
                name=self.name,
                port=port,
                address=address,
                service_id=service_id,
                tags=tags,
                meta=meta,
                ttl=check_ttl,
                healthy=self._health_for_check,
                on_error=self._on_watch_error,
            )
            self._tasks.append(loop.create_task(self._start_registration()))

    async def _start_authorizer(self) -> None:
        try:
            await self._authorizer.start()
            waiter = getattr(self._authorizer, "wait_ready", None)
            if waiter is not None:
                # Surfaces a missing right (AgentPermissionError) loudly; other
                # trouble keeps being retried by the authorizer's own watch.
                with contextlib.suppress(NotReadyError):
                    await waiter(60.0)
        except AgentPermissionError as exc:
            self._set_fatal(exc)
        except Exception as exc:
            self._on_watch_error(exc)

    async def _start_registration(self) -> None:
        # An agent that is down or failing when the Service starts must not leave it
        # unregistered for good: retry (capped, jittered) until the agent accepts it.
        # A 403 is reported (wait_ready raises it) and retried too: a token that reaches
        # the agent's servers late, or is granted the right later, must still register.
        failures = 0
        denied: AgentPermissionError | None = None
        while True:
            try:
                await self._registration.start()
            except Exception as exc:
                if isinstance(exc, AgentPermissionError):
                    denied = exc
                self._on_watch_error(exc)
                failures += 1
                delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(failures, 10))
                await asyncio.sleep(delay * (0.5 + _jitter() / 2))
                continue
            if denied is not None and self._fatal is denied:
                self._fatal = None  # the agent accepted the registration after all
            return

    # -- state ----------------------------------------------------------------

    def _current_material(self) -> TLSMaterial:
        m = self._material
        if m is None:
            raise NotReadyError(f"service {self.name!r} has no certificate yet")
        return m

    @property
    def ready(self) -> bool:
        """True once this Service has a leaf verified against current roots, its
        authorizer has the data it decides from (so it would not refuse everyone), and,
        when it registers itself, its health check has passed once (so it can be found)."""
        return (
            self._material is not None and self._authorizer_ready() and self._registration_ready()
        )

    def _registration_ready(self) -> bool:
        reg = self._registration
        return reg is None or getattr(reg, "last_status", "passing") == "passing"

    def _authorizer_ready(self) -> bool:
        authz = getattr(self, "_authorizer", None)
        return authz is not None and bool(authz.ready)

    @property
    def identity(self) -> ServiceIdentity:
        """This Service's own SPIFFE identity (raises NotReadyError before readiness)."""
        return self._current_material().leaf.identity

    @property
    def authorizer(self) -> Authorizer:
        """The authorizer deciding who may connect."""
        return self._authorizer

    @property
    def server_context(self) -> ssl.SSLContext:
        """An ``SSLContext`` whose every handshake uses this Service's newest server material.

        Pass it as ``ssl=`` to servers that should terminate Connect mTLS; the peer must
        still be authorized with :meth:`authorize_peer` before any byte is exchanged.
        """
        return self._server_ctx

    @property
    def client_context(self) -> DynamicClientContext:
        """An ``SSLContext`` presenting this Service's newest leaf (verify the server yourself)."""
        return self._client_ctx

    def client_context_for(self, endpoint: Endpoint) -> ssl.SSLContext:
        """Like :attr:`client_context`, for dialing ``endpoint``, resuming its TLS sessions.

        A second connection to the same host and port offers the session of an earlier
        one, which skips most of the handshake on both sides. The server's identity
        must still be checked (``verify_server_identity``) on every connection; sessions
        are dropped whenever this Service's leaf or roots change. Cached per endpoint.
        """
        return self._client_ctx.for_endpoint((endpoint.host, endpoint.port))

    def statistics(self) -> ServiceStatistics:
        """Return a frozen snapshot of this Service's state and counters."""
        m = self._material
        with self._tracked_lock:
            active = len(self._tracked)
        with self._counters_lock:
            c = replace(self._counters)
            c.rejected_by_reason = dict(c.rejected_by_reason)
        return ServiceStatistics(
            name=self.name,
            ready=self.ready,
            leaf_serial=m.leaf.serial_number if m else "",
            leaf_valid_before=m.leaf.valid_before if m else None,
            trust_domain=m.roots.trust_domain if m else "",
            roots=len(m.roots.roots) if m else 0,
            active_connections=active,
            accepted=c.accepted,
            rejected=c.rejected,
            rejected_by_reason=c.rejected_by_reason,
            dialed=c.dialed,
            dial_failures=c.dial_failures,
            requests_denied=c.requests_denied,
            leaf_rotations=c.leaf_rotations,
            roots_changes=c.roots_changes,
            watch_errors=c.watch_errors,
            last_error=str(self._last_error) if self._last_error else "",
        )

    def on_event(self, hook: EventHook) -> Callable[[], None]:
        """Call ``hook(event)`` for every :class:`ServiceEvent`; returns an unsubscribe function.

        Hooks run on whichever thread noticed the event and must not block.
        """
        self._hooks.append(hook)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._hooks.remove(hook)

        return remove

    def _emit(self, event: ServiceEvent) -> None:
        for hook in list(self._hooks):
            try:
                hook(event)
            except Exception:
                log.exception("event hook failed for %s", event.kind)

    def _on_watch_error(self, exc: BaseException) -> None:
        with self._counters_lock:
            self._counters.watch_errors += 1
        self._last_error = exc
        log.warning("service %s: watch error: %s", self.name, exc)
        self._emit(ServiceEvent("watch_error", self.name, error=exc, reason=str(exc)))
        if isinstance(exc, AgentPermissionError):
            self._set_fatal(exc)

    def _set_fatal(self, exc: BaseException) -> None:
        if self._fatal is None:
            log.error("service %s: %s", self.name, exc)
        self._fatal = exc
        self._last_error = exc
        with self._ready_changed:
            self._ready_changed.notify_all()

    def _on_hub_roots(self, roots: RootSet) -> None:
        self._set_roots(roots)

    def _set_roots(self, roots: RootSet) -> None:
        changed = self._roots is not None and self._roots != roots
        self._roots = roots
        self._publish()
        if changed:
            with self._counters_lock:
                self._counters.roots_changes += 1
            self._emit(ServiceEvent("roots_changed", self.name, reason=roots.active_root_id))

    def _set_leaf(self, leaf: Leaf) -> None:
        old = self._leaf
        self._leaf = leaf
        self._publish()
        if old is not None and old.serial_number != leaf.serial_number:
            with self._counters_lock:
                self._counters.leaf_rotations += 1
            self._emit(ServiceEvent("leaf_rotated", self.name, serial=leaf.serial_number))

    def _publish(self) -> None:
        leaf, roots = self._leaf, self._roots
        if leaf is None or roots is None:
            return
        try:
            material = TLSMaterial.build(
                leaf, roots, datetime.now(UTC), session_tickets=self._session_tickets
            )
        except CertificateError as exc:
            # A leaf and roots that do not verify together are never published; the
            # previous (working) material's leaf stays until a matching pair arrives,
            # but peers are checked against the current roots only.
            self._on_watch_error(exc)
            current = self._material
            if current is not None and current.roots != roots:
                with contextlib.suppress(CertificateError):
                    self._material = current.with_roots(
                        roots, session_tickets=self._session_tickets
                    )
            return
        first = self._material is None
        self._material = material
        self._last_error = None
        self._ready.set()
        if first and self._registration is not None:
            # Turn the TTL check green now rather than at the next heartbeat.
            beat = getattr(self._registration, "beat_now", None)
            if beat is not None:
                with contextlib.suppress(RuntimeError):
                    self._runtime.loop.call_soon_threadsafe(beat)
        with self._ready_changed:
            self._ready_changed.notify_all()

    async def _leaf_loop(self) -> None:
        assert self._hub is not None
        client = self._hub.client
        index = 0
        failures = 0
        stale = 0
        # An agent that answers at once (no X-Consul-Index, or one that ignores it) must
        # not make this loop spin: as the roots watch, a burst then one query a second.
        limiter = RateLimiter()
        denied: AgentPermissionError | None = None
        while True:
            leaf = self._leaf
            wait = _LEAF_WAIT
            if leaf is not None:
                # Wake before the leaf's hard renewal deadline even if the watch stays quiet.
                lifetime = (leaf.valid_before - leaf.valid_after).total_seconds()
                deadline = leaf.valid_after.timestamp() + 0.9 * lifetime
                wait = max(1.0, min(_LEAF_WAIT, deadline - time.time()))
            hold = limiter.acquire(time.monotonic())
            if hold > 0:
                await asyncio.sleep(hold)
            try:
                data, meta = await client.leaf_cert(self.name, index=index, wait=wait)
                new_leaf = Leaf.from_json(data)
                if new_leaf.identity.service.casefold() != self.name.casefold():
                    raise CertificateError(
                        f"the agent's leaf for {self.name!r} is for service "
                        f"{new_leaf.identity.service!r}"
                    )
            except asyncio.CancelledError:
                raise
            except (AgentError, CertificateError) as exc:
                # A 403 is reported (wait_ready raises it) but retried like any other
                # failure: a token can be fixed, or reach the agent late, and a leaf
                # that is never renewed again would take the service down when it expires.
                if isinstance(exc, AgentPermissionError):
                    denied = exc
                self._on_watch_error(exc)
                failures += 1
                delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(failures, 10))
                await asyncio.sleep(delay * (0.5 + _jitter() / 2))
                if leaf is not None and time.time() >= leaf.valid_before.timestamp():
                    index = 0
                continue
            failures = 0
            if denied is not None and self._fatal is denied:
                self._fatal = None  # the agent lets us read the leaf again
            denied = None
            new_index = meta.index or 1
            index = 0 if new_index < index else new_index
            if (
                leaf is None
                or leaf.serial_number != new_leaf.serial_number
                or (leaf.cert_pem != new_leaf.cert_pem)
            ):
                self._set_leaf(new_leaf)
            if time.time() >= new_leaf.valid_before.timestamp() - 1:
                # Expired and not renewed: ask again without blocking, but back off so an
                # agent that keeps handing out an expired leaf is not asked in a hot loop.
                index = 0
                stale += 1
                delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(stale, 10))
                await asyncio.sleep(delay * (0.5 + _jitter() / 2))
            else:
                stale = 0

    def _health_for_check(self) -> tuple[bool, str]:
        m = self._material
        if m is None:
            return False, "no certificate yet"
        remaining = (m.leaf.valid_before - datetime.now(UTC)).total_seconds()
        lifetime = (m.leaf.valid_before - m.leaf.valid_after).total_seconds()
        if remaining < 0.1 * lifetime:
            return False, f"leaf certificate expires in {int(remaining)}s"
        return True, f"leaf {m.leaf.serial_number} valid until {m.leaf.valid_before.isoformat()}"

    # -- readiness ------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until this Service has certificates; return at once if it already has.

        Raises :class:`AgentPermissionError` at once when the agent's latest answer to the
        leaf, registration or intention watch was a 403 (the token lacks ``service:write``
        or ``intentions:read``; the watches keep retrying), and :class:`NotReadyError`
        (naming the likely cause) on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._ready_changed:
            while not self.ready:
                if self._fatal is not None:
                    raise self._fatal
                if self._closed:
                    raise NotReadyError(f"service {self.name!r} is closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._not_ready_error(timeout)
                # Registration and authorizer progress are not signalled: poll briefly.
                self._ready_changed.wait(min(remaining, 0.05 if self._material else 0.5))

    async def wait_ready_async(self, timeout: float = 30.0) -> None:
        """Async form of :meth:`wait_ready` (does not block the event loop)."""
        if self.ready:
            return
        await asyncio.to_thread(self.wait_ready, timeout)

    def _not_ready_error(self, timeout: float) -> NotReadyError:
        cause = self._last_error
        if isinstance(cause, AgentUnavailableError):
            why = f"the Consul agent is unreachable or failing ({cause})"
        elif isinstance(cause, AgentPermissionError):
            why = f"the ACL token lacks a right the Service needs ({cause})"
        elif isinstance(cause, AgentNotFoundError):
            why = f"the agent does not know service {self.name!r} ({cause})"
        elif isinstance(cause, CertificateError):
            why = f"the agent's certificates do not verify ({cause})"
        elif cause is not None:
            why = str(cause)
        elif self._leaf is None:
            why = "no leaf certificate received from the agent yet"
        elif self._roots is None:
            why = "no CA roots received from the agent yet"
        elif not self._authorizer_ready():
            why = "no intention data received from the agent yet"
        else:
            why = "registered, but its health check has not passed yet"
        return NotReadyError(
            f"service {self.name!r} not ready after {timeout:g}s: {why}", cause=cause
        )

    # -- authorization ----------------------------------------------------------

    def authorize_peer(self, ssl_obj: Any, *, per_request_l7: bool = False) -> ServiceIdentity:
        """Check a completed server-side handshake: identity, then the authorizer.

        Returns the peer identity, or raises :class:`PeerRejected` (counted, logged,
        and reported as a ``peer_denied`` event). Never calls the agent when the
        authorizer has local data. With ``per_request_l7=True`` (HTTP servers that
        judge every request with :meth:`authorize_request`) a caller whose matching
        intention has L7 permissions is admitted; otherwise such a caller is refused,
        as Consul's authorize endpoint refuses it.
        """
        identity = self._identity_or_reject(ssl_obj)
        decision = self._authorizer.decide(identity)
        if decision is None:
            decision = self._runtime.run(self._authorizer.authorize(identity), timeout=10.0)
        return self._apply_decision(identity, decision, per_request_l7)

    async def authorize_peer_async(
        self, ssl_obj: Any, *, per_request_l7: bool = False
    ) -> ServiceIdentity:
        """Async form of :meth:`authorize_peer` (for authorizers that must ask the agent)."""
        identity = self._identity_or_reject(ssl_obj)
        decision = self._authorizer.decide(identity)
        if decision is None:
            decision = await self._runtime.run_async(
                self._authorizer.authorize(identity), timeout=10.0
            )
        return self._apply_decision(identity, decision, per_request_l7)

    def _authorize_peer_locally(
        self, ssl_obj: Any, *, per_request_l7: bool = False
    ) -> ServiceIdentity | None:
        """:meth:`authorize_peer` without the agent: None when only the agent can answer.

        For servers on the event loop's thread: they ask the agent in a task instead.
        """
        identity = self._identity_or_reject(ssl_obj)
        decision = self._authorizer.decide(identity)
        if decision is None:
            return None
        return self._apply_decision(identity, decision, per_request_l7)

    def _identity_or_reject(self, ssl_obj: Any) -> ServiceIdentity:
        try:
            identity = peer_identity(ssl_obj)
        except PeerRejected as exc:
            self._reject(None, exc.reason)
            raise
        stale = _expired_resumption(ssl_obj)
        if stale is not None:
            self._reject(identity, stale)
            raise PeerRejected(stale, peer=identity.uri)
        return identity

    def authorize_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Any
    ) -> Decision:
        """The L7 decision for one HTTP request from ``identity`` (no agent call)."""
        return self._authorizer.decide_request(identity, method, path, headers)

    def _apply_decision(
        self, identity: ServiceIdentity, decision: Decision, per_request_l7: bool = False
    ) -> ServiceIdentity:
        if not decision.allowed and not (per_request_l7 and _l7_match(decision)):
            self._reject(identity, decision.reason)
            raise PeerRejected(decision.reason, peer=identity.uri)
        with self._counters_lock:
            self._counters.accepted += 1
        if self._hooks:  # once per connection: no event object for nobody
            self._emit(
                ServiceEvent("peer_allowed", self.name, peer=identity, reason=decision.reason)
            )
        return identity

    def deny_request(self, identity: ServiceIdentity, reason: str) -> None:
        """Count and report one request refused by L7 intentions (its connection stays open).

        Integrations call this; it is reported as a ``request_denied`` event.
        """
        with self._counters_lock:
            self._counters.requests_denied += 1
        log.info("service %s refused a request from %s: %s", self.name, identity.uri, reason)
        self._emit(ServiceEvent("request_denied", self.name, peer=identity, reason=reason))

    def _handshake_failed(self, reason: str) -> None:
        self._reject(None, f"handshake failed: {reason}")

    def _reject(self, identity: ServiceIdentity | None, reason: str) -> None:
        c = self._counters
        # The part before the first ":" names the rule; a peer's URI is not part of it.
        key = _SPIFFE_URI.sub("<peer>", reason).split(":", 1)[0]
        with self._counters_lock:
            c.rejected += 1
            c.rejected_by_reason[key] = c.rejected_by_reason.get(key, 0) + 1
        log.info(
            "service %s refused %s: %s", self.name, identity.uri if identity else "peer", reason
        )
        self._emit(ServiceEvent("peer_denied", self.name, peer=identity, reason=reason))

    def track_connection(
        self,
        identity: ServiceIdentity,
        close: Callable[[], None],
        *,
        per_request_l7: bool = False,
    ) -> int:
        """Register an accepted connection so a later deny (or :meth:`close`) can cut it.

        ``close`` must be callable from any thread. Returns a token for
        :meth:`untrack_connection`. Integrations call this for connections they accept;
        ``per_request_l7`` marks connections whose requests are judged one by one (they
        are kept while the caller's matching intention has L7 permissions).
        """
        # Not id(close): once a deny drops the entry, a new connection's callable may
        # get the same id, and the cut connection's late untrack would forget it.
        with self._tracked_lock:
            token = next(self._tokens)
            self._tracked[token] = _Tracked(identity, close, per_request_l7)
        return token

    def untrack_connection(self, token: int) -> None:
        """Forget a connection registered with :meth:`track_connection` (it ended)."""
        with self._tracked_lock:
            self._tracked.pop(token, None)

    _track = track_connection
    _untrack = untrack_connection

    def _on_authz_change(self) -> None:
        with self._ready_changed:
            self._ready_changed.notify_all()
        if not self._close_denied:
            return
        with self._tracked_lock:
            items = list(self._tracked.items())
        for token, tracked in items:
            decision = self._authorizer.decide(tracked.identity)
            if decision is None or decision.allowed:
                continue
            if tracked.per_request_l7 and _l7_match(decision):
                continue
            log.info(
                "service %s closing connection from %s: %s",
                self.name,
                tracked.identity.uri,
                decision.reason,
            )
            self._emit(
                ServiceEvent(
                    "peer_denied", self.name, peer=tracked.identity, reason=decision.reason
                )
            )
            self._untrack(token)
            with contextlib.suppress(Exception):
                tracked.close()

    # -- accepting: asyncio -----------------------------------------------------

    @overload
    async def start_server(
        self,
        handler: StreamHandler,
        host: str = ...,
        port: int = ...,
        *,
        tls_transport: Literal["asyncio"] = ...,
        **kwargs: Any,
    ) -> asyncio.Server: ...

    @overload
    async def start_server(
        self,
        handler: StreamHandler,
        host: str = ...,
        port: int = ...,
        *,
        tls_transport: Literal["direct"],
        **kwargs: Any,
    ) -> TLSServer: ...

    async def start_server(
        self,
        handler: StreamHandler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_transport: Literal["asyncio", "direct"] = "asyncio",
        **kwargs: Any,
    ) -> asyncio.Server | TLSServer:
        """Serve Connect mTLS on the running loop; like ``asyncio.start_server``.

        Every handshake uses the newest leaf and roots; ``handler(reader, writer)``
        runs only for peers that passed identity checks and the authorizer, before
        any byte is read. :func:`get_peer_identity(writer)` gives the caller.
        ``ssl_handshake_timeout`` (default 10 s) bounds each handshake; failed
        handshakes are refused, counted and reported like denied peers.

        ``tls_transport="direct"`` lets OpenSSL read and write each connection's socket
        itself (less CPU per message than the event loop's TLS, the default) and returns a
        server with ``asyncio.Server``'s everyday surface (``close``, ``wait_closed``,
        ``serve_forever``, ``sockets``, ``async with``); of ``asyncio.start_server``'s
        options it takes ``limit`` and ``backlog`` (others are a ``ConfigError``).
        """
        check_transport(tls_transport)
        self._check_serving()
        await self.wait_ready_async()
        handshake_timeout = float(kwargs.pop("ssl_handshake_timeout", HANDSHAKE_TIMEOUT))
        loop = asyncio.get_running_loop()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The handshake is done (a failed one is counted and logged by the server
            # context's hook or the direct server); authorize before the handler sees a byte.
            ssl_obj = writer.get_extra_info("ssl_object")
            try:
                identity = await self.authorize_peer_async(ssl_obj)
            except PeerRejected:
                writer.transport.abort()
                return
            _remember_stream_peer(identity, writer)
            transport = writer.transport

            def close() -> None:
                loop.call_soon_threadsafe(transport.abort)

            token = self._track(identity, close)
            try:
                await handler(reader, writer)
            finally:
                self._untrack(token)

        server: asyncio.Server | TLSServer
        if tls_transport == "asyncio":
            server = await asyncio.start_server(
                on_connect,
                host,
                port,
                ssl=self._server_ctx,
                ssl_handshake_timeout=handshake_timeout,
                **kwargs,
            )
        else:
            server = self._direct_stream_server(
                on_connect, host, port, handshake_timeout, kwargs
            )
        self._servers.append((loop, server))
        return server

    def _direct_stream_server(
        self,
        on_connect: StreamHandler,
        host: str,
        port: int,
        handshake_timeout: float,
        options: dict[str, Any],
    ) -> TLSServer:
        limit = int(options.pop("limit", 2**16))
        backlog = int(options.pop("backlog", 100))
        if options:
            raise ConfigError(
                "start_server(tls_transport='direct') does not take "
                + ", ".join(sorted(options))
            )
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.BaseProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return asyncio.StreamReaderProtocol(reader, on_connect, loop=loop)

        return self._direct_server(protocol, host, port, handshake_timeout, backlog)

    def _direct_server(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str,
        port: int,
        handshake_timeout: float,
        backlog: int,
    ) -> TLSServer:
        """A direct-transport TLS server on ``host:port`` with this Service's newest
        material, reporting failed handshakes here (integrations build on it too)."""
        sock = bind_socket(host, port)
        try:
            return TLSServer(
                asyncio.get_running_loop(),
                sock,
                self._server_ctx,
                protocol_factory,
                handshake_timeout=handshake_timeout,
                on_handshake_failure=self._handshake_failed,
                backlog=backlog,
            )
        except BaseException:
            sock.close()
            raise

    # -- accepting: sync ----------------------------------------------------------

    def listen(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        backlog: int = 128,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> ConnectListener:
        """Open a blocking listener whose :meth:`ConnectListener.accept` yields authorized peers.

        Each peer's TLS handshake must finish within ``handshake_timeout`` seconds.
        """
        self._check_serving()
        self.wait_ready()
        listener = ConnectListener(self, host, port, backlog, handshake_timeout)
        self._listeners.append(listener)
        return listener

    # -- dialling -------------------------------------------------------------------

    def _resolver(self, target: str | Resolver | Endpoint) -> Resolver:
        if isinstance(target, Endpoint):
            return StaticResolver(f"{target.host}:{target.port}", target.identity)
        if not isinstance(target, str):
            return target
        r = self._resolvers.get(target)
        if r is None:
            if self._hub is None:
                raise ConfigError(
                    f"cannot resolve {target!r} without an agent; pass a StaticResolver"
                )
            r = resolver_for_name(target, self._hub.client, self._trust_domain)
            self._resolvers[target] = r
        return r

    def _trust_domain(self) -> str:
        m = self._material
        if m is not None:
            return m.roots.trust_domain
        if self._roots is not None:
            return self._roots.trust_domain
        return ""

    def resolve(
        self, target: str | Resolver | Endpoint, *, timeout: float = 10.0
    ) -> list[Endpoint]:
        """Discover the instances of ``target`` (name, DNS-style name, resolver or endpoint).

        Raises :class:`NoInstancesError` when none is healthy and Connect-capable, and
        :class:`DialError` once this Service is closed.
        """
        self._check_open()
        known = self._resolved_locally(target)
        if known is not None:
            return known
        return self._runtime.run(self._resolve(target), timeout=timeout)

    async def resolve_async(
        self, target: str | Resolver | Endpoint, *, timeout: float = 10.0
    ) -> list[Endpoint]:
        """Async form of :meth:`resolve`."""
        self._check_open()
        known = self._resolved_locally(target)
        if known is not None:
            return known
        return await self._runtime.run_async(self._resolve(target), timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise DialError(f"service {self.name!r} is closed")

    def _check_serving(self) -> None:
        # A server opened after close() would be one that nothing ever closes.
        if self._closed:
            raise NotReadyError(f"service {self.name!r} is closed")

    def _resolved_locally(self, target: str | Resolver | Endpoint) -> list[Endpoint] | None:
        """Instances known without I/O (an endpoint, a watched name), else None.

        Saves the hop to the runtime thread on every dial or request to a name this
        Service already watches.
        """
        if isinstance(target, Endpoint):
            return [target]
        resolver = self._resolvers.get(target) if isinstance(target, str) else target
        cached = getattr(resolver, "cached", None)
        if cached is None:
            return None
        found = cached()
        return found if isinstance(found, list) and found else None

    async def _resolve(self, target: str | Resolver | Endpoint) -> list[Endpoint]:
        # Checked again on the loop: a caller that passed the check before close() must
        # not add a watch once close() has begun stopping them (or grow the dict it walks).
        self._check_open()
        resolver = self._resolver(target)
        if isinstance(target, str):
            # A name dialled once is likely dialled again: keep its instances watched and
            # cached (stopped by close()) instead of asking the agent on every dial.
            starter = getattr(resolver, "start", None)
            if starter is not None:
                await starter()
            await self._stop_oldest_watches()
        endpoints = await resolver.resolve()
        if not endpoints:
            raise NoInstancesError(f"no healthy Connect-capable instance of {_name(target)}")
        return endpoints

    async def _stop_oldest_watches(self) -> None:
        while len(self._resolvers) > _MAX_WATCHED_NAMES:
            oldest = next(iter(self._resolvers))
            closer = getattr(self._resolvers.pop(oldest), "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()

    def connect(self, target: str | Resolver | Endpoint, *, timeout: float = 10.0) -> ssl.SSLSocket:
        """Dial ``target`` over Connect mTLS and return a connected ``SSLSocket``.

        ``target`` is a service name (or Consul DNS-style name), a resolver, or an
        :class:`Endpoint`. One deadline covers discovery, TCP and the handshake; on a
        refused, stalled or wrong-identity instance the next one is tried. Raises
        :class:`NoInstancesError`, :class:`ServerIdentityError` or :class:`DialError`
        listing every failure.
        """
        deadline = time.monotonic() + timeout
        self._check_open()
        self.wait_ready(timeout)
        endpoints = self._resolved_locally(target)  # no trip to the runtime loop
        if endpoints is None:
            endpoints = self._runtime.run(self._resolve(target), timeout=max(0.1, timeout))
        failures: list[tuple[str, str]] = []
        identity_failures = 0
        for n, ep in enumerate(endpoints):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append((f"{ep.host}:{ep.port}", "deadline exceeded before trying"))
                continue
            try:
                sock = self._connect_one(ep, _attempt_budget(remaining, len(endpoints) - n))
            except ServerIdentityError as exc:
                identity_failures += 1
                failures.append((f"{ep.host}:{ep.port}", str(exc)))
                continue
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                failures.append((f"{ep.host}:{ep.port}", _describe(exc)))
                continue
            with self._counters_lock:
                self._counters.dialed += 1
            return sock
        raise self._dial_error(target, failures, identity_failures)

    def _connect_one(self, ep: Endpoint, timeout: float) -> ssl.SSLSocket:
        raw = socket.create_connection((ep.host, ep.port), timeout=timeout)
        try:
            raw.settimeout(timeout)
            sock = self._client_ctx.wrap_socket(
                raw, server_hostname=None, session_key=(ep.host, ep.port)
            )
            try:
                verify_server_identity(sock, ep.identity)
            except BaseException:
                sock.close()
                raise
            sock.settimeout(None)
            _peer_identities[sock] = ep.identity
            return sock
        except BaseException:
            raw.close()
            raise

    async def open_connection(
        self,
        target: str | Resolver | Endpoint,
        *,
        timeout: float = 10.0,
        tls_transport: Literal["asyncio", "direct"] = "asyncio",
        **kwargs: Any,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Async form of :meth:`connect`, returning ``(reader, writer)``.

        ``kwargs`` go to ``asyncio.open_connection``. ``tls_transport="direct"`` lets
        OpenSSL read and write the socket itself (less CPU per message than the event
        loop's TLS, the default); of those options it takes only ``limit``.
        """
        check_transport(tls_transport)
        if tls_transport == "direct" and set(kwargs) - {"limit"}:
            raise ConfigError(
                "open_connection(tls_transport='direct') does not take "
                + ", ".join(sorted(set(kwargs) - {"limit"}))
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._check_open()
        await self.wait_ready_async(timeout)
        endpoints = self._resolved_locally(target)  # skips the runtime hop (~150 µs)
        if endpoints is None:
            endpoints = await self._runtime.run_async(self._resolve(target), timeout)
        failures: list[tuple[str, str]] = []
        identity_failures = 0
        for n, ep in enumerate(endpoints):
            remaining = deadline - loop.time()
            if remaining <= 0:
                failures.append((f"{ep.host}:{ep.port}", "deadline exceeded before trying"))
                continue
            remaining = _attempt_budget(remaining, len(endpoints) - n)
            writer: asyncio.StreamWriter | None = None
            try:
                if tls_transport == "direct":
                    ctx = self.client_context_for(ep)
                    dial = open_stream(loop, ep.host, ep.port, ctx, **kwargs)
                else:
                    dial = asyncio.open_connection(
                        ep.host,
                        ep.port,
                        ssl=self.client_context_for(ep),
                        server_hostname="",
                        ssl_handshake_timeout=remaining,
                        **kwargs,
                    )
                reader, opened = await asyncio.wait_for(dial, remaining)
                writer = opened
                verify_server_identity(opened.get_extra_info("ssl_object"), ep.identity)
            except ServerIdentityError as exc:
                identity_failures += 1
                failures.append((f"{ep.host}:{ep.port}", str(exc)))
                if writer is not None:
                    writer.transport.abort()
                continue
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                failures.append((f"{ep.host}:{ep.port}", _describe(exc)))
                if writer is not None:
                    writer.transport.abort()
                continue
            with self._counters_lock:
                self._counters.dialed += 1
            _remember_stream_peer(ep.identity, opened)
            return reader, opened
        raise self._dial_error(target, failures, identity_failures)

    def _dial_error(
        self, target: Any, failures: list[tuple[str, str]], identity_failures: int
    ) -> DialError:
        with self._counters_lock:
            self._counters.dial_failures += 1
        detail = "; ".join(f"{addr}: {why}" for addr, why in failures)
        msg = f"could not connect to {_name(target)}: {detail}"
        if failures and identity_failures == len(failures):
            return ServerIdentityError(msg, failures=failures)
        return DialError(msg, failures=failures)

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Stop every watch, listener, server, tracked connection and task this Service started.

        Deregisters the service if it registered itself. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        with self._ready_changed:
            self._ready_changed.notify_all()
        for listener in list(self._listeners):
            listener.close()
        for loop, server in list(self._servers):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(server.close)
        with self._tracked_lock:
            tracked = list(self._tracked.values())
            self._tracked.clear()
        for t in tracked:
            with contextlib.suppress(Exception):
                t.close()
        if threading.current_thread() is self._runtime.thread:
            # Called from an event hook: the loop cannot run the shutdown while we wait
            # for it, so it runs after the hook returns.
            self._closing = self._runtime.loop.create_task(self._aclose_background())
            self._closing.add_done_callback(lambda _: self._runtime.release())
            return
        try:
            self._runtime.run(self._aclose_background(), timeout=_CLOSE_TIMEOUT)
        except (TimeoutError, RuntimeError):
            log.warning("service %s: background shutdown did not finish in time", self.name)
        finally:
            self._runtime.release()

    async def aclose(self) -> None:
        """Async form of :meth:`close`."""
        servers = list(self._servers)
        await asyncio.to_thread(self.close)
        for loop, server in servers:
            if loop is asyncio.get_running_loop():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), _CLOSE_TIMEOUT)

    async def _aclose_background(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._registration is not None:
            with contextlib.suppress(Exception):
                await self._registration.aclose()
        for r in list(self._resolvers.values()):
            closer = getattr(r, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        self._resolvers.clear()
        with contextlib.suppress(Exception):
            await self._authorizer.aclose()
        if self._hub is not None:
            self._hub.remove_listeners(self._on_hub_roots, self._on_watch_error)
            await self._hub.release()
            self._hub = None

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Service({self.name!r}, ready={self.ready})"


class ConnectListener:
    """A blocking Connect mTLS listener; :meth:`accept` returns only authorized peers.

    A background thread accepts TCP connections and runs every handshake without
    blocking (each bounded by ``handshake_timeout``); a small pool of workers runs the
    authorization, so slow or silent clients, however many, cannot hold up the others.
    Refused peers (bad certificate, bad identity, denied) are closed, counted and never
    returned.
    At most ``backlog`` authorized connections wait for :meth:`accept`.
    """

    def __init__(
        self,
        service: Service,
        host: str,
        port: int,
        backlog: int,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        handshake_workers: int = 4,
    ) -> None:
        self._service = service
        self._handshake_timeout = handshake_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio (and we) only set TCP_NODELAY on such sockets.
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
            self._sock.listen(backlog)
        except BaseException:
            self._sock.close()
            raise
        self._closed = False
        self._ready: queue.Queue[tuple[ssl.SSLSocket, ServiceIdentity]] = queue.Queue(
            maxsize=max(1, backlog)
        )
        self._workers = ThreadPoolExecutor(
            max_workers=max(1, handshake_workers), thread_name_prefix="consul-connect-handshake"
        )
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="consul-connect-accept", daemon=True
        )
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` this listener is bound to."""
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def fileno(self) -> int:
        """The listening socket's file descriptor."""
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> tuple[ssl.SSLSocket, ServiceIdentity]:
        """Wait for the next authorized peer; return its socket and identity.

        ``timeout`` bounds the wait (``TimeoutError``); a closed listener raises
        ``OSError``, also for a wait in progress when another thread closes it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise OSError("the listener is closed")
            step = 0.2
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no authorized peer connected in time")
                step = min(step, remaining)
            try:
                return self._ready.get(timeout=step)
            except queue.Empty:
                continue

    def _accept_loop(self) -> None:
        # Handshakes run here, non-blocking and all at once (each with its deadline):
        # clients that connect and stall must not hold the workers, or a few of them
        # would keep every good client waiting for a whole handshake timeout.
        sel = selectors.DefaultSelector()
        pending: dict[int, tuple[ssl.SSLSocket, float]] = {}
        try:
            self._sock.setblocking(False)
            sel.register(self._sock, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in sel.select(timeout=0.2):
                    if key.fileobj is self._sock:
                        self._accept_ready(sel, pending)
                    else:
                        self._handshake_step(sel, pending, key.fd)
                now = time.monotonic()
                for fd, (_, deadline) in list(pending.items()):
                    if now >= deadline:
                        self._handshake_failed(sel, pending, fd, TimeoutError())
        except (OSError, ValueError, KeyError):
            if not self._closed:
                log.exception("service %s: the listener stopped", self._service.name)
        finally:
            for sock, _ in pending.values():
                with contextlib.suppress(OSError):
                    sock.close()
            sel.close()

    def _accept_ready(
        self, sel: selectors.BaseSelector, pending: dict[int, tuple[ssl.SSLSocket, float]]
    ) -> None:
        for _ in range(32):
            try:
                raw, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:
                if self._closed:
                    raise
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                return
            # Small request/response exchanges must not wait for delayed ACKs.
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                raw.setblocking(False)
                sock = self._service.server_context.wrap_socket(
                    raw, server_side=True, do_handshake_on_connect=False
                )
            except Exception as exc:  # e.g. OSError, or no certificate to serve yet
                raw.close()
                self._service._reject(None, f"handshake failed: {_describe(exc)}")
                continue
            fd = sock.fileno()
            pending[fd] = (sock, time.monotonic() + self._handshake_timeout)
            sel.register(fd, selectors.EVENT_READ)
            self._handshake_step(sel, pending, fd)

    def _handshake_step(
        self,
        sel: selectors.BaseSelector,
        pending: dict[int, tuple[ssl.SSLSocket, float]],
        fd: int,
    ) -> None:
        sock = pending[fd][0]
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            sel.modify(fd, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            sel.modify(fd, selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._handshake_failed(sel, pending, fd, exc)
            return
        sel.unregister(fd)
        del pending[fd]
        sock.setblocking(True)
        try:
            self._workers.submit(self._authorize_and_queue, sock)
        except RuntimeError:  # the pool is shutting down
            sock.close()

    def _handshake_failed(
        self,
        sel: selectors.BaseSelector,
        pending: dict[int, tuple[ssl.SSLSocket, float]],
        fd: int,
        exc: BaseException,
    ) -> None:
        sock, _ = pending.pop(fd)
        sel.unregister(fd)
        with contextlib.suppress(OSError):
            sock.close()
        self._service._reject(None, f"handshake failed: {_describe(exc)}")

    def _authorize_and_queue(self, sock: ssl.SSLSocket) -> None:
        got = self._authorize(sock)
        if got is None:
            return
        while not self._closed:
            try:
                self._ready.put(got, timeout=0.2)
                return
            except queue.Full:
                continue
        with contextlib.suppress(OSError):
            got[0].close()

    def _authorize(self, sock: ssl.SSLSocket) -> tuple[ssl.SSLSocket, ServiceIdentity] | None:
        svc = self._service
        try:
            identity = svc.authorize_peer(sock)
        except PeerRejected:
            with contextlib.suppress(OSError):
                sock.close()
            return None
        except Exception:
            log.exception("service %s: authorizing a connection failed", svc.name)
            with contextlib.suppress(OSError):
                sock.close()
            return None
        sock.settimeout(None)
        _peer_identities[sock] = identity
        ref = weakref.ref(sock)

        def close() -> None:
            peer = ref()
            if peer is not None:
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_RDWR)

        token = svc.track_connection(identity, close)
        # Forget the connection once the application drops its socket.
        weakref.finalize(sock, svc.untrack_connection, token)
        return sock, identity

    def close(self) -> None:
        """Stop listening and end the accept thread and handshake workers.

        Connections already returned by :meth:`accept` stay open; authorized ones not
        yet accepted are closed.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if threading.current_thread() is not self._acceptor:
            self._acceptor.join(_CLOSE_TIMEOUT)
        self._workers.shutdown(wait=True, cancel_futures=True)
        while True:
            try:
                sock, _ = self._ready.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(ValueError):
            self._service._listeners.remove(self)

    def __iter__(self) -> Iterator[tuple[ssl.SSLSocket, ServiceIdentity]]:
        while not self._closed:
            try:
                yield self.accept()
            except OSError:
                if self._closed:
                    return
                raise

    def __enter__(self) -> ConnectListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _roots_from_pem(pem: str, trust_domain: str) -> RootSet:
    from consul_connect.certs import CARoot, load_certificates

    certs = load_certificates(pem)
    if not certs:
        raise CertificateError("no CA root certificate in roots_pem")
    roots = tuple(
        CARoot.from_certificate(c, active=(i == len(certs) - 1)) for i, c in enumerate(certs)
    )
    return RootSet(trust_domain=trust_domain, active_root_id=roots[-1].id, roots=roots)


def _expired_resumption(conn: Any) -> str | None:
    """A reason to refuse a resumed TLS session whose peer certificate has expired since.

    A resumed handshake skips certificate verification; the session was made with a
    certificate that was valid then, but it must still be valid now.
    """
    obj = conn if hasattr(conn, "session_reused") else None
    if obj is None and hasattr(conn, "get_extra_info"):
        obj = conn.get_extra_info("ssl_object")
    if obj is None or not getattr(obj, "session_reused", False):
        return None
    der = obj.getpeercert(binary_form=True)
    if not der:
        return None
    if _not_after(der) <= datetime.now(UTC):
        return "resumed session with an expired peer certificate"
    return None


@functools.lru_cache(maxsize=1024)
def _not_after(der: bytes) -> datetime:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).not_valid_after_utc


def _attempt_budget(remaining: float, left: int) -> float:
    """Share what is left of a dial deadline so one stalled instance cannot use it all."""
    if left <= 1:
        return remaining
    return max(min(remaining, 0.25), remaining / left)


def _jitter() -> float:
    import random

    return random.random()


def _name(target: Any) -> str:
    if isinstance(target, str):
        return repr(target)
    if isinstance(target, Endpoint):
        return f"{target.identity.service} at {target.host}:{target.port}"
    return type(target).__name__


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc) or type(exc).__name__
    return text
