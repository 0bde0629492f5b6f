"""Dev agent endpoints: intentions (not yet implemented)."""

from __future__ import annotations

from consul_connect.devagent.context import AgentContext
from consul_connect.devagent.http import Router


def register(router: Router, ctx: AgentContext) -> None:
    """Register this group's routes."""
