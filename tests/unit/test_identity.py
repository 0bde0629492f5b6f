"""SPIFFE ID parsing, formatting and comparison (consul-api.md §3.1, §3.2, §4.6)."""

from __future__ import annotations

import dataclasses

import pytest

from consul_connect.errors import IdentityError
from consul_connect.identity import (
    AgentIdentity,
    MeshGatewayIdentity,
    ServerIdentity,
    ServiceIdentity,
    SigningIdentity,
    parse_service_identity,
    parse_spiffe_id,
    trust_domain_from_cluster_id,
)

TD = "11111111-2222-3333-4444-555555555555.consul"


# ------------------------------------------------------------------ formatting


def test_service_uri_has_namespace_and_no_partition_by_default() -> None:
    ident = ServiceIdentity(TD, "default", "dc1", "web")
    assert ident.uri == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert str(ident) == ident.uri


def test_service_uri_writes_ap_segment_only_for_non_default_partition() -> None:
    assert "/ap/" not in ServiceIdentity(TD, "default", "dc1", "web", partition="").uri
    assert "/ap/" not in ServiceIdentity(TD, "default", "dc1", "web", partition="DEFAULT").uri
    ident = ServiceIdentity(TD, "team", "dc1", "web", partition="Finance")
    assert ident.uri == f"spiffe://{TD}/ap/finance/ns/team/dc/dc1/svc/web"


def test_empty_namespace_is_written_as_default() -> None:
    assert ServiceIdentity(TD, "", "dc1", "web").uri.endswith("/ns/default/dc/dc1/svc/web")


def test_segments_needing_escapes_are_percent_encoded_and_round_trip() -> None:
    ident = ServiceIdentity(TD, "default", "dc 1", "we/b?x%")
    assert ident.uri == f"spiffe://{TD}/ns/default/dc/dc%201/svc/we%2Fb%3Fx%25"
    assert parse_spiffe_id(ident.uri) == ident


def test_agent_server_gateway_and_signing_uris() -> None:
    assert AgentIdentity(TD, "dc1", "node-1").uri == f"spiffe://{TD}/agent/client/dc/dc1/id/node-1"
    assert (
        AgentIdentity(TD, "dc1", "n", partition="p1").uri
        == f"spiffe://{TD}/ap/p1/agent/client/dc/dc1/id/n"
    )
    assert ServerIdentity(TD, "dc2").uri == f"spiffe://{TD}/agent/server/dc/dc2"
    assert MeshGatewayIdentity(TD, "dc1").uri == f"spiffe://{TD}/gateway/mesh/dc/dc1"
    assert (
        MeshGatewayIdentity(TD, "dc1", partition="p1").uri
        == f"spiffe://{TD}/ap/p1/gateway/mesh/dc/dc1"
    )
    signing = SigningIdentity("11111111-2222-3333-4444-555555555555")
    assert signing.trust_domain == TD
    assert signing.uri == f"spiffe://{TD}"


def test_identities_are_frozen_and_hashable() -> None:
    ident = ServiceIdentity(TD, "default", "dc1", "web")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.service = "db"  # type: ignore[misc]
    assert len({ident, ServiceIdentity(TD, "default", "dc1", "web")}) == 1


def test_trust_domain_from_cluster_id_is_lower_case_dot_consul() -> None:
    assert trust_domain_from_cluster_id("ABCDEF00-2222-3333-4444-555555555555") == (
        "abcdef00-2222-3333-4444-555555555555.consul"
    )


@pytest.mark.parametrize("bad", ["", "a/b", "a.b", "x y"])
def test_trust_domain_from_bad_cluster_id_raises(bad: str) -> None:
    with pytest.raises(IdentityError):
        trust_domain_from_cluster_id(bad)


