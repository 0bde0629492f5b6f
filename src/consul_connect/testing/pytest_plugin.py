"""pytest fixtures for users' tests (registered automatically as a pytest plugin).

``consul_dev_agent`` gives a running :class:`~consul_connect.devagent.DevAgent` on a
free loopback port, fresh for each test; ``consul_dev_agent_factory`` starts agents
with custom settings and stops them at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from consul_connect.devagent import DevAgent

__all__ = ["consul_dev_agent", "consul_dev_agent_factory"]


@pytest.fixture
def consul_dev_agent_factory() -> Iterator[Callable[..., DevAgent]]:
    """A function ``(**config) -> DevAgent`` that starts an agent, stopped after the test."""
    started: list[DevAgent] = []

    def start(**config: Any) -> DevAgent:
        config.setdefault("leaf_root_change_jitter", 0.0)
        agent = DevAgent(**config).start()
        started.append(agent)
        return agent

    yield start
    for agent in reversed(started):
        agent.stop()


@pytest.fixture
def consul_dev_agent(consul_dev_agent_factory: Callable[..., DevAgent]) -> DevAgent:
    """A running dev agent (ACLs off, no root-change jitter) for one test."""
    return consul_dev_agent_factory()
