"""Serve an ASGI application (FastAPI, Starlette, or any ASGI callable) on uvicorn as a
Connect-native service.

::

    async with Service("api", agent=cfg) as svc:
        server = await serve(app, svc, port=8443)   # returns once it accepts connections
        ...
        await server.aclose()

    run(app, Service("api"), port=8443)            # blocking, Ctrl-C stops it

Every connection is mutual TLS with the Service's newest leaf and CA roots (a new leaf or
a root rotation applies to the next handshake without a restart). Right after the
handshake, *before uvicorn reads a byte of HTTP*, the peer's certificate must carry one
Consul service identity and the Service's authorizer must allow it; refused peers are
aborted (and counted in ``service.statistics()``).

The application finds the caller in the ASGI scope::

    peer = scope["extensions"]["consul_connect"]
    peer["peer_identity"]   # consul_connect.identity.ServiceIdentity
    peer["peer_uri"]        # "spiffe://<trust-domain>/ns/default/dc/dc1/svc/web"

or with :func:`peer_identity_from_scope`. In Starlette/FastAPI that is
``request.scope["extensions"]["consul_connect"]``.

L7 intentions: with ``enforce_intentions=True`` (the default) the app is wrapped in
:class:`IntentionsMiddleware`, which decides every request (path, method, headers) with
Consul's L7 semantics and answers ``403`` with a short plain-text reason. A caller whose
matching intention has L7 permissions is then admitted at connection level and judged
per request (Consul's authorize endpoint would refuse such a caller outright, since it
cannot see requests); with ``enforce_intentions=False`` it is refused at connect.

HTTP/1.1 is parsed by uvicorn's httptools protocol when httptools is installed (as
uvicorn's own ``http="auto"``; ``pip install 'consul-connect[httptools]'``), else by its
h11 protocol; ``http="h11"`` or ``http="httptools"`` picks one. Both get the same
connection check and scope.

TLS runs on the socket itself (``tls_transport="direct"``, the default): OpenSSL reads
and writes each connection's socket, driven by the event loop (asyncio's or uvloop's),
which saves a copy and several Python calls per record against the loop's own TLS
(``tls_transport="asyncio"``, as plain uvicorn). Either way a response's writes of one
loop step leave as one TLS record. A client has 60 s to complete its handshake; failed
or abandoned handshakes are counted in ``service.statistics()``.

Limits: no HTTP/2; WebSockets are off (``ws="none"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any, Literal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from consul_connect._tlsserver import (
    CoalescingTransport,
    TLSServer,
    TLSSocketTransport,
    bind_socket,
    check_transport,
)
from consul_connect.authz.authorizers import IntentionAuthorizer
from consul_connect.authz.intentions import Decision
from consul_connect.errors import ConfigError, PeerRejected
from consul_connect.identity import ServiceIdentity
from consul_connect.integrations._common import request_denied, routed_path
from consul_connect.service import Service

__all__ = [
    "EXTENSION_KEY",
    "ConnectServer",
    "HTTPImplementation",
    "IntentionsMiddleware",
    "TLSTransport",
    "peer_identity_from_scope",
    "run",
    "serve",
]

log = logging.getLogger("consul_connect.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXTENSION_KEY = "consul_connect"
"""The key under ``scope["extensions"]`` holding ``{"peer_identity", "peer_uri"}``."""

_RESERVED_OPTIONS = frozenset(
    {
        "app",
        "host",
        "port",
        "uds",
        "fd",
        "http",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_keyfile_password",
        "ssl_version",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ciphers",
        "ssl_context_factory",
        "reload",
        "workers",
    }
)


def peer_identity_from_scope(scope: Scope) -> ServiceIdentity | None:
    """The caller's verified identity for a request served by :func:`serve` / :func:`run`.

    Returns None when the scope did not come from a Connect server.
    """
    extensions = scope.get("extensions") or {}
    peer = extensions.get(EXTENSION_KEY)
    if not isinstance(peer, dict):
        return None
    identity = peer.get("peer_identity")
    return identity if isinstance(identity, ServiceIdentity) else None


# ----------------------------------------------------------------------- L7 enforcement


def _authz_path(scope: Scope) -> str:
    """The path intentions are matched against: the decoded one the application routes on.

    So a rule on ``/admin`` also catches ``/%61dmin``, ``/public/../admin`` and
    ``/admin%2F..%2Fpublic`` (see :func:`routed_path`).
    """
    return routed_path(str(scope.get("path") or "/"))


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [
        (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
        for k, v in scope.get("headers") or ()
    ]


def _request_independent(service: Service, identity: ServiceIdentity) -> Decision | None:
    """The decision for every request from ``identity`` when no request detail matters.

    Only for the local intention authorizer: when the intention that matches
    ``identity`` has no L7 permissions (or none matches and the default applies), the
    per-request decision equals this cached connection decision. ``None`` when the
    request must be evaluated (L7 permissions, another authorizer, no local data).
    """
    authorizer = getattr(service, "authorizer", None)  # test doubles may have none
    if type(authorizer) is not IntentionAuthorizer:
        return None
    decision = authorizer.decide(identity)
    if decision is None or (decision.intention is not None and decision.intention.is_l7):
        return None
    return decision


class IntentionsMiddleware:
    """ASGI middleware that enforces Consul L7 intentions on every HTTP request.

    The caller is the identity :func:`serve` put into the scope; the decision comes from
    ``service.authorize_request`` (local data, no agent call): the first matching
    intention decides, L7 permissions in order (path exact/prefix/regex on the decoded
    path, methods, headers), then the default. A denied HTTP request gets ``403`` with a
    plain-text reason and never reaches ``app``; a denied WebSocket is closed with 1008.
    A request without a Connect identity in its scope is denied. Lifespan passes through.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        identity = peer_identity_from_scope(scope)
        if identity is None:
            allowed, reason = False, "no Connect peer identity on this connection"
        elif (fixed := _request_independent(self.service, identity)) is not None:
            # An L4 intention (or the default) decides: the request cannot change it,
            # so its path and headers are not decoded.
            allowed, reason = fixed.allowed, fixed.reason
        else:
            method = str(scope.get("method") or "GET")
            decision = self.service.authorize_request(
                identity, method, _authz_path(scope), _headers(scope)
            )
            allowed, reason = decision.allowed, decision.reason
        if allowed:
            await self.app(scope, receive, send)
            return
        if identity is not None:
            request_denied(self.service, identity, reason)
        log.info(
            "service %s: request %s %s from %s denied: %s",
            self.service.name,
            scope.get("method", "GET"),
            scope.get("path"),
            identity.uri if identity else "unknown peer",
            reason,
        )
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = f"Forbidden by Consul intentions: {reason}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------- connection check


