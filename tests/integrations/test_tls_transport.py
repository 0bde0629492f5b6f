"""The direct TLS transport of the ASGI server: OpenSSL on the socket, driven by the loop.

Every test runs on asyncio's loop and on uvloop, over real sockets and real handshakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from consul_connect import _tlsserver
from consul_connect._tlsserver import TLSServer, TLSSocketTransport
from consul_connect.testing import TestCA
from consul_connect.tls import TLSMaterial, load_cert_chain_from_memory
from tests.integrations import wait_until_async

LOOPS = ["asyncio", "uvloop"]


def run_on(kind: str, main: Callable[[], Awaitable[None]]) -> None:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Any = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(main(), 30))  # type: ignore[arg-type]


class Recorder(asyncio.Protocol):
    """A server protocol that records what happens and lets the test steer it."""

    def __init__(self) -> None:
        self.transport: TLSSocketTransport | None = None
        self.received = bytearray()
        self.events: list[str] = []
        self.lost: list[Exception | None] = []
        self.on_data: Callable[[Recorder, bytes], None] | None = None
        self.pause_on_connect = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSSocketTransport)
        self.transport = transport
        self.events.append("made")
        if self.pause_on_connect:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(self, data)

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.append(exc)


class Fixture:
    def __init__(self, *, handshake_timeout: float = 10.0) -> None:
        ca = TestCA()
        self.server_tls = TLSMaterial.build(ca.issue("api"), ca.roots())
        self.client_tls = TLSMaterial.build(ca.issue("web"), ca.roots())
        self.handshake_timeout = handshake_timeout
        self.protocols: list[Recorder] = []
        self.failures: list[str] = []
        self.configure: Callable[[Recorder], None] = lambda p: None
        self.server: TLSServer | None = None
        self.port = 0

    def factory(self) -> asyncio.BaseProtocol:
        protocol = Recorder()
        self.configure(protocol)
        self.protocols.append(protocol)
        return protocol

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = TLSServer(
            asyncio.get_running_loop(),
            sock,
            self.server_tls.server_context,
            self.factory,
            handshake_timeout=self.handshake_timeout,
            on_handshake_failure=self.failures.append,
        )
        self.sock = sock

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.sock.close()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = self.client_tls.client_context
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx, server_hostname="")

    def blocking_client(self) -> ssl.SSLSocket:
        """A blocking client that reports a missing close_notify as an error."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return self.client_tls.client_context.wrap_socket(
            raw, server_hostname=None, suppress_ragged_eofs=False
        )

    async def protocol(self, index: int = 0) -> Recorder:
        await wait_until_async(lambda: len(self.protocols) > index, what="connection handed over")
        return self.protocols[index]


