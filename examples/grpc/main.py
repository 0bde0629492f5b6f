"""gRPC over Connect: a grpcio server and a channel that dials it by Consul name.

``greeter`` is a sync ``grpc.Server`` from ``connect_server`` (its interceptor
authorizes every call from the caller's certificate) with a Connect mTLS port from
``add_connect_port``; ``frontend`` calls it through ``connect_channel``, which checks the
server's SPIFFE identity before any RPC byte leaves. To stay one file, the example
uses a generic handler with raw bytes instead of generated protobuf stubs; with stubs
you pass the same server and channel to ``add_..._to_server`` and ``...Stub``.

Needs the optional ``grpcio`` package; without it the example says so and exits 0.
Runs against the agent named by ``CONSUL_HTTP_ADDR`` when set, otherwise against an
embedded dev agent it starts itself. Exit status 0 means the RPC was answered.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from consul_connect import AgentConfig, DevAgent, Service

try:
    import grpc

    from consul_connect.integrations.grpc import (
        add_connect_port,
        connect_channel,
        connect_server,
        peer_identity_of,
    )
except ImportError:
    print("grpc example: skipped, grpcio is not installed (pip install grpcio)")
    sys.exit(0)

METHOD = "/example.Greeter/SayHello"


def say_hello(request: bytes, context: Any) -> bytes:
    # Runs only after the interceptor allowed the caller.
    caller = peer_identity_of(context)
    print(f"greeter: {METHOD} from {caller}")
    return b"hello " + request + b", you are " + (caller.service if caller else "?").encode()


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


def main(cfg: AgentConfig) -> None:
    port = free_port()
    with (
        Service("greeter", agent=cfg, register=True, port=port, address="127.0.0.1") as greeter,
        Service("frontend", agent=cfg) as frontend,
    ):
        server = connect_server(greeter)
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            say_hello  # no (de)serializers: raw bytes in and out
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("example.Greeter", {"SayHello": handler}),)
        )
        add_connect_port(server, greeter, f"127.0.0.1:{port}")
        server.start()
        print(f"greeter serving gRPC as {greeter.identity.uri} on 127.0.0.1:{port}")
        try:
            with connect_channel(frontend, "greeter.service.consul") as channel:
                call = channel.unary_unary(METHOD)
                deadline = time.monotonic() + 8
                while True:
                    try:
                        # wait_for_ready rides out the moment before the instance's
                        # health check passes (gRPC reconnects with backoff meanwhile).
                        reply: bytes = call(b"frontend", timeout=5, wait_for_ready=True)
                        break
                    except grpc.RpcError as exc:
                        if time.monotonic() > deadline:
                            raise
                        print(f"frontend: not yet ({exc.code()}), retrying")
                        time.sleep(0.1)
        finally:
            server.stop(grace=2).wait(5)
    print(f"frontend: got {reply.decode()!r}")
    if reply != b"hello frontend, you are frontend":
        raise SystemExit("grpc example: unexpected answer")
    print("grpc example: OK")


if __name__ == "__main__":
    with consul_agent() as agent_config, intention(agent_config, "frontend", "greeter", "allow"):
        main(agent_config)