HTTPImplementation = Literal["auto", "h11", "httptools"]
"""Which uvicorn HTTP/1.1 protocol parses requests (``serve(..., http=...)``)."""


def _http_base(http: str) -> type[Any]:
    """uvicorn's protocol class for ``http``; "auto" prefers httptools when installed."""
    if http not in ("auto", "h11", "httptools"):
        raise ConfigError(f"http must be 'auto', 'h11' or 'httptools', not {http!r}")
    if http != "h11":
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError as exc:
            if http == "httptools":
                raise ConfigError(
                    "http='httptools' needs the httptools package "
                    "(pip install 'consul-connect[httptools]')"
                ) from exc
        else:
            return HttpToolsProtocol
    return H11Protocol


def _protocol_class(service: Service, *, per_request: bool, http: str) -> type[Any]:
    """A uvicorn HTTP protocol class that authorizes each connection for ``service``."""
    base = _http_base(http)

    class ConnectProtocol(base):  # type: ignore[misc, valid-type]
        app: ASGIApp
        _cc_state = "pending"
        _cc_cut_off = False  # set by ConnectServer.aclose when its timeout ran out
        _cc_buffer: list[bytes]
        _cc_token: int | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            if not isinstance(transport, TLSSocketTransport):  # that one coalesces itself
                # uvicorn's protocol sees (and writes to) the coalescing wrapper.
                transport = CoalescingTransport(transport, self.loop)
            super().connection_made(transport)
            self._cc_buffer = []
            ssl_obj = transport.get_extra_info("ssl_object")
            if ssl_obj is None:
                self._cc_refuse()
                return
            try:
                verdict = self._cc_check(ssl_obj)
            except PeerRejected:
                self._cc_refuse()
                return
            if verdict is None:
                # The authorizer must ask the agent: hold the connection (no byte is
                # handed to HTTP parsing) until it answers.
                transport.pause_reading()
                task = self.loop.create_task(self._cc_check_async(ssl_obj))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                return
            self._cc_accept(verdict)

        def _cc_check(self, ssl_obj: Any) -> ServiceIdentity | None:
            """The admitted identity, or None when the authorizer must ask the agent.

            With per-request L7 enforcement, a caller whose matching intention has L7
            permissions is admitted here and judged on every request by the middleware.
            """
            # Raises PeerRejected (counted and logged) for a refused caller.
            return service._authorize_peer_locally(ssl_obj, per_request_l7=per_request)

        async def _cc_check_async(self, ssl_obj: Any) -> None:
            try:
                identity = await service.authorize_peer_async(ssl_obj, per_request_l7=per_request)
            except PeerRejected:
                self._cc_refuse()
                return
            except Exception:
                log.exception("service %s: authorizing a connection failed", service.name)
                self._cc_refuse()
                return
            if self.transport.is_closing():
                return
            self._cc_accept(identity)
            self.transport.resume_reading()

        def _cc_refuse(self) -> None:
            self._cc_state = "refused"
            self._cc_buffer = []
            self.transport.abort()

        def _cc_accept(self, identity: ServiceIdentity) -> None:
            inner = self.app
            uri = identity.uri

            async def app_with_peer(scope: Scope, receive: Receive, send: Send) -> None:
                extensions = scope.get("extensions")
                if extensions is None:
                    extensions = scope["extensions"] = {}
                extensions[EXTENSION_KEY] = {"peer_identity": identity, "peer_uri": uri}
                try:
                    await inner(scope, receive, send)
                except asyncio.CancelledError:
                    if not self._cc_cut_off:
                        raise
                    # ConnectServer.aclose cut this connection off after its timeout (and
                    # logged it): the request ends here, with nothing more to send.
                    if self.cycle is not None:
                        self.cycle.disconnected = True

            self.app = app_with_peer
            # Lets the Service abort this connection if a later intention change
            # denies the peer (an L7 intention keeps it: requests are judged one by one).
            loop = self.loop
            transport = self.transport

            def close() -> None:
                loop.call_soon_threadsafe(transport.abort)

            self._cc_token = service.track_connection(identity, close, per_request_l7=per_request)
            self._cc_state = "accepted"
            # From now on the transport hands bytes straight to uvicorn's parser.
            self.__dict__["data_received"] = super().data_received
            if self._cc_buffer:
                data = b"".join(self._cc_buffer)
                self._cc_buffer = []
                super().data_received(data)

        def data_received(self, data: bytes) -> None:
            if self._cc_state == "accepted":
                super().data_received(data)
            elif self._cc_state == "pending":
                self._cc_buffer.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            token, self._cc_token = self._cc_token, None
            if token is not None:
                service.untrack_connection(token)
            super().connection_lost(exc)

    ConnectProtocol.__name__ = ConnectProtocol.__qualname__ = f"Connect{base.__name__}"
    return ConnectProtocol


