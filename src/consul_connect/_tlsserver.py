"""A TLS server for asyncio protocols in which OpenSSL reads and writes the socket itself.

asyncio (and uvloop) terminate TLS with a memory BIO: every record crosses Python twice
(socket -> incoming BIO -> ``SSLObject``, ``SSLObject`` -> outgoing BIO -> socket). Here
each accepted connection is a non-blocking ``ssl.SSLSocket`` driven by the loop's
``add_reader``/``add_writer``: one ``SSL_read`` or ``SSL_write`` per record batch, and the
writes of one loop step leave as one record batch and one ``send()``.

:class:`TLSServer` accepts and handshakes (with a deadline, reporting every failed or
abandoned handshake), then hands each connection to a fresh protocol through a
:class:`TLSSocketTransport`, which behaves as asyncio's TLS transports do: flow control
both ways, ``close`` sends what is buffered then ``close_notify``, ``abort`` drops it,
``eof_received`` on the peer's ``close_notify`` or EOF, ``get_extra_info`` with
``ssl_object``, ``peercert``, ``sslcontext``, ``peername``, ``sockname``, ``socket``.

The ASGI and aiohttp servers use it (their ``tls_transport="direct"``, the default), as do
``Service.start_server`` and ``Service.open_connection`` with ``tls_transport="direct"``
(:func:`open_stream` is the dialling side). ``CoalescingTransport`` gives the event loop's
own TLS transport the same one-write-per-step behaviour. Private: those callers are the
contract.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import ssl
from asyncio import trsock
from collections.abc import Callable, Iterable
from typing import Any

from consul_connect.errors import ConfigError
from consul_connect.tls import _NOT_FINISHED, HandshakeFailureHook

__all__ = [
    "CoalescingTransport",
    "TLSServer",
    "TLSSocketTransport",
    "bind_socket",
    "check_transport",
    "open_stream",
]

log = logging.getLogger("consul_connect.tlsserver")

_ACCEPTS_PER_WAKEUP = 32
"""Connections taken from the backlog per readiness event (the rest wait a loop turn)."""

_READS_PER_WAKEUP = 16
"""Records read per readiness event before other connections get their turn."""

_READ_SIZE = 64 * 1024
"""Bytes asked of one ``SSL_read``, which returns at most one record (16 KiB) anyway."""

_WRITE_CHUNK = 256 * 1024
"""Largest single ``SSL_write``: a blocked one must be retried with the same bytes."""

_CLOSE_TIMEOUT = 30.0
"""Seconds ``close()`` waits for a peer that does not read what is still buffered."""

_LINGER = 5.0
"""Seconds a closed connection keeps reading (and discarding) until the peer's EOF.

