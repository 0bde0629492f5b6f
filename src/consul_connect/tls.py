"""The TLS layer: ``ssl`` contexts from in-memory certificates, swapped per handshake.

Three pieces, used by the service layer and by integrations:

* :func:`load_cert_chain_from_memory` puts a leaf chain and its key into an
  ``SSLContext`` without a regular file ever holding the key (Linux: an anonymous
  ``memfd``; elsewhere: a file in a private directory, unlinked at once).
* :class:`TLSMaterial` is an immutable snapshot ``(leaf, roots, server_context,
  client_context)``, built once per change and only if the leaf verifies against the
  roots. :class:`DynamicServerContext` / :class:`DynamicClientContext` are
  ``SSLContext`` objects that hand every *new* connection the current snapshot's
  context, so a listener never restarts for a new leaf or a new root set, while
  connections already open keep the context they started with.
* :func:`peer_identity` / :func:`verify_server_identity` turn the peer's verified
  certificate into a :class:`~consul_connect.identity.ServiceIdentity`, or refuse it
  with a reason, before the application reads or writes a byte.

OpenSSL checks the chain (against *all* current roots, with the intermediates the
peer sent), validity dates and key usage during the handshake; Python's ``ssl`` has
no verify callback, so the identity rules (exactly one URI SAN, a service SPIFFE ID,
not a CA) run right after the handshake. In asyncio the stream handler /
``connection_made`` only runs once the handshake, client-certificate check included,
has finished: call :func:`peer_identity` there and close on :class:`PeerRejected`.

Client-side session resumption (:class:`DynamicClientContext`, on by default): a
second connection to the same endpoint offers the TLS session ticket of an earlier
one and, when the server accepts it, skips both certificate signatures and the chain
verification (roughly half the handshake CPU on each side). What still holds on a
resumed connection, and why:

* the server's *identity* is still checked by our code after every handshake:
  ``getpeercert()`` on a resumed connection returns the certificate of the original
  full handshake, whose chain OpenSSL verified then, and :func:`verify_server_identity`
  runs on it exactly as on a full handshake;
* sessions are kept per :class:`TLSMaterial` (per leaf *and* root set) and per endpoint
  key: a new leaf or a changed root set (a rotation, a removed root) starts with no
  sessions at all, so nothing verified under old roots is resumed under new ones. The
  server side gets the same from its own per-material ticket keys;
* a session is offered only until its ticket lifetime ends *and* not after the
  server certificate it was verified with expires.

What is not re-checked on a resumed connection is the chain itself: a server whose
chain was valid at the full handshake is trusted until one of the limits above. Pass
``resume_sessions=False`` to :class:`DynamicClientContext` to always do full
handshakes.

A client cannot tell "the server refused my certificate" from a plain EOF: with
TLS 1.3 the client's handshake finishes before the server has looked at the client
certificate, and asyncio servers send no alert. Treat an EOF right after the
handshake as a possible refusal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .certs import Leaf, RootSet, peer_identity_from_der, uri_sans, verify_leaf
from .errors import CertificateError, DialError, IdentityError, PeerRejected, ServerIdentityError
from .identity import ServiceIdentity, parse_spiffe_id

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "DynamicClientContext",
    "DynamicServerContext",
    "SessionKey",
    "TLSMaterial",
    "client_handshake",
    "load_cert_chain_from_memory",
    "peer_identity",
    "server_handshake",
    "verify_server_identity",
]

HANDSHAKE_TIMEOUT = 10.0
"""Default seconds a TLS handshake may take in total (TCP accepted to Finished).