# ------------------------------------------------------------------------------ server


TLSTransport = Literal["direct", "asyncio"]
"""Who runs TLS for :func:`serve` (``serve(..., tls_transport=...)``).

"direct": OpenSSL reads and writes each connection's socket itself, driven by the
event loop (fewer copies and Python calls per record: the faster choice). "asyncio":
the event loop's own TLS (a memory BIO behind uvicorn's usual transport).
"""

HANDSHAKE_TIMEOUT = 60.0
"""Seconds a client has to complete the TLS handshake (as asyncio's default)."""


class _Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        signals: bool,
        service: Service,
        tls_transport: str,
    ) -> None:
        super().__init__(config)
        self._cc_signals = signals
        self._cc_service = service
        self._cc_direct = tls_transport == "direct"
        self.cc_started = asyncio.Event() if not signals else None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # An embedded server leaves SIGINT/SIGTERM to the application that embeds it.
        if not self._cc_signals:
            yield
            return
        with super().capture_signals():
            yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not self._cc_direct or not sockets:
            await super().startup(sockets=sockets)
        else:
            # uvicorn runs the lifespan startup and creates no listener of its own
            # (no sockets); the TLS servers take its place.
            await super().startup(sockets=[])
            self._cc_listen(sockets)
        if self.cc_started is not None:
            self.cc_started.set()

    def _cc_listen(self, sockets: list[socket.socket]) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        service = self._cc_service

        def create_protocol() -> asyncio.BaseProtocol:
            protocol: asyncio.BaseProtocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )
            return protocol

        servers = [
            TLSServer(
                loop,
                sock,
                service.server_context,
                create_protocol,
                handshake_timeout=HANDSHAKE_TIMEOUT,
                on_handshake_failure=service._handshake_failed,
                backlog=config.backlog,
            )
            for sock in sockets
        ]
        # uvicorn only calls close() and wait_closed() on what it holds here.
        self.servers.extend(servers)  # type: ignore[arg-type]


