"""POST /v1/agent/connect/authorize: input errors, L4/L7 decisions, defaults, ACLs, cache header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from tests.conftest import client_for

TD = "11111111-2222-3333-4444-555555555555.consul"
AUTHZ = "/v1/agent/connect/authorize"


def uri(service: str, ns: str = "default", dc: str = "dc1") -> str:
    return f"spiffe://{TD}/ns/{ns}/dc/{dc}/svc/{service}"


def authorize(http: httpx.Client, target: str, client: str) -> httpx.Response:
    return http.post(
        AUTHZ, json={"Target": target, "ClientCertURI": uri(client), "ClientCertSerial": "0b"}
    )


def put_exact(http: httpx.Client, src: str, dst: str, body: dict[str, Any]) -> None:
    r = http.put(
        "/v1/connect/intentions/exact", params={"source": src, "destination": dst}, json=body
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {"ClientCertURI": "spiffe://x.consul/ns/default/dc/dc1/svc/web"},
            "Target service must be specified",
        ),
        (
            {"Target": "db", "ClientCertURI": "not a uri"},
            "ClientCertURI not a valid Connect identifier",
        ),
        ({"Target": "db"}, "ClientCertURI not a valid Connect identifier"),
        (
            {"Target": "db", "ClientCertURI": f"spiffe://{TD}/agent/client/dc/dc1/id/node1"},
            "ClientCertURI not a valid Service identifier",
        ),
        (
            {"Target": "db", "ClientCertURI": f"spiffe://{TD}"},
            "ClientCertURI not a valid Service identifier",
        ),
    ],
)
def test_bad_requests_are_400_with_consuls_text(
    http: httpx.Client, body: dict[str, Any], text: str
) -> None:
    r = http.post(AUTHZ, json=body)
    assert r.status_code == 400
    assert r.text == text


def test_undecodable_body_is_400(http: httpx.Client) -> None:
    r = http.post(AUTHZ, content=b"{")
    assert r.status_code == 400 and r.text.startswith("Request decode failed: ")
    r = http.post(AUTHZ, json={"Target": 5})
    assert r.status_code == 400
    assert r.text.startswith("Request decode failed: json: cannot unmarshal number")


def test_only_post_is_allowed(http: httpx.Client) -> None:
    r = http.get(AUTHZ)
    assert r.status_code == 405
    assert r.headers["Allow"] == "POST,OPTIONS"


def test_l4_allow_and_deny_carry_the_intention_in_the_reason(http: httpx.Client) -> None:
    put_exact(http, "web", "db", {"Action": "allow"})
    put_exact(http, "*", "db", {"Action": "deny"})
    r = authorize(http, "db", "web")
    assert r.status_code == 200
    assert r.json() == {
        "Authorized": True,
        "Reason": "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)",
    }
    assert "X-Consul-Index" not in r.headers
    assert authorize(http, "db", "other").json() == {
        "Authorized": False,
        "Reason": "Matched L4 intention: default/* => default/db (Precedence: 8, Action: DENY)",
    }


def test_legacy_intention_reason_names_its_id(http: httpx.Client) -> None:
    r = http.post(
        "/v1/connect/intentions",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    ixn_id = r.json()["ID"]
    assert authorize(http, "db", "web").json()["Reason"] == (
        f"Matched L4 intention: default/web => default/db (ID: {ixn_id}, Precedence: 9, "
        "Action: DENY)"
    )


def test_l7_intention_is_a_deny(http: httpx.Client) -> None:
    http.put("/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
    put_exact(
        http,
        "web",
        "api",
        {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]},
    )
    assert authorize(http, "api", "web").json() == {
        "Authorized": False,
        "Reason": (
            "Matched L7 intention: default/web => default/api (Precedence: 9, Permissions: 1)"
        ),
    }


def test_precedence_table_through_authorize(http: httpx.Client) -> None:
    put_exact(http, "web", "*", {"Action": "allow"})  # 6
    put_exact(http, "*", "db", {"Action": "deny"})  # 8
    put_exact(http, "*", "*", {"Action": "deny"})  # 5
    put_exact(http, "admin", "db", {"Action": "allow"})  # 9
    cases = [
        ("db", "web", False, 8),  # */db beats web/*
        ("db", "admin", True, 9),
        ("cache", "web", True, 6),
        ("cache", "other", False, 5),
    ]
    for target, client, allowed, precedence in cases:
        body = authorize(http, target, client).json()
        assert body["Authorized"] is allowed, (target, client)
        assert f"Precedence: {precedence}," in body["Reason"]


def test_trust_domain_and_datacenter_of_the_caller_are_ignored(http: httpx.Client) -> None:
    put_exact(http, "web", "db", {"Action": "deny"})
    r = http.post(
        AUTHZ,
        json={"Target": "db", "ClientCertURI": "spiffe://other.consul/ns/default/dc/dc9/svc/web"},
    )
    assert r.json()["Authorized"] is False


def test_default_with_acls_off_is_allow(http: httpx.Client) -> None:
    assert authorize(http, "db", "web").json() == {
        "Authorized": True,
        "Reason": "Default behavior configured by ACLs",
    }


@pytest.mark.parametrize(("policy", "allowed"), [("allow", True), ("deny", False)])
def test_default_follows_acl_default_policy(
    start_agent: Callable[..., DevAgent], policy: str, allowed: bool
) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy=policy, acl_initial_management_token="root"
    )
    with client_for(agent, "root") as http:
        r = authorize(http, "db", "web")
        assert r.status_code == 200
        assert r.json() == {"Authorized": allowed, "Reason": "Default behavior configured by ACLs"}
        assert r.headers["X-Consul-Default-ACL-Policy"] == policy


def test_x_cache_is_miss_then_hit_until_intentions_change(http: httpx.Client) -> None:
    assert authorize(http, "db", "web").headers["X-Cache"] == "MISS"
    hit = authorize(http, "db", "web")
    assert hit.headers["X-Cache"] == "HIT" and "Age" in hit.headers
    put_exact(http, "web", "db", {"Action": "deny"})
    changed = authorize(http, "db", "web")
    assert changed.headers["X-Cache"] == "MISS"
    assert changed.json()["Authorized"] is False


def test_acl_rules_on_authorize(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    with client_for(agent, "root") as root:
        tok = root.put("/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": "db"}]}).json()
        put_exact(root, "web", "db", {"Action": "allow"})
    with client_for(agent, tok["SecretID"]) as db:
        r = authorize(db, "db", "web")
        assert r.status_code == 200 and r.json()["Authorized"] is True
        r = authorize(db, "cache", "web")
        assert r.status_code == 403
        assert r.text == (
            f"Permission denied: token with AccessorID '{tok['AccessorID']}' lacks permission "
            "'service:write' on \"cache\""
        )
    with client_for(agent) as anonymous:
        r = authorize(anonymous, "db", "web")
        assert r.status_code == 403
        assert r.text == (
            "Permission denied: anonymous token lacks permission 'service:write' on \"db\". "
            "The anonymous token is used implicitly when a request does not specify a token."
        )
    with client_for(agent, "8f4e6a59-7b0c-4c55-9a86-d1e1b2a7c3f0") as unknown:
        r = authorize(unknown, "db", "web")
        assert r.status_code == 403 and r.text == "ACL not found"
        # Input errors are reported before the token is looked at.
        r = unknown.post(AUTHZ, json={"ClientCertURI": uri("web")})
        assert r.status_code == 400
