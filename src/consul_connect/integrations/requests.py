"""A ``requests`` transport adapter that sends requests to Connect services over mTLS.

::

    session = requests.Session()
    adapter = ConnectAdapter(svc)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.get("https://api.service.consul/v1/items", timeout=5)

The URL's host names a Consul service as Consul DNS would (``api.service.consul``,
``api.connect.dc2.consul``, ``q.query.consul``, or a bare ``api``); its port is ignored.
Both schemes travel over Connect mTLS. Each new connection is dialled to a discovered
instance with the Service's newest leaf, and the server's service identity is checked
before a byte is written; a failed connect, handshake or identity check moves on to the
next instance. The ``verify``, ``cert`` and ``proxies`` arguments of requests are
ignored: trust comes from the Consul CA roots only (never from certifi or
``REQUESTS_CA_BUNDLE``) and Connect traffic never goes through an HTTP proxy.

Connections are pooled per instance (urllib3). A pool is retired when the Service's
certificate material changes, when it is older than ``max_connection_age``, or when its
instance leaves the discovery answer; its busy connections are closed when their
response is released, its idle ones at once.

Errors are requests': :class:`requests.ConnectionError` / :class:`requests.ConnectTimeout`
when nothing could be reached (``__cause__`` is the
:class:`~consul_connect.errors.DialError` or discovery error), and the usual read errors
afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, HTTPAdapter
from urllib3 import HTTPConnectionPool
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError
from urllib3.util.connection import create_connection

from consul_connect.discovery import Endpoint
from consul_connect.errors import ConsulConnectError, DialError, ServerIdentityError
from consul_connect.integrations._common import (
    PoolSet,
    dial_error,
    material_token,
    resolve_failure,
)
from consul_connect.integrations.httpx import DEFAULT_MAX_CONNECTION_AGE, DEFAULT_TIMEOUT
from consul_connect.service import Service
from consul_connect.tls import client_handshake

__all__ = ["ConnectAdapter"]


class _ConnectHTTPConnection(HTTPConnection):
    """An urllib3 connection whose socket is a Connect mTLS socket to one instance.

    It is an *HTTP* connection class on purpose: the TLS layer is ours (dynamic leaf,
    Consul roots, SPIFFE identity check), so urllib3's certificate handling never runs
    and cannot load public CAs into our context.
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        connect_service: Service,
        connect_endpoint: Endpoint,
        connect_default_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(host, port, **kwargs)
        self._cc_service = connect_service
        self._cc_endpoint = connect_endpoint
        self._cc_default_timeout = connect_default_timeout

    def _new_conn(self) -> socket.socket:
        ep = self._cc_endpoint
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        budget = self._cc_default_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + budget
        try:
            raw = create_connection(
                (ep.host, ep.port),
                budget,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                self, f"connection to {ep.address} timed out after {budget:g}s"
            ) from exc
        except OSError as exc:
            raise NewConnectionError(self, f"connection to {ep.address} failed: {exc}") from exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raw.close()
            raise ConnectTimeoutError(self, f"connection to {ep.address} timed out")
        try:
            sock, _ = client_handshake(
                raw,
                self._cc_service.client_context,
                ep.identity,
                timeout=remaining,
                session_key=(ep.host, ep.port),
            )
        except ServerIdentityError as exc:
            raise NewConnectionError(self, f"wrong server identity: {exc}") from exc
        except DialError as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise ConnectTimeoutError(self, f"{ep.address}: {exc}") from exc
            raise NewConnectionError(self, f"{ep.address}: {exc}") from exc
        sock.settimeout(timeout)
        return sock


class _ConnectPool(HTTPConnectionPool):
    ConnectionCls = _ConnectHTTPConnection


def _split_timeout(timeout: Any) -> tuple[float | None, Any]:
    """``(connect, read)`` from what requests accepts as ``timeout``."""
    if isinstance(timeout, tuple):
        connect, read = timeout
        return (None if connect is None else float(connect)), read
    if timeout is None or isinstance(timeout, int | float):
        return (None if timeout is None else float(timeout)), timeout
    # A urllib3 Timeout object.
    connect = getattr(timeout, "connect_timeout", None)
    read = getattr(timeout, "read_timeout", None)
    return (float(connect) if isinstance(connect, int | float) else None), read


def _is_connect_failure(exc: requests.ConnectionError) -> bool:
    """Whether ``exc`` happened while connecting, so no request byte was sent."""
    inner = exc.args[0] if exc.args else None
    return isinstance(inner, MaxRetryError) and isinstance(inner.reason, ConnectTimeoutError)


def _failure(reason: BaseException) -> tuple[str, bool]:
    """A short reason for one instance's failure, and whether it was the server identity."""
    cause = reason.__cause__
    if isinstance(cause, ServerIdentityError | DialError):
        return str(cause), isinstance(cause, ServerIdentityError)
    if cause is not None:
        return str(cause) or type(cause).__name__, False
    return str(reason), False


