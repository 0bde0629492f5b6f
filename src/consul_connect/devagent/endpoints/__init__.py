"""Endpoint groups of the dev agent; each module has ``register(router, ctx)``."""

from __future__ import annotations

from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.endpoints import (
    acl,
    acl_roles,
    agent,
    catalog,
    config_entries,
    connect_ca,
    intentions,
    query,
    status,
)
from consul_connect.devagent.http import Router

__all__ = ["register_all"]


def register_all(router: Router, ctx: AgentContext) -> None:
    """Register every endpoint group on ``router``."""
    for module in (
        status,
        agent,
        catalog,
        connect_ca,
        intentions,
        config_entries,
        acl,
        acl_roles,
        query,
    ):
        module.register(router, ctx)
