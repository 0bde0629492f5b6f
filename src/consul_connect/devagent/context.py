"""Configuration and shared context of one dev agent instance."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from consul_connect.devagent.state import Store

if TYPE_CHECKING:
    from consul_connect.devagent.acl import ACLSystem

__all__ = ["AgentContext", "DevAgentConfig"]

CONSUL_VERSION = "1.20.1"


@dataclass(frozen=True)
class DevAgentConfig:
    """Settings of a dev agent; defaults match ``consul agent -dev``.

    ``leaf_cert_ttl`` is in seconds (72 h by default); ``leaf_root_change_jitter``
    is the upper bound, in seconds, of the random delay before leaves are
    re-issued after a root change (Consul uses 30 s; tests usually set 0).
    ``acl_default_token`` is Consul's ``acl.tokens.default``: the secret used for requests
    that carry no token (None or empty = the anonymous token).
    """

    datacenter: str = "dc1"
    node_name: str = field(default_factory=socket.gethostname)
    node_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    bind: str = "127.0.0.1"
    http_port: int = 8500
    acl_enabled: bool = False
    acl_default_policy: str = "allow"
    acl_initial_management_token: str | None = None
    acl_default_token: str | None = None
    data_dir: str | None = None
    leaf_cert_ttl: float = 72 * 3600.0
    leaf_root_change_jitter: float = 30.0
    cluster_id: str | None = None
    log_level: str = "info"


BackgroundTask = Callable[["AgentContext"], Coroutine[Any, Any, None]]


class AgentContext:
    """What every endpoint handler can reach: config, store, ACLs, and module state.

    Endpoint modules keep their in-memory helpers (the CA, the leaf cache, ...) in
    ``extensions`` under their own key and their durable data in store tables.
    """

    def __init__(self, config: DevAgentConfig) -> None:
        from consul_connect.devagent.acl import ACLSystem

        self.config = config
        self.store = Store(config.data_dir)
        if "node_id" in self.store.meta:
            # A restarted agent keeps its node identity.
            self.node_id: str = self.store.meta["node_id"]
        else:
            self.node_id = config.node_id
            self.store.meta["node_id"] = self.node_id
        self.acl: ACLSystem = ACLSystem(self)
        self.extensions: dict[str, Any] = {}
        self.background: list[BackgroundTask] = []
        self.http_address: str = ""

    @property
    def datacenter(self) -> str:
        """The agent's datacenter."""
        return self.config.datacenter

    @property
    def node_name(self) -> str:
        """The agent's node name."""
        return self.config.node_name