def _config(
    app: ASGIApp,
    service: Service,
    host: str,
    port: int,
    *,
    enforce_intentions: bool,
    http: str,
    **options: Any,
) -> uvicorn.Config:
    bad = sorted(_RESERVED_OPTIONS.intersection(options))
    if bad:
        raise ConfigError(f"serve()/run() set these uvicorn options themselves: {', '.join(bad)}")
    if enforce_intentions and not isinstance(app, IntentionsMiddleware):
        app = IntentionsMiddleware(app, service)
    options.setdefault("ws", "none")
    # Peers are authenticated by mTLS; X-Forwarded-* from a mesh peer is not trusted.
    options.setdefault("proxy_headers", False)
    options.setdefault("timeout_keep_alive", 15)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_protocol_class(service, per_request=enforce_intentions, http=http),
        **options,
    )
    config.load()
    # After load(), which would otherwise replace it with a file-based context: every
    # handshake now takes the Service's newest leaf and roots.
    config.ssl = service.server_context
    return config


class ConnectServer:
    """A running Connect-native uvicorn server (made by :func:`serve`).

    ``host``/``port`` are the bound address (useful with ``port=0``); :meth:`aclose`
    stops accepting, lets running requests finish (up to ``timeout``), runs the app's
    lifespan shutdown and returns. Usable as ``async with``.
    """

    def __init__(self, server: _Server, task: asyncio.Task[None], host: str, port: int) -> None:
        self._server = server
        self._task = task
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """``https://host:port`` of the listener (the peer still needs a Connect leaf)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def serving(self) -> bool:
        """True until the server has stopped."""
        return not self._task.done()

    async def wait_closed(self) -> None:
        """Wait until the server stops; re-raise what made it stop, if it failed."""
        await asyncio.shield(self._task)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop the server; connections still busy after ``timeout`` s are cut off.

        Cut-off connections are aborted and their requests cancelled (logged once, as a
        warning); the app's lifespan shutdown still runs.
        """
        server = self._server
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
            return
        except TimeoutError:
            pass
        except Exception:
            log.exception("Connect server on port %d failed", self.port)
            return
        # uvicorn itself would wait for these forever (or, forced, leave them running).
        state = server.server_state
        busy = list(state.connections)
        log.warning(
            "Connect server on port %d: cutting off %d connection(s) still busy after %gs",
            self.port,
            len(busy),
            timeout,
        )
        for connection in busy:
            # Our ConnectProtocol: its app wrapper then ends the cancelled request quietly.
            setattr(connection, "_cc_cut_off", True)  # noqa: B010  (mypy: a union type)
            connection.transport.abort()
        for task in list(state.tasks):
            task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 5.0)
        except TimeoutError:
            server.force_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
        except Exception:
            log.exception("Connect server on port %d failed", self.port)

    async def __aenter__(self) -> ConnectServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"ConnectServer({self.url!r}, serving={self.serving})"


