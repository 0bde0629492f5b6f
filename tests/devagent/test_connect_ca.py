"""The dev agent's CA roots and CA configuration endpoints (consul-api.md §2.1, §2.14, §3.4)."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from consul_connect.devagent import DevAgent
from tests.conftest import client_for

CLUSTER_ID = "11111111-2222-3333-4444-555555555555"
ROOT_KEYS = [
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
]


def _key_id(cert: x509.Certificate) -> bytes:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _blocked_on(agent: DevAgent, table: str, timeout: float = 10.0) -> None:
    """Wait until some request on the agent is blocked watching ``table``."""

    def check(ctx: Any) -> bool:
        ev = ctx.store._events.get(table)
        return ev is not None and not ev.is_set()

    deadline = time.monotonic() + timeout
    while not agent.call(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"no request blocked on {table}")
        time.sleep(0.01)


def _rotate(http: httpx.Client, bits: int = 384) -> None:
    r = http.put(
        "/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": bits}},
    )
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------ roots


def test_roots_json_has_consuls_keys_and_formats(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(cluster_id=CLUSTER_ID)
    with client_for(agent) as http:
        r = http.get("/v1/agent/connect/ca/roots")
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["ActiveRootID", "TrustDomain", "Roots"]
    assert body["TrustDomain"] == f"{CLUSTER_ID}.consul"
    [root] = body["Roots"]
    assert list(root) == ROOT_KEYS
    assert root["ID"] == body["ActiveRootID"]
    assert root["Name"] == "Consul CA Primary Cert"
    assert root["ExternalTrustDomain"] == CLUSTER_ID
    assert root["Active"] is True
    assert root["IntermediateCerts"] is None
    assert root["PrivateKeyType"] == "ec" and root["PrivateKeyBits"] == 256
    assert isinstance(root["SerialNumber"], int) and 0 < root["SerialNumber"] < 1000
    assert root["CreateIndex"] == root["ModifyIndex"] == int(r.headers["X-Consul-Index"])
    assert root["RootCert"].endswith("-----END CERTIFICATE-----\n")
    cert = x509.load_pem_x509_certificate(root["RootCert"].encode())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert root["ID"] == hashlib.sha1(der).digest().hex(":")
    assert root["SigningKeyID"] == _key_id(cert).hex(":")
    assert len(root["SigningKeyID"]) == 95
    assert root["SerialNumber"] == cert.serial_number
    assert root["NotBefore"] == cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert root["NotAfter"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_root_certificate_is_a_self_signed_p256_consul_ca(http: httpx.Client) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    body = http.get("/v1/connect/ca/roots").json()
    cluster_id = body["TrustDomain"].removesuffix(".consul")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", cluster_id)
    cert = x509.load_pem_x509_certificate(body["Roots"][0]["RootCert"].encode())
    assert cert.version == x509.Version.v3
    [cn] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert re.fullmatch(rf"pri-[0-9a-z]{{8}}\.consul\.ca\.{cluster_id[:8]}\.consul", str(cn.value))
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{cluster_id}.consul"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length is None
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and ku.digital_signature
    assert not ku.key_encipherment
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert ski == aki.key_identifier == _key_id(cert)
    assert before - timedelta(seconds=5) <= cert.not_valid_before_utc <= datetime.now(UTC)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(hours=87600)


def test_agent_roots_report_a_cache_miss_then_hits_with_age(http: httpx.Client) -> None:
    first = http.get("/v1/agent/connect/ca/roots")
    assert first.headers["X-Cache"] == "MISS"
    assert "Age" not in first.headers
    second = http.get("/v1/agent/connect/ca/roots")
    assert second.headers["X-Cache"] == "HIT"
    assert int(second.headers["Age"]) >= 0
    assert second.json() == first.json()
    assert second.headers["X-Consul-Index"] == first.headers["X-Consul-Index"]
    assert second.headers["X-Consul-KnownLeader"] == "true"


def test_agent_and_catalog_roots_agree(http: httpx.Client) -> None:
    a = http.get("/v1/agent/connect/ca/roots")
    c = http.get("/v1/connect/ca/roots")
    assert a.json() == c.json()
    assert a.headers["X-Consul-Index"] == c.headers["X-Consul-Index"]
    assert "X-Cache" not in c.headers


def test_roots_pem_form_is_a_certificate_chain(http: httpx.Client) -> None:
    _rotate(http)
    roots = http.get("/v1/connect/ca/roots").json()["Roots"]
    expected = "".join(x["RootCert"] + "".join(x["IntermediateCerts"] or []) for x in roots)
    for value in ("true", "1", "T", "TRUE"):
        r = http.get("/v1/connect/ca/roots", params={"pem": value})
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/pem-certificate-chain"
        assert r.headers["X-Consul-Index"] == str(roots[-1]["ModifyIndex"])
        assert r.text == expected
        assert len(x509.load_pem_x509_certificates(r.content)) == 3


def test_roots_pem_false_or_empty_answers_json(http: httpx.Client) -> None:
    for value in ("false", "0", "f", ""):
        r = http.get("/v1/connect/ca/roots", params={"pem": value})
        assert r.headers["Content-Type"] == "application/json"
        assert "Roots" in r.json()


def test_bad_pem_value_is_a_400(http: httpx.Client) -> None:
    for value in ("yes", "2", "on", "tru"):
        r = http.get("/v1/connect/ca/roots", params={"pem": value})
        assert r.status_code == 400
        assert r.text == "The 'pem' query parameter must be a boolean value"


def test_roots_for_another_datacenter_have_no_path(http: httpx.Client) -> None:
    for path in ("/v1/connect/ca/roots", "/v1/agent/connect/ca/roots"):
        r = http.get(path, params={"dc": "dc2"})
        assert r.status_code == 500
        assert r.text == "No path to datacenter"


def test_roots_only_accept_get(http: httpx.Client) -> None:
    for path in ("/v1/connect/ca/roots", "/v1/agent/connect/ca/roots"):
        r = http.put(path)
        assert r.status_code == 405
        assert set(r.headers["Allow"].split(",")) == {"GET", "OPTIONS"}


def test_blocking_roots_return_when_the_root_rotates(agent: DevAgent, http: httpx.Client) -> None:
    for path in ("/v1/connect/ca/roots", "/v1/agent/connect/ca/roots"):
        index = int(http.get(path).headers["X-Consul-Index"])
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            fut = pool.submit(http.get, path, params={"index": index, "wait": "30s"})
            _blocked_on(agent, "connect-ca-roots")
            _rotate(http, 384 if path.startswith("/v1/connect") else 521)
            r = fut.result(timeout=20)
        assert time.monotonic() - started < 20
        assert int(r.headers["X-Consul-Index"]) > index
        roots = r.json()["Roots"]
        assert roots[-1]["Active"] and roots[-1]["ID"] == r.json()["ActiveRootID"]
        assert not roots[-2]["Active"]


def test_blocking_roots_time_out_with_the_same_index(http: httpx.Client) -> None:
    for path in ("/v1/connect/ca/roots", "/v1/agent/connect/ca/roots"):
        first = http.get(path)
        index = first.headers["X-Consul-Index"]
        started = time.monotonic()
        r = http.get(path, params={"index": index, "wait": "300ms"})
        elapsed = time.monotonic() - started
        assert r.status_code == 200
        assert 0.3 <= elapsed < 5
        assert r.headers["X-Consul-Index"] == index
        assert r.json() == first.json()


def test_blocking_agent_roots_with_an_old_index_hit_the_cache(http: httpx.Client) -> None:
    http.get("/v1/agent/connect/ca/roots")
    started = time.monotonic()
    r = http.get("/v1/agent/connect/ca/roots", params={"index": 1, "wait": "30s"})
    assert time.monotonic() - started < 5
    assert r.headers["X-Cache"] == "HIT"


def test_bad_index_on_roots_is_a_400(http: httpx.Client) -> None:
    r = http.get("/v1/connect/ca/roots", params={"index": "abc"})
    assert r.status_code == 400
    assert r.text == "Invalid index"


# ----------------------------------------------------------------- configuration


def test_ca_configuration_shows_the_bootstrap_config(http: httpx.Client) -> None:
    r = http.get("/v1/connect/ca/configuration")
    assert r.status_code == 200
    body = r.json()
    assert list(body) == [
        "Provider",
        "Config",
        "State",
        "ForceWithoutCrossSigning",
        "CreateIndex",
        "ModifyIndex",
    ]
    assert body["Provider"] == "consul"
    assert body["Config"] == {
        "LeafCertTTL": "72h",
        "IntermediateCertTTL": "8760h",
        "RootCertTTL": "87600h",
    }
    assert body["State"] is None
    assert body["ForceWithoutCrossSigning"] is False
    assert body["CreateIndex"] == body["ModifyIndex"] > 0


def test_dev_leaf_ttl_shows_as_a_go_duration(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(leaf_cert_ttl=90.0)
    with client_for(agent) as http:
        cfg = http.get("/v1/connect/ca/configuration").json()["Config"]
    assert cfg["LeafCertTTL"] == "1m30s"


def test_ttl_change_updates_config_without_a_new_root(http: httpx.Client) -> None:
    roots_before = http.get("/v1/connect/ca/roots")
    before = http.get("/v1/connect/ca/configuration").json()
    new = {"LeafCertTTL": "24h", "IntermediateCertTTL": "8760h", "RootCertTTL": "87600h"}
    r = http.put("/v1/connect/ca/configuration", json={"Provider": "consul", "Config": new})
    assert r.status_code == 200
    assert r.content == b""
    after = http.get("/v1/connect/ca/configuration").json()
    assert after["Config"] == new
    assert after["CreateIndex"] == before["CreateIndex"]
    assert after["ModifyIndex"] > before["ModifyIndex"]
    roots_after = http.get("/v1/connect/ca/roots")
    assert roots_after.json() == roots_before.json()
    assert roots_after.headers["X-Consul-Index"] == roots_before.headers["X-Consul-Index"]
    leaf = http.get("/v1/agent/connect/ca/leaf/web").json()
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(hours=24)


def test_identical_config_write_is_a_no_op(http: httpx.Client) -> None:
    before = http.get("/v1/connect/ca/configuration").json()
    r = http.put(
        "/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": before["Config"], "State": None},
    )
    assert r.status_code == 200
    assert http.get("/v1/connect/ca/configuration").json() == before


_INVALID_CONFIGS: list[tuple[dict[str, Any], str]] = [
    (
        {"LeafCertTTL": "30m"},
        "error configuring provider: leaf cert TTL must be greater or equal than 1h0m0s",
    ),
    (
        {"LeafCertTTL": "9000h", "IntermediateCertTTL": "87600h"},
        "error configuring provider: leaf cert TTL must be less than 8760h0m0s",
    ),
    (
        {"LeafCertTTL": 3_600_000_000},  # integers are nanoseconds
        "error configuring provider: leaf cert TTL must be greater or equal than 1h0m0s",
    ),
    (
        {"leafcertttl": "10"},
        "error configuring provider: error decoding config: 1 error(s) decoding:\n\n"
        "* error decoding 'LeafCertTTL': time: missing unit in duration \"10\"",
    ),
    (
        {"PrivateKeyBits": "many"},
        "error configuring provider: error decoding config: 1 error(s) decoding:\n\n"
        "* cannot parse 'PrivateKeyBits' as int: strconv.ParseInt: parsing \"many\": "
        "invalid syntax",
    ),
    (
        {"LeafCertTTL": "abc"},
        "error configuring provider: error decoding config: 1 error(s) decoding:\n\n"
        "* error decoding 'LeafCertTTL': time: invalid duration \"abc\"",
    ),
    (
        {"LeafCertTTL": "2h", "IntermediateCertTTL": "2h"},
        "error configuring provider: Intermediate Cert TTL must be greater or equal than 3h",
    ),
    (
        {"LeafCertTTL": "5h", "IntermediateCertTTL": "10h"},
        "error configuring provider: Intermediate Cert TTL must be greater or equal than "
        "3 * LeafCertTTL (>=15h0m0s).",
    ),
    (
        {"RootCertTTL": "100h"},
        "error configuring provider: root cert TTL is set and is not greater than "
        "intermediate cert ttl. root cert ttl: 100h0m0s, intermediate cert ttl: 8760h0m0s",
    ),
    (
        {"PrivateKeyType": "dsa"},
        "error configuring provider: private key type must be either 'ec' or 'rsa'",
    ),
    (
        {"PrivateKeyType": "ec", "PrivateKeyBits": 512},
        "error configuring provider: EC key length must be one of (224, 256, 384, 521) bits",
    ),
    (
        {"PrivateKeyType": "rsa", "PrivateKeyBits": 1024},
        "error configuring provider: RSA key length must be 2048 or 4096 bits",
    ),
    (
        {"RootCert": "-----BEGIN CERTIFICATE-----\n"},
        "error configuring provider: must provide a private key when providing a root cert",
    ),
]


def test_invalid_ca_config_is_refused_and_changes_nothing(http: httpx.Client) -> None:
    cfg_before = http.get("/v1/connect/ca/configuration").json()
    roots_before = http.get("/v1/connect/ca/roots").json()
    for config, text in _INVALID_CONFIGS:
        body = {"Provider": "consul", "Config": config}
        r = http.put("/v1/connect/ca/configuration", json=body)
        assert (r.status_code, r.text) == (500, text), config
        assert http.get("/v1/connect/ca/configuration").json() == cfg_before
        assert http.get("/v1/connect/ca/roots").json() == roots_before


_BAD_BODIES: list[tuple[bytes, int, str]] = [
        (b"", 400, "Request decode failed: EOF"),
    (b"{not json", 400, "Request decode failed: "),
    (b"[]", 400, "Request decode failed: json: cannot unmarshal array"),
    (b'{"Provider": 1}', 400, "Request decode failed: json: cannot unmarshal number"),
    (b'{"Provider": "consul", "Config": "x"}', 400, "Request decode failed: json: cannot"),
    (
        b'{"Provider": "consul", "Config": {}, "State": {"a": "b"}}',
        400,
        "Provider State is read-only. It must be omitted or identical to the current value",
    ),
    (b'{"Provider": "nope", "Config": {}}', 500, 'could not initialize provider: unknown CA'),
    (b"null", 500, 'could not initialize provider: unknown CA provider ""'),
]


def test_bad_config_bodies_answer_as_consul_and_change_nothing(http: httpx.Client) -> None:
    cfg_before = http.get("/v1/connect/ca/configuration").json()
    roots_before = http.get("/v1/connect/ca/roots").json()
    for body, status, text in _BAD_BODIES:
        r = http.put("/v1/connect/ca/configuration", content=body)
        assert r.status_code == status, body
        assert r.text.startswith(text), (body, r.text)
        assert http.get("/v1/connect/ca/configuration").json() == cfg_before
        assert http.get("/v1/connect/ca/roots").json() == roots_before


def test_snake_case_force_flag_is_accepted(http: httpx.Client) -> None:
    r = http.put(
        "/v1/connect/ca/configuration",
        json={
            "Provider": "consul",
            "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384},
            "force_without_cross_signing": True,
        },
    )
    assert r.status_code == 200
    cfg = http.get("/v1/connect/ca/configuration").json()
    assert cfg["ForceWithoutCrossSigning"] is True
    # Forced rotations skip the cross-signed certificate.
    active = http.get("/v1/connect/ca/roots").json()["Roots"][-1]
    assert active["Active"] and active["IntermediateCerts"] is None


def test_config_endpoint_methods(http: httpx.Client) -> None:
    r = http.post("/v1/connect/ca/configuration", json={})
    assert r.status_code == 405
    assert set(r.headers["Allow"].split(",")) == {"GET", "PUT", "OPTIONS"}


# ------------------------------------------------------------------------ ACLs


def test_ca_endpoints_enforce_acls(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    with client_for(agent) as anon, client_for(agent, "root") as admin:
        assert anon.get("/v1/connect/ca/roots").status_code == 200
        assert anon.get("/v1/agent/connect/ca/roots").status_code == 200
        for r in (
            anon.get("/v1/connect/ca/configuration"),
            anon.put("/v1/connect/ca/configuration", json={"Provider": "consul", "Config": {}}),
            anon.get("/v1/agent/connect/ca/leaf/web"),
        ):
            assert r.status_code == 403
            assert r.text.startswith("Permission denied")
        before = admin.get("/v1/connect/ca/configuration")
        assert before.status_code == 200
        assert before.json()["Config"]["LeafCertTTL"] == "72h"
        assert admin.get("/v1/agent/connect/ca/leaf/web").status_code == 200
