"""consul-connect: Connect-native Consul service mesh for Python services, no sidecar.

The public surface is what this module exports; everything else is internal.

>>> from consul_connect import Service
>>> with Service("web") as web:                       # doctest: +SKIP
...     web.wait_ready()
...     sock = web.connect("api.service.consul")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import (
    AgentAuthorizer,
    AllowAnyServiceInsecure,
    AllowIdentities,
    AllowTrustDomain,
    Authorizer,
    IntentionAuthorizer,
    all_of,
    any_of,
)
from consul_connect.authz.intentions import Decision
from consul_connect.certs import CARoot, Leaf, RootSet
from consul_connect.discovery import (
    CatalogResolver,
    Endpoint,
    PreparedQueryResolver,
    Resolver,
    StaticResolver,
    resolver_for_name,
)
from consul_connect.errors import (
    AgentError,
    AgentNotFoundError,
    AgentPermissionError,
    AgentRateLimitedError,
    AgentRequestError,
    AgentResponseError,
    AgentUnavailableError,
    CertificateError,
    ConfigError,
    ConsulConnectError,
    DialError,
    IdentityError,
    NoInstancesError,
    NotReadyError,
    PeerRejected,
    ServerIdentityError,
)
from consul_connect.identity import ServiceIdentity, parse_service_identity, parse_spiffe_id
from consul_connect.service import (
    ConnectListener,
    Service,
    ServiceEvent,
    ServiceStatistics,
    get_peer_identity,
)

if TYPE_CHECKING:
    from consul_connect.devagent import DevAgent

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The dev agent is only loaded when asked for: services do not pay for it.
    if name == "DevAgent":
        from consul_connect.devagent import DevAgent

        return DevAgent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AgentAuthorizer",
    "AgentConfig",
    "AgentError",
    "AgentNotFoundError",
    "AgentPermissionError",
    "AgentRateLimitedError",
    "AgentRequestError",
    "AgentResponseError",
    "AgentUnavailableError",
    "AllowAnyServiceInsecure",
    "AllowIdentities",
    "AllowTrustDomain",
    "Authorizer",
    "CARoot",
    "CatalogResolver",
    "CertificateError",
    "ConfigError",
    "ConnectListener",
    "ConsulConnectError",
    "Decision",
    "DevAgent",
    "DialError",
    "Endpoint",
    "IdentityError",
    "IntentionAuthorizer",
    "Leaf",
    "NoInstancesError",
    "NotReadyError",
    "PeerRejected",
    "PreparedQueryResolver",
    "Resolver",
    "RootSet",
    "ServerIdentityError",
    "Service",
    "ServiceEvent",
    "ServiceIdentity",
    "ServiceStatistics",
    "StaticResolver",
    "__version__",
    "all_of",
    "any_of",
    "get_peer_identity",
    "parse_service_identity",
    "parse_spiffe_id",
    "resolver_for_name",
]