Matches the 10 s Consul's built-in proxy documents for handshakes. Pass it as
``ssl_handshake_timeout=`` to ``asyncio.start_server`` / ``open_connection``.
"""

# TLS 1.2 suites: ECDHE key exchange with AEAD ciphers only, AES-GCM before
# ChaCha20, like the Go SDK's fixed list. TLS 1.3 suites are not affected by this.
_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

_MEMFD_NAME = "consul-connect-leaf"

_SERVER_TICKETS = 1
"""TLS 1.3 session tickets a server sends per handshake (tickets stay enabled)."""


# ----------------------------------------------------------------- loading from memory


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise CertificateError("the private key is encrypted; Consul keys never are")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _memfd_available() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _load_via_memfd(ctx: ssl.SSLContext, data: bytes) -> None:
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        _write_all(fd, data)
        # Each open() of /proc/self/fd/N on a memfd gets its own offset (0), so
        # OpenSSL reads the whole file although our descriptor is at its end.
        ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=_refuse_password)
    finally:
        os.close(fd)


def _load_via_private_dir(ctx: ssl.SSLContext, data: bytes) -> None:
    # Fallback where memfd does not exist (macOS, Windows, no /proc). mkdtemp makes a
    # 0700 directory only our user can enter; the file is 0600, created exclusively,
    # and removed (with the directory) as soon as OpenSSL has parsed it. The key does
    # touch the temp filesystem for that moment: prefer Linux in production.
    directory = tempfile.mkdtemp(prefix="consul-connect-")
    try:
        path = os.path.join(directory, "leaf.pem")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path, password=_refuse_password)
        finally:
            os.unlink(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def load_cert_chain_from_memory(ctx: ssl.SSLContext, chain_pem: str, key_pem: str) -> None:
    """Load ``chain_pem`` (leaf first, then intermediates) and ``key_pem`` into ``ctx``.

    On Linux the PEM goes into an anonymous ``memfd_create`` file (close-on-exec) that
    OpenSSL reads through ``/proc/self/fd/N``; the descriptor is closed right after,
    so no regular file ever holds the key. Where that is unavailable, a 0600 file in
    a fresh 0700 temporary directory is used and unlinked immediately after loading.

    Raises :class:`CertificateError` when the PEM does not parse, the key does not
    match the leaf (``KEY_VALUES_MISMATCH``) or the key is encrypted.
    """
    if not isinstance(chain_pem, str) or not isinstance(key_pem, str):
        raise CertificateError("certificate chain and private key must be PEM strings")
    if "-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise CertificateError("certificate chain holds no PEM certificate")
    if "PRIVATE KEY-----" not in key_pem:
        raise CertificateError("private key is not a PEM private key")
    sep = "" if chain_pem.endswith("\n") else "\n"
    try:
        data = (chain_pem + sep + key_pem).encode("ascii")
    except UnicodeEncodeError as exc:
        raise CertificateError("PEM text must be ASCII") from exc
    loader = _load_via_memfd if _memfd_available() else _load_via_private_dir
    try:
        loader(ctx, data)
    except ssl.SSLError as exc:
        # OpenSSL's messages name the failure, never the key bytes.
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError("private key does not match the leaf certificate") from exc
        raise CertificateError(f"cannot load certificate chain and key: {exc}") from exc


# --------------------------------------------------------------------------- contexts


def _harden(ctx: ssl.SSLContext, alpn_protocols: Sequence[str] | None) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn_protocols:
        ctx.set_alpn_protocols(list(alpn_protocols))


HandshakeFailureHook = Callable[[str], None]
"""Called with a reason when a server-side handshake fails or is abandoned."""

_NOT_FINISHED = "did not complete (timed out, or the peer went away)"


class _ServerSSLObject(ssl.SSLObject):
    """The ``SSLObject`` of server contexts: reports a handshake that fails or never ends.

    Event loops (asyncio's and uvloop's) run server handshakes themselves and drop a
    failed connection silently; this is where the reason can still be seen. Only
    objects handed out by a :class:`DynamicServerContext` with a hook report.
    """

    _cc_hook: HandshakeFailureHook | None = None
    _cc_settled = False

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._cc_report(str(exc) or type(exc).__name__)
            raise
        self._cc_settled = True

    def _cc_report(self, reason: str) -> None:
        hook = self._cc_hook
        if hook is not None and not self._cc_settled:
            self._cc_settled = True
            with contextlib.suppress(Exception):  # a hook's bug must not break the loop
                hook(reason)

    def __del__(self) -> None:
        if self._cc_hook is not None and not self._cc_settled:
            self._cc_report(_NOT_FINISHED)


def _presented_chain_pem(leaf: Leaf, path: Sequence[x509.Certificate]) -> str:
    """The chain a context presents: the leaf's own chain, else the verified path.

    Given only a leaf, OpenSSL completes the chain itself on *every* handshake, by
    verifying the leaf against the context's trust store (one signature check and a
    chain build, about 7 % of a full server handshake with OpenSSL 3.0; Python cannot
    set ``SSL_MODE_NO_AUTO_CHAIN``). Loading the path we verified once when the
    material was built sends the same certificates and skips that work.
    """
    if leaf.chain or len(path) < 2:
        return leaf.full_chain_pem
    return leaf.cert_pem + "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in path[1:])


def _server_context(
    leaf: Leaf,
    roots: RootSet,
    alpn: Sequence[str] | None,
    *,
    chain_pem: str,
    tickets: bool = True,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = _ServerSSLObject
    _harden(ctx, alpn)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    # One TLS 1.3 session ticket per handshake instead of OpenSSL's two: a client
    # resumes with one, and each ticket costs the server ~0.3 ms with OpenSSL 3.0
    # (measured: full handshake 1.8 -> 1.5 ms server CPU; bench/results/RESULTS.md).
    # Without tickets, TLS 1.3 clients cannot resume; TLS 1.2 clients still can, by
    # session ID from this context's in-memory cache (cheap: no ticket to encrypt).
    ctx.num_tickets = _SERVER_TICKETS if tickets else 0
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    ctx.load_verify_locations(cadata=roots.cadata)
    load_cert_chain_from_memory(ctx, chain_pem, leaf.private_key_pem)
    return ctx


def _client_context(
    leaf: Leaf, roots: RootSet, alpn: Sequence[str] | None, *, chain_pem: str
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Connect leaves carry no DNS name; the server's identity is its URI SAN, which
    # verify_server_identity checks after the handshake.
    ctx.check_hostname = False
    _harden(ctx, alpn)
    ctx.load_verify_locations(cadata=roots.cadata)
    load_cert_chain_from_memory(ctx, chain_pem, leaf.private_key_pem)
    return ctx


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class TLSMaterial:
    """One generation of TLS material: a leaf, the roots it verifies against, and the
    ``SSLContext`` objects built from them.

    Immutable; build it with :meth:`build` and publish it by swapping one reference.
    Both contexts require a peer certificate chaining to one of ``roots``, allow
    TLS 1.2 and 1.3, and present ``leaf`` with its chain. Contexts are never changed
    after publication (OpenSSL contexts are not safe to mutate while in use).
    """

    leaf: Leaf
    roots: RootSet
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext
    built_at: datetime

    @classmethod
    def build(
        cls,
        leaf: Leaf,
        roots: RootSet,
        now: datetime | None = None,
        *,
        alpn_protocols: Sequence[str] | None = None,
        session_tickets: bool = True,
    ) -> TLSMaterial:
        """Verify ``leaf`` against ``roots`` at ``now`` and build both contexts.

        ``now`` defaults to the current UTC time. ``alpn_protocols`` (default: none
        advertised) is set on both contexts, e.g. ``["h2", "http/1.1"]``.
        ``session_tickets=False`` makes the server context send no TLS session
        tickets, so TLS 1.3 clients cannot resume with it, and each full handshake
        costs the server less.

        Raises :class:`CertificateError` if the leaf does not chain to any of the roots
        (with its own chain and the roots' intermediates), is expired or a CA, or if
        OpenSSL refuses the chain or key.
        """
        at = datetime.now(UTC) if now is None else now
        chain_pem = _presented_chain_pem(leaf, verify_leaf(leaf, roots, at))
        return cls(
            leaf=leaf,
            roots=roots,
            server_context=_server_context(
                leaf, roots, alpn_protocols, chain_pem=chain_pem, tickets=session_tickets
            ),
            client_context=_client_context(leaf, roots, alpn_protocols, chain_pem=chain_pem),
            built_at=at,
        )

    def with_roots(
        self,
        roots: RootSet,
        now: datetime | None = None,
        *,
        alpn_protocols: Sequence[str] | None = None,
        session_tickets: bool = True,
    ) -> TLSMaterial:
        """The same leaf, with new contexts that trust exactly ``roots``.

        For roots that change under a leaf which no longer chains to them (its root
        was pruned before the leaf was renewed): peers must be verified against the
        current roots at once, as Consul's Go client swaps its root pool on every
        roots update, while the leaf is still presented as issued until a new one
        arrives. Options are as for :meth:`build`. Raises :class:`CertificateError`
        if OpenSSL refuses the roots, chain or key.
        """
        chain_pem = self.leaf.full_chain_pem
        return type(self)(
            leaf=self.leaf,
            roots=roots,
            server_context=_server_context(
                self.leaf, roots, alpn_protocols, chain_pem=chain_pem, tickets=session_tickets
            ),
            client_context=_client_context(self.leaf, roots, alpn_protocols, chain_pem=chain_pem),
            built_at=datetime.now(UTC) if now is None else now,
        )

    @property
    def identity(self) -> ServiceIdentity:
        """The identity this material presents to peers."""
        return self.leaf.identity

    def __repr__(self) -> str:
        root_ids = ", ".join(r.id for r in self.roots.roots)
        return (
            f"TLSMaterial(identity={self.leaf.identity.uri!r}, "
            f"serial={self.leaf.serial_number!r}, "
            f"valid_before={self.leaf.valid_before.isoformat()}, roots=[{root_ids}])"
        )


class _DelegatingContext(ssl.SSLContext):
    """Shared body of the dynamic contexts: every wrap goes to ``_pick()``."""

    _protocol: ssl._SSLMethod = ssl.PROTOCOL_TLS_SERVER
    _get_current: Callable[[], TLSMaterial]

    def __new__(cls, get_current: Callable[[], TLSMaterial], *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, cls._protocol)

    def __init__(self, get_current: Callable[[], TLSMaterial]) -> None:
        self._get_current = get_current
        # The wrapper itself never handshakes, but frameworks read these attributes
        # (and urllib3 only touches verify settings it sees as unset): mirror the
        # real contexts so nothing "fixes" them.
        if self.protocol == ssl.PROTOCOL_TLS_CLIENT:
            self.check_hostname = False
        self.verify_mode = ssl.CERT_REQUIRED
        self.minimum_version = ssl.TLSVersion.TLSv1_2

    def _pick(self) -> ssl.SSLContext:
        raise NotImplementedError

    @property
    def current(self) -> TLSMaterial:
        """The snapshot the next connection will use."""
        return self._get_current()

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """Wrap with the current snapshot's context (asyncio and uvloop call this)."""
        return self._adopt(
            self._pick().wrap_bio(
                incoming,
                outgoing,
                server_side=server_side,
                server_hostname=server_hostname,
                session=session,
            )
        )

    def _adopt(self, obj: ssl.SSLObject) -> ssl.SSLObject:
        """Hook for subclasses: prepare each new connection's ``SSLObject``."""
        return obj

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap a plain socket with the current snapshot's context."""
        return self._pick().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


class DynamicServerContext(_DelegatingContext):
    """A listening ``SSLContext`` that always serves the newest material.

    ``get_current()`` is called once per new connection (it must be cheap: return a
    reference) and that snapshot's :attr:`TLSMaterial.server_context` does the whole
    handshake: its leaf, its roots, its verify mode, versions and ticket keys. So a
    new leaf or a changed root set (including a removed root) takes effect on the
    next handshake without restarting the listener; open connections are untouched,
    and session tickets from an older snapshot do not resume.

    Use it as ``ssl=`` for ``asyncio.start_server`` / ``loop.create_server`` (and
    servers built on them, like uvicorn), or with :func:`server_handshake` /
    ``wrap_socket(..., server_side=True)`` for blocking sockets. Setting options on
    this object has no effect on handshakes.

    ``on_handshake_failure(reason)`` is called once for each connection an event loop
    accepted whose handshake failed (bad or missing client certificate, not TLS at
    all) or never finished (the loop's handshake timeout, the peer closing early).
    Blocking sockets report their own errors instead.
    """

    _protocol = ssl.PROTOCOL_TLS_SERVER

    def __init__(
        self,
        get_current: Callable[[], TLSMaterial],
        *,
        on_handshake_failure: HandshakeFailureHook | None = None,
    ) -> None:
        super().__init__(get_current)
        self._on_failure = on_handshake_failure

    def _pick(self) -> ssl.SSLContext:
        return self._get_current().server_context

    def _adopt(self, obj: ssl.SSLObject) -> ssl.SSLObject:
        if self._on_failure is not None and isinstance(obj, _ServerSSLObject):
            obj._cc_hook = self._on_failure
        return obj


SessionKey = Hashable
"""What identifies one server for session reuse, e.g. ``(host, port)``."""

_PENDING_PER_ENDPOINT = 8
"""Recent connections per endpoint whose session may still be harvested (see below)."""

_SESSION_REFRESH = 60.0
"""Seconds a session keeps being offered before a newer ticket is read (if any).

TLS 1.3 servers (OpenSSL's included) accept a ticket more than once; resumption is not
used for early data here, so reusing one is safe, and reading a fresh one per
connection would cost more than the handshake saves.
"""


class _Slot:
    """Sessions known for one endpoint under one material."""

    __slots__ = ("expires", "harvested", "pending", "session")

    def __init__(self) -> None:
        self.session: ssl.SSLSession | None = None
        self.expires = 0.0
        self.harvested = 0.0  # wall-clock time ``session`` was read
        # (thread id, SSL object) of recent connections, newest last. TLS 1.3 tickets
        # arrive after the handshake, so a connection's session is only worth keeping
        # once it has carried some data: it is read when the *next* connection to the
        # same endpoint starts, on the thread that made it (OpenSSL may replace the
        # session of a connection that another thread is reading from).
        self.pending: deque[tuple[int, Any]] = deque(maxlen=_PENDING_PER_ENDPOINT)


def _session_expiry(obj: Any, session: ssl.SSLSession) -> float:
    """Wall-clock end of ``session``'s usefulness: ticket lifetime, server cert expiry."""
    end = float(session.time + session.timeout)
    try:
        cert = obj.getpeercert()
    except (ValueError, AttributeError):
        return 0.0
    not_after = cert.get("notAfter") if cert else None
    if not not_after:
        return 0.0
    try:
        return min(end, float(ssl.cert_time_to_seconds(not_after)))
    except ValueError:
        return 0.0


class _SessionCache:
    """Client TLS sessions of the current material, per endpoint key (LRU-bounded).

    All sessions belong to exactly one :class:`TLSMaterial`; when the material changes
    the whole cache is dropped, so a session is only ever offered with the context it
    came from and never across a leaf or root change.
    """

    def __init__(self, max_endpoints: int) -> None:
        self._lock = threading.Lock()
        self._material: TLSMaterial | None = None
        self._slots: OrderedDict[SessionKey, _Slot] = OrderedDict()
        self._max = max_endpoints
        self.offered = 0

    def _slots_for(self, material: TLSMaterial) -> OrderedDict[SessionKey, _Slot]:
        if material is not self._material:
            self._material = material
            self._slots = OrderedDict()
        return self._slots

    def take(self, material: TLSMaterial, key: SessionKey) -> ssl.SSLSession | None:
        """The session to offer for ``key`` now, or ``None`` for a full handshake."""
        me = threading.get_ident()
        now = time.time()
        with self._lock:
            slots = self._slots_for(material)
            slot = slots.get(key)
            if slot is None:
                return None
            slots.move_to_end(key)
            self._harvest(slot, me, now)
            if slot.session is None:
                return None
            if slot.expires <= now:
                slot.session = None
                return None
            self.offered += 1
            return slot.session

    @staticmethod
    def _harvest(slot: _Slot, me: int, now: float) -> None:
        """Update ``slot.session`` from its finished connections, newest first.

        Reading a connection's session is not free (CPython copies it through
        i2d/d2i), so it is read only when there is something to learn: no session yet,
        the last one read is older than :data:`_SESSION_REFRESH` seconds, or a finished
        connection did *not* resume (the server changed keys or refused the ticket, so
        its new ticket is the one to offer). A connection that resumed what we offered
        teaches nothing and is dropped with everything older.
        """
        pending = slot.pending
        for i in range(len(pending) - 1, -1, -1):
            owner, obj = pending[i]
            if owner != me:
                continue
            try:
                if obj.version() is None:
                    continue  # handshake still running: no ticket yet
                resumed = bool(obj.session_reused)
            except (ValueError, AttributeError, ssl.SSLError):
                resumed = False
            if resumed and slot.session is not None and now - slot.harvested < _SESSION_REFRESH:
                for _ in range(i + 1):
                    pending.popleft()
                return
            try:
                got = obj.session
            except (ValueError, AttributeError, ssl.SSLError):
                # CPython's i2d/d2i copy fails for a connection that never completed;
                # such a one has nothing to offer.
                got = None
            if got is None or not got.has_ticket:
                continue  # its ticket has not arrived (yet): try an older one
            expires = _session_expiry(obj, got)
            if expires > now:
                slot.session, slot.expires, slot.harvested = got, expires, now
            for _ in range(i + 1):
                pending.popleft()
            return

    def track(self, material: TLSMaterial, key: SessionKey, obj: Any) -> None:
        """Remember ``obj`` (a new connection to ``key``) to harvest its session later."""
        with self._lock:
            if self._material is None:
                self._material = material
            elif material is not self._material:
                # The material changed between take() and here: this connection's
                # session belongs to a context no later connection will use.
                return
            slots = self._slots
            slot = slots.get(key)
            if slot is None:
                slot = slots[key] = _Slot()
                while len(slots) > self._max:
                    slots.popitem(last=False)
            slot.pending.append((threading.get_ident(), obj))

    def clear(self) -> None:
        with self._lock:
            self._material = None
            self._slots = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots.values() if s.session is not None)


