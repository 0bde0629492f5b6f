"""ACLs of the dev agent: token API, validation texts, rights of identities and policies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from consul_connect.devagent.context import AgentContext
from tests.conftest import client_for

MGMT_POLICY = "00000000-0000-0000-0000-000000000001"
ANON = "00000000-0000-0000-0000-000000000002"


@pytest.fixture
def acl_agent(start_agent: Callable[..., DevAgent]) -> DevAgent:
    """ACLs on, default deny, management token ``root``."""
    return start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )


@pytest.fixture
def root(acl_agent: DevAgent) -> Any:
    with client_for(acl_agent, "root") as c:
        yield c


def create_token(root: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = root.put("/v1/acl/token", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def rights(agent: DevAgent, secret: str, checks: list[tuple[str, str, str]]) -> list[bool]:
    def run(ctx: AgentContext) -> list[bool]:
        authz = ctx.acl.authorizer(secret)
        return [authz.allowed(res, lvl, name) for res, lvl, name in checks]

    return list(agent.call(run))


def test_acl_endpoints_answer_401_when_disabled(http: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v1/acl/token/self"),
        ("PUT", "/v1/acl/token"),
        ("GET", "/v1/acl/tokens"),
        ("GET", "/v1/acl/policies"),
        ("PUT", "/v1/acl/bootstrap"),
    ]:
        r = http.request(method, path)
        assert r.status_code == 401, path
        assert r.text == "ACL support disabled"


def test_initial_management_token_exists_at_start(root: httpx.Client) -> None:
    r = root.get("/v1/acl/token/self")
    assert r.status_code == 200
    tok = r.json()
    assert tok["SecretID"] == "root"
    assert tok["Description"] == "Initial Management Token"
    assert tok["Policies"] == [{"ID": MGMT_POLICY, "Name": "global-management"}]
    assert tok["Local"] is False
    assert list(tok) == [
        "AccessorID",
        "SecretID",
        "Description",
        "Policies",
        "Local",
        "CreateTime",
        "Hash",
        "CreateIndex",
        "ModifyIndex",
    ]
    r = root.put("/v1/acl/bootstrap")
    assert r.status_code == 403
    assert r.text.startswith("Permission denied: ACL bootstrap no longer allowed (reset index: ")


def test_create_read_list_delete_token(root: httpx.Client, acl_agent: DevAgent) -> None:
    tok = create_token(
        root,
        {
            "Description": "web identity",
            "ServiceIdentities": [
                {"ServiceName": "web", "Datacenters": ["dc1"]},
                {"ServiceName": "web", "Datacenters": ["dc2"]},
            ],
        },
    )
    assert tok["Description"] == "web identity"
    assert tok["ServiceIdentities"] == [{"ServiceName": "web", "Datacenters": ["dc1", "dc2"]}]
    assert len(tok["Hash"]) == 44 and "ExpirationTime" not in tok

    got = root.get(f"/v1/acl/token/{tok['AccessorID']}")
    assert got.status_code == 200 and got.json()["SecretID"] == tok["SecretID"]
    with client_for(acl_agent, tok["SecretID"]) as web:
        assert web.get("/v1/acl/token/self").json()["AccessorID"] == tok["AccessorID"]

    listed = root.get("/v1/acl/tokens").json()
    accessors = {t["AccessorID"] for t in listed}
    assert {ANON, tok["AccessorID"]} <= accessors and len(listed) == 3
    only_web = root.get("/v1/acl/tokens", params={"servicename": "web"}).json()
    assert [t["AccessorID"] for t in only_web] == [tok["AccessorID"]]

    r = root.delete(f"/v1/acl/token/{tok['AccessorID']}")
    assert r.status_code == 200 and r.json() is True
    r = root.get(f"/v1/acl/token/{tok['AccessorID']}")
    assert r.status_code == 404 and r.text == "Requested token does not exist: ACL not found"
    with client_for(acl_agent, tok["SecretID"]) as gone:
        r = gone.get("/v1/connect/intentions")
        assert r.status_code == 403 and r.text == "ACL not found"
        r = gone.get("/v1/acl/token/self")
        assert r.status_code == 404 and r.text == "Supplied token does not exist"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {"ServiceIdentities": [{}]},
            "Service identity is missing the service name field on this token",
        ),
        (
            {"ServiceIdentities": [{"ServiceName": "Web!"}]},
            'Service identity "Web!" has an invalid name. Only lowercase alphanumeric '
            "characters, '-' and '_' are allowed",
        ),
        (
            {"Local": True, "ServiceIdentities": [{"ServiceName": "web", "Datacenters": ["dc1"]}]},
            'Service identity "web" cannot specify a list of datacenters on a local token',
        ),
        ({"Policies": [{"Name": "nope"}]}, 'No such ACL policy with name "nope"'),
        (
            {"Policies": [{"ID": "4d8f6a1e-5c1b-4a7f-9e2d-3b6c7d8e9f01"}]},
            'No such ACL policy with ID "4d8f6a1e-5c1b-4a7f-9e2d-3b6c7d8e9f01"',
        ),
        ({"AccessorID": "abc"}, "Invalid Token: AccessorID - not a valid UUID"),
        (
            {"AccessorID": ANON},
            "Invalid Token: AccessorID - UUIDs with the prefix "
            '"00000000-0000-0000-0000-0000000000" are reserved',
        ),
        ({"SecretID": "root"}, "Invalid Token: SecretID - not a valid UUID"),
        ({"ExpirationTTL": "-5m"}, "Token Expiration TTL '-5m0s' should be > 0"),
        (
            {"ExpirationTTL": "10s"},
            "ExpirationTime cannot be less than 1m0s in the future (was 10s)",
        ),
        (
            {"ExpirationTTL": "48h"},
            "ExpirationTime cannot be more than 24h0m0s in the future (was 48h0m0s)",
        ),
        (
            {"ExpirationTTL": "1h", "ExpirationTime": "2099-01-01T00:00:00Z"},
            "Token Expiration TTL and Expiration Time cannot both be set",
        ),
        (
            {"NodeIdentities": [{"NodeName": "n1"}]},
            "Node identity is missing the datacenter field on this token",
        ),
    ],
)
def test_token_validation_texts(root: httpx.Client, body: dict[str, Any], text: str) -> None:
    before = root.get("/v1/acl/tokens").json()
    r = root.put("/v1/acl/token", json=body)
    assert r.status_code == 500
    assert r.text == text
    assert root.get("/v1/acl/tokens").json() == before


def test_token_decode_error_is_400(root: httpx.Client) -> None:
    r = root.put("/v1/acl/token", content=b"{")
    assert r.status_code == 400 and r.text.startswith("Token decoding failed: ")
    r = root.put("/v1/acl/token", json={"Description": 5})
    assert r.status_code == 400
    assert r.text.startswith("Token decoding failed: json: cannot unmarshal number")


def test_duplicate_accessor_is_refused(root: httpx.Client) -> None:
    accessor = "4d8f6a1e-5c1b-4a7f-9e2d-3b6c7d8e9f01"
    create_token(root, {"AccessorID": accessor})
    r = root.put("/v1/acl/token", json={"AccessorID": accessor})
    assert r.status_code == 500 and r.text == "Invalid Token: AccessorID is already in use"


def test_ttl_sets_expiration_and_expired_tokens_are_not_found(
    root: httpx.Client, acl_agent: DevAgent
) -> None:
    tok = create_token(root, {"ExpirationTTL": "1h"})
    assert tok["ExpirationTime"] > tok["CreateTime"]

    def expire(ctx: AgentContext) -> None:
        ctx.store.table("acl_tokens")[tok["AccessorID"]]["expires_ns"] = 1

    acl_agent.call(expire)
    with client_for(acl_agent, tok["SecretID"]) as expired:
        assert expired.get("/v1/connect/intentions").text == "ACL not found"
    assert tok["AccessorID"] not in {t["AccessorID"] for t in root.get("/v1/acl/tokens").json()}


def test_delete_errors(root: httpx.Client, acl_agent: DevAgent) -> None:
    r = root.delete("/v1/acl/token/not-a-uuid")
    assert r.status_code == 500 and r.text == "Accessor ID is missing or an invalid UUID"
    r = root.delete(f"/v1/acl/token/{ANON}")
    assert r.status_code == 500
    assert r.text == "Delete operation not permitted on the anonymous token"
    me = root.get("/v1/acl/token/self").json()["AccessorID"]
    r = root.delete(f"/v1/acl/token/{me}")
    assert r.status_code == 500
    assert r.text == "Deletion of the request's authorization token is not permitted"
    r = root.delete("/v1/acl/token/4d8f6a1e-5c1b-4a7f-9e2d-3b6c7d8e9f01")
    assert r.status_code == 200 and r.json() is True
    with client_for(acl_agent, "4d8f6a1e-0000-4a7f-9e2d-3b6c7d8e9f01") as unknown:
        r = unknown.delete(f"/v1/acl/token/{me}")
        assert r.status_code == 404 and r.text == "Cannot find token to delete"
    r = root.get("/v1/acl/token/")
    assert r.status_code == 400 and r.text == "Missing token AccessorID"


def test_secret_is_hidden_without_acl_write(root: httpx.Client, acl_agent: DevAgent) -> None:
    pol = root.put("/v1/acl/policy", json={"Name": "reader", "Rules": 'acl = "read"'}).json()
    reader = create_token(root, {"Policies": [{"ID": pol["ID"]}]})
    with client_for(acl_agent, reader["SecretID"]) as c:
        listed = c.get("/v1/acl/tokens").json()
        assert {t["SecretID"] for t in listed} == {"<hidden>"}
        r = c.put("/v1/acl/token", json={})
        assert r.status_code == 403
        assert r.text == (
            f"Permission denied: token with AccessorID '{reader['AccessorID']}' lacks "
            "permission 'acl:write'"
        )


def test_anonymous_gets_anonymous_wording(acl_agent: DevAgent) -> None:
    with client_for(acl_agent) as anonymous:
        r = anonymous.get("/v1/acl/tokens")
        assert r.status_code == 403
        assert r.text == (
            "Permission denied: anonymous token lacks permission 'acl:read'. The anonymous "
            "token is used implicitly when a request does not specify a token."
        )
        r = anonymous.get("/v1/acl/token/self")
        assert r.status_code == 404 and r.text == "Supplied token does not exist"


def test_service_identity_rights(root: httpx.Client, acl_agent: DevAgent) -> None:
    tok = create_token(root, {"ServiceIdentities": [{"ServiceName": "web"}]})
    checks = [
        ("service", "write", "web"),
        ("service", "write", "web-sidecar-proxy"),
        ("service", "write", "webby"),
        ("service", "read", "anything"),
        ("node", "read", "node1"),
        ("node", "write", "node1"),
        ("intention", "read", "db"),
        ("intentions", "read", "*"),
        ("intention", "write", "web"),
        ("intention", "write", "*"),
        ("agent", "read", "node1"),
        ("acl", "read", ""),
    ]
    assert rights(acl_agent, tok["SecretID"], checks) == [
        True, True, False, True, True, False, True, True, False, False, False, False,
    ]  # fmt: skip


def test_identity_in_another_datacenter_grants_nothing(
    root: httpx.Client, acl_agent: DevAgent
) -> None:
    tok = create_token(
        root, {"ServiceIdentities": [{"ServiceName": "web", "Datacenters": ["dc2"]}]}
    )
    assert rights(acl_agent, tok["SecretID"], [("service", "write", "web")]) == [False]


def test_default_allow_still_refuses_writes_outside_the_identity(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="allow", acl_initial_management_token="root"
    )
    with client_for(agent, "root") as root:
        tok = create_token(root, {"ServiceIdentities": [{"ServiceName": "web"}]})
    got = rights(
        agent,
        tok["SecretID"],
        [
            ("service", "write", "db"),
            ("agent", "write", "n"),
            ("acl", "read", ""),
            ("key", "write", "k"),
        ],
    )
    assert got == [False, True, False, True]
    anon = rights(agent, "", [("service", "write", "db"), ("acl", "write", "")])
    assert anon == [True, False]


def test_policy_rules_exact_prefix_and_merging(root: httpx.Client, acl_agent: DevAgent) -> None:
    p1 = root.put(
        "/v1/acl/policy",
        json={
            "Name": "p1",
            "Rules": """
                service_prefix "" { policy = "read" }
                service_prefix "api-" { policy = "write" }
                service "api-internal" { policy = "deny" }
                service "db" { policy = "write" intentions = "write" }
            """,
        },
    )
    assert p1.status_code == 200, p1.text
    # JSON rules, as py-consul sends them; merged with p1, deny beats write.
    p2 = root.put(
        "/v1/acl/policy",
        json={"Name": "p2", "Rules": '{"service": {"db": {"policy": "deny"}}, "operator": "read"}'},
    )
    assert p2.status_code == 200, p2.text
    only_p1 = create_token(root, {"Policies": [{"Name": "p1"}]})
    both = create_token(root, {"Policies": [{"Name": "p1"}, {"ID": p2.json()["ID"]}]})
    checks = [
        ("service", "write", "api-gw"),
        ("service", "write", "api-internal"),
        ("service", "read", "api-internal"),
        ("service", "write", "other"),
        ("service", "read", "other"),
        ("intention", "write", "db"),
        ("intention", "read", "api-gw"),
        ("operator", "read", ""),
    ]
    assert rights(acl_agent, only_p1["SecretID"], checks) == [
        True, False, False, False, True, True, True, False,
    ]  # fmt: skip
    # Merging keeps the strongest policy (deny) and, separately, the strongest explicit
    # intentions level (p1's write), exactly as Consul's MergePolicies does.
    merged = rights(acl_agent, both["SecretID"], [*checks, ("service", "write", "db")])
    assert merged[5:] == [True, True, True, False]
    assert only_p1["Policies"] == [{"ID": p1.json()["ID"], "Name": "p1"}]


def test_policy_api(root: httpx.Client) -> None:
    r = root.put("/v1/acl/policy", json={"Name": "bad name"})
    assert r.status_code == 500
    assert r.text == (
        "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are allowed"
    )
    r = root.put("/v1/acl/policy", json={"Name": ""})
    assert r.status_code == 500 and r.text == "Invalid Policy: no Name is set"
    pol = root.put(
        "/v1/acl/policy", json={"Name": "p", "Rules": 'node_prefix "" { policy = "read" }'}
    )
    assert pol.status_code == 200
    r = root.put("/v1/acl/policy", json={"Name": "p"})
    assert (
        r.status_code == 500 and r.text == 'Invalid Policy: A Policy with Name "p" already exists'
    )
    r = root.put("/v1/acl/policy", json={"Name": "q", "Rules": 'service "x" { policy = "maybe" }'})
    assert r.status_code == 500 and r.text.startswith("Failed to parse ACL rules")
    assert root.get(f"/v1/acl/policy/{pol.json()['ID']}").json()["Name"] == "p"
    assert root.get("/v1/acl/policy/name/p").json()["ID"] == pol.json()["ID"]
    names = [p["Name"] for p in root.get("/v1/acl/policies").json()]
    assert {"global-management", "p"} <= set(names)
    r = root.delete(f"/v1/acl/policy/{MGMT_POLICY}")
    assert r.status_code == 500
    assert r.text == "Delete operation not permitted on the builtin global-management policy"
    assert root.delete(f"/v1/acl/policy/{pol.json()['ID']}").json() is True
    r = root.get(f"/v1/acl/policy/{pol.json()['ID']}")
    assert r.status_code == 404 and r.text == "Requested policy does not exist: ACL not found"


def test_intention_list_is_filtered_with_header(root: httpx.Client, acl_agent: DevAgent) -> None:
    for src, dst in [("web", "db"), ("api", "cache")]:
        r = root.put(
            "/v1/connect/intentions/exact",
            params={"source": src, "destination": dst},
            json={"Action": "allow"},
        )
        assert r.status_code == 200
    pol = root.put(
        "/v1/acl/policy", json={"Name": "dbr", "Rules": 'service "db" { policy = "read" }'}
    ).json()
    tok = create_token(root, {"Policies": [{"ID": pol["ID"]}]})
    with client_for(acl_agent, tok["SecretID"]) as c:
        r = c.get("/v1/connect/intentions")
        assert [i["DestinationName"] for i in r.json()] == ["db"]
        assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
        r = c.get("/v1/connect/intentions/exact", params={"source": "api", "destination": "cache"})
        assert r.status_code == 403 and r.text == "Permission denied"
        r = c.get("/v1/connect/intentions/match", params={"by": "destination", "name": "cache"})
        assert r.status_code == 403
        assert "lacks permission 'intention:read' on \"cache\"" in r.text
    full = root.get("/v1/connect/intentions")
    assert "X-Consul-Results-Filtered-By-ACLs" not in full.headers


def test_tokens_survive_a_restart(tmp_path: Path) -> None:
    cfg: dict[str, Any] = {
        "acl_enabled": True,
        "acl_default_policy": "deny",
        "acl_initial_management_token": "root",
        "data_dir": str(tmp_path),
        "leaf_root_change_jitter": 0.0,
    }
    with DevAgent(**cfg) as agent, client_for(agent, "root") as root:
        tok = create_token(root, {"ServiceIdentities": [{"ServiceName": "web"}]})
        root_accessor = root.get("/v1/acl/token/self").json()["AccessorID"]
    with DevAgent(**cfg) as agent:
        with client_for(agent, tok["SecretID"]) as web:
            assert web.get("/v1/acl/token/self").json()["AccessorID"] == tok["AccessorID"]
        with client_for(agent, "root") as root:
            assert root.get("/v1/acl/token/self").json()["AccessorID"] == root_accessor
