"""aiohttp over Consul Connect: a client connector and a server site.

Client::

    async with connect_session(service) as session:
        async with session.get("https://api.service.consul/items") as resp:
            ...

:class:`ConnectConnector` resolves ``<svc>.service.consul``-style hosts (or a bare
service name) through the Service's resolvers, dials with the newest leaf, and checks
the server's SPIFFE identity before aiohttp writes the request.

Server::

    server = await serve(app, service, "127.0.0.1", 8443)
    ...
    await server.aclose()

:class:`ConnectSite` terminates Connect mTLS and authorizes every connection before
aiohttp sees a byte of it; :func:`connect_middleware` (added by :func:`serve`) exposes
the caller's identity to handlers and enforces L7 intentions per request (403 with a
short reason). Handlers read the caller with :func:`peer_identity_of` or
``request[PEER_KEY]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import BaseConnector, ClientSession, web
from aiohttp.typedefs import Middleware

from consul_connect._tlsserver import TLSServer, check_transport
from consul_connect.discovery import Endpoint
from consul_connect.errors import ConfigError, ConsulConnectError, PeerRejected
from consul_connect.identity import ServiceIdentity
from consul_connect.integrations._common import (
    EndpointKey,
    endpoint_key,
    material_token,
    request_denied,
    routed_path,
    try_endpoints,
)
from consul_connect.integrations.httpx import DEFAULT_MAX_CONNECTION_AGE
from consul_connect.service import Service
from consul_connect.tls import HANDSHAKE_TIMEOUT, verify_server_identity

if TYPE_CHECKING:
    from aiohttp import ClientTimeout
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

__all__ = [
    "PEER_KEY",
    "ConnectConnector",
    "ConnectServer",
    "ConnectSite",
    "connect_middleware",
    "connect_session",
    "peer_identity_of",
    "serve",
]

log = logging.getLogger("consul_connect.integrations.aiohttp")

# aiohttp >= 3.13 warns about plain string keys in request storage.
_RequestKey: Any = getattr(web, "RequestKey", None)
PEER_KEY: Any = (
    _RequestKey("consul_connect_peer", ServiceIdentity)
    if _RequestKey is not None
    else "consul_connect_peer"
)
"""``request[PEER_KEY]``: the caller's :class:`ServiceIdentity` (set by the middleware)."""

# Bytes a not-yet-authorized peer may send before we stop buffering and drop it. The
# gate pauses reading while the authorizer decides, so this only absorbs what was
# already decrypted.
_MAX_PENDING = 256 * 1024

# Identities of connections a ConnectSite accepted, keyed by aiohttp's transport.
_identities: weakref.WeakKeyDictionary[Any, ServiceIdentity] = weakref.WeakKeyDictionary()


# -------------------------------------------------------------------------------- client


@dataclass(eq=False)
class _Pooled:
    """Where one client connection goes and what it was dialled with."""

    host: str
    endpoint: EndpointKey
    material: object
    created: float