# --------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web",
            ServiceIdentity(TD, "default", "dc1", "web", "default"),
        ),
        (
            f"spiffe://{TD}/ap/finance/ns/ns1/dc/dc2/svc/db",
            ServiceIdentity(TD, "ns1", "dc2", "db", "finance"),
        ),
        (
            f"spiffe://{TD}/ns/default/dc/dc1/svc/my%20svc",
            ServiceIdentity(TD, "default", "dc1", "my svc"),
        ),
        (
            f"spiffe://{TD}/ns/default/dc/dc1/svc/a%2Fb",
            ServiceIdentity(TD, "default", "dc1", "a/b"),
        ),
        (
            f"spiffe://{TD}/ns/default/dc/dc1/svc/caf%C3%A9",
            ServiceIdentity(TD, "default", "dc1", "café"),
        ),
        (
            "spiffe:///ns/default/dc/dc1/svc/web",
            ServiceIdentity("", "default", "dc1", "web"),
        ),
        (
            f"SPIFFE://{TD}/ns/default/dc/dc1/svc/web",
            ServiceIdentity(TD, "default", "dc1", "web"),
        ),
        (
            f"spiffe://{TD}/agent/client/dc/dc1/id/node-a",
            AgentIdentity(TD, "dc1", "node-a"),
        ),
        (
            f"spiffe://{TD}/ap/p2/agent/client/dc/dc1/id/node-a",
            AgentIdentity(TD, "dc1", "node-a", partition="p2"),
        ),
        (f"spiffe://{TD}/agent/server/dc/dc1", ServerIdentity(TD, "dc1")),
        (f"spiffe://{TD}/gateway/mesh/dc/dc1", MeshGatewayIdentity(TD, "dc1")),
        (
            f"spiffe://{TD}/ap/p2/gateway/mesh/dc/dc1",
            MeshGatewayIdentity(TD, "dc1", partition="p2"),
        ),
        (
            f"spiffe://{TD}",
            SigningIdentity("11111111-2222-3333-4444-555555555555"),
        ),
        ("spiffe://abc.example.org", SigningIdentity("abc", domain="example.org")),
    ],
)
def test_parse_every_consul_form(uri: str, expected: object) -> None:
    assert parse_spiffe_id(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web",
        f"spiffe://{TD}/ap/finance/ns/ns1/dc/dc2/svc/db",
        f"spiffe://{TD}/agent/client/dc/dc1/id/node-a",
        f"spiffe://{TD}/ap/p2/agent/client/dc/dc1/id/node-a",
        f"spiffe://{TD}/agent/server/dc/dc1",
        f"spiffe://{TD}/ap/p2/gateway/mesh/dc/dc1",
        f"spiffe://{TD}",
    ],
)
def test_canonical_uris_format_back_identically(uri: str) -> None:
    assert parse_spiffe_id(uri).uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "web",
        f"https://{TD}/ns/default/dc/dc1/svc/web",
        f"spiffe:/{TD}/ns/default/dc/dc1/svc/web",
        f"spiffe://{TD}/",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web/",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web/extra",
        f"spiffe://{TD}/ns//dc/dc1/svc/web",
        f"spiffe://{TD}/dc/dc1/svc/web",
        f"spiffe://{TD}/ap//ns/default/dc/dc1/svc/web",
        f"spiffe://{TD}/ap/p/agent/server/dc/dc1",
        f"spiffe://{TD}/agent/client/dc/dc1",
        f"spiffe://{TD}/gateway/ingress/dc/dc1",
        f"spiffe://{TD}/ap/p/ns/ns/identity/web",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web?x=1",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web#frag",
        f"spiffe://{TD}:8443/ns/default/dc/dc1/svc/web",
        f"spiffe://user@{TD}/ns/default/dc/dc1/svc/web",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/we%zzb",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web%",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/%ff",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/w b",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/w\nb",
        "spiffe://",
        "spiffe://nodot",
        "spiffe://.consul",
    ],
)
def test_invalid_spiffe_ids_raise_identity_error_naming_the_uri(uri: str) -> None:
    with pytest.raises(IdentityError) as excinfo:
        parse_spiffe_id(uri)
    assert str(excinfo.value) == f"SPIFFE ID is not in the expected format: {uri}"


def test_parse_rejects_non_string() -> None:
    with pytest.raises(IdentityError):
        parse_spiffe_id(b"spiffe://x.consul")  # type: ignore[arg-type]


def test_parse_is_cached_and_returns_the_same_object() -> None:
    uri = f"spiffe://{TD}/ns/default/dc/dc1/svc/cached"
    assert parse_spiffe_id(uri) is parse_spiffe_id(uri)


def test_parse_service_identity_accepts_service_ids() -> None:
    assert parse_service_identity(f"spiffe://{TD}/ns/default/dc/dc1/svc/web").service == "web"


@pytest.mark.parametrize(
    "uri",
    [
        f"spiffe://{TD}/agent/client/dc/dc1/id/node-a",
        f"spiffe://{TD}/agent/server/dc/dc1",
        f"spiffe://{TD}/gateway/mesh/dc/dc1",
        f"spiffe://{TD}",
    ],
)
def test_parse_service_identity_rejects_other_valid_kinds(uri: str) -> None:
    with pytest.raises(IdentityError, match="not a service identity"):
        parse_service_identity(uri)


def test_parse_service_identity_rejects_garbage_with_format_message() -> None:
    with pytest.raises(IdentityError, match="not in the expected format"):
        parse_service_identity("spiffe://x.consul/nope")


# ------------------------------------------------------------------ comparison


def test_matches_expected_tolerates_a_different_trust_domain() -> None:
    presented = ServiceIdentity("aaaa.consul", "default", "dc1", "web")
    expected = ServiceIdentity("bbbb.consul", "default", "dc1", "web")
    assert presented.matches_expected(expected)
    assert presented.matches_expected(ServiceIdentity("", "default", "dc1", "web"))


def test_matches_expected_is_case_insensitive() -> None:
    presented = ServiceIdentity(TD, "Default", "DC1", "Web", partition="P1")
    assert presented.matches_expected(ServiceIdentity(TD, "default", "dc1", "web", "p1"))


def test_matches_expected_treats_empty_partition_and_namespace_as_default() -> None:
    presented = ServiceIdentity(TD, "default", "dc1", "web", partition="default")
    assert presented.matches_expected(ServiceIdentity(TD, "", "dc1", "web", partition=""))


@pytest.mark.parametrize(
    "expected",
    [
        ServiceIdentity(TD, "default", "dc1", "db"),
        ServiceIdentity(TD, "other", "dc1", "web"),
        ServiceIdentity(TD, "default", "dc2", "web"),
        ServiceIdentity(TD, "default", "dc1", "web", partition="p1"),
        ServiceIdentity(TD, "default", "dc1", "web2"),
    ],
)
def test_matches_expected_requires_service_namespace_partition_datacenter(
    expected: ServiceIdentity,
) -> None:
    assert not ServiceIdentity(TD, "default", "dc1", "web").matches_expected(expected)
