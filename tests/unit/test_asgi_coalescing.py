"""Write coalescing over the event loop's own TLS: the writes of one loop step leave as
one write."""

from __future__ import annotations

import asyncio
from typing import Any

from consul_connect._tlsserver import CoalescingTransport


class FakeTransport(asyncio.Transport):
    """Records what reaches the wire."""

    def __init__(self) -> None:
        super().__init__(extra={"peername": ("127.0.0.1", 1)})
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def get_write_buffer_size(self) -> int:
        return 7


async def a_loop_step() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_step_leave_together_after_the_step() -> None:
    wire = FakeTransport()
    t = CoalescingTransport(wire, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    t.write(b"")
    t.writelines([b"o", b"k"])
    assert wire.writes == []
    assert t.get_write_buffer_size() == 38 + 2 + 7
    await a_loop_step()
    assert wire.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    t.write(b"next")
    await a_loop_step()
    assert wire.writes[1:] == [b"next"]


async def test_a_large_write_goes_out_at_once_after_what_was_held() -> None:
    wire = FakeTransport()
    t = CoalescingTransport(wire, asyncio.get_running_loop())
    t.write(b"head")
    big = b"x" * CoalescingTransport.FLUSH_AT
    t.write(big)
    assert wire.writes == [b"head" + big]
    await a_loop_step()
    assert len(wire.writes) == 1


async def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    wire = FakeTransport()
    t = CoalescingTransport(wire, loop)
    t.write(b"last words")
    t.close()
    assert wire.writes == [b"last words"] and wire.closed
    t.write(b"after close")
    await a_loop_step()
    assert wire.writes == [b"last words"]

    wire = FakeTransport()
    t = CoalescingTransport(wire, loop)
    t.write(b"never sent")
    t.abort()
    await a_loop_step()
    assert wire.writes == [] and wire.aborted


async def test_everything_else_is_the_wrapped_transports() -> None:
    wire = FakeTransport()
    t = CoalescingTransport(wire, asyncio.get_running_loop())
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)
    assert t.get_extra_info("ssl_object", "none") == "none"
    t.pause_reading()
    assert not wire.reading
    assert not t.is_closing()


async def test_a_buffer_the_caller_reuses_is_sent_as_it_was_written() -> None:
    wire = FakeTransport()
    t = CoalescingTransport(wire, asyncio.get_running_loop())
    buf = bytearray(b"first")
    t.write(buf)
    buf[:] = b"XXXXX"
    t.write(memoryview(b"-second"))
    await a_loop_step()
    assert wire.writes == [b"first-second"]