class ConnectConnector(BaseConnector):
    """An aiohttp connector that dials Connect services by name.

    The URL host is a Consul name (``api.service.consul``, ``api.service.dc2.consul``,
    ``q.query.consul`` or a bare ``api``); the port in the URL is ignored (the catalog
    gives it). Every new connection presents ``service``'s newest leaf; the server must
    present the identity discovery expects, checked before any request byte is written.
    Instances that refuse, stall or present another identity are skipped.

    Pooled keep-alive connections are not reused once the Service's leaf or roots
    changed, once they are older than ``max_connection_age`` seconds (None: no limit),
    or once their instance left the discovery answer: idle ones are closed, busy ones
    when their response is released.

    ``dial_timeout`` bounds discovery plus all attempts (each TCP connect + handshake is
    also bounded by the session's ``sock_connect`` timeout when set). Raises
    :class:`~consul_connect.errors.ConfigError` for a host that is not a Consul name or a
    proxy URL, :class:`~consul_connect.errors.NoInstancesError`,
    :class:`~consul_connect.errors.ServerIdentityError` (every instance had the wrong
    identity) or :class:`~consul_connect.errors.DialError`. aiohttp hands these to the
    caller wrapped in ``aiohttp.ClientOSError`` (a ``ClientError``) whose ``__cause__`` is
    our error, with the same message. Other keyword arguments go to ``BaseConnector``
    (``limit``, ``keepalive_timeout``, ``force_close`` ...).
    """

    def __init__(
        self,
        service: Service,
        *,
        dial_timeout: float = 10.0,
        max_connection_age: float | None = DEFAULT_MAX_CONNECTION_AGE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._service = service
        self._dial_timeout = dial_timeout
        self._max_age = max_connection_age
        self._pooled: weakref.WeakKeyDictionary[ResponseHandler, _Pooled] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def service(self) -> Service:
        """The Service whose identity this connector presents."""
        return self._service

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: ClientTimeout
    ) -> Connection:
        """A pooled connection still fit for use, else a new Connect connection."""
        host = req.url.raw_host
        if host and self._pooled:
            await self._retire_stale(host)
        return await super().connect(req, traces, timeout)

    async def _retire_stale(self, host: str) -> None:
        try:
            endpoints = await self._service.resolve_async(host, timeout=self._dial_timeout)
        except (ConsulConnectError, TimeoutError):
            endpoints = []  # nothing to dial either: every pooled connection is stale
        present = {endpoint_key(ep) for ep in endpoints}
        material = material_token(self._service)
        now = time.monotonic()
        for proto, info in list(self._pooled.items()):
            if not proto.is_connected():
                self._pooled.pop(proto, None)
                continue
            stale = info.material is not material or (
                self._max_age is not None and now - info.created >= self._max_age
            )
            if info.host == host and info.endpoint not in present:
                stale = True
            if not stale:
                continue
            self._pooled.pop(proto, None)
            # A busy connection finishes its response and is then closed on release; an
            # idle one is closed now, so the pool never hands it out again.
            proto.force_close()
            if proto not in self._acquired:
                proto.close()

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: ClientTimeout
    ) -> ResponseHandler:
        if req.proxy is not None:
            raise ConfigError("Connect connections cannot go through an HTTP proxy")
        host = req.url.raw_host
        if not host:
            raise ConfigError(f"URL {req.url} has no host to resolve")
        svc = self._service
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._dial_timeout
        await svc.wait_ready_async(self._dial_timeout)
        endpoints = await svc.resolve_async(host, timeout=max(0.1, deadline - loop.time()))
        material = material_token(svc)

        async def dial(ep: Endpoint, budget: float) -> ResponseHandler:
            if timeout.sock_connect:
                budget = min(budget, timeout.sock_connect)
            transport: asyncio.BaseTransport | None = None
            try:
                async with asyncio.timeout(budget):
                    transport, proto = await loop.create_connection(
                        self._factory,
                        ep.host,
                        ep.port,
                        ssl=svc.client_context_for(ep),
                        server_hostname="",
                        ssl_handshake_timeout=budget,
                    )
                verify_server_identity(transport, ep.identity)
            except BaseException:
                if transport is not None:
                    transport.abort()  # type: ignore[attr-defined]
                raise
            self._pooled[proto] = _Pooled(host, endpoint_key(ep), material, time.monotonic())
            return proto

        return await try_endpoints(host, endpoints, deadline, dial)


def connect_session(
    service: Service,
    *,
    dial_timeout: float = 10.0,
    max_connection_age: float | None = DEFAULT_MAX_CONNECTION_AGE,
    connector_kwargs: dict[str, Any] | None = None,
    **session_kwargs: Any,
) -> ClientSession:
    """An ``aiohttp.ClientSession`` whose connections go over Connect mTLS.

    Uses a :class:`ConnectConnector` for ``service`` (``dial_timeout``,
    ``max_connection_age`` and ``connector_kwargs`` go to it);
    other keyword arguments go to ``ClientSession``. Call it inside a running event loop
    and close the session (``async with`` or ``await session.close()``).
    """
    connector = ConnectConnector(
        service,
        dial_timeout=dial_timeout,
        max_connection_age=max_connection_age,
        **(connector_kwargs or {}),
    )
    return ClientSession(connector=connector, **session_kwargs)


# -------------------------------------------------------------------------------- server


