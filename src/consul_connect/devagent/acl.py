"""ACLs of the dev agent (consul-api.md §6): tokens, service identities, rights, denial texts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from consul_connect.devagent.http import HTTPError

if TYPE_CHECKING:
    from consul_connect.devagent.context import AgentContext

__all__ = ["ACLAuthorizer", "ACLSystem"]


class ACLAuthorizer:
    """The rights of one resolved token.

    ``allowed(resource, level, name)`` answers; ``require(...)`` raises the 403
    Consul sends. Resources are Consul's (``service``, ``node``, ``intention``,
    ``operator``, ``agent``, ``acl``, ``query`` ...), levels ``read``/``list``/``write``.
    """

    def __init__(self, system: ACLSystem, token: str) -> None:
        self.system = system
        self.token = token

    @property
    def has_token(self) -> bool:
        """True when the request carried (or defaulted to) a non-empty token."""
        return bool(self.token)

    @property
    def intention_default_allow(self) -> bool:
        """The default decision for intentions when nothing matches."""
        return not self.system.enabled or self.system.default_policy == "allow"

    def allowed(self, resource: str, level: str, name: str = "") -> bool:
        """True when this token holds ``resource:level`` on ``name``."""
        return not self.system.enabled

    def require(self, resource: str, level: str, name: str = "") -> None:
        """Raise the 403 Consul sends when ``resource:level`` on ``name`` is missing."""
        if not self.allowed(resource, level, name):
            raise HTTPError(403, "Permission denied")


class ACLSystem:
    """Token store and policy evaluation; disabled (allow everything) by default."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.enabled = ctx.config.acl_enabled
        self.default_policy = ctx.config.acl_default_policy

    def authorizer(self, token: str) -> ACLAuthorizer:
        """Resolve ``token`` (empty = anonymous); 403 ``ACL not found`` when unknown."""
        return ACLAuthorizer(self, token)
