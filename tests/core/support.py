"""Helpers shared by the core tests that run Services against the dev agent."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.discovery import Endpoint
from consul_connect.service import Service


def cfg(agent: DevAgent | str, token: str = "") -> AgentConfig:
    """An AgentConfig for ``agent`` (or a ``host:port``), with ``token`` when given."""
    config = AgentConfig.from_address(agent if isinstance(agent, str) else agent.address)
    return config.replace(token=token) if token else config


def put(agent: DevAgent, path: str, body: Any, token: str = "", **params: str) -> None:
    """PUT ``body`` as JSON to the agent and insist on a 200."""
    headers = {"X-Consul-Token": token} if token else {}
    r = httpx.put(f"{agent.http_addr}{path}", params=params, json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text


def intention(agent: DevAgent, source: str, dest: str, action: str, token: str = "") -> None:
    """Write an L4 intention through the exact API."""
    put(
        agent,
        "/v1/connect/intentions/exact",
        {"Action": action},
        token=token,
        source=source,
        destination=dest,
    )


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``cond()`` holds; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def decides(svc: Service, caller: Service, allowed: bool) -> Callable[[], bool]:
    """A condition: ``svc``'s authorizer decides ``caller`` as ``allowed``."""

    def check() -> bool:
        d = svc.authorizer.decide(caller.identity)
        return d is not None and d.allowed is allowed

    return check


def force_leaf_renewal(agent: DevAgent, service: str) -> None:
    """Make the agent renew ``service``'s cached leaf now (wakes blocked leaf queries)."""

    def go(ctx: Any) -> None:
        from consul_connect.devagent.ca import LEAF_TABLE

        ctx.extensions["connect_ca"].leaves[service].force_expire_after = time.time()
        ctx.store.touch(LEAF_TABLE)

    agent.call(go)


class EchoServer:
    """A Service's blocking listener echoing on threads until closed."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.listener = svc.listen()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> Endpoint:
        host, port = self.listener.address
        return Endpoint(host, port, self.svc.identity)

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            for sock, identity in self.listener:
                self.seen.append(identity.service)
                threading.Thread(target=self._echo, args=(sock,), daemon=True).start()

    @staticmethod
    def _echo(sock: Any) -> None:
        with contextlib.suppress(OSError), sock:
            while data := sock.recv(4096):
                sock.sendall(data)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)
