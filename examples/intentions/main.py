"""Intentions decide who may connect, and a change applies to connections already open.

``ledger`` serves a line-echo protocol with ``Service.start_server``; ``auditor`` keeps a
connection open to it. The example then flips the intention ``auditor => ledger``:

1. allow: the connection works;
2. deny: ``ledger`` learns of it through its intentions watch, cuts the connection
   that is already open, and refuses new ones (before reading a byte);
3. allow again: new connections work.

``ledger`` decides locally from its cached intentions, with no agent call per
connection; ``on_event`` shows each decision it makes.

Runs against the agent named by ``CONSUL_HTTP_ADDR`` when set, otherwise against an
embedded dev agent it starts itself. Exit status 0 means every step behaved as described.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterator

import httpx

from consul_connect import AgentConfig, DevAgent, DialError, Service, ServiceEvent

SOURCE, DESTINATION = "auditor", "ledger"


@contextlib.contextmanager
def consul_agent() -> Iterator[AgentConfig]:
    """The agent from ``CONSUL_*`` variables, or a throw-away embedded dev agent."""
    if os.environ.get("CONSUL_HTTP_ADDR"):
        yield AgentConfig.from_env()
        return
    with DevAgent(leaf_root_change_jitter=0.0) as dev:
        print(f"started an embedded dev agent on {dev.http_addr}")
        yield AgentConfig.from_address(dev.address)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def set_intention(admin: httpx.AsyncClient, action: str) -> None:
    """What ``consul intention create -replace [-deny] auditor ledger`` does."""
    r = await admin.put(
        "/v1/connect/intentions/exact",
        params={"source": SOURCE, "destination": DESTINATION},
        json={"Action": action},
    )
    r.raise_for_status()
    print(f"\n== intention {SOURCE} => {DESTINATION} set to {action}")


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    writer.close()


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> bool:
    """Send one line; True if it came back, False if the connection was closed instead."""
    try:
        writer.write(text.encode() + b"\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5) == text.encode() + b"\n"
    except (ConnectionError, TimeoutError):
        return False


async def new_connection_works(auditor: Service) -> bool:
    """Dial ledger afresh and try one line (a refused peer sees its connection closed)."""
    try:
        reader, writer = await auditor.open_connection("ledger.service.consul", timeout=5)
    except DialError:
        return False
    try:
        return await round_trip(reader, writer, "ping")
    finally:
        writer.close()


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Await ``condition()`` until it is true, within ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise SystemExit(f"intentions example: timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def main(cfg: AgentConfig) -> None:
    port = free_port()
    headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
    async with (
        httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=10) as admin,
        Service("ledger", agent=cfg, register=True, port=port, address="127.0.0.1") as ledger,
        Service(SOURCE, agent=cfg) as auditor,
    ):

        def show(event: ServiceEvent) -> None:
            if event.kind in ("peer_allowed", "peer_denied"):
                peer = event.peer.service if event.peer else "?"
                print(f"   ledger: {event.kind} {peer}: {event.reason}")

        ledger.on_event(show)
        try:
            await set_intention(admin, "allow")
            server = await ledger.start_server(echo, "127.0.0.1", port)

            async def works() -> bool:
                return await new_connection_works(auditor)

            # The just-registered instance shows up in discovery once its check passes.
            await until(works, 10, "ledger to accept auditor")
            reader, writer = await auditor.open_connection("ledger.service.consul", timeout=5)
            ok = await round_trip(reader, writer, "first")
            print(f"auditor: long-lived connection open, round trip ok={ok}")
            if not ok:
                raise SystemExit("intentions example: the allowed connection did not work")

            await set_intention(admin, "deny")
            # No polling of the agent here: ledger's watch delivers the deny and ledger
            # closes the connection, which the open reader sees as end of stream.
            cut = await asyncio.wait_for(reader.read(1), 10)
            writer.close()
            print(f"auditor: the open connection was cut (read returned {cut!r})")
            if cut != b"":
                raise SystemExit("intentions example: the open connection was not cut")
            refused = not await new_connection_works(auditor)
            print(f"auditor: a new connection is refused: {refused}")
            if not refused:
                raise SystemExit("intentions example: a denied peer was served")

            await set_intention(admin, "allow")
            await until(works, 10, "the allow to reach ledger")
            print("auditor: new connections work again")
            server.close()
        finally:
            await admin.delete(
                "/v1/connect/intentions/exact",
                params={"source": SOURCE, "destination": DESTINATION},
            )
        stats = ledger.statistics()
        print(f"\nledger statistics: accepted={stats.accepted} rejected={stats.rejected}")
    print("intentions example: OK")


if __name__ == "__main__":
    with consul_agent() as agent_config:
        asyncio.run(asyncio.wait_for(main(agent_config), 30))
