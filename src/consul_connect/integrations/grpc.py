"""gRPC (grpcio) over Consul Connect.

Server::

    server = connect_server(service)                 # or grpc.server(..., interceptors=[
    add_connect_port(server, service, "0.0.0.0:8502")  #    ConnectServerInterceptor(service)])
    server.start()

:func:`add_connect_port` serves TLS with ``grpc.dynamic_ssl_server_credentials``: gRPC
asks for certificates on every new connection, so a new leaf or root set applies
without a restart; client certificates are required and checked against the current
roots. gRPC Python has no per-connection hook, so :class:`ConnectServerInterceptor`
(and :class:`AioConnectServerInterceptor` for ``grpc.aio``) authorizes every *call*
from ``context.auth_context()``: the caller's SPIFFE ID, the service's authorizer, and
for intentions with L7 permissions the gRPC path (``/pkg.Service/Method``, method
``POST``). A refusal aborts the call with ``PERMISSION_DENIED`` and a short reason
before the servicer runs.

Client::

    channel = connect_channel(service, "api.service.consul")
    stub = MyStub(channel)

gRPC Python checks a server's certificate by DNS name only and its client certificates
are fixed per channel, which fits neither SPIFFE IDs nor rotation. So the channel
speaks plaintext HTTP/2 to a private bridge: a Unix socket in a fresh ``0700``
directory, served on the Service's background loop. For each connection gRPC opens,
the bridge resolves the target, dials it with the Service's newest leaf (ALPN ``h2``),
checks the server's SPIFFE ID, and only then relays bytes; a server with the wrong
identity gets none. gRPC sees a refused dial as ``UNAVAILABLE`` and retries with its
usual backoff; :attr:`ConnectChannel.last_error` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
import ssl
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent import futures
from functools import lru_cache
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from consul_connect._runtime import Runtime
from consul_connect.discovery import Endpoint
from consul_connect.errors import ConsulConnectError, DialError, PeerRejected
from consul_connect.identity import ServiceIdentity
from consul_connect.integrations._common import current_material, request_denied, try_endpoints
from consul_connect.service import Service
from consul_connect.tls import (
    HANDSHAKE_TIMEOUT,
    DynamicClientContext,
    TLSMaterial,
    peer_identity,
    verify_server_identity,
)

__all__ = [
    "DEFAULT_MAX_CONNECTION_AGE",
    "AioConnectChannel",
    "AioConnectServerInterceptor",
    "ConnectChannel",
    "ConnectServerInterceptor",
    "add_connect_port",
    "connect_aio_channel",
    "connect_aio_server",
    "connect_channel",
    "connect_server",
    "peer_identity_of",
    "server_credentials",
]

log = logging.getLogger("consul_connect.integrations.grpc")

_NO_LONGER_ALLOWED = "consul-connect: an intention change denied the caller"
_ending: set[asyncio.Task[None]] = set()


def _background(task: asyncio.Task[None]) -> None:
    """Keep a reference to ``task`` until it is done (the loop holds only weak ones)."""
    _ending.add(task)
    task.add_done_callback(_ending.discard)
_RELAY_CHUNK = 64 * 1024


# ------------------------------------------------------------------------ server: TLS


def _server_config(material: TLSMaterial) -> grpc.ServerCertificateConfiguration:
    leaf = material.leaf
    return grpc.ssl_server_certificate_configuration(
        [(leaf.private_key_pem.encode("ascii"), leaf.full_chain_pem.encode("ascii"))],
        root_certificates=material.roots.cadata.encode("ascii"),
    )


def server_credentials(service: Service, *, timeout: float = 30.0) -> grpc.ServerCredentials:
    """gRPC server credentials that follow ``service``'s leaf and roots.

    Client certificates are required and must chain to the current roots. gRPC calls
    back on every new connection; a changed (leaf, roots) snapshot is handed over then,
    so rotation needs no restart (open connections keep their session). Waits up to
    ``timeout`` s for certificates (raises :class:`~consul_connect.errors.NotReadyError`).
    Authorization is *not* part of this: install :class:`ConnectServerInterceptor`.
    """
    service.wait_ready(timeout)
    first = current_material(service)
    last: list[TLSMaterial] = [first]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Runs on a gRPC core thread per handshake: only compare references here.
        current = current_material(service)
        if current is last[0]:
            return None
        last[0] = current
        return _server_config(current)

    return grpc.dynamic_ssl_server_credentials(
        _server_config(first),
        fetch,  # type: ignore[arg-type]  # gRPC accepts None ("keep the current config")
        require_client_authentication=True,
    )


def add_connect_port(server: grpc.Server | grpc.aio.Server, service: Service, address: str) -> int:
    """Add a Connect mTLS port to a (sync or aio) gRPC server; return the bound port.

    ``address`` is ``host:port`` (port 0 picks a free one). The server must also carry
    :class:`ConnectServerInterceptor` / :class:`AioConnectServerInterceptor` (as
    :func:`connect_server` / :func:`connect_aio_server` set up): the TLS layer alone admits
    every service of the mesh. Raises ``RuntimeError`` if gRPC cannot bind.
    """
    return server.add_secure_port(address, server_credentials(service))


# ------------------------------------------------------------------ server: authorization


class _PemPeer:
    """Just enough of an SSL object for the Service's peer checks: the caller's DER leaf
    (None when the connection carried no client certificate)."""

    server_side = True

    def __init__(self, der: bytes | None) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self._der


@lru_cache(maxsize=2048)
def _der(pem: bytes) -> bytes | None:
    try:
        return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


def _peer(context: Any) -> _PemPeer:
    """The caller's certificate, from the call's auth context."""
    auth = context.auth_context() or {}
    if b"ssl" not in (auth.get("transport_security_type") or []):
        return _PemPeer(None)
    pems = auth.get("x509_pem_cert") or []
    return _PemPeer(_der(bytes(pems[0])) if pems else None)


def peer_identity_of(context: Any) -> ServiceIdentity | None:
    """The verified identity of the service calling this RPC (sync or aio context).

    Returns None when the call did not arrive over Connect mTLS or the certificate holds
    no service identity (an interceptor would have refused such a call).
    """
    try:
        return peer_identity(_peer(context))
    except PeerRejected:
        return None


def _headers(metadata: Any) -> list[tuple[str, str]]:
    # Binary ("-bin") metadata has bytes values; L7 header rules only compare text.
    return [(str(k), v) for k, v in (metadata or ()) if isinstance(v, str)]


def _per_call(service: Service, identity: ServiceIdentity, method: str, md: Any) -> str | None:
    """The L7 verdict for one call from an admitted caller: None, or the denial text.

    gRPC calls are HTTP/2 ``POST`` requests to ``/pkg.Service/Method``; that is what
    intentions with L7 permissions are matched against (L4 intentions allow every call).
    """
    decision = service.authorize_request(identity, "POST", method, _headers(md))
    if decision.allowed:
        return None
    request_denied(service, identity, decision.reason)
    return f"consul-connect: {decision.reason}"


def _sync_check(
    service: Service, context: Any, method: str, md: Any
) -> tuple[ServiceIdentity | None, str | None]:
    """The admitted caller and None when the call may proceed, else the
    PERMISSION_DENIED message."""
    try:
        identity = service.authorize_peer(_peer(context), per_request_l7=True)
    except PeerRejected as exc:
        return None, f"consul-connect: {exc.reason}"
    except Exception as exc:  # fail closed on anything, incl. agent timeouts
        return None, f"consul-connect: authorization failed: {exc or type(exc).__name__}"
    return identity, _per_call(service, identity, method, md)


async def _async_check(
    service: Service, context: Any, method: str, md: Any
) -> tuple[ServiceIdentity | None, str | None]:
    try:
        identity = await service.authorize_peer_async(_peer(context), per_request_l7=True)
    except PeerRejected as exc:
        return None, f"consul-connect: {exc.reason}"
    except Exception as exc:  # fail closed on anything, incl. agent timeouts
        return None, f"consul-connect: authorization failed: {exc or type(exc).__name__}"
    return identity, _per_call(service, identity, method, md)


def _track_sync_call(service: Service, identity: ServiceIdentity, context: Any) -> None:
    """Let a later intention change that denies the caller cancel this call (a stream
    may outlive the decision that admitted it), as HTTP servers cut connections."""
    token = service.track_connection(identity, context.cancel, per_request_l7=True)
    if not context.add_callback(lambda: service.untrack_connection(token)):
        service.untrack_connection(token)  # the call has already ended


def _rebuild(handler: Any, wrap: Callable[[Any], Any]) -> Any:
    """A method handler like ``handler`` whose behaviour is ``wrap(behaviour)``."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kw)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kw)