def peer_identity_of(request: web.BaseRequest) -> ServiceIdentity | None:
    """The verified identity of the service that sent ``request``.

    Returns None when the request did not arrive through a :class:`ConnectSite`.
    """
    found = request.get(PEER_KEY)
    if isinstance(found, ServiceIdentity):
        return found
    transport = request.transport
    return None if transport is None else _identities.get(transport)


class _Gate(asyncio.Protocol):
    """Stands between the TLS transport and aiohttp until the peer is authorized.

    asyncio calls ``connection_made`` once the handshake (client certificate included)
    is done; aiohttp's protocol is created and connected only after the authorizer
    allowed the peer, so a refused peer never reaches the HTTP parser.
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], service: Service, l7: bool) -> None:
        self._factory = factory
        self._service = service
        self._l7 = l7
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._eof = False
        self._closed = False
        self._token: int | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        svc = self._service
        ssl_obj = transport.get_extra_info("ssl_object")
        try:
            identity = svc._authorize_peer_locally(ssl_obj, per_request_l7=self._l7)
        except PeerRejected:  # counted, logged and reported
            transport.abort()
            return
        if identity is not None:  # local data decided at once: no task, no pause
            self._admit(identity)
            return
        transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._ask(ssl_obj))

    async def _ask(self, ssl_obj: Any) -> None:
        svc = self._service
        try:
            identity = await svc.authorize_peer_async(ssl_obj, per_request_l7=self._l7)
        except Exception as exc:  # fail closed on anything, incl. timeouts
            if not isinstance(exc, PeerRejected):
                log.warning("service %s: authorizing a connection failed: %s", svc.name, exc)
            if self._transport is not None:
                self._transport.abort()
            return
        if self._closed:
            return
        self._admit(identity)
        if self._inner is not None and self._transport is not None:
            self._transport.resume_reading()

    def _admit(self, identity: ServiceIdentity) -> None:
        transport = self._transport
        assert transport is not None
        _identities[transport] = identity
        loop = asyncio.get_running_loop()

        def close() -> None:
            # Called from the authorizer's thread when an intention change denies the peer.
            loop.call_soon_threadsafe(transport.abort)

        # A caller admitted for per-request (L7) checks is kept while its intention has
        # L7 permissions: the middleware judges each of its requests.
        self._token = self._service.track_connection(identity, close, per_request_l7=self._l7)
        inner = self._factory()
        self._inner = inner
        inner.connection_made(transport)
        pending, self._pending = self._pending, []
        for chunk in pending:
            inner.data_received(chunk)
        if self._eof and not inner.eof_received():
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > _MAX_PENDING and self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        self._eof = True
        return True  # keep the transport open until the decision

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._token is not None:
            self._service.untrack_connection(self._token)
            self._token = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._inner is not None:
            self._inner.connection_lost(exc)


class ConnectSite(web.BaseSite):
    """An aiohttp site that serves Connect mTLS and admits only authorized services.

    Every handshake uses ``service``'s newest leaf and roots and requires a client
    certificate; the caller's identity is then checked and authorized before aiohttp
    reads a byte (refused peers are closed, counted and reported as ``peer_denied``
    events). Callers whose intention has L7 permissions are let in and judged per
    request only if the application runs :func:`connect_middleware` (as :func:`serve`
    arranges); without it they are refused at connection time, as Consul's authorize
    endpoint would. ``port=0`` picks a free port (see :attr:`port`).

    ``tls_transport="direct"`` (the default) lets OpenSSL read and write each
    connection's socket itself, driven by the event loop; ``"asyncio"`` uses the loop's
    own TLS. The first costs less CPU per request (see the ASGI guide); both behave the
    same to aiohttp.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        service: Service,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        backlog: int = 128,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        tls_transport: Literal["direct", "asyncio"] = "direct",
    ) -> None:
        check_transport(tls_transport)
        super().__init__(runner, backlog=backlog)
        self._service = service
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout
        self._direct = tls_transport == "direct"
        self._bound: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        """The site's URL (``https://host:port``)."""
        host, port = self._bound or (self._host, self._port)
        return f"https://{host}:{port}"

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._bound[1] if self._bound else self._port

    async def start(self) -> None:
        """Bind and start serving; waits (up to 30 s) for the Service's certificates."""
        await self._service.wait_ready_async()
        await super().start()
        server = self._runner.server
        assert server is not None
        factory: Callable[[], asyncio.Protocol] = server
        svc = self._service
        app = getattr(self._runner, "app", None)
        l7 = app is not None and any(m in _l7_middlewares for m in app.middlewares)
        loop = asyncio.get_running_loop()
        listener: Any  # aiohttp only calls close() on what it keeps in _server
        if self._direct:
            listener = svc._direct_server(
                lambda: _Gate(factory, svc, l7),
                self._host,
                self._port,
                self._handshake_timeout,
                self._backlog,
            )
        else:
            listener = await loop.create_server(
                lambda: _Gate(factory, svc, l7),
                self._host,
                self._port,
                ssl=svc.server_context,
                ssl_handshake_timeout=self._handshake_timeout,
                backlog=self._backlog,
            )
        self._server = listener
        if listener.sockets:
            host, port = listener.sockets[0].getsockname()[:2]
            self._bound = (str(host), int(port))

    async def stop(self) -> None:
        """Stop accepting (connections being served are left to the runner)."""
        server = self._server
        await super().stop()
        if isinstance(server, TLSServer):
            await server.wait_closed()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Middlewares made by connect_middleware: a ConnectSite admits callers whose intention
