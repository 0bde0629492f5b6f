"""Two Connect-native services talking over mutual TLS with plain asyncio streams.

``echo`` serves with ``Service.start_server`` (like ``asyncio.start_server``) and
``client`` dials it by name with ``Service.open_connection``. Each side prints the
SPIFFE identity the other side proved.

Runs against the agent named by ``CONSUL_HTTP_ADDR`` when set, otherwise against an
embedded dev agent it starts itself. Exit status 0 means the echo came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator

import httpx

from consul_connect import AgentConfig, DevAgent, DialError, Service, get_peer_identity


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


@contextlib.contextmanager
def intention(cfg: AgentConfig, source: str, destination: str, action: str) -> Iterator[None]:
    """Create ``source => destination`` (as ``consul intention create`` does), then remove it.

    The dev agent allows everything by default; a real cluster often denies by default.
    """
    headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
    params = {"source": source, "destination": destination}
    with httpx.Client(base_url=cfg.base_url, headers=headers, timeout=10) as admin:
        admin.put(
            "/v1/connect/intentions/exact", params=params, json={"Action": action}
        ).raise_for_status()
        try:
            yield
        finally:
            admin.delete("/v1/connect/intentions/exact", params=params)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Runs only for peers that passed the certificate checks and the intentions.
    peer = get_peer_identity(writer)
    line = await reader.readline()
    print(f"echo: peer {peer} sent {line.decode().strip()!r}")
    writer.write(line)
    await writer.drain()
    writer.close()


async def main(cfg: AgentConfig) -> None:
    port = free_port()
    async with (
        Service("echo", agent=cfg, register=True, port=port, address="127.0.0.1") as echo,
        Service("echo-client", agent=cfg) as client,
    ):
        server = await echo.start_server(handle, "127.0.0.1", port)
        print(f"echo serving as {echo.identity.uri} on 127.0.0.1:{port}")

        # The registration's health check turns green right after the first leaf
        # arrives; discovery only returns passing instances, so allow a moment.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8
        while True:
            try:
                reader, writer = await client.open_connection("echo.service.consul", timeout=5)
                break
            except DialError as exc:  # NoInstancesError until the check passes
                if loop.time() > deadline:
                    raise
                print(f"client: not yet ({type(exc).__name__}), retrying")
                await asyncio.sleep(0.1)

        print(f"client: connected; server proved it is {get_peer_identity(writer)}")
        writer.write(b"hello over mTLS\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        print(f"client: got back {answer.decode().strip()!r}")
        server.close()
        if answer != b"hello over mTLS\n":
            raise SystemExit("echo example: wrong answer")
    print("echo example: OK")


if __name__ == "__main__":
    with consul_agent() as agent_config, intention(agent_config, "echo-client", "echo", "allow"):
        asyncio.run(asyncio.wait_for(main(agent_config), 20))