class ConnectServerInterceptor(grpc.ServerInterceptor):
    """Authorizes every call on a sync ``grpc.server`` before the servicer runs.

    The caller is the SPIFFE ID in its (already chain-verified) client certificate.
    The Service's authorizer decides locally (``decide``), or, for authorizers that must
    ask the agent, within 10 s on the Service's background loop. Intentions with L7
    permissions are evaluated per call with the gRPC method path. A refusal aborts with
    ``PERMISSION_DENIED`` (details ``"consul-connect: <reason>"``), is counted in
    ``service.statistics()`` and reported as a ``peer_denied`` event (the caller is
    denied) or a ``request_denied`` event (L7 permissions deny this call).
    """

    def __init__(self, service: Service) -> None:
        self._service = service

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service = self._service
        method = handler_call_details.method
        md = handler_call_details.invocation_metadata

        def wrap(behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            def authorized(request: Any, context: Any) -> Any:
                identity, denial = _sync_check(service, context, method, md)
                if denial is not None or identity is None:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, denial)
                    raise AssertionError("unreachable: abort() raises")
                _track_sync_call(service, identity, context)
                return behaviour(request, context)

            return authorized

        return _rebuild(handler, wrap)


class AioConnectServerInterceptor(grpc.aio.ServerInterceptor):
    """The ``grpc.aio`` form of :class:`ConnectServerInterceptor` (same rules)."""

    def __init__(self, service: Service) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service = self._service
        method = handler_call_details.method
        md = handler_call_details.invocation_metadata

        async def check(context: Any) -> int:
            """Authorize the call; return its token for ``service.untrack_connection``."""
            identity, denial = await _async_check(service, context, method, md)
            if denial is not None or identity is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, denial)
                raise AssertionError("unreachable: abort() raises")
            # A later intention change that denies the caller cancels the call (a
            # stream may outlive the decision that admitted it).
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None

            async def end() -> None:
                # abort() sends the status, then raises (here, not in the servicer).
                with contextlib.suppress(BaseException):
                    await context.abort(grpc.StatusCode.CANCELLED, _NO_LONGER_ALLOWED)
                task.cancel()

            def cancel() -> None:
                loop.call_soon_threadsafe(lambda: _background(loop.create_task(end())))

            return service.track_connection(identity, cancel, per_request_l7=True)

        def wrap(behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            # Keep the behaviour's kind: gRPC iterates async generators and awaits the rest.
            if inspect.isasyncgenfunction(behaviour):

                async def authorized_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    token = await check(context)
                    try:
                        async for item in behaviour(request, context):
                            yield item
                    finally:
                        service.untrack_connection(token)

                return authorized_stream

            async def authorized(request: Any, context: Any) -> Any:
                token = await check(context)
                try:
                    result = behaviour(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                finally:
                    service.untrack_connection(token)

            return authorized

        return _rebuild(handler, wrap)


DEFAULT_MAX_CONNECTION_AGE = 300.0
"""Seconds after which a server asks a client (HTTP/2 GOAWAY) to move to a new connection."""


def _server_options(
    options: Sequence[tuple[str, Any]] | None, max_connection_age: float | None
) -> list[tuple[str, Any]]:
    """gRPC options with a bounded connection age, unless the caller set one.

    A connection's TLS session is fixed at its handshake; a bounded age makes clients
    reconnect (gracefully: GOAWAY, then in-flight calls finish within the grace period)
    and so meet the current leaf and roots on both sides after a rotation.
    """
    opts = list(options or [])
    names = {k for k, _ in opts}
    if max_connection_age is not None and "grpc.max_connection_age_ms" not in names:
        opts.append(("grpc.max_connection_age_ms", int(max_connection_age * 1000)))
        if "grpc.max_connection_age_grace_ms" not in names:
            opts.append(("grpc.max_connection_age_grace_ms", 30_000))
    return opts


def connect_server(
    service: Service,
    *,
    executor: futures.ThreadPoolExecutor | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] | None = None,
    max_connection_age: float | None = DEFAULT_MAX_CONNECTION_AGE,
    **kwargs: Any,
) -> grpc.Server:
    """A sync ``grpc.Server`` with :class:`ConnectServerInterceptor` as first interceptor.

    ``executor`` defaults to a 16-thread pool. Connections older than
    ``max_connection_age`` seconds (None: no limit) are gracefully recycled so both
    sides pick up rotated certificates. ``options`` and other keyword arguments go to
    ``grpc.server``. Add ports with :func:`add_connect_port`.
    """
    pool = executor if executor is not None else futures.ThreadPoolExecutor(max_workers=16)
    return grpc.server(
        pool,
        interceptors=[ConnectServerInterceptor(service), *interceptors],
        options=_server_options(options, max_connection_age),
        **kwargs,
    )


def connect_aio_server(
    service: Service,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] | None = None,
    max_connection_age: float | None = DEFAULT_MAX_CONNECTION_AGE,
    **kwargs: Any,
) -> grpc.aio.Server:
    """A ``grpc.aio.Server`` with :class:`AioConnectServerInterceptor` first.

    Call it with an event loop running. ``max_connection_age`` as for
    :func:`connect_server`; ``options`` and other keyword arguments go to
    ``grpc.aio.server``.
    """
    return grpc.aio.server(
        interceptors=[AioConnectServerInterceptor(service), *interceptors],
        options=_server_options(options, max_connection_age),
        **kwargs,
    )


