"""httpx transports that send requests to Connect services over mTLS.

::

    with Service("web", agent=cfg) as svc, httpx.Client(transport=ConnectTransport(svc)) as c:
        c.get("https://api.service.consul/v1/items")

The URL's host names a Consul service the way Consul DNS would (``api.service.consul``,
``api.connect.dc2.consul``, ``q.query.consul`` or a bare ``api``); the port in the URL
is ignored, the instance's catalog port is dialled. ``http://`` and ``https://`` URLs
both travel over Connect mTLS: Connect has no plaintext mode, and the scheme only
decides what ``scope["scheme"]`` the server reports. For every new connection the
transport resolves the name, dials an instance with the Service's newest leaf, checks
that the server presents the expected service identity before writing a byte, and moves
on to the next instance when the TCP connect, the handshake or the identity check fails.

Keep-alive connections live in one httpcore pool per instance. A pool is retired (its
idle connections closed, busy ones finished first) when the Service's certificate
material changes (new leaf or new CA roots), when it is older than
``max_connection_age``, or when its instance is no longer in the discovery answer, so a
long-lived client never keeps talking with stale certificates or to removed instances.

Errors are httpx's: :class:`httpx.ConnectError` / :class:`httpx.ConnectTimeout` when no
instance could be reached (``__cause__`` is the
:class:`~consul_connect.errors.DialError` listing every instance tried), and the usual
read/write/protocol errors afterwards. A server that refuses *our* certificate shows up
as :class:`httpx.RemoteProtocolError` ("Server disconnected") at the first read.

HTTP/1.1 only. :class:`AsyncConnectTransport` runs on asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import httpcore
import httpx

from consul_connect.discovery import Endpoint
from consul_connect.errors import ConsulConnectError, ServerIdentityError
from consul_connect.integrations._common import (
    PoolEntry,
    PoolSet,
    dial_error,
    material_token,
    resolve_failure,
)
from consul_connect.service import Service
from consul_connect.tls import verify_server_identity

__all__ = ["DEFAULT_LIMITS", "AsyncConnectTransport", "ConnectTransport"]

DEFAULT_TIMEOUT = 10.0
"""Seconds for discovery plus TCP plus TLS when a request carries no connect timeout."""

DEFAULT_MAX_CONNECTION_AGE = 300.0
"""Seconds after which an instance's pool is retired and its connections re-dialled."""

DEFAULT_LIMITS = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0
)
"""Per-instance pool limits. The idle expiry sits below uvicorn's 5 s keep-alive so the
client drops an idle connection before a server is likely to close it under a request."""

P = TypeVar("P")

# ----------------------------------------------------------------- shared helpers


def _connect_timeout(request: httpx.Request, default: float) -> float:
    timeouts = request.extensions.get("timeout") or {}
    value = timeouts.get("connect")
    return default if value is None else float(value)


def _core_request(request: httpx.Request, connect_timeout: float, content: Any) -> httpcore.Request:
    extensions = dict(request.extensions)
    timeouts = dict(extensions.get("timeout") or {})
    timeouts["connect"] = connect_timeout
    extensions["timeout"] = timeouts
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=request.url.raw_scheme,
            host=request.url.raw_host,
            port=request.url.port,
            target=request.url.raw_path,
        ),
        headers=request.headers.raw,
        content=content,
        extensions=extensions,
    )


def _httpx_error(exc: Exception, request: httpx.Request) -> Exception:
    """The httpx exception for an httpcore one (same class name), else ``exc``."""
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] != "httpcore":
            continue
        target = getattr(httpx, cls.__name__, None)
        if isinstance(target, type) and issubclass(target, httpx.TransportError):
            return target(str(exc), request=request)
    return exc


class _WrongIdentity(httpcore.ConnectError):
    """The server's certificate named another service (a class, since httpcore's pool
    re-raises connect errors ``from None``)."""


