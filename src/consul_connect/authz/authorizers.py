"""Authorizers: who may connect to this service.

An :class:`Authorizer` turns a verified peer identity into a
:class:`~consul_connect.authz.intentions.Decision`. The TLS layer has already checked the
peer's chain against the CA roots before asking, so authorizers look only at the identity.

* :class:`IntentionAuthorizer` — the complete integration: watches the intentions whose
  destination is this service and decides locally, O(1) per connection, with per-request
  L7 decisions for HTTP. Fails closed until the first data arrives and keeps deciding from
  the last data while the agent is away.
* :class:`AgentAuthorizer` — the simple integration: asks the agent's authorize endpoint,
  with a timeout, a short per-identity cache and in-flight de-duplication.
* :class:`AllowIdentities`, :class:`AllowTrustDomain`, :class:`AllowAnyServiceInsecure` —
  fixed rules for dev mode and tests; :func:`any_of` / :func:`all_of` combine authorizers.

There is no implicit allow-all: an authorizer that allows everyone says so in its name.

Authorizers run on one asyncio loop (the Service's background loop). :meth:`Authorizer.decide`
and :meth:`Authorizer.decide_request` are synchronous and only read an immutable snapshot, so
they may be called from any thread; :meth:`Authorizer.authorize`, :meth:`Authorizer.start`
and :meth:`Authorizer.aclose` must run on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from consul_connect.agent.client import AgentClient, QueryMeta
from consul_connect.agent.watch import watch
from consul_connect.authz.intentions import Decision, Headers, Intention, IntentionSet
from consul_connect.errors import (
    AgentError,
    AgentPermissionError,
    AgentResponseError,
    ConsulConnectError,
    NotReadyError,
)
from consul_connect.identity import ServiceIdentity, parse_service_identity

__all__ = [
    "AgentAuthorizer",
    "AllowAnyServiceInsecure",
    "AllowIdentities",
    "AllowTrustDomain",
    "Authorizer",
    "IntentionAuthorizer",
    "all_of",
    "any_of",
]

logger = logging.getLogger(__name__)

Listener = Callable[[], None]
ErrorHook = Callable[[BaseException], None]

NO_DATA_REASON = "no intention data yet"

# A caller that no Consul CE intention can match: CE intentions only name the "default"
# namespace, so authorize answers with the default decision. Trust domain and datacenter
# are ignored by authorize.
_PROBE_URI = "spiffe://probe.consul/ns/consul-connect-probe/dc/probe/svc/consul-connect-probe"


@runtime_checkable
class Authorizer(Protocol):
    """What the Service asks about every peer.

    ``decide`` is the synchronous fast path: a decision from local data, or None when only
    :meth:`authorize` (asynchronous) can answer. ``authorize`` always returns a decision and
    never raises for agent trouble (it denies, with the reason). ``decide_request`` decides
    one HTTP request (L7); authorizers without L7 data answer with their connection decision.
    ``add_listener`` registers a callback run (on the authorizer's loop) whenever the data
    behind decisions changes, so open connections can be re-checked.
    """

    @property
    def name(self) -> str:
        """A short label for logs and metrics."""
        ...

    @property
    def ready(self) -> bool:
        """Whether decisions are based on real data (False: everything is denied)."""
        ...

    def decide(self, identity: ServiceIdentity) -> Decision | None:
        """A decision from local data, or None when :meth:`authorize` must be awaited."""
        ...

    async def authorize(self, identity: ServiceIdentity, serial: str = "") -> Decision:
        """The decision for a connection from ``identity`` (certificate ``serial``)."""
        ...

    def decide_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Headers
    ) -> Decision:
        """The decision for one HTTP request from ``identity``."""
        ...

    def add_listener(self, cb: Listener) -> None:
        """Call ``cb()`` whenever the data behind decisions changes."""
        ...

    async def start(self) -> None:
        """Start background work (watches). Idempotent."""
        ...

    async def aclose(self) -> None:
        """Stop background work. Idempotent."""
        ...


class _Listeners:
    """Change listeners shared by the authorizers; a failing listener is logged, not raised."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add_listener(self, cb: Listener) -> None:
        """Call ``cb()`` whenever the data behind decisions changes."""
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        """Stop calling ``cb`` (no error if it was not registered)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    def _notify(self) -> None:
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:
                logger.exception("authorizer change listener raised")


def _report(on_error: ErrorHook | None, exc: BaseException, what: str) -> None:
    if isinstance(exc, AgentPermissionError):
        # A missing ACL right needs an operator: say so loudly every time.
        logger.error("%s: %s", what, exc)
    else:
        logger.warning("%s: %s", what, exc)
    if on_error is not None:
        try:
            on_error(exc)
        except Exception:
            logger.exception("authorizer on_error hook raised")


# --------------------------------------------------------------------------------------------
# Fixed rules


class _StaticAuthorizer(_Listeners):
    """Base for authorizers whose answer depends only on the identity."""

    name = "static"

    @property
    def ready(self) -> bool:
        """Always True: fixed rules need no data."""
        return True

    def decide(self, identity: ServiceIdentity) -> Decision:
        """The decision for ``identity``; never None."""
        raise NotImplementedError

    async def authorize(self, identity: ServiceIdentity, serial: str = "") -> Decision:
        """Same as :meth:`decide`."""
        return self.decide(identity)

    def decide_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Headers
    ) -> Decision:
        """Fixed rules have no L7 data: the connection decision applies to every request."""
        return self.decide(identity)

    async def start(self) -> None:
        """Nothing to start."""

    async def aclose(self) -> None:
        """Nothing to stop."""


_IdentityKey = tuple[str, str, str, str, str]


def _norm_partition(partition: str) -> str:
    return partition.lower() or "default"


class AllowIdentities(_StaticAuthorizer):
    """Allow exactly the listed service identities; deny everyone else.

    Each argument is a SPIFFE URI string or a :class:`ServiceIdentity`. Namespace, service
    and datacenter compare exactly; the trust domain case-insensitively; partition ""
    means ``default``. A :class:`ServiceIdentity` with an empty ``trust_domain`` or
    ``datacenter`` matches any trust domain or datacenter (the trust domain is the
    cluster's id, which callers often do not know in advance).
    Raises :class:`~consul_connect.errors.IdentityError` for a URI that is not a service
    identity, and ``ValueError`` when nothing is listed.
    """

    name = "allow-identities"

    def __init__(self, *identities: str | ServiceIdentity) -> None:
        super().__init__()
        if not identities:
            raise ValueError("AllowIdentities needs at least one identity")
        parsed = [parse_service_identity(i) if isinstance(i, str) else i for i in identities]
        self.identities: tuple[ServiceIdentity, ...] = tuple(parsed)
        self._keys: frozenset[_IdentityKey] = frozenset(self._key(i) for i in parsed)

    @staticmethod
    def _key(i: ServiceIdentity, td: str | None = None, dc: str | None = None) -> _IdentityKey:
        return (
            (i.trust_domain if td is None else td).lower(),
            i.namespace or "default",
            _norm_partition(i.partition),
            i.datacenter if dc is None else dc,
            i.service,
        )

    def decide(self, identity: ServiceIdentity) -> Decision:
        """Allow when ``identity`` is one of the listed ones."""
        keys = self._keys
        for td in (None, ""):
            for dc in (None, ""):
                if self._key(identity, td, dc) in keys:
                    return Decision(True, f"identity {identity.uri} is in the allowed list")
        return Decision(False, f"identity {identity.uri} is not in the allowed list")


class AllowTrustDomain(_StaticAuthorizer):
    """Allow every service of one trust domain (compared case-insensitively); deny others."""

    name = "allow-trust-domain"

    def __init__(self, trust_domain: str) -> None:
        super().__init__()
        if not trust_domain:
            raise ValueError("AllowTrustDomain needs a trust domain")
        self.trust_domain = trust_domain.lower()

    def decide(self, identity: ServiceIdentity) -> Decision:
        """Allow when ``identity`` belongs to the configured trust domain."""
        if identity.trust_domain.lower() == self.trust_domain:
            return Decision(True, f"trust domain {self.trust_domain} is allowed")
        return Decision(
            False, f"trust domain {identity.trust_domain!r} is not {self.trust_domain!r}"
        )


class AllowAnyServiceInsecure(_StaticAuthorizer):
    """Allow every peer whose certificate chains to the roots. For development only.

    Any service of the mesh (and anything else the CA signed) may connect: this ignores
    intentions entirely.
    """

    name = "allow-any-service-insecure"

    def decide(self, identity: ServiceIdentity) -> Decision:
        """Always allow."""
        return Decision(True, "any service allowed (AllowAnyServiceInsecure)")


# --------------------------------------------------------------------------------------------
# Combinators


class _Combined(_Listeners):
    def __init__(self, members: Iterable[Authorizer], *, label: str) -> None:
        super().__init__()
        self.members: tuple[Authorizer, ...] = tuple(members)
        if not self.members:
            raise ValueError(f"{label}() needs at least one authorizer")
        self.name = f"{label}(" + ", ".join(m.name for m in self.members) + ")"
        for m in self.members:
            m.add_listener(self._notify)

    @property
    def ready(self) -> bool:
        """Whether every member is ready."""
        return all(m.ready for m in self.members)

    async def start(self) -> None:
        """Start every member."""
        for m in self.members:
            await m.start()

    async def aclose(self) -> None:
        """Stop every member (all are stopped even if one fails; the first error is raised)."""
        first: BaseException | None = None
        for m in self.members:
            try:
                await m.aclose()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


def _joined(decisions: Iterable[Decision]) -> str:
    return "; ".join(d.reason for d in decisions)


class _AnyOf(_Combined):
    def decide(self, identity: ServiceIdentity) -> Decision | None:
        denials: list[Decision] = []
        pending = False
        for m in self.members:
            d = m.decide(identity)
            if d is None:
                pending = True
            elif d.allowed:
                return d
            else:
                denials.append(d)
        return None if pending else Decision(False, _joined(denials))

    async def authorize(self, identity: ServiceIdentity, serial: str = "") -> Decision:
        denials: list[Decision] = []
        for m in self.members:
            d = m.decide(identity)
            if d is None:
                d = await m.authorize(identity, serial)
            if d.allowed:
                return d
            denials.append(d)
        return Decision(False, _joined(denials))

    def decide_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Headers
    ) -> Decision:
        denials = []
        for m in self.members:
            d = m.decide_request(identity, method, path, headers)
            if d.allowed:
                return d
            denials.append(d)
        return Decision(False, _joined(denials))


class _AllOf(_Combined):
    def decide(self, identity: ServiceIdentity) -> Decision | None:
        pending = False
        allowed: list[Decision] = []
        for m in self.members:
            d = m.decide(identity)
            if d is None:
                pending = True
            elif not d.allowed:
                return d
            else:
                allowed.append(d)
        return None if pending else Decision(True, _joined(allowed))

    async def authorize(self, identity: ServiceIdentity, serial: str = "") -> Decision:
        allowed: list[Decision] = []
        for m in self.members:
            d = m.decide(identity)
            if d is None:
                d = await m.authorize(identity, serial)
            if not d.allowed:
                return d
            allowed.append(d)
        return Decision(True, _joined(allowed))

    def decide_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Headers
    ) -> Decision:
        allowed = []
        for m in self.members:
            d = m.decide_request(identity, method, path, headers)
            if not d.allowed:
                return d
            allowed.append(d)
        return Decision(True, _joined(allowed))


def any_of(*authorizers: Authorizer) -> Authorizer:
    """An authorizer that allows when any member allows (members asked in order).

    Denials carry every member's reason. ``start``/``aclose`` reach every member; it is
    ready when all members are. Raises ``ValueError`` with no members.
    """
    return _AnyOf(authorizers, label="any_of")


def all_of(*authorizers: Authorizer) -> Authorizer:
    """An authorizer that allows only when every member allows (the first denial wins).

    Raises ``ValueError`` with no members.
    """
    return _AllOf(authorizers, label="all_of")


# --------------------------------------------------------------------------------------------
# Intention-backed (local decisions)


def _debug_default_allow(self_info: dict[str, Any]) -> bool:
    """The intention default the agent applies, read from ``/v1/agent/self``.

    ACLs off means allow. Otherwise ``acl.default_policy``: recent Consul nests it in
    ``DebugConfig.ACLResolverSettings``; older releases (and the dev agent) put it at the
    top of ``DebugConfig``.
    """
    debug = self_info.get("DebugConfig")
    if not isinstance(debug, dict):
        return True
    resolver = debug.get("ACLResolverSettings")
    resolver = resolver if isinstance(resolver, dict) else {}
    enabled = debug.get("ACLsEnabled", resolver.get("ACLsEnabled", False))
    if not enabled:
        return True
    policy = debug.get("ACLDefaultPolicy") or resolver.get("ACLDefaultPolicy") or "allow"
    return str(policy).lower() != "deny"


class IntentionAuthorizer(_Listeners):
    """Decides locally from the intentions whose destination is ``service_name``.

    :meth:`start` launches a background task that learns the intention default (unless
    ``default_allow`` is given) and then watches ``/v1/connect/intentions/match`` with
    blocking queries; every change builds a new precomputed
    :class:`~consul_connect.authz.intentions.IntentionSet` (O(1) decisions), swapped in by
    one assignment, after which listeners are called.

    The default (no intention matches) is the agent's: allow with ACLs off, else
    ``acl.default_policy``. Unless ``default_allow`` is given it is learnt once, by asking
    the authorize endpoint about a caller in a namespace no CE intention can name (the
    answer is exactly the agent's default for this token), else from ``/v1/agent/self``;
    if neither is readable the default is *deny* (fail closed) and a warning says to pass
    ``default_allow`` explicitly.

    Before the first data every decision is a denial (``"no intention data yet"``). When
    the agent goes away the last data keeps deciding. Watch errors go to ``on_error``; an
    :class:`~consul_connect.errors.AgentPermissionError` (token lacks ``intentions:read``)
    is reported, raised by :meth:`wait_ready` while no data has arrived, and retried with a
    capped back-off (a token's rights can be granted later, e.g. through a role).
    """

    def __init__(
        self,
        client: AgentClient,
        service_name: str,
        *,
        default_allow: bool | None = None,
        wait: float = 300.0,
        cached: bool = False,
        on_error: ErrorHook | None = None,
    ) -> None:
        super().__init__()
        if not service_name:
            raise ValueError("IntentionAuthorizer needs the destination service name")
        self.client = client
        self.service_name = service_name
        self.name = f"intentions({service_name})"
        self._explicit_default = default_allow
        self._wait = wait
        self._cached = cached
        self._on_error = on_error
        self._set: IntentionSet | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._denied = asyncio.Event()  # set while the latest answer was a 403
        self._fatal: BaseException | None = None
        self.updates = 0

    @property
    def ready(self) -> bool:
        """True once intention data has arrived (stays True while the agent is away)."""
        return self._set is not None

    @property
    def intentions(self) -> IntentionSet | None:
        """The current precomputed intentions, or None before the first data."""
        return self._set

    @property
    def failure(self) -> BaseException | None:
        """The error that ended the watch, or the permission error it is retrying, if any."""
        return self._fatal

    def decide(self, identity: ServiceIdentity) -> Decision:
        """The L4 decision for ``identity`` (never None: the data is local)."""
        current = self._set
        if current is None:
            return Decision(False, NO_DATA_REASON)
        return current.decide_l4(identity.namespace, identity.service, identity.partition)

    async def authorize(self, identity: ServiceIdentity, serial: str = "") -> Decision:
        """Same as :meth:`decide`; no agent call."""
        return self.decide(identity)

    def decide_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Headers
    ) -> Decision:
        """The L7 decision for one HTTP request (``path`` may carry a query string)."""
        current = self._set
        if current is None:
            return Decision(False, NO_DATA_REASON)
        return current.decide_l7(
            identity.namespace,
            identity.service,
            method,
            path,
            headers,
            partition=identity.partition,
        )

    async def start(self) -> None:
        """Start the background watch (returns at once). Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"consul-connect intentions {self.service_name}"
            )

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the first intention data arrived.

        Raises the :class:`~consul_connect.errors.AgentPermissionError` that ended the
        watch, or :class:`~consul_connect.errors.NotReadyError` after ``timeout`` seconds.
        """
        if self._set is not None:
            return
        waiter = asyncio.ensure_future(self._ready.wait())
        denied = asyncio.ensure_future(self._denied.wait())
        pending: set[asyncio.Future[Any]] = {waiter, denied}
        if self._task is not None:
            pending.add(self._task)
        try:
            await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            denied.cancel()
        if self._set is not None:
            return
        if self._fatal is not None:
            raise self._fatal
        raise NotReadyError(
            f"no intention data for {self.service_name!r} within {timeout}s", cause=None
        )

    async def aclose(self) -> None:
        """Stop the watch. Decisions keep using the last data. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe_default(self) -> bool | None:
        """Ask authorize about a caller no CE intention can match; None if inconclusive.

        This uses the agent's own rule (the request token's intention default) and needs
        only ``service:write`` on the destination, which the service's token has anyway.
        """
        data, _ = await self.client.authorize(self.service_name, _PROBE_URI, "")
        reason = str(data.get("Reason", ""))
        if reason.startswith("Matched"):
            # Enterprise: a wildcard-namespace intention matched; not the default.
            return None
        return bool(data["Authorized"])

    async def _self_default(self) -> bool | None:
        try:
            info, _ = await self.client.agent_self()
        except AgentPermissionError:
            return None
        return _debug_default_allow(info)

    async def _learn_default(self) -> bool:
        """Learn the intention default from the agent, retrying while it is unreachable."""
        delay = 0.1
        while True:
            try:
                try:
                    found = await self._probe_default()
                except (AgentPermissionError, AgentResponseError):
                    found = None
                if found is None:
                    found = await self._self_default()
            except ConsulConnectError as exc:
                _report(self._on_error, exc, "reading the agent's intention default failed")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if found is None:
                logger.warning(
                    "cannot learn the agent's intention default for %r (token lacks "
                    "service:write and agent:read); defaulting to deny: pass default_allow=",
                    self.service_name,
                )
                return False
            return found

    async def _follow(
        self,
        fetch: Callable[[int, float], Any],
        on_error: Callable[[BaseException], None],
        default_allow: bool,
    ) -> None:
        """Build a new IntentionSet from every change; returns only by raising."""
        stream = watch(fetch, wait=self._wait, on_error=on_error)
        async with contextlib.aclosing(stream):
            async for entries in stream:
                if self._fatal is not None and isinstance(self._fatal, AgentPermissionError):
                    self._fatal = None  # the agent answers again
                    self._denied.clear()
                try:
                    intentions = [Intention.from_json(e) for e in entries]
                except (ConsulConnectError, ValueError, TypeError, AttributeError) as exc:
                    # Keep deciding from the last good data rather than from nothing.
                    _report(self._on_error, exc, "undecodable intentions; keeping last data")
                    continue
                self._set = IntentionSet(intentions, default_allow=default_allow)
                self.updates += 1
                self._ready.set()
                self._notify()
        raise RuntimeError("the intention watch ended")  # watch() never returns


    async def _run(self) -> None:
        try:
            default_allow = self._explicit_default
            if default_allow is None:
                default_allow = await self._learn_default()

            async def fetch(index: int, wait: float) -> tuple[list[dict[str, Any]], QueryMeta]:
                return await self.client.intention_match_destination(
                    self.service_name, index=index, wait=wait, cached=self._cached
                )

            def on_error(exc: BaseException) -> None:
                _report(self._on_error, exc, f"intention watch for {self.service_name!r}")

            delay = 1.0
            while True:
                try:
                    await self._follow(fetch, on_error, default_allow)
                except AgentPermissionError as exc:
                    self._fatal = exc
                    self._denied.set()
                    _report(
                        self._on_error,
                        exc,
                        f"intention watch for {self.service_name!r} refused; retrying in "
                        f"{delay:g}s, decisions use the last data",
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        except Exception as exc:
            # A bug (or an unretried error) ends the watch; say so instead of dying quietly.
            self._fatal = exc
            _report(
                self._on_error,
                exc,
                f"intention watch for {self.service_name!r} stopped; decisions use the last data",
            )


# --------------------------------------------------------------------------------------------
# Agent-backed (authorize endpoint)


class AgentAuthorizer(_Listeners):
    """Asks the agent (``POST /v1/agent/connect/authorize``) about each new peer.

    Answers are cached per identity URI for ``cache_ttl`` seconds; concurrent
    authorizations of one identity share one request. A request that takes longer than
    ``timeout`` seconds, fails, or is refused (403) becomes a denial whose reason says so;
    such denials are not cached. Errors also go to ``on_error``. ``clock`` (monotonic
    seconds) is injectable for tests. Listeners are never called: the agent decides per
    connection and publishes no change events.
    """

    def __init__(
        self,
        client: AgentClient,
        service_name: str,
        *,
        timeout: float = 2.0,
        cache_ttl: float = 1.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        on_error: ErrorHook | None = None,
    ) -> None:
        super().__init__()
        if not service_name:
            raise ValueError("AgentAuthorizer needs the destination service name")
        self.client = client
        self.service_name = service_name
        self.name = f"agent-authorize({service_name})"
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.max_entries = max(1, max_entries)
        self._clock = clock
        self._on_error = on_error
        # uri -> (expires_at, decision); insertion order doubles as age order for eviction.
        self._cache: dict[str, tuple[float, Decision]] = {}
        self._inflight: dict[str, asyncio.Task[tuple[Decision, bool]]] = {}
        self.requests = 0

    @property
    def ready(self) -> bool:
        """Always True: each decision is asked for when needed."""
        return True

    def decide(self, identity: ServiceIdentity) -> Decision | None:
        """A cached, still fresh decision for ``identity``, else None."""
        entry = self._cache.get(identity.uri)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        return None

    def decide_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Headers
    ) -> Decision:
        """The last decision the agent gave for ``identity`` (even if past ``cache_ttl``).

        The authorize endpoint is L4-only; a request on an authorized connection uses that
        connection-level decision. An identity never authorized is denied.
        """
        entry = self._cache.get(identity.uri)
        if entry is None:
            return Decision(False, "identity was never authorized by the agent")
        return entry[1]

    async def authorize(self, identity: ServiceIdentity, serial: str = "") -> Decision:
        """The agent's decision (cached or fresh); denies with a reason on any failure."""
        cached = self.decide(identity)
        if cached is not None:
            return cached
        uri = identity.uri
        task = self._inflight.get(uri)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(uri, serial))
            self._inflight[uri] = task
            task.add_done_callback(functools.partial(self._forget, uri))
        # shield: one caller giving up must not cancel the answer others wait for.
        decision, _ = await asyncio.shield(task)
        return decision

    def _forget(self, uri: str, task: asyncio.Task[tuple[Decision, bool]]) -> None:
        if self._inflight.get(uri) is task:
            del self._inflight[uri]

    async def _ask(self, uri: str, serial: str) -> tuple[Decision, bool]:
        self.requests += 1
        try:
            async with asyncio.timeout(self.timeout):
                data, _ = await self.client.authorize(self.service_name, uri, serial)
        except TimeoutError:
            exc = TimeoutError(f"authorize did not answer within {self.timeout}s")
            _report(self._on_error, exc, f"authorizing {uri}")
            return Decision(False, f"authorization timed out after {self.timeout}s"), False
        except AgentPermissionError as perm:
            _report(self._on_error, perm, f"authorizing {uri}")
            return Decision(False, f"agent refused the authorize call: {perm}"), False
        except AgentError as err:
            _report(self._on_error, err, f"authorizing {uri}")
            return Decision(False, f"authorize call failed: {err}"), False
        decision = Decision(bool(data["Authorized"]), str(data.get("Reason", "")))
        self._store(uri, decision)
        return decision, True

    def _store(self, uri: str, decision: Decision) -> None:
        now = self._clock()
        self._cache.pop(uri, None)
        self._cache[uri] = (now + self.cache_ttl, decision)
        if len(self._cache) > self.max_entries:
            for key in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[key]
            while len(self._cache) > self.max_entries:
                del self._cache[next(iter(self._cache))]

    def clear_cache(self) -> None:
        """Forget every cached decision."""
        self._cache.clear()

    async def start(self) -> None:
        """Nothing to start: requests are made on demand."""

    async def aclose(self) -> None:
        """Cancel in-flight requests (their waiters get CancelledError). Idempotent."""
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