class DynamicClientContext(_DelegatingContext):
    """A client ``SSLContext`` that dials with the newest material, resuming sessions.

    Like :class:`DynamicServerContext`, for outgoing connections: each new connection
    presents the current leaf and trusts the current roots. Pass it as ``ssl=`` to
    ``asyncio.open_connection`` (with ``server_hostname=""`` to send no SNI) or use
    :func:`client_handshake`; then check the server with :func:`verify_server_identity`
    before writing anything. Hostname checking is off: Connect leaves name no host.

    Session resumption (module docstring: what it skips and what still holds) needs
    to know which server a connection goes to, so it only happens through
    :meth:`for_endpoint` (a context to pass as ``ssl=`` for that one endpoint) or
    ``session_key=`` of :meth:`wrap_bio` / :meth:`wrap_socket`. Using this object
    itself as ``ssl=`` always makes full handshakes, as before.

    ``resume_sessions=False`` turns resumption off (:meth:`for_endpoint` then behaves
    like this object). ``max_endpoints`` bounds the endpoints remembered (least
    recently dialed forgotten first).
    """

    _protocol = ssl.PROTOCOL_TLS_CLIENT

    def __init__(
        self,
        get_current: Callable[[], TLSMaterial],
        *,
        resume_sessions: bool = True,
        max_endpoints: int = 1024,
    ) -> None:
        super().__init__(get_current)
        self._resume = resume_sessions
        self._sessions = _SessionCache(max_endpoints)
        self._views: OrderedDict[SessionKey, _EndpointClientContext] = OrderedDict()
        self._views_lock = threading.Lock()
        self._max_views = max_endpoints

    def _pick(self) -> ssl.SSLContext:
        return self._get_current().client_context

    @property
    def resume_sessions(self) -> bool:
        """Whether connections with a session key offer an earlier session."""
        return self._resume

    @property
    def sessions_offered(self) -> int:
        """How many handshakes offered a cached session (the server may still refuse it)."""
        return self._sessions.offered

    def cached_sessions(self) -> int:
        """Endpoints with a session ready to offer (under the current material only)."""
        return len(self._sessions)

    def forget_sessions(self) -> None:
        """Drop every cached session: the next connection to each endpoint is a full one."""
        self._sessions.clear()

    def for_endpoint(self, key: SessionKey) -> ssl.SSLContext:
        """An ``SSLContext`` for connections to one server, resuming its sessions.

        ``key`` names the server, e.g. ``(host, port)``; use the same key for the same
        server and different keys for different servers. Pass the result as ``ssl=``
        to ``asyncio.open_connection`` / ``loop.create_connection`` / anyio's
        ``start_tls``. It always uses this context's current material; the object is
        cached per key, so calling this per connection is cheap after the first time.
        Verify the server with :func:`verify_server_identity` as for any connection.
        """
        with self._views_lock:
            view = self._views.get(key)
            if view is not None:
                self._views.move_to_end(key)
                return view
        view = _EndpointClientContext(self._get_current, self, key)
        with self._views_lock:
            view = self._views.setdefault(key, view)
            while len(self._views) > self._max_views:
                self._views.popitem(last=False)
        return view

    def _session_wrap(self, key: SessionKey | None, session: ssl.SSLSession | None,
                      wrap: Callable[[ssl.SSLContext, ssl.SSLSession | None], Any]) -> Any:
        material = self._get_current()
        ctx = material.client_context
        if key is None or not self._resume or session is not None:
            return wrap(ctx, session)
        offered = self._sessions.take(material, key)
        try:
            obj = wrap(ctx, offered)
        except ValueError:
            if offered is None:
                raise
            # A session the context refuses (cannot happen while sessions are keyed by
            # material, but a full handshake is always a correct fallback).
            obj = wrap(ctx, None)
        # Keep the C-level SSL object: SSLSocket.close() drops its reference to it,
        # but the session stays readable from the object itself.
        inner = getattr(obj, "_sslobj", None)
        self._sessions.track(material, key, obj if inner is None else inner)
        return obj

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
        *,
        session_key: SessionKey | None = None,
    ) -> ssl.SSLObject:
        """Wrap with the current material's context (asyncio and uvloop call this).

        With ``session_key`` (and no explicit ``session``) a cached session for that
        server is offered and this connection's own session is kept for the next one.
        """
        obj: ssl.SSLObject = self._session_wrap(
            session_key,
            session,
            lambda ctx, s: ctx.wrap_bio(
                incoming, outgoing, server_side=server_side,
                server_hostname=server_hostname, session=s,
            ),
        )
        return obj

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
        *,
        session_key: SessionKey | None = None,
    ) -> ssl.SSLSocket:
        """Wrap a plain socket with the current material's context.

        ``session_key`` resumes as in :meth:`wrap_bio`.
        """
        ssock: ssl.SSLSocket = self._session_wrap(
            session_key,
            session,
            lambda ctx, s: ctx.wrap_socket(
                sock, server_side=server_side,
                do_handshake_on_connect=do_handshake_on_connect,
                suppress_ragged_eofs=suppress_ragged_eofs,
                server_hostname=server_hostname, session=s,
            ),
        )
        return ssock