def _recv_all(sock: ssl.SSLSocket) -> bytes:
    """Everything until the server's close_notify (raises on a ragged EOF)."""
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_flow_both_ways_and_the_peer_identity_is_there(loop: str) -> None:
    async def main() -> None:
        f = Fixture()
        f.configure = lambda p: setattr(p, "on_data", lambda p, d: p.transport.write(d.upper()))
        f.start()
        reader, writer = await f.connect()
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"HELLO"
        protocol = await f.protocol()
        transport = protocol.transport
        assert transport is not None
        assert transport.get_extra_info("peername") == writer.get_extra_info("sockname")
        assert transport.get_extra_info("sockname") == ("127.0.0.1", f.port)
        assert "web" in str(transport.get_extra_info("peercert")["subjectAltName"])
        assert transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert transport.get_extra_info("sslcontext") is not None
        assert transport.get_extra_info("socket").getsockname() == ("127.0.0.1", f.port)
        assert transport.get_extra_info("no such thing", 7) == 7
        writer.close()
        await wait_until_async(lambda: protocol.events[-1:] == ["lost"], what="connection lost")
        assert protocol.events == ["made", "eof", "lost"]
        assert protocol.lost == [None]
        assert f.failures == []
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_writes_of_one_loop_step_leave_as_one_tls_write(loop: str) -> None:
    async def main() -> None:
        f = Fixture()
        f.start()
        reader, writer = await f.connect()
        protocol = await f.protocol()
        transport = protocol.transport
        assert transport is not None
        writes: list[bytes] = []
        real = transport._tls

        class Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def write(self, data: bytes) -> int:
                writes.append(bytes(data))
                return int(real.write(data))

        transport._tls = Counting()
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.writelines([bytearray(b"o"), memoryview(b"k")])
        assert writes == []
        assert transport.get_write_buffer_size() == 21
        assert await reader.readexactly(21) == b"HTTP/1.1 200 OK\r\n\r\nok"
        assert writes == [b"HTTP/1.1 200 OK\r\n\r\nok"]
        writer.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_large_write_pauses_the_protocol_until_the_peer_reads_it_all(loop: str) -> None:
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB: far more than the socket buffers

    async def main() -> None:
        f = Fixture()
        f.start()
        reader, writer = await f.connect()
        protocol = await f.protocol()
        assert protocol.transport is not None
        protocol.transport.write(payload)
        await wait_until_async(
            lambda: "pause_writing" in protocol.events, what="protocol paused for writing"
        )
        assert protocol.transport.get_write_buffer_size() > 64 * 1024
        assert await reader.readexactly(len(payload)) == payload
        await wait_until_async(
            lambda: "resume_writing" in protocol.events, what="protocol resumed writing"
        )
        assert protocol.transport.get_write_buffer_size() == 0
        writer.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_sends_everything_buffered_then_close_notify(loop: str) -> None:
    payload = b"x" * (3 * 1024 * 1024)

    async def main() -> None:
        f = Fixture()

        def reply_and_close(p: Recorder, data: bytes) -> None:
            assert p.transport is not None
            p.transport.write(payload)
            p.transport.close()
            p.transport.write(b"after close")  # ignored

        f.configure = lambda p: setattr(p, "on_data", reply_and_close)
        f.start()

        def client() -> bytes:
            with f.blocking_client() as sock:
                sock.sendall(b"go")
                return _recv_all(sock)

        received = await asyncio.to_thread(client)
        assert received == payload
        protocol = await f.protocol()
        await wait_until_async(lambda: "lost" in protocol.events, what="connection lost")
        assert protocol.lost == [None]
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_closed_first_gets_the_answer_and_nothing_lingers(loop: str) -> None:
    # The client sends its request and its close_notify, then reads: the server
    # answers on eof_received and closes; after that EOF nothing is left to drain.
    async def main() -> None:
        f = Fixture()

        lingering_at_loss: list[int] = []

        def answer_at_eof(p: Recorder) -> None:
            original, lost = p.eof_received, p.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                assert f.server is not None
                lingering_at_loss.append(len(f.server._lingering))
                lost(exc)

            p.connection_lost = connection_lost  # type: ignore[method-assign]

            def eof() -> bool | None:
                assert p.transport is not None
                p.transport.write(b"answer to " + bytes(p.received))
                return original()

            p.eof_received = eof  # type: ignore[method-assign]

        f.configure = answer_at_eof
        f.start()

        def client() -> bytes:
            # Over memory BIOs: ssl.SSLSocket cannot read after sending close_notify.
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = f.client_tls.client_context.wrap_bio(incoming, outgoing)
            with socket.create_connection(("127.0.0.1", f.port), timeout=10) as raw:

                def fill() -> None:
                    raw.sendall(outgoing.read())
                    data = raw.recv(65536)
                    if data:
                        incoming.write(data)
                    else:
                        incoming.write_eof()

                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        fill()
                tls.write(b"question")
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.unwrap()  # our close_notify; the answer can still be read
                answer = b""
                while True:
                    try:
                        chunk = tls.read(65536)
                    except ssl.SSLWantReadError:
                        fill()
                        continue
                    except ssl.SSLZeroReturnError:
                        return answer  # the server's close_notify
                    if not chunk:
                        return answer
                    answer += chunk

        assert await asyncio.to_thread(client) == b"answer to question"
        protocol = await f.protocol()
        await wait_until_async(lambda: "lost" in protocol.events, what="connection lost")
        assert protocol.events[-2:] == ["eof", "lost"]
        assert protocol.lost == [None]
        assert lingering_at_loss == [0]
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_abort_drops_what_is_buffered_and_reports_the_loss(loop: str) -> None:
    async def main() -> None:
        f = Fixture()

        def reply_and_abort(p: Recorder, data: bytes) -> None:
            assert p.transport is not None
            p.transport.write(b"never sent")
            p.transport.abort()
            assert p.transport.is_closing()

        f.configure = lambda p: setattr(p, "on_data", reply_and_abort)
        f.start()
        reader, writer = await f.connect()
        writer.write(b"go")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await reader.read() == b""
        protocol = await f.protocol()
        await wait_until_async(lambda: "lost" in protocol.events, what="connection lost")
        assert protocol.lost == [None]
        writer.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_paused_reading_holds_input_until_resumed_even_when_openssl_buffered_it(
    loop: str,
) -> None:
    async def main() -> None:
        f = Fixture()
        f.configure = lambda p: setattr(p, "pause_on_connect", True)
        f.start()
        _reader, writer = await f.connect()
        protocol = await f.protocol()
        assert protocol.transport is not None
        # Several records in one burst: resuming must deliver all of them, including
        # what OpenSSL already decrypted and the selector cannot see.
        for i in range(20):
            writer.write(b"record %02d;" % i)
        await writer.drain()
        for _ in range(20):
            await asyncio.sleep(0)
        assert protocol.received == b""
        assert not protocol.transport.is_reading()
        protocol.transport.resume_reading()
        expected = b"".join(b"record %02d;" % i for i in range(20))
        await wait_until_async(lambda: protocol.received == expected, what="held input arrives")
        writer.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_failed_and_abandoned_handshakes_are_reported_and_serving_goes_on(loop: str) -> None:
    async def main() -> None:
        f = Fixture(handshake_timeout=0.5)
        f.start()
        # Not TLS at all.
        _, w1 = await asyncio.open_connection("127.0.0.1", f.port)
        w1.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        await wait_until_async(lambda: len(f.failures) == 1, what="garbage reported")
        assert "http request" in f.failures[0].lower()
        # A TLS client without a certificate.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=f.server_tls.roots.cadata)
        _, w2 = await asyncio.open_connection("127.0.0.1", f.port, ssl=ctx, server_hostname="")
        w2.write(b"hi")
        await wait_until_async(lambda: len(f.failures) == 2, what="no certificate reported")
        assert "did not return a certificate" in f.failures[1]
        # A client that connects and says nothing: the handshake deadline ends it.
        _, w3 = await asyncio.open_connection("127.0.0.1", f.port)
        await wait_until_async(lambda: len(f.failures) == 3, what="stalled handshake reported")
        assert "did not complete" in f.failures[2]
        for w in (w1, w2, w3):
            w.transport.abort()
        assert f.protocols == []
        _reader, writer = await f.connect()
        writer.write(b"still serving")
        protocol = await f.protocol()
        await wait_until_async(lambda: protocol.received == b"still serving", what="served")
        writer.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failing_protocol_loses_only_its_own_connection(loop: str) -> None:
    async def main() -> None:
        f = Fixture()
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))

        def explode(p: Recorder, data: bytes) -> None:
            if data == b"boom":
                raise RuntimeError("bug in the protocol")

        f.configure = lambda p: setattr(p, "on_data", explode)
        f.start()
        _reader1, writer1 = await f.connect()
        _reader2, writer2 = await f.connect()
        first, second = await f.protocol(0), await f.protocol(1)
        writer1.write(b"boom")
        await wait_until_async(lambda: "lost" in first.events, what="failing connection lost")
        assert isinstance(first.lost[0], RuntimeError)
        assert errors and errors[0]["message"] == "protocol.data_received() failed"
        writer2.write(b"fine")
        await wait_until_async(lambda: second.received == b"fine", what="other connection served")
        assert "lost" not in second.events
        writer1.close()
        writer2.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("failing", ["factory", "connection_made"])
