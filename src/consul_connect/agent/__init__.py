"""Talking to a Consul agent: configuration, the HTTP client, and blocking watches.

* :class:`AgentConfig` — where the agent is (``AgentConfig.from_env()`` reads ``CONSUL_*``).
* :class:`AgentClient` — one async client with a method per endpoint, returning
  ``(data, QueryMeta)``; failures raise :mod:`consul_connect.errors` ``Agent*Error``.
* :func:`watch` / :func:`watch_hash` — async iterators of changed values of a
  blocking endpoint, driving the pure state machines of :mod:`.blocking`.
"""

from __future__ import annotations

from consul_connect.agent.blocking import (
    Backoff,
    BlockingState,
    HashBlockingState,
    Outcome,
    RateLimiter,
    format_wait,
    parse_index,
)
from consul_connect.agent.client import AgentClient, QueryMeta, error_for_status
from consul_connect.agent.config import AgentConfig
from consul_connect.agent.watch import watch, watch_hash

__all__ = [
    "AgentClient",
    "AgentConfig",
    "Backoff",
    "BlockingState",
    "HashBlockingState",
    "Outcome",
    "QueryMeta",
    "RateLimiter",
    "error_for_status",
    "format_wait",
    "parse_index",
    "watch",
    "watch_hash",
]
