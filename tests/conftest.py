"""Shared fixtures: a dev agent per test and an HTTP client pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from consul_connect.devagent import DevAgent


@pytest.fixture
def agent(consul_dev_agent: DevAgent) -> DevAgent:
    """A fresh dev agent with ACLs off."""
    return consul_dev_agent


@pytest.fixture
def start_agent(consul_dev_agent_factory: Callable[..., DevAgent]) -> Callable[..., DevAgent]:
    """Start a dev agent with custom settings (stopped after the test)."""
    return consul_dev_agent_factory


@pytest.fixture
def http(agent: DevAgent) -> Iterator[httpx.Client]:
    """A plain HTTP client whose base URL is the dev agent."""
    with httpx.Client(base_url=agent.http_addr, timeout=30) as client:
        yield client


def client_for(agent: DevAgent, token: str | None = None) -> httpx.Client:
    """An HTTP client for ``agent``, sending ``token`` as X-Consul-Token when given."""
    headers = {"X-Consul-Token": token} if token else {}
    return httpx.Client(base_url=agent.http_addr, timeout=30, headers=headers)
