"""Root rotation, cross-signing, pruning and persistence of the dev agent's CA (§3.5)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from consul_connect.devagent import DevAgent
from tests.conftest import client_for
from tests.pem import assert_ec_key_pem

ROOTS = "/v1/connect/ca/roots"
CONFIG = "/v1/connect/ca/configuration"
LEAF = "/v1/agent/connect/ca/leaf/web"


def _certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def _key_id(key: Any) -> bytes:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _pem(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> str:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _chains_to(leaf: x509.Certificate, intermediates: list[x509.Certificate],
               anchor: x509.Certificate) -> bool:
    """Whether ``leaf`` reaches ``anchor`` directly or through one of ``intermediates``."""
    if _issued_by(leaf, anchor):
        return True
    return any(_issued_by(leaf, i) and _issued_by(i, anchor) for i in intermediates)


def _rotate(http: httpx.Client, key_type: str = "ec", bits: int = 384) -> None:
    r = http.put(
        CONFIG,
        json={"Provider": "consul", "Config": {"PrivateKeyType": key_type, "PrivateKeyBits": bits}},
    )
    assert r.status_code == 200, r.text


def _blocked_on(agent: DevAgent, table: str, timeout: float = 10.0) -> None:
    def check(ctx: Any) -> bool:
        ev = ctx.store._events.get(table)
        return ev is not None and not ev.is_set()

    deadline = time.monotonic() + timeout
    while not agent.call(check):
        assert time.monotonic() < deadline, f"no request blocked on {table}"
        time.sleep(0.01)


def test_rotation_keeps_the_old_root_and_activates_a_cross_signed_new_one(
    http: httpx.Client,
) -> None:
    before = http.get(ROOTS)
    [old] = before.json()["Roots"]
    _rotate(http)
    after = http.get(ROOTS)
    body = after.json()
    assert int(after.headers["X-Consul-Index"]) > int(before.headers["X-Consul-Index"])
    prev, new = body["Roots"]
    assert prev["ID"] == old["ID"]
    assert prev["Active"] is False and new["Active"] is True
    assert body["ActiveRootID"] == new["ID"] != old["ID"]
    assert "RotatedOutAt" not in prev
    assert prev["CreateIndex"] == old["CreateIndex"]
    assert prev["ModifyIndex"] == new["CreateIndex"] == new["ModifyIndex"]
    assert new["PrivateKeyType"] == "ec" and new["PrivateKeyBits"] == 384
    assert new["SerialNumber"] > old["SerialNumber"]
    assert new["ExternalTrustDomain"] == old["ExternalTrustDomain"]
    assert new["SigningKeyID"] != old["SigningKeyID"]
    old_cert = x509.load_pem_x509_certificate(old["RootCert"].encode())
    new_cert = x509.load_pem_x509_certificate(new["RootCert"].encode())
    assert _issued_by(new_cert, new_cert)
    assert new_cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert isinstance(new_cert.signature_hash_algorithm, hashes.SHA384)  # as Go picks for P-384
    # The cross-signed certificate: the new root re-issued by the old root.
    [xc_pem] = new["IntermediateCerts"]
    xc = x509.load_pem_x509_certificate(xc_pem.encode())
    assert xc.subject == new_cert.subject
    assert xc.issuer == old_cert.subject
    assert _key_id(xc.public_key()) == _key_id(new_cert.public_key())
    ski = xc.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert ski == _key_id(new_cert.public_key())
    aki = xc.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    assert aki.key_identifier.hex(":") == old["SigningKeyID"]
    assert xc.serial_number not in (new_cert.serial_number, old_cert.serial_number)
    assert xc.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _issued_by(xc, old_cert)
    now = datetime.now(UTC)
    assert now - timedelta(minutes=1, seconds=5) <= xc.not_valid_before_utc <= now
    assert xc.not_valid_after_utc - xc.not_valid_before_utc == timedelta(days=7)


def test_leaf_after_rotation_verifies_against_either_root(http: httpx.Client) -> None:
    old_leaf = http.get(LEAF).json()
    _rotate(http)
    old_root, new_root = (
        x509.load_pem_x509_certificate(r["RootCert"].encode())
        for r in http.get(ROOTS).json()["Roots"]
    )
    body = http.get(LEAF).json()
    assert body["SerialNumber"] != old_leaf["SerialNumber"]
    leaf, *chain = _certs(body["CertPEM"])
    assert len(chain) == 1
    # A peer that already trusts the new root verifies directly ...
    assert _chains_to(leaf, [], new_root)
    # ... one that still trusts only the old root goes through the cross-signed cert,
    assert not _issued_by(leaf, old_root)
    assert _chains_to(leaf, chain, old_root)
    # and a leaf issued before the rotation still verifies against the old root.
    assert _chains_to(_certs(old_leaf["CertPEM"])[0], [], old_root)
    assert not _chains_to(_certs(old_leaf["CertPEM"])[0], chain, new_root)


def test_blocked_leaf_watcher_gets_a_new_leaf_on_rotation(
    agent: DevAgent, http: httpx.Client
) -> None:
    first = http.get(LEAF)
    index = int(first.headers["X-Consul-Index"])
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        fut = pool.submit(http.get, LEAF, params={"index": index, "wait": "30s"})
        _blocked_on(agent, "leaf")
        _rotate(http)
        r = fut.result(timeout=20)
    assert time.monotonic() - started < 20
    new = r.json()
    old = first.json()
    assert int(r.headers["X-Consul-Index"]) == new["ModifyIndex"] > index
    assert new["SerialNumber"] != old["SerialNumber"]
    assert new["PrivateKeyPEM"] != old["PrivateKeyPEM"]
    active = http.get(ROOTS).json()["Roots"][-1]
    leaf = _certs(new["CertPEM"])[0]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    assert aki.key_identifier.hex(":") == active["SigningKeyID"]
    assert new["CertPEM"].endswith(active["IntermediateCerts"][0])


def test_root_change_jitter_delays_reissue_for_blocked_watchers(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent(leaf_root_change_jitter=0.5)
    with client_for(agent) as http:
        first = http.get(LEAF)
        index = int(first.headers["X-Consul-Index"])
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(http.get, LEAF, params={"index": index, "wait": "30s"})
            _blocked_on(agent, "leaf")
            started = time.monotonic()
            _rotate(http)
            r = fut.result(timeout=20)
        assert time.monotonic() - started < 5
        assert r.json()["SerialNumber"] != first.json()["SerialNumber"]


def test_non_blocking_leaf_is_reissued_at_once_after_rotation(
    start_agent: Callable[..., DevAgent],
) -> None:
    # Even with a long jitter, a non-blocking call sees the root change right away.
    agent = start_agent(leaf_root_change_jitter=300.0)
    with client_for(agent) as http:
        old = http.get(LEAF).json()
        _rotate(http)
        started = time.monotonic()
        new = http.get(LEAF).json()
        assert time.monotonic() - started < 5
    assert new["SerialNumber"] != old["SerialNumber"]
    assert new["ModifyIndex"] > old["ModifyIndex"]


def test_rsa_roots_sign_ec_leaves_with_rsa_signatures(http: httpx.Client) -> None:
    _rotate(http, "rsa", 2048)
    roots = http.get(ROOTS).json()["Roots"]
    new = roots[-1]
    assert new["PrivateKeyType"] == "rsa" and new["PrivateKeyBits"] == 2048
    new_cert = x509.load_pem_x509_certificate(new["RootCert"].encode())
    assert isinstance(new_cert.public_key(), rsa.RSAPublicKey)
    body = http.get(LEAF).json()
    leaf, xc = _certs(body["CertPEM"])
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert_ec_key_pem(body["PrivateKeyPEM"])
    assert leaf.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256
    assert _issued_by(leaf, new_cert)
    old_cert = x509.load_pem_x509_certificate(roots[0]["RootCert"].encode())
    assert xc.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert _chains_to(leaf, [xc], old_cert)
    # Rotating away from the RSA root: the RSA key signs the next cross-signed cert.
    _rotate(http, "ec", 256)
    latest = http.get(ROOTS).json()["Roots"][-1]
    xc2 = x509.load_pem_x509_certificate(latest["IntermediateCerts"][0].encode())
    assert xc2.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256
    assert _issued_by(xc2, new_cert)


def test_supplied_private_key_and_root_cert_become_the_active_root(http: httpx.Client) -> None:
    td = http.get(ROOTS).json()["TrustDomain"]
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = _pem(key, serialization.PrivateFormat.TraditionalOpenSSL)
    # A supplied key without a cert: the agent builds the root around that key.
    r = http.put(CONFIG, json={"Provider": "consul", "Config": {"PrivateKey": key_pem}})
    assert r.status_code == 200, r.text
    active = http.get(ROOTS).json()["Roots"][-1]
    cert = x509.load_pem_x509_certificate(active["RootCert"].encode())
    assert _key_id(cert.public_key()) == _key_id(key.public_key())
    # Key and cert: the supplied cert is the root, its fingerprint the ID.
    key2 = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Operator CA")])
    now = datetime.now(UTC)
    own = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key2.public_key())
        .serial_number(4242)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]),
            critical=False,
        )
        .sign(key2, hashes.SHA256())
    )
    own_pem = own.public_bytes(serialization.Encoding.PEM).decode()
    key2_pem = _pem(key2, serialization.PrivateFormat.PKCS8)
    r = http.put(
        CONFIG,
        json={"Provider": "consul", "Config": {"PrivateKey": key2_pem, "RootCert": own_pem}},
    )
    assert r.status_code == 200, r.text
    roots = http.get(ROOTS).json()["Roots"]
    assert len(roots) == 3
    active = roots[-1]
    assert active["RootCert"] == own_pem
    fp = hashlib.sha1(own.public_bytes(serialization.Encoding.DER)).digest().hex(":")
    assert active["ID"] == fp
    assert active["SerialNumber"] == 4242
    assert active["PrivateKeyType"] == "ec" and active["PrivateKeyBits"] == 384
    leaf = _certs(http.get(LEAF).json()["CertPEM"])[0]
    assert _issued_by(leaf, own)


def test_mismatched_supplied_key_and_cert_are_refused(http: httpx.Client) -> None:
    before = http.get(ROOTS).json()
    key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    r = http.put(
        CONFIG,
        json={
            "Provider": "consul",
            "Config": {"PrivateKey": key_pem, "RootCert": before["Roots"][0]["RootCert"]},
        },
    )
    assert r.status_code == 500
    r2 = http.put(CONFIG, json={"Provider": "consul", "Config": {"PrivateKey": "not a key"}})
    assert r2.status_code == 500
    assert "no PEM-encoded data found" in r2.text
    assert http.get(ROOTS).json() == before


def test_disabled_cross_signing_needs_the_force_flag(http: httpx.Client) -> None:
    r = http.put(CONFIG, json={"Provider": "consul", "Config": {"DisableCrossSigning": True}})
    assert r.status_code == 200
    roots = http.get(ROOTS).json()
    bits = {"PrivateKeyType": "ec", "PrivateKeyBits": 384, "DisableCrossSigning": True}
    r = http.put(CONFIG, json={"Provider": "consul", "Config": bits})
    assert r.status_code == 500
    assert r.text.startswith("The current CA Provider does not support cross-signing.")
    assert http.get(ROOTS).json() == roots
    r = http.put(
        CONFIG,
        json={"Provider": "consul", "Config": bits, "ForceWithoutCrossSigning": True},
    )
    assert r.status_code == 200
    assert http.get(ROOTS).json()["Roots"][-1]["IntermediateCerts"] is None


def test_rotation_hook_rotates_like_a_config_change(agent: DevAgent, http: httpx.Client) -> None:
    config = http.get(CONFIG).json()
    new_id = agent.call(lambda ctx: ctx.extensions["connect_ca"].rotate())
    body = http.get(ROOTS).json()
    assert body["ActiveRootID"] == new_id
    assert len(body["Roots"]) == 2
    assert len(body["Roots"][-1]["IntermediateCerts"]) == 1
    assert http.get(CONFIG).json() == config


def test_each_rotation_cross_signs_only_from_its_predecessor(http: httpx.Client) -> None:
    _rotate(http, "ec", 384)
    _rotate(http, "ec", 521)
    roots = http.get(ROOTS).json()["Roots"]
    assert [r["Active"] for r in roots] == [False, False, True]
    certs = [x509.load_pem_x509_certificate(r["RootCert"].encode()) for r in roots]
    [xc_pem] = roots[2]["IntermediateCerts"]
    xc = x509.load_pem_x509_certificate(xc_pem.encode())
    assert _issued_by(xc, certs[1])
    assert not _issued_by(xc, certs[0])


# ----------------------------------------------------------------------- pruning


def test_old_roots_are_pruned_after_twice_the_leaf_ttl(agent: DevAgent, http: httpx.Client) -> None:
    _rotate(http)
    before = http.get(ROOTS)
    assert len(before.json()["Roots"]) == 2
    ext_call = agent.call
    # Not yet: rotated out just now.
    assert ext_call(lambda ctx: ctx.extensions["connect_ca"].prune()) == []
    # Move the CA clock past 2 x 72 h and let the background pruner run often.
    later = time.time() + 2 * 72 * 3600 + 60
    ext_call(lambda ctx: ctx.extensions["connect_ca"].set_clock(lambda: later))
    ext_call(lambda ctx: ctx.extensions["connect_ca"].set_prune_interval(0.05))
    deadline = time.monotonic() + 10
    while len(http.get(ROOTS).json()["Roots"]) != 1:
        assert time.monotonic() < deadline, "old root was never pruned"
        time.sleep(0.02)
    after = http.get(ROOTS)
    [root] = after.json()["Roots"]
    assert root["ID"] == before.json()["ActiveRootID"] == after.json()["ActiveRootID"]
    assert int(after.headers["X-Consul-Index"]) > int(before.headers["X-Consul-Index"])
    assert root["ModifyIndex"] == int(after.headers["X-Consul-Index"])
    # The current leaf still carries the (still valid) cross-signed certificate.
    assert len(_certs(http.get(LEAF).json()["CertPEM"])) == 2


def test_pruning_uses_the_configured_leaf_ttl(agent: DevAgent, http: httpx.Client) -> None:
    r = http.put(
        CONFIG,
        json={"Provider": "consul", "Config": {"LeafCertTTL": "1h", "PrivateKeyBits": 384}},
    )
    assert r.status_code == 200
    ca = "connect_ca"
    just_under = time.time() + 2 * 3600 - 60
    agent.call(lambda ctx: ctx.extensions[ca].set_clock(lambda: just_under))
    assert agent.call(lambda ctx: ctx.extensions[ca].prune()) == []
    assert len(http.get(ROOTS).json()["Roots"]) == 2
    past = time.time() + 2 * 3600 + 60
    # Setting the clock also wakes the background pruner, which may get there first.
    agent.call(lambda ctx: ctx.extensions[ca].set_clock(lambda: past))
    agent.call(lambda ctx: ctx.extensions[ca].prune())
    assert len(http.get(ROOTS).json()["Roots"]) == 1


def test_blocking_roots_wake_up_when_a_root_is_pruned(agent: DevAgent, http: httpx.Client) -> None:
    _rotate(http)
    index = int(http.get(ROOTS).headers["X-Consul-Index"])
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(http.get, ROOTS, params={"index": index, "wait": "30s"})
        _blocked_on(agent, "connect-ca-roots")
        later = time.time() + 1000 * 3600
        agent.call(lambda ctx: ctx.extensions["connect_ca"].set_clock(lambda: later))
        agent.call(lambda ctx: ctx.extensions["connect_ca"].prune())
        r = fut.result(timeout=20)
    assert int(r.headers["X-Consul-Index"]) > index
    assert len(r.json()["Roots"]) == 1


# ------------------------------------------------------------------- persistence


def test_a_restart_with_a_data_dir_keeps_the_ca_but_never_writes_its_key(
    start_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = start_agent(data_dir=str(data))
    with client_for(first) as http:
        _rotate(http)
        roots = http.get(ROOTS).json()
        config = http.get(CONFIG).json()
        leaf = http.get(LEAF)
    first.stop()
    # No private key was ever written to the data directory.
    for f in data.iterdir():
        assert b"PRIVATE KEY" not in f.read_bytes(), f

    second = start_agent(data_dir=str(data))
    with client_for(second) as http:
        roots2 = http.get(ROOTS)
        after = roots2.json()
        # Same cluster and configuration; the CA key did not survive, so the agent
        # started on a fresh root (not cross-signed: there is no old key to sign with).
        assert after["TrustDomain"] == roots["TrustDomain"]
        assert http.get(CONFIG).json()["Config"] == config["Config"]
        assert [r["ID"] for r in after["Roots"][:-1]] == [r["ID"] for r in roots["Roots"]]
        assert not any(r["Active"] for r in after["Roots"][:-1])
        fresh = after["Roots"][-1]
        assert fresh["Active"] and fresh["ID"] == after["ActiveRootID"] != roots["ActiveRootID"]
        assert fresh["IntermediateCerts"] is None
        assert fresh["PrivateKeyType"] == "ec" and fresh["PrivateKeyBits"] == 384
        # The leaf from before the restart still verifies against a listed root.
        old_active = x509.load_pem_x509_certificate(roots["Roots"][-1]["RootCert"].encode())
        assert _issued_by(_certs(leaf.json()["CertPEM"])[0], old_active)
        # New leaves come from the fresh root; indexes continue from where they were.
        leaf2 = http.get(LEAF)
        assert int(leaf2.headers["X-Consul-Index"]) > int(leaf.headers["X-Consul-Index"])
        new_root = x509.load_pem_x509_certificate(fresh["RootCert"].encode())
        assert _issued_by(_certs(leaf2.json()["CertPEM"])[0], new_root)
        assert int(roots2.headers["X-Consul-Index"]) > int(leaf.headers["X-Consul-Index"])
        # The fresh key signs the next rotation's cross-signature.
        _rotate(http, "ec", 256)
        latest = http.get(ROOTS).json()["Roots"][-1]
        xc = x509.load_pem_x509_certificate(latest["IntermediateCerts"][0].encode())
        assert _issued_by(xc, new_root)
    for f in data.iterdir():
        assert b"PRIVATE KEY" not in f.read_bytes(), f


def test_a_supplied_ca_key_is_not_written_to_the_data_dir_either(
    start_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = start_agent(data_dir=str(data))
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = _pem(key, serialization.PrivateFormat.PKCS8)
    with client_for(first) as http:
        r = http.put(CONFIG, json={"Provider": "consul", "Config": {"PrivateKey": key_pem}})
        assert r.status_code == 200, r.text
        supplied = http.get(ROOTS).json()["Roots"][-1]
    first.stop()
    for f in data.iterdir():
        assert b"PRIVATE KEY" not in f.read_bytes(), f
    second = start_agent(data_dir=str(data))
    with client_for(second) as http:
        roots = http.get(ROOTS).json()["Roots"]
        assert roots[-2]["ID"] == supplied["ID"] and not roots[-2]["Active"]
        fresh = x509.load_pem_x509_certificate(roots[-1]["RootCert"].encode())
        assert roots[-1]["Active"]
        assert _key_id(fresh.public_key()) != _key_id(key.public_key())
        assert _issued_by(_certs(http.get(LEAF).json()["CertPEM"])[0], fresh)


def test_restart_keeps_the_cluster_id_even_if_config_names_another(
    start_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    data = str(tmp_path / "data")
    first = start_agent(data_dir=data, cluster_id="11111111-2222-3333-4444-555555555555")
    with client_for(first) as http:
        td = http.get(ROOTS).json()["TrustDomain"]
    first.stop()
    second = start_agent(data_dir=data, cluster_id="99999999-2222-3333-4444-555555555555")
    with client_for(second) as http:
        assert http.get(ROOTS).json()["TrustDomain"] == td
    assert td == "11111111-2222-3333-4444-555555555555.consul"


def test_private_keys_are_not_served(http: httpx.Client) -> None:
    for path in (ROOTS, "/v1/agent/connect/ca/roots", CONFIG):
        assert "PRIVATE KEY" not in http.get(path).text


@pytest.mark.parametrize("bits", [224, 521])
def test_other_ec_curves_work_for_roots(http: httpx.Client, bits: int) -> None:
    _rotate(http, "ec", bits)
    active = http.get(ROOTS).json()["Roots"][-1]
    assert active["PrivateKeyBits"] == bits
    root = x509.load_pem_x509_certificate(active["RootCert"].encode())
    leaf = _certs(http.get(LEAF).json()["CertPEM"])[0]
    assert _issued_by(leaf, root)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
