"""One benchmark server process: the same tiny ASGI app on uvicorn, four ways.

``python bench/scenarios/server.py --kind K --port P [--agent HOST:PORT]``

* ``plain``: plaintext HTTP (the upper bound, and the backend behind the sidecars);
* ``mtls``: uvicorn with a plain mTLS ``SSLContext`` built from the same Connect leaf,
  CA verification only: no identity check, no intentions (the TLS cost alone);
* ``native-intentions`` / ``native-agent``: ``consul_connect.integrations.asgi.serve``
  with a ``Service("api")`` whose authorizer is the local intention cache (complete
  integration, L7 middleware on) or the agent's authorize endpoint (simple integration).

``--no-tickets`` (TLS kinds): the server sends no TLS session tickets, for the
full-handshake scenarios, as the nginx servers there (``ssl_session_tickets off``):
``num_tickets = 0`` on the plain context, ``Service(session_tickets=False)`` for native.

``--http h11|httptools`` (default h11) picks uvicorn's HTTP/1.1 parser, the same for
every kind: uvicorn's ``http=`` for plain and mtls, ``serve(..., http=...)`` for native.

``--tls-transport direct|asyncio`` (native kinds, default direct) picks who runs TLS in
``serve()``: OpenSSL on the socket itself, or the event loop's TLS as the plain mTLS
server uses.

``--loop uvloop`` runs the whole process (uvicorn, or ``serve()`` and its ASGI
protocol) on a uvloop event loop instead of asyncio's default one. ``serve()`` runs on
the caller's loop, so this is how a caller gets uvloop there; ``asgi.run(...,
loop="uvloop")`` is the blocking equivalent.

Prints ``listening <port>`` once it accepts connections and runs until SIGTERM/SIGINT.
With ``--profile FILE`` the whole serving thread is sampled with pyinstrument and a text
report is written to FILE at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BODY, Pem, fetch_pem, plain_mtls_context

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

_HEADERS = [
    (b"content-type", b"text/plain"),
    (b"content-length", str(len(BODY)).encode()),
]


async def app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """A minimal ASGI app: 200 with a fixed 100-byte body for every HTTP request."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": BODY})


_UVICORN: dict[str, Any] = {
    "log_config": None,
    "access_log": False,
    "lifespan": "off",
    "ws": "none",
    "timeout_keep_alive": 15,
    "backlog": 4096,
}


async def _serve_uvicorn(port: int, pem: Pem | None, stop: asyncio.Event, *,
                         tickets: bool = True, http: str = "h11") -> None:
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, **_UVICORN)
    config.load()
    if pem is not None:
        config.ssl = plain_mtls_context(pem, server=True, tickets=tickets)
    # uvicorn handles SIGTERM/SIGINT itself while serving: it stops and re-raises.
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            return
        await asyncio.sleep(0.01)
    print(f"listening {port}", flush=True)
    await stop.wait()
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def _serve_native(port: int, agent: str, authorizer: str, stop: asyncio.Event, *,
                        tickets: bool = True, http: Any = "h11",
                        tls_transport: Any = "direct") -> None:
    from consul_connect.agent.config import AgentConfig
    from consul_connect.integrations.asgi import serve
    from consul_connect.service import Service

    kind: Any = authorizer  # "intentions" or "agent"
    svc = Service("api", agent=AgentConfig.from_address(agent), authorizer=kind,
                  session_tickets=tickets)
    try:
        server = await serve(app, svc, "127.0.0.1", port, ready_timeout=30, http=http,
                             tls_transport=tls_transport, **_UVICORN)
        print(f"listening {server.port}", flush=True)
        await stop.wait()
        await server.aclose(5)
    finally:
        await svc.aclose()


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.kind == "plain":
        await _serve_uvicorn(args.port, None, stop, http=args.http)
    elif args.kind == "mtls":
        await _serve_uvicorn(args.port, fetch_pem(args.agent, "api"), stop,
                             tickets=not args.no_tickets, http=args.http)
    elif args.kind in ("native-intentions", "native-agent"):
        await _serve_native(args.port, args.agent, args.kind.split("-", 1)[1], stop,
                            tickets=not args.no_tickets, http=args.http,
                            tls_transport=args.tls_transport)
    else:
        raise SystemExit(f"unknown kind {args.kind}")


def _run(args: argparse.Namespace) -> None:
    if args.loop == "uvloop":
        # Optional dependency: imported by name so type checking works without it.
        uvloop: Any = importlib.import_module("uvloop")
        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agent", default="")
    parser.add_argument("--profile", default="")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--no-tickets", action="store_true")
    parser.add_argument("--http", choices=["h11", "httptools"], default="h11")
    parser.add_argument("--tls-transport", choices=["direct", "asyncio"], default="direct")
    args = parser.parse_args()
    if not args.profile:
        _run(args)
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        _run(args)
    finally:
        profiler.stop()
        Path(args.profile).write_text(
            profiler.output_text(unicode=False, color=False, show_all=False, timeline=False)
        )


if __name__ == "__main__":
    main()
