"""The dev agent's service leaf certificates (consul-api.md §2.2, §3.3, §3.6)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from consul_connect.devagent import DevAgent
from tests.conftest import client_for
from tests.pem import assert_ec_key_pem

LEAF_KEYS = [
    "SerialNumber",
    "CertPEM",
    "PrivateKeyPEM",
    "Service",
    "ServiceURI",
    "ValidAfter",
    "ValidBefore",
    "CreateIndex",
    "ModifyIndex",
]


def _key_id(key: Any) -> bytes:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _leaf_cert(body: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificates(body["CertPEM"].encode())[0]


def _fmt(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_leaf_json_and_headers(agent: DevAgent, http: httpx.Client) -> None:
    r = http.get("/v1/agent/connect/ca/leaf/web")
    assert r.status_code == 200
    body = r.json()
    assert list(body) == LEAF_KEYS
    td = http.get("/v1/agent/connect/ca/roots").json()["TrustDomain"]
    assert body["Service"] == "web"
    assert body["ServiceURI"] == f"spiffe://{td}/ns/default/dc/dc1/svc/web"
    assert body["CreateIndex"] == body["ModifyIndex"] == int(r.headers["X-Consul-Index"])
    assert r.headers["X-Cache"] == "MISS"
    assert "X-Consul-KnownLeader" not in r.headers
    cert = _leaf_cert(body)
    assert body["SerialNumber"] == cert.serial_number.to_bytes(
        (cert.serial_number.bit_length() + 7) // 8, "big"
    ).hex(":")
    assert body["ValidAfter"] == _fmt(cert.not_valid_before_utc)
    assert body["ValidBefore"] == _fmt(cert.not_valid_after_utc)
    assert body["CertPEM"].endswith("-----END CERTIFICATE-----\n")
    assert_ec_key_pem(body["PrivateKeyPEM"])


def test_leaf_certificate_contents_follow_the_builtin_provider(http: httpx.Client) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    body = http.get("/v1/agent/connect/ca/leaf/web").json()
    after = datetime.now(UTC)
    [root] = http.get("/v1/agent/connect/ca/roots").json()["Roots"]
    root_cert = x509.load_pem_x509_certificate(root["RootCert"].encode())
    certs = x509.load_pem_x509_certificates(body["CertPEM"].encode())
    assert len(certs) == 1  # a fresh built-in CA has no intermediates
    cert = certs[0]
    key = serialization.load_pem_private_key(body["PrivateKeyPEM"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert _key_id(key.public_key()) == _key_id(cert.public_key())
    assert cert.version == x509.Version.v3
    assert cert.subject == x509.Name([])
    assert cert.issuer == root_cert.subject
    cert.verify_directly_issued_by(root_cert)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [body["ServiceURI"]]
    assert san.value.get_values_for_type(x509.DNSName) == []
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and ku.data_encipherment
    assert ku.key_agreement and not ku.key_cert_sign and not ku.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == _key_id(cert.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    assert aki.key_identifier.hex(":") == root["SigningKeyID"]
    # NotBefore is back-dated one minute; the lifetime is exactly the 72 h default.
    nb = cert.not_valid_before_utc
    assert before - timedelta(minutes=1, seconds=2) <= nb <= after - timedelta(seconds=59)
    assert cert.not_valid_after_utc - nb == timedelta(hours=72)


def test_serials_and_indexes_strictly_increase_per_issuance(http: httpx.Client) -> None:
    seen = []
    for svc in ("a", "b", "c"):
        body = http.get(f"/v1/agent/connect/ca/leaf/{svc}").json()
        seen.append((_leaf_cert(body).serial_number, body["ModifyIndex"]))
    serials = [s for s, _ in seen]
    indexes = [i for _, i in seen]
    assert serials == sorted(serials) and len(set(serials)) == 3
    assert indexes == sorted(indexes) and len(set(indexes)) == 3


def test_non_blocking_calls_return_the_cached_leaf(http: httpx.Client) -> None:
    first = http.get("/v1/agent/connect/ca/leaf/web")
    second = http.get("/v1/agent/connect/ca/leaf/web", params={"index": 0})
    assert second.json() == first.json()
    assert second.headers["X-Consul-Index"] == first.headers["X-Consul-Index"]
    # Non-blocking calls always revalidate, so they report a miss.
    assert second.headers["X-Cache"] == "MISS"
    other = http.get("/v1/agent/connect/ca/leaf/api").json()
    assert other["SerialNumber"] != first.json()["SerialNumber"]


def test_blocking_call_with_a_lower_index_returns_the_cached_leaf_at_once(
    http: httpx.Client,
) -> None:
    first = http.get("/v1/agent/connect/ca/leaf/web")
    index = int(first.headers["X-Consul-Index"])
    started = time.monotonic()
    r = http.get("/v1/agent/connect/ca/leaf/web", params={"index": index - 1, "wait": "30s"})
    assert time.monotonic() - started < 5
    assert r.json() == first.json()
    assert r.headers["X-Cache"] == "HIT"
    assert int(r.headers["Age"]) >= 0


def test_blocking_call_times_out_with_the_same_leaf_and_index(http: httpx.Client) -> None:
    first = http.get("/v1/agent/connect/ca/leaf/web")
    index = first.headers["X-Consul-Index"]
    started = time.monotonic()
    r = http.get("/v1/agent/connect/ca/leaf/web", params={"index": index, "wait": "400ms"})
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5
    assert r.status_code == 200
    assert r.headers["X-Consul-Index"] == index
    assert r.json() == first.json()


def test_first_blocking_call_issues_a_leaf_at_once(http: httpx.Client) -> None:
    started = time.monotonic()
    r = http.get("/v1/agent/connect/ca/leaf/web", params={"index": 5, "wait": "30s"})
    assert time.monotonic() - started < 5
    assert r.status_code == 200
    assert r.json()["Service"] == "web"


def test_blocking_call_returns_a_renewed_leaf_at_renewal_time(
    start_agent: Callable[..., DevAgent],
) -> None:
    # The dev config may go below Consul's 1 h minimum; renewal happens between
    # 60 % and 90 % of the lifetime.
    agent = start_agent(leaf_cert_ttl=3.0)
    with client_for(agent) as http:
        first = http.get("/v1/agent/connect/ca/leaf/web")
        body = first.json()
        cert = _leaf_cert(body)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(seconds=3)
        index = int(first.headers["X-Consul-Index"])
        started = time.monotonic()
        r = http.get("/v1/agent/connect/ca/leaf/web", params={"index": index, "wait": "20s"})
        assert time.monotonic() - started < 5
    renewed = r.json()
    assert int(r.headers["X-Consul-Index"]) > index
    assert renewed["ModifyIndex"] > body["ModifyIndex"]
    assert renewed["SerialNumber"] != body["SerialNumber"]
    assert renewed["PrivateKeyPEM"] != body["PrivateKeyPEM"]


def test_non_blocking_call_after_renewal_time_gets_a_new_leaf(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent(leaf_cert_ttl=2.0)
    with client_for(agent) as http:
        body = http.get("/v1/agent/connect/ca/leaf/web").json()
        deadline = time.monotonic() + 10
        while True:
            again = http.get("/v1/agent/connect/ca/leaf/web").json()
            if again["SerialNumber"] != body["SerialNumber"]:
                break
            assert time.monotonic() < deadline, "leaf was never renewed"
            time.sleep(0.05)
    assert again["ModifyIndex"] > body["ModifyIndex"]


def test_leaf_for_another_datacenter_has_no_path(http: httpx.Client) -> None:
    r = http.get("/v1/agent/connect/ca/leaf/web", params={"dc": "dc2"})
    assert r.status_code == 500
    assert r.text == "No path to datacenter"
    ok = http.get("/v1/agent/connect/ca/leaf/web", params={"dc": "dc1"})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("params", "headers", "text"),
    [
        (
            {"ns": "default"},
            {},
            'Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature',
        ),
        (
            {"partition": "p1"},
            {},
            'Invalid query parameter: "partition" - Partitions are a Consul Enterprise feature',
        ),
        (
            {},
            {"X-Consul-Namespace": "team"},
            'Invalid header: "X-Consul-Namespace" - Namespaces are a Consul Enterprise feature',
        ),
        ({"index": "x"}, {}, "Invalid index"),
        ({"wait": "forever"}, {}, "Invalid wait time"),
    ],
)
def test_bad_leaf_requests_are_400s(
    http: httpx.Client, params: dict[str, str], headers: dict[str, str], text: str
) -> None:
    r = http.get("/v1/agent/connect/ca/leaf/web", params=params, headers=headers)
    assert r.status_code == 400
    assert r.text == text


def test_leaf_service_name_must_form_a_spiffe_id(http: httpx.Client) -> None:
    r = http.get("/v1/agent/connect/ca/leaf/")
    assert r.status_code == 500
    assert r.text == "URI must be either service, agent, server, or kind"
    r = http.get("/v1/agent/connect/ca/leaf/a/b")
    assert r.status_code == 500
    assert r.text.startswith("SPIFFE ID is not in the expected format: spiffe://")
    assert r.text.endswith("/ns/default/dc/dc1/svc/a/b")


def test_unusual_service_names_are_percent_encoded_in_the_uri(http: httpx.Client) -> None:
    body = http.get("/v1/agent/connect/ca/leaf/web%20api").json()
    assert body["Service"] == "web api"
    assert body["ServiceURI"].endswith("/svc/web%20api")
    cert = _leaf_cert(body)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [body["ServiceURI"]]


def test_leaf_endpoint_only_accepts_get(http: httpx.Client) -> None:
    r = http.put("/v1/agent/connect/ca/leaf/web")
    assert r.status_code == 405
    assert set(r.headers["Allow"].split(",")) == {"GET", "OPTIONS"}