class _Attempts:
    """The instances one request tried, and the httpx error when none worked."""

    def __init__(self, request: httpx.Request, target: str) -> None:
        self.request = request
        self.target = target
        self.failures: list[tuple[str, str]] = []
        self.identity_failures = 0
        self.timed_out = False

    def failed(self, ep: Endpoint, exc: BaseException) -> None:
        self.timed_out = isinstance(exc, httpcore.ConnectTimeout)
        self.identity_failures += isinstance(exc, _WrongIdentity)
        self.failures.append((ep.address, str(exc) or type(exc).__name__))

    def error(self) -> httpx.TransportError:
        cause = dial_error(self.target, self.failures, self.identity_failures)
        cls = httpx.ConnectTimeout if self.timed_out else httpx.ConnectError
        error = cls(str(cause), request=self.request)
        error.__cause__ = cause
        return error


def _resolve_failure(exc: BaseException, request: httpx.Request, target: str) -> Exception:
    message, timed_out = resolve_failure(exc, target)
    cls = httpx.ConnectTimeout if timed_out else httpx.ConnectError
    err = cls(message, request=request)
    err.__cause__ = exc
    return err


class _Dialled:
    """Base of the streams our backends return: already TLS, identity already checked.

    httpcore calls ``start_tls`` only for ``https`` origins; the connection is mTLS for
    both schemes, so the upgrade is a no-op.
    """


# ------------------------------------------------------------------------------ sync


