"""Acceptance: ACL token transports and decisions; leaves verified by an X.509 path validator."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from consul_connect.devagent import DevAgent
from tests.devagent.acceptance_support import MGMT, ok

# -- tokens ---------------------------------------------------------------------------------------


@pytest.fixture
def deny_agent(start_agent: Callable[..., DevAgent]) -> DevAgent:
    return start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token=MGMT
    )


def _service_token(agent: DevAgent, service: str) -> str:
    with httpx.Client(base_url=agent.http_addr, headers={"X-Consul-Token": MGMT}) as c:
        body = ok(c.put("/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": service}]}))
    secret: str = body.json()["SecretID"]
    return secret


def test_a_token_is_read_from_the_header_bearer_or_query(deny_agent: DevAgent) -> None:
    secret = _service_token(deny_agent, "web")
    with httpx.Client(base_url=deny_agent.http_addr, timeout=10) as c:
        for kwargs in (
            {"headers": {"X-Consul-Token": secret}},
            {"headers": {"Authorization": f"Bearer {secret}"}},
            {"headers": {"authorization": f"bearer {secret}"}},
            {"params": {"token": secret}},
        ):
            r = c.get("/v1/acl/token/self", **kwargs)  # type: ignore[arg-type]
            assert r.status_code == 200, kwargs
            assert r.json()["SecretID"] == secret
            # The service identity grants service:write on web, so its leaf is allowed.
            assert c.get("/v1/agent/connect/ca/leaf/web", **kwargs).status_code == 200  # type: ignore[arg-type]
        # ?token= wins over the header, the header over Authorization.
        r = c.get(
            "/v1/acl/token/self",
            params={"token": secret},
            headers={"X-Consul-Token": MGMT, "Authorization": f"Bearer {MGMT}"},
        )
        assert r.json()["SecretID"] == secret
        r = c.get(
            "/v1/acl/token/self",
            headers={"X-Consul-Token": secret, "Authorization": f"Bearer {MGMT}"},
        )
        assert r.json()["SecretID"] == secret


def test_deny_by_default_refuses_with_consul_wording(deny_agent: DevAgent) -> None:
    secret = _service_token(deny_agent, "web")
    with httpx.Client(base_url=deny_agent.http_addr, timeout=10) as c:
        anon = c.get("/v1/agent/connect/ca/leaf/web")
        assert anon.status_code == 403
        assert anon.text.startswith("Permission denied: anonymous token lacks permission")
        other = c.get("/v1/agent/connect/ca/leaf/db", headers={"X-Consul-Token": secret})
        assert other.status_code == 403
        assert other.text.startswith("Permission denied: token with AccessorID '")
        assert "lacks permission 'service:write' on \"db\"" in other.text
        unknown = c.get("/v1/agent/connect/ca/leaf/web", headers={"X-Consul-Token": "nope"})
        assert (unknown.status_code, unknown.text) == (403, "ACL not found")
        assert anon.headers["X-Consul-Default-ACL-Policy"] == "deny"
        # A service identity may register its own service and read the catalog for discovery.
        tok = {"X-Consul-Token": secret}
        ok(c.put("/v1/agent/service/register", json={"Name": "web", "Port": 1}, headers=tok))
        assert [
            e["Service"]["Service"] for e in c.get("/v1/health/service/web", headers=tok).json()
        ]
        assert c.get("/v1/health/service/web").json() == []  # anonymous sees nothing


def test_allow_by_default_lets_anonymous_through(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="allow", acl_initial_management_token=MGMT
    )
    with httpx.Client(base_url=agent.http_addr, timeout=10) as c:
        r = ok(c.get("/v1/agent/connect/ca/leaf/web"))
        assert r.headers["X-Consul-Default-ACL-Policy"] == "allow"
        ok(c.put("/v1/agent/service/register", json={"Name": "web", "Port": 1}))


# -- leaves verified by a path validator ----------------------------------------------------------


def _verify(
    leaf: x509.Certificate, anchor: x509.Certificate, chain: list[x509.Certificate]
) -> None:
    verifier = PolicyBuilder().store(Store([anchor])).build_client_verifier()
    verifier.verify(leaf, chain)


def test_a_leaf_after_rotation_validates_against_either_root_alone(http: httpx.Client) -> None:
    before = http.get("/v1/agent/connect/ca/leaf/web").json()
    ok(
        http.put(
            "/v1/connect/ca/configuration",
            json={"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
        )
    )
    roots = http.get("/v1/connect/ca/roots").json()
    old_root, new_root = (
        x509.load_pem_x509_certificate(r["RootCert"].encode()) for r in roots["Roots"]
    )
    assert [r["Active"] for r in roots["Roots"]] == [False, True]
    body = http.get("/v1/agent/connect/ca/leaf/web").json()
    leaf, *cross = x509.load_pem_x509_certificates(body["CertPEM"].encode())
    assert len(cross) == 1
    assert cross[0].subject == new_root.subject and cross[0].issuer == old_root.subject
    assert roots["Roots"][1]["IntermediateCerts"] == [
        body["CertPEM"][body["CertPEM"].index("-----BEGIN CERTIFICATE-----", 10) :]
    ]
    _verify(leaf, new_root, [])  # the new root alone
    _verify(leaf, old_root, cross)  # the old root alone, through the cross-signed cert
    with pytest.raises(VerificationError):
        _verify(leaf, old_root, [])
    old_leaf = x509.load_pem_x509_certificates(before["CertPEM"].encode())[0]
    _verify(old_leaf, old_root, [])  # leaves from before the rotation still validate
    with pytest.raises(VerificationError):
        _verify(old_leaf, new_root, cross)
