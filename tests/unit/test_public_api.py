"""The public surface is a contract: changing it must be a deliberate act."""

from __future__ import annotations

import consul_connect

EXPECTED = {
    "AgentAuthorizer", "AgentConfig", "AgentError", "AgentNotFoundError",
    "AgentPermissionError", "AgentRateLimitedError", "AgentRequestError", "AgentResponseError",
    "AgentUnavailableError", "AllowAnyServiceInsecure", "AllowIdentities", "AllowTrustDomain",
    "Authorizer", "CARoot", "CatalogResolver", "CertificateError", "ConfigError",
    "ConnectListener", "ConsulConnectError", "Decision", "DevAgent", "DialError", "Endpoint",
    "IdentityError", "IntentionAuthorizer", "Leaf", "NoInstancesError", "NotReadyError",
    "PeerRejected", "PreparedQueryResolver", "Resolver", "RootSet", "ServerIdentityError",
    "Service", "ServiceEvent", "ServiceIdentity", "ServiceStatistics", "StaticResolver",
    "__version__", "all_of", "any_of", "get_peer_identity", "parse_service_identity",
    "parse_spiffe_id", "resolver_for_name",
}  # fmt: skip


def test_exported_names_are_exactly_the_contract() -> None:
    assert set(consul_connect.__all__) == EXPECTED


def test_every_export_exists_and_public_callables_are_documented() -> None:
    for name in consul_connect.__all__:
        obj = getattr(consul_connect, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_errors_share_one_root_and_mix_in_stdlib_bases() -> None:
    root = consul_connect.ConsulConnectError
    for name in consul_connect.__all__:
        obj = getattr(consul_connect, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, root), name
    assert issubclass(consul_connect.AgentPermissionError, PermissionError)
    assert issubclass(consul_connect.NotReadyError, TimeoutError)
    assert issubclass(consul_connect.DialError, ConnectionError)
