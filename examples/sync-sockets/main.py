"""Connect for synchronous programs: blocking sockets and a thread, no asyncio in sight.

``greeter`` accepts with ``Service.listen()`` / ``ConnectListener.accept()`` in a
thread; ``caller`` dials it by name with ``Service.connect()`` and gets back a plain
``ssl.SSLSocket``. The certificates are fetched and renewed by the library's own
background thread, so nothing here has to run an event loop.

Runs against the agent named by ``CONSUL_HTTP_ADDR`` when set, otherwise against an
embedded dev agent it starts itself. Exit status 0 means the greeting came back.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx

from consul_connect import (
    AgentConfig,
    ConnectListener,
    DevAgent,
    DialError,
    Service,
    get_peer_identity,
)


@contextlib.contextmanager
def consul_agent() -> Iterator[AgentConfig]:
    """The agent from ``CONSUL_*`` variables, or a throw-away embedded dev agent."""
    if os.environ.get("CONSUL_HTTP_ADDR"):
        yield AgentConfig.from_env()
        return
    with DevAgent(leaf_root_change_jitter=0.0) as dev:
        print(f"started an embedded dev agent on {dev.http_addr}")
        yield AgentConfig.from_address(dev.address)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(listener: ConnectListener, errors: list[BaseException]) -> None:
    """Answer every authorized caller with a greeting naming it, until the listener closes."""
    try:
        # Iterating yields only peers that passed the certificate checks and intentions.
        for sock, peer in listener:
            with sock:
                name = sock.recv(1024).decode().strip()
                print(f"greeter: {peer.uri} says it is {name!r}")
                sock.sendall(f"hello {name}, you are {peer.service}\n".encode())
    except BaseException as exc:
        errors.append(exc)


def connect_with_retry(svc: Service, target: str, timeout: float) -> socket.socket:
    """Dial ``target``; a just-registered instance takes a moment to pass its check."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return svc.connect(target, timeout=5)
        except DialError as exc:
            if time.monotonic() > deadline:
                raise
            print(f"caller: not yet ({type(exc).__name__}), retrying")
            time.sleep(0.1)


def main(cfg: AgentConfig) -> None:
    port = free_port()
    with (
        Service("greeter", agent=cfg, register=True, port=port, address="127.0.0.1") as greeter,
        Service("caller", agent=cfg) as caller,
    ):
        greeter.wait_ready(15)
        caller.wait_ready(15)
        errors: list[BaseException] = []
        listener = greeter.listen("127.0.0.1", port)
        thread = threading.Thread(target=serve, args=(listener, errors), daemon=True)
        thread.start()
        print(f"greeter listening as {greeter.identity.uri} on 127.0.0.1:{port}")

        with connect_with_retry(caller, "greeter.service.consul", 8) as sock:
            print(f"caller: connected; server proved it is {get_peer_identity(sock)}")
            sock.sendall(b"caller\n")
            sock.settimeout(5)
            answer = sock.recv(1024).decode().strip()
        print(f"caller: got {answer!r}")

        listener.close()
        thread.join(5)
        if errors:
            raise errors[0]
        if answer != "hello caller, you are caller":
            raise SystemExit("sync example: wrong answer")
        print(f"greeter statistics: accepted={greeter.statistics().accepted}")
    print("sync example: OK")


if __name__ == "__main__":
    with consul_agent() as agent_config, intention(agent_config, "caller", "greeter", "allow"):
        main(agent_config)
