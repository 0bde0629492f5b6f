"""A raw-TCP Connect-native server (``Service.start_server``) answering HTTP-shaped requests.

``python bench/scenarios/tcp_server.py --agent HOST:PORT --port P --tls-transport T``

The handler reads up to each blank line and writes a fixed 13-byte HTTP/1.1 response, so
the C load generator can drive it; no HTTP library is involved, which leaves the TLS
transport as most of the per-request work. Prints ``listening <port>`` when it accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from consul_connect.agent.config import AgentConfig
from consul_connect.service import Service

RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\n"
            b"Hello, world!")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    svc = Service("api", agent=AgentConfig.from_address(args.agent))
    try:
        server = await svc.start_server(handle, "127.0.0.1", args.port,
                                        tls_transport=args.tls_transport)
        print(f"listening {args.port}", flush=True)
        await stop.wait()
        server.close()
    finally:
        await svc.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-transport", choices=["asyncio", "direct"], default="direct")
    asyncio.run(main(parser.parse_args()))
