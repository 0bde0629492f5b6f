"""Fixtures for the core tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from consul_connect.devagent import DevAgent
from consul_connect.service import Service
from tests.core.support import cfg


@pytest.fixture
def services(agent: DevAgent) -> Iterator[Callable[..., Service]]:
    """``make(name, **kw)`` builds Services on the test's agent; all closed afterwards."""
    made: list[Service] = []

    def make(name: str, **kw: Any) -> Service:
        svc = Service(name, agent=kw.pop("agent_config", cfg(agent)), **kw)
        made.append(svc)
        return svc

    yield make
    for s in made:
        s.close()