async def serve(
    app: ASGIApp,
    service: Service,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    enforce_intentions: bool = True,
    ready_timeout: float = 30.0,
    http: HTTPImplementation = "auto",
    tls_transport: TLSTransport = "direct",
    **uvicorn_options: Any,
) -> ConnectServer:
    """Start serving ``app`` as ``service`` on the running loop; return once it listens.

    Waits (up to ``ready_timeout`` s) for the Service's certificates and its
    authorizer's first data (so early callers are not refused), binds
    ``host:port`` (0 picks a free port: read :attr:`ConnectServer.port`) and runs the
    app's lifespan startup. ``uvicorn_options`` go to ``uvicorn.Config`` (for example
    ``log_level``, ``lifespan``, ``limit_concurrency``, ``timeout_keep_alive``, default
    15); TLS, protocol and address options are set here and refused. ``http`` picks
    the HTTP/1.1 parser: "httptools" (faster; needs the httptools package), "h11", or
    "auto" (httptools when installed). ``tls_transport`` picks who runs TLS:
    "direct" (OpenSSL on the socket itself, the faster default) or "asyncio" (the event
    loop's TLS, as plain uvicorn). Logging is left as configured unless
    ``log_config`` is passed.

    Raises :class:`~consul_connect.errors.NotReadyError` when the Service has no
    certificate in time, :class:`~consul_connect.errors.ConfigError` for reserved
    options, ``OSError`` when the address cannot be bound, ``RuntimeError`` when the
    app's lifespan startup fails, ``TimeoutError`` if startup takes longer than
    ``ready_timeout``.
    """
    loop = asyncio.get_running_loop()
    check_transport(tls_transport)
    # A ready Service also has its authorizer's first data, so early callers are not
    # refused for want of intentions.
    await service.wait_ready_async(ready_timeout)
    options = dict(uvicorn_options)
    options.setdefault("log_config", None)
    config = _config(
        app, service, host, port, enforce_intentions=enforce_intentions, http=http, **options
    )
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    server = _Server(config, signals=False, service=service, tls_transport=tls_transport)
    assert server.cc_started is not None
    started = server.cc_started

    async def main() -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:
            # uvicorn exits the process when the lifespan startup fails.
            raise RuntimeError("the ASGI application failed its lifespan startup") from exc
        finally:
            sock.close()

    task = loop.create_task(main(), name=f"consul-connect asgi {service.name}")
    waiter = asyncio.ensure_future(started.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, task}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
    if task in done:
        task.result()  # raises the startup failure
        raise RuntimeError("the Connect server stopped during startup")
    if not done:
        server.should_exit = True
        raise TimeoutError(f"the Connect server did not start within {ready_timeout:g}s")
    log.info("service %s serving Connect mTLS on %s:%d", service.name, bound_host, bound_port)
    return ConnectServer(server, task, str(bound_host), int(bound_port))


def run(
    app: ASGIApp,
    service: Service,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    enforce_intentions: bool = True,
    ready_timeout: float = 30.0,
    http: HTTPImplementation = "auto",
    tls_transport: TLSTransport = "direct",
    **uvicorn_options: Any,
) -> None:
    """Serve ``app`` as ``service`` until SIGINT/SIGTERM (blocking; uvicorn's own loop).

    Same arguments and guarantees as :func:`serve`; uvicorn configures logging as usual.
    The Service is not closed on return: it belongs to the caller.
    """
    check_transport(tls_transport)
    service.wait_ready(ready_timeout)
    config = _config(
        app,
        service,
        host,
        port,
        enforce_intentions=enforce_intentions,
        http=http,
        **uvicorn_options,
    )
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    log.warning("service %s serving Connect mTLS on %s:%d", service.name, bound_host, bound_port)
    try:
        _Server(config, signals=True, service=service, tls_transport=tls_transport).run(
            sockets=[sock]
        )
    finally:
        sock.close()