# has L7 permissions only when one of these will judge their requests.
_l7_middlewares: weakref.WeakSet[Any] = weakref.WeakSet()


def connect_middleware(service: Service) -> Middleware:
    """An aiohttp middleware: caller identity for handlers, and L7 intentions per request.

    For each request it sets ``request[PEER_KEY]`` to the caller's identity and asks
    ``service.authorize_request(identity, method, path, headers)``; a denial answers
    ``403`` with a one-line reason and the handler does not run. Requests that did not
    come through a :class:`ConnectSite` (no verified caller) also get ``403``.
    """

    @web.middleware
    async def consul_connect_middleware(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        transport = request.transport
        identity = None if transport is None else _identities.get(transport)
        if identity is None:
            return web.Response(status=403, text="forbidden: no Connect peer identity\n")
        decision = service.authorize_request(
            identity, request.method, routed_path(request.path), list(request.headers.items())
        )
        if not decision.allowed:
            request_denied(service, identity, decision.reason)
            return web.Response(status=403, text=f"forbidden: {decision.reason}\n")
        request[PEER_KEY] = identity
        return await handler(request)

    _l7_middlewares.add(consul_connect_middleware)
    return consul_connect_middleware


class ConnectServer:
    """A running aiohttp application behind a :class:`ConnectSite` (from :func:`serve`)."""

    def __init__(self, runner: web.AppRunner, site: ConnectSite) -> None:
        self.runner = runner
        self.site = site

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.site.port

    async def aclose(self) -> None:
        """Stop listening, finish in-flight requests (runner's shutdown timeout), clean up."""
        await self.runner.cleanup()

    async def __aenter__(self) -> ConnectServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def serve(
    app: web.Application,
    service: Service,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 128,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    shutdown_timeout: float = 10.0,
    tls_transport: Literal["direct", "asyncio"] = "direct",
    **runner_kwargs: Any,
) -> ConnectServer:
    """Serve ``app`` over Connect mTLS on ``host:port`` and return the running server.

    Adds :func:`connect_middleware` in front of the app's own middlewares (so it must be
    called before the app is frozen by another runner), sets up an ``AppRunner`` and a
    :class:`ConnectSite`. Waits up to 30 s for the Service's certificates
    (raises :class:`~consul_connect.errors.NotReadyError`); ``OSError`` if the port is
    taken. Stop it with ``await server.aclose()`` or ``async with``. ``tls_transport``
    is :class:`ConnectSite`'s.
    """
    app.middlewares.insert(0, connect_middleware(service))
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, **runner_kwargs)
    await runner.setup()
    try:
        site = ConnectSite(
            runner,
            service,
            host,
            port,
            backlog=backlog,
            handshake_timeout=handshake_timeout,
            tls_transport=tls_transport,
        )
        await site.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise
    return ConnectServer(runner, site)