class _EndpointClientContext(_DelegatingContext):
    """:meth:`DynamicClientContext.for_endpoint`: the parent, with a fixed session key."""

    _protocol = ssl.PROTOCOL_TLS_CLIENT

    def __init__(
        self,
        get_current: Callable[[], TLSMaterial],
        parent: DynamicClientContext,
        key: SessionKey,
    ) -> None:
        super().__init__(get_current)
        self._parent = parent
        self._key = key

    def _pick(self) -> ssl.SSLContext:
        return self._get_current().client_context

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """Wrap through the parent with this endpoint's session key."""
        return self._parent.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname,
            session=session, session_key=self._key,
        )

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap through the parent with this endpoint's session key."""
        return self._parent.wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
            session=session, session_key=self._key,
        )


# --------------------------------------------------------------------- peer identity


class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> Any: ...


PeerConnection = ssl.SSLObject | ssl.SSLSocket | _HasPeerCert | _HasExtraInfo
"""What the peer checks accept: an SSL object or socket, or an asyncio transport/writer."""


@lru_cache(maxsize=2048)
def _classify_der(der: bytes) -> ServiceIdentity | str:
    """The identity in a peer's leaf, or the reason it is refused (cached per DER)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "peer certificate does not parse"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError:
        return "peer certificate has malformed extensions"
    # OpenSSL accepts a CA certificate as a client leaf when its key usages allow it;
    # a Connect identity is never a CA.
    if bc is not None and bc.ca:
        return "peer certificate is a CA certificate (basicConstraints CA=true)"
    try:
        uris = uri_sans(cert)
    except CertificateError as exc:
        return str(exc)
    if len(uris) != 1:
        return f"expected exactly one URI SAN, got {len(uris)}"
    try:
        parsed = parse_spiffe_id(uris[0])
    except IdentityError:
        return f"not a Consul SPIFFE ID: {uris[0]}"
    if not isinstance(parsed, ServiceIdentity):
        return f"not a service identity: {uris[0]}"
    try:
        return peer_identity_from_der(der)
    except CertificateError as exc:  # pragma: no cover - the checks above match it
        return str(exc)


def _ssl_object(conn: PeerConnection) -> Any:
    """The object holding the peer certificate: ``conn`` itself, or its ``ssl_object``."""
    # Duck-typed so SSL objects of other event loops (uvloop) and test doubles work.
    if hasattr(conn, "getpeercert"):
        return conn
    assert not isinstance(conn, ssl.SSLObject | ssl.SSLSocket)  # for the type checker
    get_extra_info = getattr(conn, "get_extra_info", None)  # None: no connection at all
    obj = get_extra_info("ssl_object") if get_extra_info is not None else None
    if obj is None or not hasattr(obj, "getpeercert"):
        raise PeerRejected("connection is not TLS")
    return obj


def _peer_name(conn: object) -> str | None:
    """``host:port`` of the peer, for messages; ``None`` when unknown."""
    peer: Any = None
    with contextlib.suppress(OSError, AttributeError):
        if isinstance(conn, ssl.SSLSocket):
            peer = conn.getpeername()
        elif hasattr(conn, "get_extra_info"):
            peer = conn.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return None


def peer_identity(conn: PeerConnection) -> ServiceIdentity:
    """The service identity of the peer of a completed TLS handshake.

    ``conn`` is an ``ssl.SSLObject``, an ``ssl.SSLSocket``, or anything with
    ``get_extra_info("ssl_object")`` (asyncio transports and ``StreamWriter``).
    The certificate's chain was already verified by OpenSSL; this adds the identity
    rules: not a CA, exactly one URI SAN, and that URI a Consul *service* SPIFFE ID.
    Results are cached per certificate.

    Raises :class:`PeerRejected` with a reason such as ``"no client certificate"``,
    ``"expected exactly one URI SAN, got 2"`` or ``"not a service identity: spiffe://…"``.
    The caller should close the connection without reading from it.
    """
    obj = _ssl_object(conn)
    try:
        der = obj.getpeercert(binary_form=True)
    except ValueError as exc:  # handshake not done
        raise PeerRejected("TLS handshake has not completed") from exc
    if not der:
        side = "client" if getattr(obj, "server_side", True) else "server"
        raise PeerRejected(f"no {side} certificate", peer=_peer_name(conn))
    result = _classify_der(der)
    if isinstance(result, str):
        raise PeerRejected(result, peer=_peer_name(conn))
    return result


def verify_server_identity(conn: PeerConnection, expected: ServiceIdentity) -> ServiceIdentity:
    """Check that the server of a completed handshake is the service we meant to reach.

    Returns the identity the server presented. Service, namespace, partition and
    datacenter must equal ``expected``'s (case-insensitively); the trust-domain host
    is tolerated, as Consul's own clients do, since the chain was already verified
    against the cluster's roots.

    Raises :class:`ServerIdentityError` if the server's certificate holds no usable
    service identity or names a different service. Close without writing then.
    """
    try:
        presented = peer_identity(conn)
    except PeerRejected as exc:
        raise ServerIdentityError(
            f"server certificate is not a usable service identity: {exc.reason}",
            failures=[(exc.peer or "", exc.reason)],
        ) from exc
    if not presented.matches_expected(expected):
        reason = f"peer certificate mismatch: expected {expected.uri}, got {presented.uri}"
        peer = _peer_name(conn) or ""
        raise ServerIdentityError(reason, failures=[(peer, reason)])
    return presented


# -------------------------------------------------------------------- blocking sockets


def _describe_handshake_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"TLS handshake did not complete within {timeout:g}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate"
        return f"TLS handshake failed: {exc.reason or exc}"
    return f"connection lost during TLS handshake: {exc}"


def _address(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    timeout: float,
    server_hostname: str | None,
    session_key: SessionKey | None = None,
) -> ssl.SSLSocket:
    """Wrap and handshake within ``timeout`` seconds in total, or close and raise."""
    previous = sock.gettimeout()
    # CPython computes one deadline from the socket timeout for a whole
    # do_handshake() call and waits only for the remainder after each partial read,
    # so a peer trickling bytes cannot stretch it.
    sock.settimeout(timeout)
    try:
        if session_key is not None and isinstance(ctx, DynamicClientContext):
            ssock = ctx.wrap_socket(
                sock,
                do_handshake_on_connect=False,
                server_hostname=server_hostname,
                session_key=session_key,
            )
        else:
            ssock = ctx.wrap_socket(
                sock,
                server_side=server_side,
                do_handshake_on_connect=False,
                server_hostname=server_hostname,
            )
    except BaseException:
        sock.close()
        raise
    try:
        ssock.do_handshake()
        ssock.settimeout(previous)
    except BaseException:
        ssock.close()
        raise
    return ssock


def server_handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[ssl.SSLSocket, ServiceIdentity]:
    """Run the server side of a TLS handshake on an accepted socket, with a deadline.

    ``ctx`` is usually a :class:`DynamicServerContext`. The handshake (client
    certificate verification included) must finish within ``timeout`` seconds in
    total; then the client's identity is checked with :func:`peer_identity`. Returns
    the TLS socket (with the socket's original timeout restored) and the client's
    identity. Nothing has been read from the application stream yet.

    Raises :class:`PeerRejected` (after closing the socket) for a timeout, garbage,
    a failed handshake, a missing or bad certificate, or an unusable identity.
    """
    address = _address(sock)
    try:
        ssock = _handshake(sock, ctx, server_side=True, timeout=timeout, server_hostname=None)
    except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
        raise PeerRejected(_describe_handshake_error(exc, timeout), peer=address) from exc
    try:
        identity = peer_identity(ssock)
    except PeerRejected:
        ssock.close()
        raise
    return ssock, identity


def client_handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    expected: ServiceIdentity | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
    *,
    server_hostname: str | None = None,
    session_key: SessionKey | None = None,
) -> tuple[ssl.SSLSocket, ServiceIdentity]:
    """Run the client side of a TLS handshake on a connected socket, with a deadline.

    ``ctx`` is usually a :class:`DynamicClientContext`. No SNI is sent unless
    ``server_hostname`` is given. With ``session_key`` (e.g. ``(host, port)``) and a
    :class:`DynamicClientContext`, a session cached for that server is offered and
    this one's kept (see the module docstring); the identity check below runs on
    resumed handshakes too. After the handshake the server's identity is
    checked: against ``expected`` with :func:`verify_server_identity`, or, without
    ``expected``, only for being a valid service identity. Returns the TLS socket
    (original timeout restored) and the server's identity; nothing has been written.

    With TLS 1.3 a server that refuses *our* certificate is noticed only at the first
    read (as EOF or an alert), not here.

    Raises :class:`ServerIdentityError` for a wrong or unusable server identity and
    :class:`DialError` for a timeout or failed handshake; the socket is closed then.
    """
    address = _address(sock)
    try:
        ssock = _handshake(
            sock,
            ctx,
            server_side=False,
            timeout=timeout,
            server_hostname=server_hostname,
            session_key=session_key,
        )
    except (OSError, ValueError) as exc:
        reason = _describe_handshake_error(exc, timeout)
        raise DialError(f"{address}: {reason}", failures=[(address, reason)]) from exc
    try:
        if expected is not None:
            identity = verify_server_identity(ssock, expected)
        else:
            try:
                identity = peer_identity(ssock)
            except PeerRejected as exc:
                raise ServerIdentityError(
                    f"server certificate is not a usable service identity: {exc.reason}",
                    failures=[(address, exc.reason)],
                ) from exc
    except ServerIdentityError:
        ssock.close()
        raise
    return ssock, identity