def test_a_protocol_failing_to_start_leaves_the_next_connection_served(
    loop: str, failing: str
) -> None:
    # The failed connection's descriptor is closed and unwatched: the next accepted
    # socket, which gets the same descriptor number, is handshaken and served.
    async def main() -> None:
        f = Fixture()
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        calls = 0
        plain_factory = f.factory

        def factory() -> asyncio.BaseProtocol:
            nonlocal calls
            calls += 1
            if calls == 1 and failing == "factory":
                raise RuntimeError("no protocol today")
            protocol = plain_factory()
            if calls == 1:
                def refuse(transport: asyncio.BaseTransport) -> None:
                    raise RuntimeError("no connection today")

                protocol.connection_made = refuse  # type: ignore[method-assign]
            return protocol

        f.factory = factory  # type: ignore[method-assign]
        f.start()
        reader1, writer1 = await f.connect()
        assert await asyncio.wait_for(reader1.read(), 10) == b""  # closed by the server
        await wait_until_async(lambda: bool(errors), what="the failure reported")
        assert "failed" in errors[0]["message"]
        writer1.close()
        _reader2, writer2 = await f.connect()
        served = await f.protocol(0 if failing == "factory" else 1)
        writer2.write(b"fine")
        await wait_until_async(lambda: served.received == b"fine", what="next connection served")
        writer2.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_resets_the_connection_is_reported_lost(loop: str) -> None:
    async def main() -> None:
        f = Fixture()
        f.start()
        _reader, writer = await f.connect()
        protocol = await f.protocol()
        raw = writer.get_extra_info("socket")
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # with SO_LINGER 0: a reset, no close_notify
        await wait_until_async(lambda: "lost" in protocol.events, what="reset noticed")
        assert protocol.transport is not None and protocol.transport.is_closing()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_closing_the_server_stops_accepting_and_abandons_handshakes(loop: str) -> None:
    async def main() -> None:
        f = Fixture()
        f.start()
        assert f.server is not None
        _reader, writer = await f.connect()
        protocol = await f.protocol()
        _, stalled = await asyncio.open_connection("127.0.0.1", f.port)
        await wait_until_async(lambda: len(f.server._handshakes) == 1, what="handshake pending")
        await f.stop()
        assert not f.server.is_serving() and f.server.sockets == ()
        assert f.server._handshakes == set()
        with pytest.raises(OSError):
            await f.connect()
        # An accepted connection is its protocol's to close, not the listener's.
        writer.write(b"after")
        await wait_until_async(lambda: protocol.received == b"after", what="still served")
        writer.close()
        stalled.transport.abort()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_gives_up_on_a_peer_that_never_reads(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_tlsserver, "_CLOSE_TIMEOUT", 0.3)

    async def main() -> None:
        f = Fixture()
        f.start()
        _reader, writer = await f.connect()  # and never reads
        protocol = await f.protocol()
        assert protocol.transport is not None
        protocol.transport.write(b"x" * (16 * 1024 * 1024))
        protocol.transport.close()
        assert protocol.transport.get_write_buffer_size() > 0
        await wait_until_async(lambda: "lost" in protocol.events, what="close gave up")
        assert protocol.transport.get_write_buffer_size() == 0
        writer.transport.abort()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_1_2_client_is_served_and_closed_cleanly(loop: str) -> None:
    async def main() -> None:
        f = Fixture()
        f.configure = lambda p: setattr(p, "on_data", lambda p, d: p.transport.write(d[::-1]))
        f.start()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=f.server_tls.roots.cadata)
        web = f.client_tls.leaf
        load_cert_chain_from_memory(ctx, web.full_chain_pem, web.private_key_pem)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", f.port, ssl=ctx, server_hostname=""
        )
        writer.write(b"abc")
        assert await reader.readexactly(3) == b"cba"
        protocol = await f.protocol()
        assert protocol.transport is not None
        assert protocol.transport.get_extra_info("ssl_object").version() == "TLSv1.2"
        protocol.transport.close()
        assert await reader.read() == b""  # close_notify, then EOF
        await wait_until_async(lambda: "lost" in protocol.events, what="connection lost")
        writer.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_garbage_after_the_handshake_loses_that_connection_only(loop: str) -> None:
    async def main() -> None:
        f = Fixture()
        f.configure = lambda p: setattr(p, "on_data", lambda p, d: p.transport.write(d))
        f.start()

        def corrupt() -> None:
            with f.blocking_client() as sock:
                sock.sendall(b"fine")
                assert sock.recv(4) == b"fine"
                # Bytes that are not a TLS record, on the same TCP stream.
                with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                    raw.sendall(b"\x17\x03\x03\x00\x10" + b"\x00" * 16 + b"GET / HTTP/1.1\r\n")

        await asyncio.to_thread(corrupt)
        first = await f.protocol()
        await wait_until_async(lambda: "lost" in first.events, what="corrupt connection lost")
        assert isinstance(first.lost[0], ssl.SSLError)
        reader, writer = await f.connect()
        writer.write(b"next")
        assert await reader.readexactly(4) == b"next"
        writer.close()
        await f.stop()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_context_that_cannot_wrap_refuses_the_connection_and_serving_goes_on(
    loop: str,
) -> None:
    class NotReady:
        def wrap_socket(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no certificate yet")

    async def main() -> None:
        f = Fixture()
        f.start()
        assert f.server is not None
        good = f.server.context
        f.server.context = NotReady()  # type: ignore[assignment]
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            await f.connect()
        await wait_until_async(lambda: len(f.failures) == 1, what="refusal reported")
        assert "no certificate yet" in f.failures[0]
        f.server.context = good
        _reader, writer = await f.connect()
        writer.write(b"ok")
        protocol = await f.protocol()
        await wait_until_async(lambda: protocol.received == b"ok", what="served again")
        writer.close()
        await f.stop()

    run_on(loop, main)
