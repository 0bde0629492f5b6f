"""An embedded, Consul-compatible development agent.

It answers the HTTP API a Connect-native application uses (CA roots and leaf
certificates, authorize, intentions and config entries, catalog and health,
prepared queries, ACL tokens) with Consul's JSON, headers, errors and blocking
semantics, so the library and users' tests run against real HTTP without a
Consul binary.
"""

from __future__ import annotations

from consul_connect.devagent.app import DevAgentApp
from consul_connect.devagent.context import DevAgentConfig
from consul_connect.devagent.server import DevAgent

__all__ = ["DevAgent", "DevAgentApp", "DevAgentConfig"]
