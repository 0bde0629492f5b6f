"""Library changes the benchmark proposes, applied by monkeypatching *this process only*.

The benchmark measures the native path twice in the same run: as the library ships
("before") and with these patches ("after"), so each proposal comes with its gain.
None of this is used outside ``bench/``; the real fix belongs in the library.

* ``nodelay``: ``integrations.asgi._listen`` creates its socket as
  ``socket.socket(family, SOCK_STREAM)``, whose ``proto`` is 0. asyncio only sets
  ``TCP_NODELAY`` on accepted sockets whose ``proto == IPPROTO_TCP``
  (``asyncio.base_events._set_nodelay``), so every Connect ASGI connection runs with
  Nagle on: uvicorn writes the response head and body separately, the second TLS record
  waits for the client's delayed ACK (~40 ms on Linux) on keep-alive connections.
  Fix: pass ``socket.IPPROTO_TCP`` as the third argument.
* ``l4-decision-cache``: ``IntentionSet.decide_l4`` formats a new reason string
  (``Intention.describe()``) and a new ``Decision`` on every call, although both depend
  only on the winning intention. Build each intention's ``Decision`` once (lazily here,
  or in ``IntentionSet.__init__``) and return the same frozen object.
* ``agent-pool``: ``AgentClient`` builds ``httpx.AsyncHTTPTransport`` with httpx's default
  limits (100 connections). Every Service holds two blocking queries (leaf, intentions)
  on the one shared client, so past ~50 Services the pool is full of held queries and
  every further request (a new Service's first leaf, the authorize probe) waits for a
  blocking query to return, up to its 5-minute wait, and fails with ``PoolTimeout``.
  Fix: ``limits=httpx.Limits(max_connections=None, max_keepalive_connections=...)``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable


def _nodelay() -> None:
    from consul_connect.integrations import asgi

    def _listen(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    asgi._listen = _listen


def _l4_decision_cache() -> None:
    from consul_connect.authz import intentions as mod

    original = mod.IntentionSet.decide_l4

    def decide_l4(
        self: mod.IntentionSet,
        source_ns: str,
        source_name: str,
        partition: str = mod.DEFAULT_PARTITION,
        *,
        peer: str = "",
    ) -> mod.Decision:
        pos = self._first_pos(source_ns, source_name, partition, peer)
        if pos is None:
            return original(self, source_ns, source_name, partition, peer=peer)
        cache: dict[int, mod.Decision] | None = self.__dict__.get("_bench_l4")
        if cache is None:
            cache = self.__dict__["_bench_l4"] = {}
        found = cache.get(pos)
        if found is None:
            found = cache[pos] = original(self, source_ns, source_name, partition, peer=peer)
        return found

    mod.IntentionSet.decide_l4 = decide_l4  # type: ignore[method-assign]


def _agent_pool() -> None:
    import functools

    import httpx

    from consul_connect.agent import client

    class _Httpx:
        """``httpx`` as ``agent.client`` sees it, with an unbounded connection pool."""

        def __getattr__(self, name: str) -> object:
            return getattr(httpx, name)

        AsyncHTTPTransport = functools.partial(
            httpx.AsyncHTTPTransport,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        )

    setattr(client, "httpx", _Httpx())  # noqa: B010 - the module re-exports nothing


AVAILABLE = {
    "nodelay": _nodelay,
    "l4-decision-cache": _l4_decision_cache,
    "agent-pool": _agent_pool,
}


def apply(names: Iterable[str]) -> None:
    """Apply the named patches (unknown names raise ``KeyError``)."""
    for name in names:
        if name:
            AVAILABLE[name]()