class _SyncStream(_Dialled, httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return self

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _SyncEndpointBackend(httpcore.NetworkBackend):
    """Dials one instance: TCP, then TLS with the Service's newest leaf, then identity."""

    def __init__(self, service: Service, endpoint: Endpoint) -> None:
        self._service = service
        self._endpoint = endpoint
        self._tcp = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        ep = self._endpoint
        budget = DEFAULT_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + budget
        raw = self._tcp.connect_tcp(
            ep.host, ep.port, budget, local_address, socket_options or ()
        )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raw.close()
            raise httpcore.ConnectTimeout("deadline exceeded before the TLS handshake")
        tls = raw.start_tls(
            self._service.client_context_for(ep), server_hostname=None, timeout=remaining
        )
        try:
            verify_server_identity(tls.get_extra_info("socket"), ep.identity)
        except ServerIdentityError as exc:
            tls.close()
            raise _WrongIdentity(f"wrong server identity: {exc}") from exc
        except BaseException:
            tls.close()
            raise
        return _SyncStream(tls)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _SyncBody(httpx.SyncByteStream):
    def __init__(
        self, stream: Iterable[bytes], request: httpx.Request, done: Callable[[], None]
    ) -> None:
        self._stream = stream
        self._request = request
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except httpcore.TimeoutException as exc:
            raise _httpx_error(exc, self._request) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _httpx_error(exc, self._request) from exc

    def close(self) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        try:
            closer = getattr(self._stream, "close", None)
            if closer is not None:
                closer()
        finally:
            done()


class _Settings(Generic[P]):
    """What both transports are configured with, and their per-instance pools."""

    def __init__(
        self,
        service: Service,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connection_age: float | None = DEFAULT_MAX_CONNECTION_AGE,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        self._service = service
        self._timeout = timeout
        self._limits = limits
        self._pools: PoolSet[P] = PoolSet(max_connection_age)

    def _pool_options(self) -> dict[str, Any]:
        return {
            "ssl_context": self._service.client_context,
            "max_connections": self._limits.max_connections,
            "max_keepalive_connections": self._limits.max_keepalive_connections,
            "keepalive_expiry": self._limits.keepalive_expiry,
            "http1": True,
            "http2": False,
            "retries": 0,
        }


class ConnectTransport(_Settings[httpcore.ConnectionPool], httpx.BaseTransport):
    """An httpx transport that reaches Consul services over Connect mTLS.

    ``ConnectTransport(service)`` dials as ``service`` (its leaf certificate is the
    client identity). Use it as ``httpx.Client(transport=...)`` or mount it for
    ``*.consul`` hosts: ``httpx.Client(mounts={"all://*.consul": ConnectTransport(svc)})``.

    ``timeout`` bounds discovery plus TCP plus TLS, across all instances tried, when a
    request carries no connect timeout (an ``httpx.Client`` always sends its own).
    ``max_connection_age`` (seconds, None for no limit) retires pools this old;
    ``limits`` applies to each instance's pool.

    ``handle_request`` raises :class:`httpx.ConnectError` / :class:`httpx.ConnectTimeout`
    when the name does not resolve, no instance is healthy, or every instance failed
    (the ``__cause__`` is a :class:`~consul_connect.errors.DialError` or the discovery
    error), and the other httpx transport errors once a connection is in use.
    """

    def _new_pool(self, ep: Endpoint) -> httpcore.ConnectionPool:
        return httpcore.ConnectionPool(
            **self._pool_options(), network_backend=_SyncEndpointBackend(self._service, ep)
        )

    @staticmethod
    def _close(pools: list[httpcore.ConnectionPool]) -> None:
        for pool in pools:
            with contextlib.suppress(Exception):
                pool.close()

    def _resolve(self, request: httpx.Request, target: str, budget: float) -> list[Endpoint]:
        svc = self._service
        try:
            svc.wait_ready(budget)
            endpoints = svc.resolve(target, timeout=max(0.05, budget))
        except (ConsulConnectError, TimeoutError) as exc:
            raise _resolve_failure(exc, request, target) from exc
        self._close(self._pools.observe(target, endpoints))
        return endpoints

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to an instance of the service its URL names."""
        assert isinstance(request.stream, httpx.SyncByteStream)
        budget = _connect_timeout(request, self._timeout)
        deadline = time.monotonic() + budget
        target = request.url.host
        endpoints = self._resolve(request, target, budget)
        material = material_token(self._service)
        attempts = _Attempts(request, target)
        for ep in endpoints:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempts.timed_out = True
                break
            entry, due = self._pools.acquire(ep, material, self._new_pool)
            self._close(due)
            core = _core_request(request, remaining, request.stream)
            try:
                resp = entry.pool.handle_request(core)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                # Nothing of the request was sent yet: the next instance may serve it.
                self._close(self._pools.release(entry))
                attempts.failed(ep, exc)
                continue
            except Exception as exc:
                self._close(self._pools.release(entry))
                mapped = _httpx_error(exc, request)
                if mapped is exc:
                    raise
                raise mapped from exc
            except BaseException:
                self._close(self._pools.release(entry))
                raise
            assert isinstance(resp.stream, Iterable)

            def done(e: PoolEntry[httpcore.ConnectionPool] = entry) -> None:
                self._close(self._pools.release(e))

            return httpx.Response(
                status_code=resp.status,
                headers=resp.headers,
                stream=_SyncBody(resp.stream, request, done),
                extensions=resp.extensions,
            )
        raise attempts.error()

    def close(self) -> None:
        """Close every pooled connection (requests still running are cut off)."""
        self._close(self._pools.close())


# ----------------------------------------------------------------------------- async


def _is_readable(sock: socket.socket | None) -> bool:
    """Whether an idle pooled connection has something to read (EOF included): stale."""
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


class _AsyncStream(_Dialled, httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        # httpcore asks for these around every request; anyio's TLS stream rebuilds its
        # attribute table on each lookup, so keep the fixed ones.
        self._sock: socket.socket | None = inner.get_extra_info("socket")
        self._ssl_object = inner.get_extra_info("ssl_object")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return _is_readable(self._sock)
        if info == "ssl_object":
            return self._ssl_object
        if info == "socket":
            return self._sock
        return self._inner.get_extra_info(info)


class _AsyncEndpointBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, service: Service, endpoint: Endpoint) -> None:
        self._service = service
        self._endpoint = endpoint
        self._tcp = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        ep = self._endpoint
        loop = asyncio.get_running_loop()
        budget = DEFAULT_TIMEOUT if timeout is None else timeout
        deadline = loop.time() + budget
        raw = await self._tcp.connect_tcp(
            ep.host, ep.port, budget, local_address, socket_options or ()
        )
        remaining = deadline - loop.time()
        if remaining <= 0:
            await raw.aclose()
            raise httpcore.ConnectTimeout("deadline exceeded before the TLS handshake")
        try:
            tls = await raw.start_tls(
                self._service.client_context_for(ep), server_hostname=None, timeout=remaining
            )
        except BaseException:
            # httpcore closes the TCP stream when the handshake fails, not when the
            # request is cancelled mid-handshake: the socket would stay open until GC.
            await raw.aclose()
            raise
        try:
            verify_server_identity(tls.get_extra_info("ssl_object"), ep.identity)
        except ServerIdentityError as exc:
            await tls.aclose()
            raise _WrongIdentity(f"wrong server identity: {exc}") from exc
        except BaseException:
            await tls.aclose()
            raise
        return _AsyncStream(tls)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(
        self,
        stream: AsyncIterable[bytes],
        request: httpx.Request,
        done: Callable[[], Any],
    ) -> None:
        self._stream = stream
        self._request = request
        self._done: Callable[[], Any] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except httpcore.TimeoutException as exc:
            raise _httpx_error(exc, self._request) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        try:
            closer = getattr(self._stream, "aclose", None)
            if closer is not None:
                await closer()
        finally:
            await done()


class AsyncConnectTransport(_Settings[httpcore.AsyncConnectionPool], httpx.AsyncBaseTransport):
    """The asyncio form of :class:`ConnectTransport`, for ``httpx.AsyncClient``.

    Same arguments, routing, failover, pool retirement and errors.
    """

    def _new_pool(self, ep: Endpoint) -> httpcore.AsyncConnectionPool:
        return httpcore.AsyncConnectionPool(
            **self._pool_options(), network_backend=_AsyncEndpointBackend(self._service, ep)
        )

    @staticmethod
    async def _close(pools: list[httpcore.AsyncConnectionPool]) -> None:
        for pool in pools:
            with contextlib.suppress(Exception):
                await pool.aclose()

    async def _resolve(
        self, request: httpx.Request, target: str, budget: float
    ) -> list[Endpoint]:
        svc = self._service
        try:
            await svc.wait_ready_async(budget)
            endpoints = await svc.resolve_async(target, timeout=max(0.05, budget))
        except (ConsulConnectError, TimeoutError) as exc:
            raise _resolve_failure(exc, request, target) from exc
        await self._close(self._pools.observe(target, endpoints))
        return endpoints

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to an instance of the service its URL names."""
        assert isinstance(request.stream, httpx.AsyncByteStream)
        loop = asyncio.get_running_loop()
        budget = _connect_timeout(request, self._timeout)
        deadline = loop.time() + budget
        target = request.url.host
        endpoints = await self._resolve(request, target, budget)
        material = material_token(self._service)
        attempts = _Attempts(request, target)
        for ep in endpoints:
            remaining = deadline - loop.time()
            if remaining <= 0:
                attempts.timed_out = True
                break
            entry, due = self._pools.acquire(ep, material, self._new_pool)
            await self._close(due)
            core = _core_request(request, remaining, request.stream)
            try:
                resp = await entry.pool.handle_async_request(core)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                await self._close(self._pools.release(entry))
                attempts.failed(ep, exc)
                continue
            except Exception as exc:
                await self._close(self._pools.release(entry))
                mapped = _httpx_error(exc, request)
                if mapped is exc:
                    raise
                raise mapped from exc
            except BaseException:
                await self._close(self._pools.release(entry))
                raise
            assert isinstance(resp.stream, AsyncIterable)

            async def done(e: PoolEntry[httpcore.AsyncConnectionPool] = entry) -> None:
                await self._close(self._pools.release(e))

            return httpx.Response(
                status_code=resp.status,
                headers=resp.headers,
                stream=_AsyncBody(resp.stream, request, done),
                extensions=resp.extensions,
            )
        raise attempts.error()

    async def aclose(self) -> None:
        """Close every pooled connection (requests still running are cut off)."""
        await self._close(self._pools.close())
