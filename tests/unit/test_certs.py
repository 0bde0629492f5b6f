"""Certificate values, chain verification and renewal arithmetic (consul-api.md §2.1-3.6)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from consul_connect.certs import (
    CARoot,
    Leaf,
    RootSet,
    colon_hex,
    format_rfc3339,
    key_id,
    load_certificates,
    parse_rfc3339,
    peer_identity_from_der,
    pick_renewal_time,
    renewal_window,
    serial_to_colon_hex,
    service_identity_of,
    split_pem,
    uri_sans,
    verify_chain,
    verify_leaf,
)
from consul_connect.errors import CertificateError
from consul_connect.identity import ServiceIdentity
from consul_connect.testing import TestCA
from tests.pem import assert_ec_key_pem

CLUSTER = "11111111-2222-3333-4444-555555555555"
TD = f"{CLUSTER}.consul"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA(CLUSTER)


@pytest.fixture(scope="module")
def leaf(ca: TestCA) -> Leaf:
    return ca.issue("web")


def _now() -> datetime:
    return datetime.now(UTC)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _self_signed(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = True,
    ski: bool = True,
    lifetime: timedelta = timedelta(days=1),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier(key_id(key.public_key())), critical=False)
    return b.sign(key, hashes.SHA256())


def _child(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    aki: bool = True,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "child")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if aki:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier(key_id(issuer_key.public_key()), None, None),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256()), key


# --------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "00"),
        (1, "01"),
        (11, "0b"),
        (255, "ff"),
        (256, "01:00"),
        (300, "01:2c"),
        (2**64 - 1, "ff:ff:ff:ff:ff:ff:ff:ff"),
    ],
)
def test_serial_is_colon_hex_of_minimal_big_endian_bytes(n: int, text: str) -> None:
    assert serial_to_colon_hex(n) == text


def test_negative_serial_is_refused() -> None:
    with pytest.raises(ValueError):
        serial_to_colon_hex(-1)


def test_colon_hex_is_lower_case_pairs() -> None:
    assert colon_hex(b"\x0b\xab\x00") == "0b:ab:00"
    assert colon_hex(b"") == ""


def test_key_id_is_sha256_of_spki_and_matches_consul_fields(ca: TestCA, leaf: Leaf) -> None:
    root = ca.roots().active
    assert root is not None
    pub = root.root_cert.public_key()
    spki = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_id(pub) == hashlib.sha256(spki).digest()
    assert colon_hex(key_id(pub)) == root.signing_key_id
    assert len(root.signing_key_id) == 95
    aki = leaf.certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert aki.value.key_identifier == key_id(pub)


def test_split_pem_returns_each_block_newline_terminated(leaf: Leaf, ca: TestCA) -> None:
    text = "junk\r\n" + leaf.cert_pem.rstrip("\n").replace("\n", "\r\n") + "\nmore junk\n"
    text += ca.root_cert_pem.rstrip("\n")
    blocks = split_pem(text)
    assert blocks == [leaf.cert_pem, ca.root_cert_pem]
    assert all(b.endswith("-----END CERTIFICATE-----\n") for b in blocks)
    assert split_pem("no pem here") == []
    assert split_pem(leaf.private_key_pem) == []


def test_load_certificates_reads_all_blocks_in_order(leaf: Leaf, ca: TestCA) -> None:
    certs = load_certificates(leaf.cert_pem + ca.root_cert_pem)
    assert [c.serial_number for c in certs] == [
        leaf.certificate.serial_number,
        load_certificates(ca.root_cert_pem)[0].serial_number,
    ]


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "hello",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nnot base64 é\n-----END CERTIFICATE-----\n",
        b"bytes are not accepted",
        None,
    ],
)
def test_load_certificates_raises_certificate_error_on_garbage(garbage: Any) -> None:
    with pytest.raises(CertificateError):
        load_certificates(garbage)


def test_rfc3339_parsing_handles_z_nanoseconds_and_offsets() -> None:
    assert parse_rfc3339("2025-03-01T10:00:00Z") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parse_rfc3339("2025-03-01T10:00:00.123456789Z") == datetime(
        2025, 3, 1, 10, 0, 0, 123456, tzinfo=UTC
    )
    assert parse_rfc3339("2025-03-01T12:00:00+02:00") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    for bad in ["2025-03-01", "2025-03-01T10:00:00", "yesterday", "2025-13-01T10:00:00Z"]:
        with pytest.raises(CertificateError):
            parse_rfc3339(bad)


def test_rfc3339_formatting_is_utc_with_z() -> None:
    assert format_rfc3339(datetime(2025, 3, 1, 10, tzinfo=UTC)) == "2025-03-01T10:00:00Z"
    assert format_rfc3339(datetime(2025, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)) == (
        "2025-03-01T10:00:00.5Z"
    )


# ------------------------------------------------------------- identity of certs


def test_service_identity_of_a_leaf(leaf: Leaf) -> None:
    assert service_identity_of(leaf.certificate) == ServiceIdentity(TD, "default", "dc1", "web")
    assert uri_sans(leaf.certificate) == [f"spiffe://{TD}/ns/default/dc/dc1/svc/web"]


def test_uri_sans_of_cert_without_san_is_empty() -> None:
    cert = _self_signed("x", ec.generate_private_key(ec.SECP256R1()))
    assert uri_sans(cert) == []


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ("issue_without_uri_san", "no URI SAN"),
        ("issue_with_two_uri_sans", "2 URI SANs"),
        ("issue_with_non_spiffe_uri", "not a service identity"),
    ],
)
def test_service_identity_of_rejects_bad_certs(ca: TestCA, issuer: str, message: str) -> None:
    bad = getattr(ca, issuer)("web")
    with pytest.raises(CertificateError, match=message):
        service_identity_of(bad.certificate)


def test_service_identity_of_rejects_agent_cert(ca: TestCA) -> None:
    with pytest.raises(CertificateError, match="AgentIdentity"):
        service_identity_of(ca.issue_agent_cert("node1").certificate)


def test_peer_identity_from_der_parses_and_caches(leaf: Leaf) -> None:
    der = _der(leaf.certificate)
    first = peer_identity_from_der(der)
    assert first == leaf.identity
    assert peer_identity_from_der(bytes(der)) is first


def test_peer_identity_from_der_rejects_garbage_and_non_service_certs(ca: TestCA) -> None:
    with pytest.raises(CertificateError):
        peer_identity_from_der(b"\x30\x03junk")
    with pytest.raises(CertificateError):
        peer_identity_from_der(_der(ca.issue_agent_cert("n").certificate))


# ------------------------------------------------------------------ CARoot/RootSet

CONSUL_ROOTS_SAMPLE_KEYS = {
    "ID",
    "Name",
    "SerialNumber",
    "SigningKeyID",
    "ExternalTrustDomain",
    "NotBefore",
    "NotAfter",
    "RootCert",
    "IntermediateCerts",
    "Active",
    "PrivateKeyType",
    "PrivateKeyBits",
    "CreateIndex",
    "ModifyIndex",
}


def test_roots_json_round_trips_with_consul_fields(ca: TestCA) -> None:
    roots = ca.roots(index=7)
    doc = roots.to_json()
    assert set(doc) == {"ActiveRootID", "TrustDomain", "Roots"}
    assert set(doc["Roots"][0]) == CONSUL_ROOTS_SAMPLE_KEYS
    assert doc["Roots"][0]["IntermediateCerts"] is None
    again = RootSet.from_json(doc, index=7)
    assert again == roots
    assert again.index == 7
    assert again.trust_domain == TD
    root = again.roots[0]
    assert root.active and again.active == root
    assert root.id == colon_hex(root.root_cert.fingerprint(hashes.SHA1()))
    assert root.private_key_type == "ec" and root.private_key_bits == 256
    assert root.external_trust_domain == CLUSTER
    assert root.not_before == root.root_cert.not_valid_before_utc


def test_root_built_directly_parses_and_validates_its_pem(ca: TestCA) -> None:
    template = ca.roots().roots[0]
    root = CARoot(
        id="x",
        name="n",
        serial_number=1,
        signing_key_id="",
        external_trust_domain="",
        not_before=template.not_before,
        not_after=template.not_after,
        root_cert_pem=template.root_cert_pem,
    )
    assert root.root_cert == template.root_cert
    with pytest.raises(CertificateError):
        CARoot("x", "n", 1, "", "", root.not_before, root.not_after, "garbage")
    with pytest.raises(CertificateError, match="exactly one"):
        CARoot("x", "n", 1, "", "", root.not_before, root.not_after, root.root_cert_pem * 2)


def test_peer_identity_from_der_rejects_non_bytes() -> None:
    with pytest.raises(CertificateError):
        peer_identity_from_der("not bytes")  # type: ignore[arg-type]


def test_root_from_minimal_json_defaults_from_certificate(ca: TestCA) -> None:
    root = CARoot.from_json({"ID": "x", "RootCert": ca.root_cert_pem, "IntermediateCerts": None})
    assert root.intermediate_cert_pems == ()
    assert root.serial_number == root.root_cert.serial_number
    assert root.not_after == root.root_cert.not_valid_after_utc
    assert not root.active


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RootCert", None),
        ("RootCert", 5),
        ("RootCert", "garbage"),
        ("ID", None),
        ("SerialNumber", "7"),
        ("SerialNumber", True),
        ("Active", "yes"),
        ("IntermediateCerts", "pem"),
        ("IntermediateCerts", [5]),
        ("IntermediateCerts", ["garbage"]),
        ("NotBefore", "yesterday"),
        ("NotAfter", 12),
        ("CreateIndex", 1.5),
    ],
)
def test_malformed_root_json_raises_certificate_error(ca: TestCA, key: str, value: Any) -> None:
    doc = ca.roots().to_json()
    doc["Roots"][0][key] = value
    with pytest.raises(CertificateError):
        RootSet.from_json(doc)


@pytest.mark.parametrize(
    "doc", [None, [], "x", {"Roots": "x"}, {"Roots": [None]}, {"TrustDomain": 3}]
)
def test_malformed_root_set_json_raises_certificate_error(doc: Any) -> None:
    with pytest.raises(CertificateError):
        RootSet.from_json(doc)


def test_empty_root_set_has_no_active_root() -> None:
    roots = RootSet.from_json({"ActiveRootID": "", "TrustDomain": "", "Roots": None})
    assert roots.roots == () and roots.active is None and roots.cadata == ""


def test_cadata_holds_every_root_after_rotation() -> None:
    ca = TestCA()
    ca.rotate()
    roots = ca.roots()
    assert len(roots.roots) == 2
    assert isinstance(roots.cadata, str)
    assert split_pem(roots.cadata) == [r.root_cert_pem for r in roots.roots]
    assert roots.active is roots.roots[1]
    assert roots.active_root_id == roots.roots[1].id
    assert split_pem(roots.intermediates_pem) == list(roots.roots[1].intermediate_cert_pems)


# ------------------------------------------------------------------------ Leaf


def test_leaf_from_json_reads_consul_issued_cert(leaf: Leaf) -> None:
    doc = leaf.to_json()
    assert set(doc) == {
        "SerialNumber",
        "CertPEM",
        "PrivateKeyPEM",
        "Service",
        "ServiceURI",
        "ValidAfter",
        "ValidBefore",
        "CreateIndex",
        "ModifyIndex",
    }
    parsed = Leaf.from_json(doc)
    assert parsed == leaf
    assert parsed.service == "web"
    assert parsed.identity == ServiceIdentity(TD, "default", "dc1", "web")
    assert parsed.serial_number == serial_to_colon_hex(leaf.certificate.serial_number)
    assert parsed.valid_before - parsed.valid_after == timedelta(hours=72)
    assert_ec_key_pem(parsed.private_key_pem)


def test_leaf_from_json_accepts_nanosecond_times_and_missing_indexes(leaf: Leaf) -> None:
    doc = leaf.to_json()
    doc["ValidAfter"] = "2025-03-01T09:59:00.123456789Z"
    del doc["CreateIndex"], doc["ModifyIndex"]
    parsed = Leaf.from_json(doc)
    # The certificate, not the JSON, is authoritative for the validity period.
    assert parsed.valid_after == leaf.valid_after
    assert parsed.modify_index == 0


def test_leaf_cert_pem_with_intermediates_is_split_into_leaf_and_chain() -> None:
    ca = TestCA()
    ca.rotate()
    leaf = ca.issue("api")
    parsed = Leaf.from_json(leaf.to_json())
    assert len(split_pem(parsed.cert_pem)) == 1
    assert parsed.chain_pems == ca.roots().active.intermediate_cert_pems  # type: ignore[union-attr]
    assert parsed.full_chain_pem == leaf.to_json()["CertPEM"]
    assert len(parsed.chain) == 1


def test_leaf_repr_never_contains_the_private_key(leaf: Leaf) -> None:
    text = repr(leaf) + str(leaf)
    assert "PRIVATE KEY" not in text
    body = leaf.private_key_pem.splitlines()[1]
    assert body not in text
    assert "web" in text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("CertPEM", None, "CertPEM"),
        ("CertPEM", 1, "CertPEM"),
        ("CertPEM", "garbage", "PEM"),
        ("PrivateKeyPEM", None, "PrivateKeyPEM"),
        ("PrivateKeyPEM", "garbage", "private key"),
        ("Service", None, "Service"),
        ("Service", "db", "does not match"),
        ("ServiceURI", None, "ServiceURI"),
        ("ServiceURI", f"spiffe://{TD}/ns/default/dc/dc1/svc/db", "does not match"),
        ("SerialNumber", "ff:ff", "SerialNumber"),
        ("SerialNumber", 11, "SerialNumber"),
        ("ValidBefore", "soon", "RFC 3339"),
        ("ModifyIndex", "42", "ModifyIndex"),
        ("CreateIndex", False, "CreateIndex"),
    ],
)
def test_malformed_leaf_json_raises_certificate_error(
    leaf: Leaf, key: str, value: Any, message: str
) -> None:
    doc = leaf.to_json()
    if value is None:
        del doc[key]
    else:
        doc[key] = value
    with pytest.raises(CertificateError, match=message):
        Leaf.from_json(doc)


@pytest.mark.parametrize("doc", [None, [], "x", 3])
def test_leaf_from_non_object_raises_certificate_error(doc: Any) -> None:
    with pytest.raises(CertificateError):
        Leaf.from_json(doc)


def test_leaf_with_someone_elses_key_is_refused(ca: TestCA, leaf: Leaf) -> None:
    doc = leaf.to_json()
    doc["PrivateKeyPEM"] = ca.issue("web").private_key_pem
    with pytest.raises(CertificateError, match="does not match the leaf"):
        Leaf.from_json(doc)


@pytest.mark.parametrize(
    "issuer",
    ["issue_without_uri_san", "issue_with_two_uri_sans", "issue_with_non_spiffe_uri"],
)
def test_leaf_from_bad_certificate_is_refused(ca: TestCA, issuer: str) -> None:
    bad = getattr(ca, issuer)("web")
    doc = {
        "CertPEM": bad.full_chain_pem,
        "PrivateKeyPEM": bad.private_key_pem,
        "Service": "web",
        "ServiceURI": f"spiffe://{TD}/ns/default/dc/dc1/svc/web",
    }
    with pytest.raises(CertificateError):
        Leaf.from_json(doc)


def test_leaf_is_immutable(leaf: Leaf) -> None:
    with pytest.raises(AttributeError):
        leaf.service = "db"  # type: ignore[misc]


# ------------------------------------------------------------------ verify_leaf


def test_fresh_leaf_verifies_against_its_roots(ca: TestCA, leaf: Leaf) -> None:
    verify_leaf(leaf, ca.roots(), _now())


def test_leaf_from_another_ca_fails(leaf: Leaf) -> None:
    with pytest.raises(CertificateError, match="does not chain"):
        verify_leaf(leaf, TestCA().roots(), _now())


def test_leaf_from_impostor_ca_with_same_trust_domain_fails(ca: TestCA) -> None:
    impostor = ca.untrusted()
    forged = impostor.issue("web")
    assert forged.service_uri == ca.issue("web").service_uri
    with pytest.raises(CertificateError):
        verify_leaf(forged, ca.roots(), _now())


def test_expired_leaf_fails(ca: TestCA, leaf: Leaf) -> None:
    with pytest.raises(CertificateError, match="expired"):
        verify_leaf(leaf, ca.roots(), leaf.valid_before + timedelta(seconds=1))


def test_not_yet_valid_leaf_fails(ca: TestCA, leaf: Leaf) -> None:
    with pytest.raises(CertificateError, match="not yet valid"):
        verify_leaf(leaf, ca.roots(), leaf.valid_after - timedelta(seconds=1))


def test_naive_now_is_taken_as_utc(ca: TestCA, leaf: Leaf) -> None:
    verify_leaf(leaf, ca.roots(), datetime.now(UTC).replace(tzinfo=None))


def test_empty_root_set_fails(leaf: Leaf) -> None:
    with pytest.raises(CertificateError):
        verify_leaf(leaf, RootSet("", "", ()), _now())


@pytest.fixture(scope="module")
def rotated() -> tuple[TestCA, RootSet, Leaf, Leaf]:
    """A CA before/after rotation: (ca, roots before, leaf before, leaf after)."""
    ca = TestCA()
    before_roots = ca.roots(index=1)
    before_leaf = ca.issue("web")
    ca.rotate()
    return ca, before_roots, before_leaf, ca.issue("web")


def _only(roots: RootSet, root_index: int, *, keep_intermediates: bool) -> RootSet:
    r = roots.roots[root_index]
    if not keep_intermediates:
        r = CARoot.from_json({**r.to_json(), "IntermediateCerts": None})
    return RootSet(roots.trust_domain, r.id, (r,))


def test_leaf_after_rotation_verifies_against_new_root_alone(
    rotated: tuple[TestCA, RootSet, Leaf, Leaf],
) -> None:
    ca, _, _, after = rotated
    new_only = _only(ca.roots(), 1, keep_intermediates=False)
    verify_leaf(after, new_only, _now())
    path = verify_chain(after.certificate, [], new_only.root_certificates, _now())
    assert len(path) == 2


def test_leaf_after_rotation_verifies_against_old_root_via_cross_signed_cert(
    rotated: tuple[TestCA, RootSet, Leaf, Leaf],
) -> None:
    _, before_roots, _, after = rotated
    assert len(after.chain) == 1
    # The peer still only knows the old root; the leaf's chain carries the cross-sign.
    verify_leaf(after, before_roots, _now())
    path = verify_chain(after.certificate, after.chain, before_roots.root_certificates, _now())
    assert [c.subject for c in path[1:]] == [
        after.chain[0].subject,
        before_roots.roots[0].root_cert.subject,
    ]
    assert path[1].issuer == before_roots.roots[0].root_cert.subject


def test_leaf_after_rotation_without_cross_sign_fails_against_old_root(
    rotated: tuple[TestCA, RootSet, Leaf, Leaf],
) -> None:
    _, before_roots, _, after = rotated
    bare = Leaf.from_pem(after.cert_pem, after.private_key_pem)
    with pytest.raises(CertificateError):
        verify_leaf(bare, before_roots, _now())


def test_roots_intermediates_are_used_as_chain_candidates(
    rotated: tuple[TestCA, RootSet, Leaf, Leaf],
) -> None:
    ca, _, _, after = rotated
    bare = Leaf.from_pem(after.cert_pem, after.private_key_pem)
    assert bare.chain == ()
    old, new = ca.roots().roots
    # Only the old root is an anchor; the cross-signed link comes from IntermediateCerts.
    old_with_cross = CARoot.from_json(
        {**old.to_json(), "IntermediateCerts": list(new.intermediate_cert_pems)}
    )
    verify_leaf(bare, RootSet(ca.trust_domain, old.id, (old_with_cross,)), _now())


def test_leaf_before_rotation_still_verifies_against_rotated_set(
    rotated: tuple[TestCA, RootSet, Leaf, Leaf],
) -> None:
    ca, _, before, _ = rotated
    verify_leaf(before, ca.roots(), _now())


def test_cross_signed_path_ends_when_cross_sign_expires(
    rotated: tuple[TestCA, RootSet, Leaf, Leaf],
) -> None:
    ca, before_roots, _, after = rotated
    later = _now() + timedelta(days=8)
    with pytest.raises(CertificateError):
        verify_leaf(after, before_roots, later)
    # Within its own lifetime the leaf is still fine against the new root directly.
    verify_leaf(after, ca.roots(), min(later, after.valid_before - timedelta(seconds=1)))


def test_leaf_with_ca_flag_is_refused(ca: TestCA) -> None:
    bad = ca.issue_with_ca_flag("web")
    leaf = Leaf.from_pem(bad.cert_pem, bad.private_key_pem)
    with pytest.raises(CertificateError, match="CA certificate"):
        verify_leaf(leaf, ca.roots(), _now())


def test_rsa_root_signs_verifiable_leaves() -> None:
    ca = TestCA(key_type="rsa", key_bits=2048)
    leaf = ca.issue("web")
    root = ca.roots().active
    assert root is not None and root.private_key_type == "rsa" and root.private_key_bits == 2048
    assert leaf.certificate.signature_hash_algorithm is not None
    verify_leaf(leaf, ca.roots(), _now())
    with pytest.raises(CertificateError):
        verify_leaf(leaf, TestCA(key_type="rsa").roots(), _now())


def test_rotation_from_ec_to_rsa_cross_signs_across_key_types() -> None:
    ca = TestCA()
    old = ca.roots()
    ca.key_type = "rsa"
    ca.rotate()
    leaf = ca.issue("web")
    verify_leaf(leaf, old, _now())


def test_verify_chain_checks_signatures_when_key_ids_are_absent() -> None:
    real_key = ec.generate_private_key(ec.SECP256R1())
    fake_key = ec.generate_private_key(ec.SECP256R1())
    anchor = _self_signed("root", real_key, ski=False)
    forged, _ = _child(anchor, fake_key, aki=False)  # right issuer name, wrong key
    with pytest.raises(CertificateError, match="signature does not verify"):
        verify_chain(forged, [], [anchor], _now())
    genuine, _ = _child(anchor, real_key, aki=False)
    assert verify_chain(genuine, [], [anchor], _now()) == [genuine, anchor]


def test_verify_chain_requires_issuers_to_be_cas() -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    anchor = _self_signed("root", root_key)
    not_ca, not_ca_key = _child(anchor, root_key, ca=False)
    grandchild, _ = _child(not_ca, not_ca_key)
    with pytest.raises(CertificateError, match="not a CA"):
        verify_chain(grandchild, [not_ca], [anchor], _now())
    inter, inter_key = _child(anchor, root_key, ca=True)
    leaf, _ = _child(inter, inter_key)
    assert verify_chain(leaf, [inter], [anchor], _now()) == [leaf, inter, anchor]


def test_verify_chain_needs_anchors_and_accepts_an_anchor_itself() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    anchor = _self_signed("root", key)
    assert verify_chain(anchor, [], [anchor], _now()) == [anchor]
    with pytest.raises(CertificateError, match="no trust anchors"):
        verify_chain(anchor, [], [], _now())


def test_verify_chain_fails_when_the_anchor_has_expired() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    anchor = _self_signed("root", key, lifetime=timedelta(minutes=30))
    child, _ = _child(anchor, key)
    assert verify_chain(child, [], [anchor], _now()) == [child, anchor]
    with pytest.raises(CertificateError, match="not valid at"):
        verify_chain(child, [], [anchor], _now() + timedelta(hours=1))


# --------------------------------------------------------------------- renewal

VA = datetime(2025, 3, 1, 10, tzinfo=UTC)
VB = VA + timedelta(hours=72)


def test_renewal_window_is_60_and_90_percent_of_lifetime() -> None:
    soft, hard = renewal_window(VA, VB)
    assert soft == VA + timedelta(hours=43.2)
    assert hard == VA + timedelta(hours=64.8)


def test_pick_renewal_time_is_uniform_between_soft_and_hard() -> None:
    soft, hard = renewal_window(VA, VB)
    now = VA + timedelta(hours=1)
    assert pick_renewal_time(VA, VB, now, 0.0) == soft
    assert pick_renewal_time(VA, VB, now, 1.0) == hard
    assert pick_renewal_time(VA, VB, now, 0.5) == VA + timedelta(hours=54)


def test_pick_renewal_time_inside_soft_window_starts_from_now() -> None:
    _, hard = renewal_window(VA, VB)
    now = VA + timedelta(hours=50)
    assert pick_renewal_time(VA, VB, now, 0.0) == now
    assert pick_renewal_time(VA, VB, now, 1.0) == hard
    assert now < pick_renewal_time(VA, VB, now, 0.5) < hard


def test_pick_renewal_time_after_hard_deadline_is_now() -> None:
    now = VA + timedelta(hours=70)
    assert pick_renewal_time(VA, VB, now, 0.7) == now
    assert pick_renewal_time(VA, VB, VB + timedelta(days=1), 0.3) == VB + timedelta(days=1)


def test_pick_renewal_time_for_very_short_lifetime_is_now() -> None:
    assert pick_renewal_time(VA, VA + timedelta(minutes=5), VA, 0.5) == VA


@pytest.mark.parametrize("rand", [-0.1, 1.1])
def test_pick_renewal_time_rejects_rand_outside_unit_interval(rand: float) -> None:
    with pytest.raises(ValueError):
        pick_renewal_time(VA, VB, VA, rand)