class ConnectAdapter(HTTPAdapter):
    """A ``requests`` adapter that reaches Consul services over Connect mTLS as ``service``.

    Mount it on ``"https://"`` and ``"http://"`` (or on prefixes such as
    ``"https://api.service.consul"``). ``connect_timeout`` bounds discovery plus TCP plus
    TLS, across every instance tried, when the caller passes no connect timeout.
    ``max_connection_age`` (seconds, None for no limit) retires pools this old;
    ``pool_maxsize`` / ``pool_block`` apply per instance. ``max_retries`` is urllib3's and
    defaults to no retries, as in requests (failover between instances happens anyway).

    ``send`` raises :class:`requests.ConnectTimeout` / :class:`requests.ConnectionError`
    when the name does not resolve, no instance is healthy, or every instance failed.
    """

    def __init__(
        self,
        service: Service,
        *,
        connect_timeout: float = DEFAULT_TIMEOUT,
        max_connection_age: float | None = DEFAULT_MAX_CONNECTION_AGE,
        pool_maxsize: int = 10,
        pool_block: bool = False,
        max_retries: Any = 0,
    ) -> None:
        self._service = service
        self._connect_timeout = connect_timeout
        self._pools: PoolSet[_ConnectPool] = PoolSet(max_connection_age)
        self._local = threading.local()
        super().__init__(
            pool_connections=1,
            pool_maxsize=pool_maxsize,
            max_retries=max_retries,
            pool_block=pool_block,
        )

    # -- the hooks HTTPAdapter.send calls -------------------------------------------

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> HTTPConnectionPool:
        """The pool :meth:`send` chose for this attempt (not for direct use)."""
        pool: _ConnectPool | None = getattr(self._local, "pool", None)
        if pool is None:
            raise requests.ConnectionError("ConnectAdapter pools are chosen by send()")
        return pool

    def get_connection(self, url: Any, proxies: Any = None) -> HTTPConnectionPool:
        """Deprecated requests hook; same as :meth:`get_connection_with_tls_context`."""
        return self.get_connection_with_tls_context(None, True)

    def cert_verify(self, conn: Any, url: Any, verify: Any, cert: Any) -> None:
        """Do nothing: trust is the Consul roots, never a CA bundle from requests."""

    def request_url(self, request: Any, proxies: Any) -> str:
        """The origin-form target: Connect requests never go through a proxy."""
        return str(request.path_url)

    def add_headers(self, request: Any, **kwargs: Any) -> None:
        """Send the logical host (``api.service.consul``) rather than the instance address."""
        if "Host" not in request.headers:
            netloc = urlsplit(request.url).netloc.rpartition("@")[2]
            request.headers["Host"] = netloc
            # Taken out again after sending: requests copies these headers into the
            # request that follows a redirect, which may go to another service.
            self._local.added_host = True

    # -- sending -----------------------------------------------------------------------

    def _new_pool(self, ep: Endpoint) -> _ConnectPool:
        return _ConnectPool(
            ep.host,
            ep.port,
            # Set by HTTPAdapter.__init__; the type stubs do not declare them.
            maxsize=getattr(self, "_pool_maxsize", DEFAULT_POOLSIZE),
            block=getattr(self, "_pool_block", DEFAULT_POOLBLOCK),
            connect_service=self._service,
            connect_endpoint=ep,
            connect_default_timeout=self._connect_timeout,
        )

    @staticmethod
    def _close(pools: list[_ConnectPool]) -> None:
        # urllib3 closes idle connections now and busy ones when they are released.
        for pool in pools:
            with contextlib.suppress(Exception):
                pool.close()

    def _resolve(self, request: Any, target: str, budget: float) -> list[Endpoint]:
        svc = self._service
        try:
            svc.wait_ready(budget)
            endpoints = svc.resolve(target, timeout=max(0.05, budget))
        except (ConsulConnectError, TimeoutError) as exc:
            message, timed_out = resolve_failure(exc, target)
            cls = requests.ConnectTimeout if timed_out else requests.ConnectionError
            raise cls(message, request=request) from exc
        self._close(self._pools.observe(target, endpoints))
        return endpoints

    def send(
        self,
        request: Any,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        """Send ``request`` to an instance of the service its URL names."""
        connect, read = _split_timeout(timeout)
        budget = self._connect_timeout if connect is None else connect
        deadline = time.monotonic() + budget
        target = urlsplit(request.url).hostname or ""
        endpoints = self._resolve(request, target, budget)
        material = material_token(self._service)
        failures: list[tuple[str, str]] = []
        identity_failures = 0
        timed_out = False
        for ep in endpoints:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            try:
                entry, due = self._pools.acquire(ep, material, self._new_pool)
            except RuntimeError as exc:
                # close() ran on another thread since this request began: report it as
                # requests reports a closed pool.
                raise requests.ConnectionError(str(exc), request=request) from exc
            self._close(due)
            self._local.pool = entry.pool
            try:
                return super().send(
                    request, stream=stream, timeout=(remaining, read), proxies={}
                )
            except requests.ConnectionError as exc:
                if not _is_connect_failure(exc):
                    raise
                timed_out = isinstance(exc, requests.ConnectTimeout)
                why, wrong_identity = _failure(exc.args[0].reason)
                identity_failures += wrong_identity
                failures.append((ep.address, why))
            finally:
                self._local.pool = None
                if getattr(self._local, "added_host", False):
                    self._local.added_host = False
                    request.headers.pop("Host", None)
                # urllib3 pools may close under a busy connection, so release at once.
                self._close(self._pools.release(entry))
        cause = dial_error(target, failures, identity_failures)
        cls = requests.ConnectTimeout if timed_out else requests.ConnectionError
        raise cls(str(cause), request=request) from cause

    def close(self) -> None:
        """Close every pooled connection."""
        self._close(self._pools.close())
        super().close()
