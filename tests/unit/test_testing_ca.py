"""TestCA issues what Consul's built-in CA issues, and each wrong certificate it promises."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consul_connect.certs import (
    Leaf,
    key_id,
    service_identity_of,
    uri_sans,
    verify_chain,
    verify_leaf,
)
from consul_connect.errors import CertificateError
from consul_connect.identity import AgentIdentity, ServiceIdentity, parse_spiffe_id
from consul_connect.testing import BadCert, TestCA
from tests.pem import assert_ec_key_pem

CLUSTER = "11111111-2222-3333-4444-555555555555"
TD = f"{CLUSTER}.consul"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA(CLUSTER)


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def _now() -> datetime:
    return datetime.now(UTC)


def _verify(bad: BadCert, ca: TestCA, now: datetime | None = None) -> list[x509.Certificate]:
    roots = ca.roots()
    return verify_chain(
        bad.certificate, [], roots.root_certificates, now if now is not None else _now()
    )


# ------------------------------------------------------------------------ roots


def test_root_looks_like_consuls_built_in_provider(ca: TestCA) -> None:
    roots = ca.roots()
    assert roots.trust_domain == TD
    (root,) = roots.roots
    cert = root.root_cert
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert re.fullmatch(r"pri-[0-9a-z]{8}\.consul\.ca\.11111111\.consul", str(cn))
    assert cert.issuer == cert.subject
    assert uri_sans(cert) == [f"spiffe://{TD}"]
    assert parse_spiffe_id(uri_sans(cert)[0]) == ca.signing_identity
    bc = _ext(cert, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints) and bc.ca and bc.path_length is None
    ku = _ext(cert, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign and ku.digital_signature
    kid = key_id(cert.public_key())
    assert _ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier(kid)
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier) and aki.key_identifier == kid
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert root.private_key_type == "ec" and root.private_key_bits == 256
    assert root.name == "Consul CA Primary Cert"
    assert root.external_trust_domain == CLUSTER
    assert root.active and roots.active_root_id == root.id
    assert root.not_after - root.not_before == timedelta(hours=87600)


def test_default_cluster_id_is_a_random_uuid() -> None:
    a, b = TestCA(), TestCA()
    assert a.cluster_id != b.cluster_id
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", a.cluster_id
    )
    assert a.trust_domain == f"{a.cluster_id}.consul"


def test_roots_index_is_passed_through(ca: TestCA) -> None:
    assert ca.roots(index=42).index == 42


# ----------------------------------------------------------------------- leaves


def test_issued_leaf_matches_consul_leaf_contents(ca: TestCA) -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    leaf = ca.issue("web", ttl=timedelta(hours=5), now=now)
    cert = leaf.certificate
    assert cert.subject == x509.Name([])
    assert cert.issuer == ca.roots().roots[0].root_cert.subject
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical
    assert leaf.service_uri == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert uri_sans(cert) == [leaf.service_uri]
    bc = _ext(cert, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints) and not bc.ca
    ku = _ext(cert, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and ku.key_encipherment and ku.data_encipherment
    assert ku.key_agreement and not ku.key_cert_sign
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert _ext(cert, x509.SubjectKeyIdentifier).value.digest == key_id(cert.public_key())  # type: ignore[attr-defined]
    assert leaf.valid_after == datetime(2030, 1, 2, 3, 3, 5, tzinfo=UTC)
    assert leaf.valid_before - leaf.valid_after == timedelta(hours=5)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert_ec_key_pem(leaf.private_key_pem)
    assert leaf.chain_pems == ()


def test_serials_and_indexes_increase_with_each_leaf(ca: TestCA) -> None:
    a, b = ca.issue("web"), ca.issue("web")
    assert b.certificate.serial_number > a.certificate.serial_number
    assert b.modify_index > a.modify_index
    assert a.create_index == a.modify_index


def test_issue_with_namespace_partition_and_datacenter(ca: TestCA) -> None:
    leaf = ca.issue("db", namespace="team", partition="Finance", datacenter="dc9")
    assert leaf.identity == ServiceIdentity(TD, "team", "dc9", "db", "finance")
    assert leaf.service_uri == f"spiffe://{TD}/ap/finance/ns/team/dc/dc9/svc/db"


def test_issued_leaf_survives_json_round_trip(ca: TestCA) -> None:
    leaf = ca.issue("web")
    assert Leaf.from_json(leaf.to_json()) == leaf


# --------------------------------------------------------------------- rotation


def test_rotate_adds_active_root_with_cross_signed_intermediate() -> None:
    ca = TestCA(CLUSTER)
    old_cert = ca.roots().roots[0].root_cert
    ca.rotate()
    roots = ca.roots()
    old, new = roots.roots
    assert not old.active and new.active and roots.active_root_id == new.id
    assert old.root_cert == old_cert
    (cross,) = new.intermediate_certs
    assert cross.subject == new.root_cert.subject
    assert cross.public_key() == new.root_cert.public_key()
    assert cross.issuer == old.root_cert.subject
    assert cross.serial_number != new.root_cert.serial_number
    aki = _ext(cross, x509.AuthorityKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == key_id(old.root_cert.public_key())
    assert (
        _ext(cross, x509.SubjectKeyIdentifier).value
        == _ext(new.root_cert, x509.SubjectKeyIdentifier).value
    )
    assert cross.not_valid_after_utc - cross.not_valid_before_utc == timedelta(days=7)
    assert verify_chain(cross, [], [old.root_cert], _now()) == [cross, old.root_cert]
    leaf = ca.issue("web")
    assert leaf.certificate.issuer == new.root_cert.subject
    assert leaf.chain_pems == new.intermediate_cert_pems
    assert new.signing_key_id != old.signing_key_id


def test_untrusted_ca_has_same_trust_domain_but_other_keys(ca: TestCA) -> None:
    other = ca.untrusted()
    assert other.trust_domain == ca.trust_domain
    assert other.root_cert_pem != ca.root_cert_pem
    with pytest.raises(CertificateError):
        verify_leaf(other.issue("web"), ca.roots(), _now())


# ------------------------------------------------------------ wrong certificates


def test_bad_cert_repr_hides_the_key(ca: TestCA) -> None:
    bad = ca.issue_expired("web")
    assert "PRIVATE" not in repr(bad)
    assert_ec_key_pem(bad.private_key_pem)
    assert bad.full_chain_pem == bad.cert_pem + "".join(bad.chain_pems)


def test_issue_expired_is_otherwise_valid_but_expired(ca: TestCA) -> None:
    now = _now()
    bad = ca.issue_expired("web", now=now)
    assert bad.certificate.not_valid_after_utc < now
    assert service_identity_of(bad.certificate).service == "web"
    with pytest.raises(CertificateError, match="expired"):
        _verify(bad, ca, now)


def test_issue_not_yet_valid_starts_in_the_future(ca: TestCA) -> None:
    now = _now()
    bad = ca.issue_not_yet_valid("web", now=now)
    assert bad.certificate.not_valid_before_utc > now
    with pytest.raises(CertificateError, match="not yet valid"):
        _verify(bad, ca, now)
    # It is a genuine leaf of this CA once its time comes.
    assert len(_verify(bad, ca, now + timedelta(hours=2))) == 2


def test_issue_with_ca_flag_sets_basic_constraints_ca(ca: TestCA) -> None:
    bad = ca.issue_with_ca_flag("web")
    bc = _ext(bad.certificate, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints) and bc.ca
    assert len(_verify(bad, ca)) == 2
    with pytest.raises(CertificateError, match="CA certificate"):
        verify_leaf(Leaf.from_pem(bad.cert_pem, bad.private_key_pem), ca.roots(), _now())


def test_issue_without_uri_san_has_only_a_dns_san(ca: TestCA) -> None:
    bad = ca.issue_without_uri_san("web")
    san = _ext(bad.certificate, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["web.service.consul"]
    assert uri_sans(bad.certificate) == []
    assert len(_verify(bad, ca)) == 2


def test_issue_with_two_uri_sans_names_two_services(ca: TestCA) -> None:
    bad = ca.issue_with_two_uri_sans("web")
    assert [parse_spiffe_id(u) for u in uri_sans(bad.certificate)] == [
        ServiceIdentity(TD, "default", "dc1", "web"),
        ServiceIdentity(TD, "default", "dc1", "web-other"),
    ]
    assert len(_verify(bad, ca)) == 2


def test_issue_with_non_spiffe_uri_uses_another_scheme(ca: TestCA) -> None:
    bad = ca.issue_with_non_spiffe_uri("web")
    (uri,) = uri_sans(bad.certificate)
    assert uri == f"https://{TD}/ns/default/dc/dc1/svc/web"
    assert len(_verify(bad, ca)) == 2


def test_issue_agent_cert_carries_an_agent_identity(ca: TestCA) -> None:
    bad = ca.issue_agent_cert("node-1")
    (uri,) = uri_sans(bad.certificate)
    assert parse_spiffe_id(uri) == AgentIdentity(TD, "dc1", "node-1")
    assert len(_verify(bad, ca)) == 2


def test_issue_for_uri_carries_exactly_the_given_uris(ca: TestCA) -> None:
    bad = ca.issue_for_uri(["spiffe://other.consul/ns/default/dc/dc1/svc/x"])
    assert uri_sans(bad.certificate) == ["spiffe://other.consul/ns/default/dc/dc1/svc/x"]


def test_bad_certs_carry_the_active_chain_after_rotation() -> None:
    ca = TestCA()
    old_roots = ca.roots()
    ca.rotate()
    bad = ca.issue_agent_cert("n")
    assert len(bad.chain_pems) == 1
    path = verify_chain(
        bad.certificate,
        [x509.load_pem_x509_certificate(p.encode()) for p in bad.chain_pems],
        old_roots.root_certificates,
        _now(),
    )
    assert len(path) == 3


# ------------------------------------------------------------- OpenSSL accepts it


@contextmanager
def _memfile(data: str) -> Iterator[str]:
    fd = os.memfd_create("pem")  # key material stays off disk
    try:
        os.write(fd, data.encode("ascii"))
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _context(side: int, leaf: Leaf, cadata: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cadata)
    with _memfile(leaf.full_chain_pem) as cert, _memfile(leaf.private_key_pem) as key:
        ctx.load_cert_chain(cert, key)
    return ctx


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> bytes:
    """Run a TLS handshake over memory BIOs; return the DER the server saw from the client."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not complete"
    der = server.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd_create")
def test_openssl_accepts_leaves_across_a_rotation() -> None:
    ca = TestCA()
    old_roots = ca.roots()
    before = ca.issue("client")
    ca.rotate()
    after = ca.issue("server")
    # Server has rotated; client still only trusts the old root.
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, after, ca.roots().cadata)
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, before, old_roots.cadata)
    der = _handshake(client_ctx, server_ctx)
    assert x509.load_der_x509_certificate(der) == before.certificate


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd_create")
def test_openssl_rejects_a_leaf_from_an_untrusted_ca(ca: TestCA) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, ca.issue("server"), ca.roots().cadata)
    stranger = ca.untrusted()
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, stranger.issue("client"), stranger.cadata)
    with pytest.raises(ssl.SSLError):
        _handshake(client_ctx, server_ctx)