# ----------------------------------------------------------------------- client: bridge

# One h2 client context per Service: the Service's own contexts advertise no ALPN
# (they also serve HTTP/1.1), while gRPC servers expect "h2".
_h2_contexts: weakref.WeakKeyDictionary[Service, DynamicClientContext] = weakref.WeakKeyDictionary()


def _h2_context(service: Service) -> DynamicClientContext:
    ctx = _h2_contexts.get(service)
    if ctx is not None:
        return ctx
    ref = weakref.ref(service)
    cache: list[TLSMaterial | None] = [None, None]

    def current() -> TLSMaterial:
        svc = ref()
        if svc is None:
            raise DialError("the Service was garbage-collected")
        base = current_material(svc)
        derived = cache[1]
        if cache[0] is not base or derived is None:
            derived = TLSMaterial.build(base.leaf, base.roots, alpn_protocols=["h2"])
            cache[0], cache[1] = base, derived
        return derived

    ctx = DynamicClientContext(current, resume_sessions=service.client_context.resume_sessions)
    _h2_contexts[service] = ctx
    return ctx


class _Bridge:
    """A Unix-socket listener that relays each accepted stream over a fresh Connect dial.

    Lives on the Service's background loop; the socket sits in a private (0700)
    directory so no other local user can borrow this service's identity through it.
    """

    def __init__(self, service: Service, target: str, dial_timeout: float) -> None:
        self._service = service
        self._target = target
        self._dial_timeout = dial_timeout
        self.last_error = ""
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False
        self._runtime = Runtime.acquire()
        self._dir = tempfile.mkdtemp(prefix="consul-connect-grpc-")
        self.path = os.path.join(self._dir, "bridge.sock")
        try:
            self._server = self._runtime.run(self._start(), timeout=10.0)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._runtime.release()
            raise

    async def _start(self) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._handle, path=self.path)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        svc = self._service
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._dial_timeout
        await svc.wait_ready_async(self._dial_timeout)
        endpoints = await svc.resolve_async(
            self._target, timeout=max(0.1, deadline - loop.time())
        )
        ctx = _h2_context(svc)

        async def dial(
            ep: Endpoint, budget: float
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(budget):
                    reader, writer = await asyncio.open_connection(
                        ep.host,
                        ep.port,
                        ssl=ctx.for_endpoint((ep.host, ep.port)),
                        server_hostname="",
                        ssl_handshake_timeout=min(budget, HANDSHAKE_TIMEOUT),
                    )
                verify_server_identity(writer, ep.identity)
            except BaseException:
                if writer is not None:
                    writer.transport.abort()
                raise
            return reader, writer

        return await try_endpoints(self._target, endpoints, deadline, dial)

    async def _handle(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        if self._closed:
            local_w.transport.abort()
            return
        self._writers.add(local_w)
        remote_w: asyncio.StreamWriter | None = None
        try:
            try:
                remote_r, remote_w = await self._dial()
            except (ConsulConnectError, TimeoutError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("gRPC bridge to %s: %s", self._target, self.last_error)
                local_w.transport.abort()
                return
            self.connections += 1
            self._writers.add(remote_w)
            pumps = [
                asyncio.ensure_future(_pump(local_r, remote_w)),
                asyncio.ensure_future(_pump(remote_r, local_w)),
            ]
            try:
                # h2 never half-closes usefully: when one side ends, end both.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for w in (local_w, remote_w):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _aclose(self) -> None:
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(TimeoutError, RuntimeError):
                self._runtime.run(self._aclose(), timeout=10.0)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._runtime.release()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        while True:
            data = await reader.read(_RELAY_CHUNK)
            if not data:
                return
            writer.write(data)
            await writer.drain()


def _channel_setup(
    service: Service,
    target: str,
    options: Sequence[tuple[str, Any]] | None,
    dial_timeout: float,
) -> tuple[_Bridge, str, list[tuple[str, Any]]]:
    bridge = _Bridge(service, target, dial_timeout)
    opts = list(options or [])
    if not any(k == "grpc.default_authority" for k, _ in opts):
        # Without this, :authority would be the bridge's socket path.
        opts.append(("grpc.default_authority", target))
    return bridge, f"unix:{bridge.path}", opts


class ConnectChannel(grpc.Channel):
    """A ``grpc.Channel`` to a Connect service (from :func:`connect_channel`).

    Behaves like the channel it wraps; :meth:`close` also stops its bridge.
    """

    def __init__(self, channel: grpc.Channel, bridge: _Bridge) -> None:
        self._channel = channel
        self._bridge = bridge

    @property
    def last_error(self) -> str:
        """Why the most recent dial failed (empty if none has)."""
        return self._bridge.last_error

    @property
    def connections(self) -> int:
        """How many Connect connections this channel has opened so far."""
        return self._bridge.connections

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._channel.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        """Close the channel (cancelling its RPCs), then the bridge and its connections."""
        try:
            self._channel.close()
        finally:
            self._bridge.close()

    def __enter__(self) -> ConnectChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect_channel(
    service: Service,
    target: str,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    dial_timeout: float = 10.0,
) -> ConnectChannel:
    """A sync gRPC channel to the Connect service ``target``, as ``service``.

    ``target`` is a service name or Consul DNS-style name (``api``,
    ``api.service.consul``, ``api.service.dc2.consul``, ``q.query.consul``). Each
    connection gRPC opens is dialled afresh: discovery, the newest leaf, ALPN ``h2``, and
    the server's SPIFFE ID checked before any gRPC byte is relayed, within
    ``dial_timeout`` s. A failed dial shows up as ``UNAVAILABLE`` on the RPC (see
    :attr:`ConnectChannel.last_error`). ``options``/``compression`` go to gRPC.
    Close the channel when done.
    """
    bridge, address, opts = _channel_setup(service, target, options, dial_timeout)
    try:
        channel = grpc.insecure_channel(address, options=opts, compression=compression)
    except BaseException:
        bridge.close()
        raise
    return ConnectChannel(channel, bridge)


class AioConnectChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` to a Connect service (from :func:`connect_aio_channel`)."""

    def __init__(self, channel: grpc.aio.Channel, bridge: _Bridge) -> None:
        self._channel = channel
        self._bridge = bridge

    @property
    def last_error(self) -> str:
        """Why the most recent dial failed (empty if none has)."""
        return self._bridge.last_error

    @property
    def connections(self) -> int:
        """How many Connect connections this channel has opened so far."""
        return self._bridge.connections

    async def __aenter__(self) -> AioConnectChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel (after ``grace`` s for RPCs in flight), then the bridge."""
        try:
            await self._channel.close(grace)
        finally:
            await asyncio.to_thread(self._bridge.close)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)


def connect_aio_channel(
    service: Service,
    target: str,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    dial_timeout: float = 10.0,
) -> AioConnectChannel:
    """The ``grpc.aio`` form of :func:`connect_channel` (call it with a loop running).

    Close it with ``await channel.close()`` or ``async with``.
    """
    bridge, address, opts = _channel_setup(service, target, options, dial_timeout)
    try:
        channel = grpc.aio.insecure_channel(
            address, options=opts, compression=compression, interceptors=interceptors
        )
    except BaseException:
        bridge.close()
        raise
    return AioConnectChannel(channel, bridge)