Closing a socket with unread input makes the kernel answer with a reset, which can
destroy the end of a response the peer has not read yet; waiting for the peer to close
first avoids that.
"""

_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)



def check_transport(tls_transport: str) -> None:
    """Raise ``ConfigError`` unless ``tls_transport`` is "direct" or "asyncio"."""
    if tls_transport not in ("direct", "asyncio"):
        raise ConfigError(f"tls_transport must be 'direct' or 'asyncio', not {tls_transport!r}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening); 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets, and without
    # it every response waits for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _is_eof(exc: ssl.SSLError) -> bool:
    """True when ``exc`` says the peer closed its side, with or without ``close_notify``."""
    return (
        isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
        or exc.reason == "UNEXPECTED_EOF_WHILE_READING"
    )


class _WriteCoalescing:
    """Holds the writes of one event-loop step and hands them to ``_flush`` as one.

    uvicorn writes a response's head and its body separately; over TLS each write would
    be a record of its own and a ``send()``. A write that brings the held bytes to
    :data:`FLUSH_AT` or more is flushed at once.
    """

    FLUSH_AT = 64 * 1024

    _loop: asyncio.AbstractEventLoop
    _held: list[bytes]
    _held_size: int
    _flush_scheduled: bool

    def _init_coalescing(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held = []
        self._held_size = 0
        self._flush_scheduled = False

    def _hold(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        # The caller may reuse a bytearray or memoryview once write() returns.
        self._held.append(data if isinstance(data, bytes) else bytes(data))
        self._held_size += len(data)
        if self._held_size >= self.FLUSH_AT:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _take_held(self) -> bytes:
        """What is held, as one bytes object (empty if nothing); nothing is held after."""
        self._flush_scheduled = False
        held = self._held
        if not held:
            return b""
        self._held, self._held_size = [], 0
        return held[0] if len(held) == 1 else b"".join(held)

    def _flush(self) -> None:
        raise NotImplementedError

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError


class CoalescingTransport(_WriteCoalescing, asyncio.Transport):
    """Another transport (the event loop's own TLS), with the writes of one step sent as one.

    ``close`` sends what is held first, ``abort`` drops it; everything else is the
    wrapped transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._init_coalescing(loop)
        self._transport = transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hold(data)

    def _flush(self) -> None:
        data = self._take_held()
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_size = [], 0
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._held_size + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class TLSSocketTransport(_WriteCoalescing, asyncio.Transport):
    """One established TLS connection, for one protocol (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        server: TLSServer | None = None,
    ) -> None:
        super().__init__()
        self._init_coalescing(loop)
        self._sock = sock
        self._fd = sock.fileno()
        # The C-level connection object: reading and writing through it skips two
        # Python frames per call on the hot path. ssl.SSLSocket keeps it as _sslobj.
        self._tls: Any = getattr(sock, "_sslobj", None) or sock
        self._server = server
        self._protocol: asyncio.BaseProtocol = asyncio.Protocol()
        self._extra: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            self._extra["peername"] = sock.getpeername()
        with contextlib.suppress(OSError):
            self._extra["sockname"] = sock.getsockname()
        self._reader = False  # is a reader registered for _fd
        self._writer = False  # is a writer registered for _fd
        self._read_paused = False
        self._read_needs_write = False  # SSL_read asked for the socket to be writable
        self._write_needs_read = False  # SSL_write asked for the socket to be readable
        self._blocked: bytes | None = None  # an SSL_write to repeat with the same bytes
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_size = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._protocol_paused = False
        self._closing = False
        self._closed = False  # the protocol has been (or is being) told
        self._peer_eof = False  # the peer closed its side: nothing more can arrive
        self._close_timer: asyncio.TimerHandle | None = None
        self._writes_after_close = 0

    # -- lifecycle ------------------------------------------------------------------

    def start(self, protocol: asyncio.BaseProtocol) -> None:
        """Give the connection to ``protocol`` and start reading."""
        self._protocol = protocol
        try:
            protocol.connection_made(self)
        except Exception as exc:
            self._fatal(exc, "protocol.connection_made() failed")
            return
        if self._closing:
            return
        if not self._read_paused:
            self._add_reader()
            if self._tls.pending():
                self._loop.call_soon(self._read_ready)

    def _add_reader(self) -> None:
        if not self._reader:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reader = True

    def _remove_reader(self) -> None:
        if self._reader:
            self._loop.remove_reader(self._fd)
            self._reader = False

    def _add_writer(self) -> None:
        if not self._writer:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer = True

    def _remove_writer(self) -> None:
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False

    # -- reading --------------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._write_needs_read:
            self._write_needs_read = False
            self._write_ready()
        if self._closing:
            return
        if self._read_paused:
            # Paused lazily: the reader goes only when input actually arrives.
            if not self._write_needs_read:
                self._remove_reader()
            return
        if self._read_needs_write:
            return
        tls = self._tls
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._read_needs_write = True
                self._remove_reader()
                self._add_writer()
                return
            except ssl.SSLError as exc:
                if _is_eof(exc):
                    self._eof()
                else:
                    self._fatal(exc, "TLS error while reading")
                return
            except OSError as exc:
                self._fatal(exc, "socket error while reading")
                return
            if not data:
                self._eof()
                return
            try:
                self._protocol.data_received(data)  # type: ignore[attr-defined]
            except Exception as exc:
                self._fatal(exc, "protocol.data_received() failed")
                return
            if self._closing or self._read_paused:
                return
            if not tls.pending():
                return
        # More decrypted input is waiting in OpenSSL, where the selector cannot see it.
        self._loop.call_soon(self._read_ready)

    def _eof(self) -> None:
        self._peer_eof = True
        self._remove_reader()
        try:
            self._protocol.eof_received()  # type: ignore[attr-defined]
        except Exception as exc:
            self._fatal(exc, "protocol.eof_received() failed")
            return
        # As asyncio's TLS transports do: a half-open TLS connection is not kept.
        self.close()

    def is_reading(self) -> bool:
        return not self._closing and not self._read_paused

    def pause_reading(self) -> None:
        # Only a flag: the reader is removed if input arrives while paused, so a pause
        # and resume around every request costs no system call.
        self._read_paused = True

    def resume_reading(self) -> None:
        if not self._read_paused or self._closing:
            return
        self._read_paused = False
        self._add_reader()
        if self._tls.pending():
            self._loop.call_soon(self._read_ready)

    # -- writing --------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            self._writes_after_close += 1
            if self._writes_after_close == 5:
                log.warning("write() on a closed TLS connection (ignored)")
            return
        self._hold(data)

    def _flush(self) -> None:
        data = self._take_held()
        if not data or self._closed:
            return
        if self._blocked is not None:
            self._queue(data)
        else:
            self._send(data)
        self._check_high_water()

    def _queue(self, data: bytes) -> None:
        self._backlog.append(data)
        self._backlog_size += len(data)

    def _send(self, data: bytes) -> None:
        """Write ``data`` now; what the socket cannot take waits, ahead of the backlog."""
        tls = self._tls
        if len(data) <= _WRITE_CHUNK:  # the usual case: one SSL_write
            try:
                tls.write(data)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                self._block(data, want_read=isinstance(exc, ssl.SSLWantReadError))
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc, "error while writing")
            return
        view = memoryview(data)
        for start in range(0, len(data), _WRITE_CHUNK):
            chunk = bytes(view[start : start + _WRITE_CHUNK])
            try:
                tls.write(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                rest = view[start + len(chunk) :]
                if rest:
                    self._backlog.appendleft(bytes(rest))
                    self._backlog_size += len(rest)
                self._block(chunk, want_read=isinstance(exc, ssl.SSLWantReadError))
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc, "error while writing")
                return

    def _block(self, chunk: bytes, *, want_read: bool) -> None:
        self._blocked = chunk
        if want_read:
            self._write_needs_read = True
            self._add_reader()
        else:
            self._add_writer()

    def _write_ready(self) -> None:
        if self._read_needs_write:
            self._read_needs_write = False
            if not self._closing and not self._read_paused:
                self._add_reader()
                self._loop.call_soon(self._read_ready)
        if self._closed:
            return
        tls = self._tls
        while True:
            chunk = self._blocked
            if chunk is not None:
                try:
                    tls.write(chunk)
                except ssl.SSLWantWriteError:
                    self._add_writer()
                    return
                except ssl.SSLWantReadError:
                    self._remove_writer()
                    self._write_needs_read = True
                    self._add_reader()
                    return
                except (ssl.SSLError, OSError) as exc:
                    self._fatal(exc, "error while writing")
                    return
                self._blocked = None
            if not self._backlog:
                break
            data = self._backlog.popleft()
            self._backlog_size -= len(data)
            self._send(data)
            if self._closed or self._blocked is not None:
                return
        self._remove_writer()
        self._check_low_water()
        if self._closing and not self._held:
            self._shutdown()

    def _buffered(self) -> int:
        blocked = len(self._blocked) if self._blocked is not None else 0
        return self._held_size + blocked + self._backlog_size

    def _check_high_water(self) -> None:
        if self._protocol_paused or self._buffered() <= self._high:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except Exception as exc:
            self._fatal(exc, "protocol.pause_writing() failed")

    def _check_low_water(self) -> None:
        if not self._protocol_paused or self._buffered() > self._low:
            return
        self._protocol_paused = False
        try:
            self._protocol.resume_writing()
        except Exception as exc:
            self._fatal(exc, "protocol.resume_writing() failed")

    def get_write_buffer_size(self) -> int:
        return self._buffered()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high_water()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    # -- closing --------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is buffered and ``close_notify``, then tell the protocol."""
        if self._closing:
            return
        self._closing = True
        if not self._write_needs_read:
            self._remove_reader()
        self._flush()
        if self._closed:
            return
        if self._blocked is None:
            self._shutdown()
        else:
            # A peer that stops reading must not keep the connection forever.
            self._close_timer = self._loop.call_later(_CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        """Close at once; buffered bytes are dropped."""
        self._force_close(None)

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._remove_reader()
        self._remove_writer()
        sock = self._sock
        try:
            sock.unwrap()  # sends close_notify; the peer's is not awaited
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._loop.call_soon(self._call_connection_lost, None)
        try:
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except OSError:
            self._release()
            return
        if self._server is not None and not self._peer_eof:
            # Read and drop until the peer's EOF: closing with unread input would
            # send a reset, which can destroy the response before the peer reads it.
            self._server._linger(sock, self._fd)
        else:
            self._release()  # after the peer's EOF there is nothing left to drain

    def _force_close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closing = self._closed = True
        self._held, self._held_size = [], 0
        self._blocked = None
        self._backlog.clear()
        self._backlog_size = 0
        self._release()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _release(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._remove_reader()
        self._remove_writer()
        self._sock.close()

    def _fatal(self, exc: Exception, message: str) -> None:
        if isinstance(exc, OSError):  # the peer went away, or sent what is not TLS
            log.debug("%s: %s", message, exc)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = asyncio.Protocol()
            self._server = None

    # -- the rest of asyncio.Transport ----------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        sock = self._sock
        if name == "ssl_object":
            return sock
        if name == "sslcontext":
            return sock.context
        if name == "socket":
            return trsock.TransportSocket(sock)
        if name in ("peercert", "cipher", "compression"):
            with contextlib.suppress(ValueError, OSError):
                if name == "peercert":
                    return sock.getpeercert()
                return sock.cipher() if name == "cipher" else sock.compression()
        return default

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return f"<TLSSocketTransport fd={self._fd} {state}>"


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def open_stream(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial ``host:port``, run the client side of a TLS handshake with ``context`` and
    return asyncio streams over a :class:`TLSSocketTransport`.

    The caller bounds the time (cancelling closes the socket) and checks the server's
    identity. Raises ``OSError`` (``ssl.SSLError`` included) when the connection or the
    handshake fails.
    """
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    raw: socket.socket | None = None
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        candidate = socket.socket(family, kind, proto)
        try:
            candidate.setblocking(False)
            candidate.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(candidate, address)
        except OSError as exc:
            candidate.close()
            error = exc
            continue
        except BaseException:
            candidate.close()
            raise
        raw = candidate
        break
    if raw is None:
        raise error or OSError(f"no address for {host}:{port}")
    try:
        tls = context.wrap_socket(raw, server_hostname=None, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _ready(loop, tls.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, tls.fileno(), write=True)
        transport = TLSSocketTransport(loop, tls)
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.start(protocol)
    except BaseException:
        tls.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _Handshake:
    """The server side of one TLS handshake on an accepted socket, driven by the loop."""

    def __init__(self, server: TLSServer, sock: ssl.SSLSocket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.waiting: str | None = None  # "r" or "w": what is registered for fd
        self.timer = server.loop.call_later(server.handshake_timeout, self.expire)

    def step(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.wait("r")
        except ssl.SSLWantWriteError:
            self.wait("w")
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # The same reasons the event loops' own TLS reports (see tls.py).
            self.fail(str(exc) or type(exc).__name__)
        else:
            self.finish(keep_reader=True)
            self.server._established(self)

    def wait(self, what: str) -> None:
        if self.waiting == what:
            return
        self.unwatch()
        loop = self.server.loop
        if what == "r":
            loop.add_reader(self.fd, self.step)
        else:
            loop.add_writer(self.fd, self.step)
        self.waiting = what

    def unwatch(self) -> None:
        loop = self.server.loop
        if self.waiting == "r":
            loop.remove_reader(self.fd)
        elif self.waiting == "w":
            loop.remove_writer(self.fd)
        self.waiting = None

    def finish(self, *, keep_reader: bool = False) -> None:
        """Stop the clock and the watching: the handshake is over, one way or another.

        ``keep_reader``: leave a registered reader for the transport to take over.
        """
        if not (keep_reader and self.waiting == "r"):
            self.unwatch()
        self.timer.cancel()
        self.server._handshakes.discard(self)

    def expire(self) -> None:
        self.fail(_NOT_FINISHED)

    def fail(self, reason: str) -> None:
        self.finish()
        self.sock.close()
        self.server._handshake_failed(reason)


class TLSServer(asyncio.AbstractServer):
    """Accepts TLS connections on a listening socket and serves each with a new protocol.

    ``context`` wraps every accepted socket (a dynamic context picks the newest
    certificate per connection). A handshake must finish within ``handshake_timeout``
    seconds; a failed or abandoned one is closed and reported to
    ``on_handshake_failure(reason)``. Serves from construction on; used like an
    ``asyncio.Server``: :meth:`close`, :meth:`wait_closed`, :meth:`serve_forever`,
    :meth:`is_serving`, :attr:`sockets`, ``async with``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        context: ssl.SSLContext,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        handshake_timeout: float = 60.0,
        on_handshake_failure: HandshakeFailureHook | None = None,
        backlog: int = 2048,
    ) -> None:
        self.loop = loop
        self.context = context
        self.handshake_timeout = handshake_timeout
        self._sock = sock
        self._factory = protocol_factory
        self._on_failure = on_handshake_failure
        self._handshakes: set[_Handshake] = set()
        self._lingering: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._serving = True
        self._stopped: asyncio.Future[None] = loop.create_future()
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this server runs on."""
        return self.loop

    async def start_serving(self) -> None:
        """Nothing to do: the server accepts connections from construction on."""

    async def serve_forever(self) -> None:
        """Wait until the server is closed; cancelling the wait closes it."""
        if not self._serving:
            raise RuntimeError("the server is closed")
        try:
            await asyncio.shield(self._stopped)
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket (empty once closed)."""
        return (self._sock,) if self._serving else ()

    def is_serving(self) -> bool:
        """True until :meth:`close`."""
        return self._serving

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                raw, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    # Out of descriptors or memory: stop accepting for a moment
                    # instead of spinning on a listener that stays readable.
                    log.error("accepting a connection failed: %s", exc)
                    self.loop.remove_reader(self._sock.fileno())
                    self.loop.call_later(1.0, self._resume_accepting)
                    return
                raise
            try:
                raw.setblocking(False)
                if raw.family in (socket.AF_INET, socket.AF_INET6):
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self.context.wrap_socket(
                    raw, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ValueError) as exc:
                raw.close()
                self._handshake_failed(f"connection lost before the TLS handshake: {exc}")
                continue
            except Exception as exc:  # e.g. no certificate to serve yet: refuse, go on
                raw.close()
                log.warning("cannot start a TLS handshake: %s", exc)
                self._handshake_failed(f"cannot start a TLS handshake: {exc}")
                continue
            handshake = _Handshake(self, sock)
            self._handshakes.add(handshake)
            # The ClientHello is often there already: no need to wait a loop turn.
            handshake.step()

    def _resume_accepting(self) -> None:
        if self._serving:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def _handshake_failed(self, reason: str) -> None:
        log.debug("TLS handshake failed: %s", reason)
        if self._on_failure is not None:
            try:
                self._on_failure(reason)
            except Exception:  # a hook's bug must not stop the server
                log.exception("the handshake failure hook failed")

    def _established(self, handshake: _Handshake) -> None:
        transport = TLSSocketTransport(self.loop, handshake.sock, self)
        if handshake.waiting == "r":
            # The handshake's reader is still registered: replacing its callback
            # costs neither event loop an epoll call, removing and adding it costs two.
            transport._add_reader()
        try:
            protocol = self._factory()
        except Exception as exc:
            transport._fatal(exc, "the protocol factory failed")
            return
        transport.start(protocol)

    def _linger(self, sock: socket.socket, fd: int) -> None:
        """Read and drop input on a closed connection until EOF, then close it."""
        if not self._serving:
            self._close_quietly(sock, fd)
            return

        def drain() -> None:
            try:
                # The raw bytes: whatever the peer still sends is dropped unread.
                while socket.socket.recv(sock, 65536):
                    pass
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            self._unlinger(fd)

        timer = self.loop.call_later(_LINGER, self._unlinger, fd)
        self._lingering[fd] = (sock, timer)
        self.loop.add_reader(fd, drain)

    def _unlinger(self, fd: int) -> None:
        entry = self._lingering.pop(fd, None)
        if entry is not None:
            sock, timer = entry
            timer.cancel()
            self._close_quietly(sock, fd)

    def _close_quietly(self, sock: socket.socket, fd: int) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(fd)
        sock.close()

    def close(self) -> None:
        """Stop accepting and close the listening socket; abandon handshakes in progress.

        Accepted connections stay: they belong to their protocols.
        """
        if not self._serving:
            return
        self._serving = False
        if not self._stopped.done():
            self._stopped.set_result(None)
        with contextlib.suppress(ValueError, OSError):  # the socket may be closed already
            self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for handshake in list(self._handshakes):
            handshake.finish()
            handshake.sock.close()

    async def wait_closed(self) -> None:
        """Close what is still lingering (the server is going away)."""
        for fd in list(self._lingering):
            self._unlinger(fd)
