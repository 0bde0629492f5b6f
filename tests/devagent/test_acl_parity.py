"""ACL behaviour of the dev agent pinned against Consul's source, one divergence per test.

Each test names the Consul function it follows (hashicorp/consul, current main unless noted).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from tests.conftest import client_for


@pytest.fixture
def acl_agent(start_agent: Callable[..., DevAgent]) -> DevAgent:
    """ACLs on, default deny, management token ``root``."""
    return start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )


@pytest.fixture
def root(acl_agent: DevAgent) -> Iterator[httpx.Client]:
    with client_for(acl_agent, "root") as c:
        yield c


@pytest.fixture
def anon(acl_agent: DevAgent) -> Iterator[httpx.Client]:
    with client_for(acl_agent) as c:
        yield c


def create_token(root: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = root.put("/v1/acl/token", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def create_policy(root: httpx.Client, name: str, rules: str) -> httpx.Response:
    return root.put("/v1/acl/policy", json={"Name": name, "Rules": rules})


# -- validation that must refuse what Consul refuses -------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["web\n", "Web", "web.1", "-web"],
)
def test_service_identity_name_is_matched_whole_like_go_regexp(
    root: httpx.Client, name: str
) -> None:
    # acl/validation.go IsValidServiceIdentityName: Go's `$` is end of text, so "web\n" fails.
    # agent/consul/auth/token_writer.go normalizeServiceIdentities gives the text.
    r = root.put("/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": name}]})
    assert r.status_code == 500
    assert r.text.endswith(
        "has an invalid name. Only lowercase alphanumeric characters, '-' and '_' are allowed"
    )


@pytest.mark.parametrize("name", ["node.1", "Node", "n1\n", "-n"])
def test_node_identity_name_is_validated(root: httpx.Client, name: str) -> None:
    # agent/consul/auth/token_writer.go normalizeNodeIdentities + acl.IsValidNodeIdentityName.
    r = root.put(
        "/v1/acl/token", json={"NodeIdentities": [{"NodeName": name, "Datacenter": "dc1"}]}
    )
    assert r.status_code == 500
    assert r.text == (
        "Node identity has an invalid name. Only lowercase alphanumeric characters, "
        "'-' and '_' are allowed"
    )


def test_accessor_id_with_trailing_newline_is_not_a_uuid(root: httpx.Client) -> None:
    # token_writer.go validateTokenID -> go-uuid ParseUUID demands exactly 36 characters.
    r = root.put("/v1/acl/token", json={"AccessorID": str(uuid.uuid4()) + "\n"})
    assert r.status_code == 500
    assert r.text == "Invalid Token: AccessorID - not a valid UUID"


def test_policy_name_with_trailing_newline_is_invalid(root: httpx.Client) -> None:
    # acl/validation.go validPolicyName `^[A-Za-z0-9\-_]{1,128}$` (Go: `$` = end of text).
    r = create_policy(root, "p1\n", "")
    assert r.status_code == 500
    assert r.text == (
        "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are allowed"
    )


@pytest.mark.parametrize(
    "rules",
    [
        'service "web" { policy = "list" }',
        'service_prefix "" { policy = "list" }',
        'node "n" { policy = "list" }',
        'agent_prefix "" { policy = "list" }',
        'operator = "list"',
        'mesh = "list"',
        'acl = "list"',
        'service "web" { policy = "read" intentions = "list" }',
    ],
)
def test_list_is_only_a_key_policy(root: httpx.Client, rules: str) -> None:
    # acl/policy.go (*PolicyRules).Validate: isPolicyValid(p, allowList) with allowList only
    # for key/key_prefix.
    r = create_policy(root, "p", rules)
    assert r.status_code == 500, r.text
    assert r.text.startswith("Failed to parse ACL rules: Invalid ")


def test_list_is_accepted_on_keys(root: httpx.Client) -> None:
    r = create_policy(root, "p", 'key_prefix "app/" { policy = "list" }')
    assert r.status_code == 200, r.text


def test_bearer_separated_by_a_tab_is_ignored(acl_agent: DevAgent, root: httpx.Client) -> None:
    # agent/http.go parseTokenFromHeaders: strings.Split(header, " ") needs a space after the
    # scheme; "Bearer\t<secret>" is one part, so no token is taken (anonymous is used).
    tok = create_token(root, {"ServiceIdentities": [{"ServiceName": "web"}]})
    with client_for(acl_agent) as c:
        r = c.get(
            "/v1/agent/connect/ca/leaf/web",
            headers={"Authorization": "Bearer\t" + tok["SecretID"]},
        )
        assert r.status_code == 403
        assert r.text.startswith("Permission denied: anonymous token lacks permission")
        # Several spaces are fine: the value is trimmed, then its first space-separated word.
        r = c.get(
            "/v1/agent/connect/ca/leaf/web",
            headers={"Authorization": "bearer   " + tok["SecretID"] + " extra"},
        )
        assert r.status_code == 200, r.text


def test_updating_a_token_cannot_change_its_expiration(root: httpx.Client) -> None:
    # agent/consul/auth/token_writer.go (*TokenWriter).Update.
    tok = create_token(root, {"Description": "x"})
    acc = tok["AccessorID"]
    r = root.put(f"/v1/acl/token/{acc}", json={"ExpirationTTL": "1h"})
    assert r.status_code == 500
    assert r.text == f"Cannot change expiration time of {acc}"
    r = root.put(f"/v1/acl/token/{acc}", json={"ExpirationTime": "2099-01-01T00:00:00Z"})
    assert r.status_code == 500
    assert r.text == f"Cannot change expiration time of {acc}"
    # The unchanged time is accepted.
    tok2 = create_token(root, {"ExpirationTTL": "1h"})
    r = root.put(
        f"/v1/acl/token/{tok2['AccessorID']}",
        json={"ExpirationTime": tok2["ExpirationTime"], "Description": "y"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["ExpirationTime"] == tok2["ExpirationTime"]


# -- what Consul allows and we must not refuse -------------------------------------------------


def test_access_levels_are_case_insensitive(acl_agent: DevAgent, root: httpx.Client) -> None:
    # acl/acl.go AccessLevelFromString lower-cases the level before matching, and both
    # Validate and insertPolicyIntoRadix go through it.
    r = create_policy(root, "upper", 'service "web" { policy = "WRITE" }\noperator = "Read"')
    assert r.status_code == 200, r.text
    tok = create_token(root, {"Policies": [{"Name": "upper"}]})
    with client_for(acl_agent, tok["SecretID"]) as c:
        assert c.get("/v1/agent/connect/ca/leaf/web").status_code == 200
        r = c.get("/v1/connect/ca/configuration")
        assert r.status_code == 403
        assert "lacks permission 'operator:write'" in r.text


def test_json_rules_with_uppercase_level(root: httpx.Client) -> None:
    r = create_policy(root, "j", json.dumps({"service": {"web": {"policy": "Deny"}}}))
    assert r.status_code == 200, r.text


def test_default_token_is_used_when_the_request_has_none(
    start_agent: Callable[..., DevAgent],
) -> None:
    # agent/http.go parseTokenWithDefault: an empty token becomes acl.tokens.default
    # (s.agent.tokens.UserToken()); an explicit token still wins.
    agent = start_agent(
        acl_enabled=True,
        acl_default_policy="deny",
        acl_initial_management_token="root",
        acl_default_token="root",
    )
    with client_for(agent) as c:
        assert c.get("/v1/agent/connect/ca/leaf/web").status_code == 200
        r = c.get("/v1/acl/token/self")
        assert r.status_code == 200
        assert r.json()["SecretID"] == "root"
        r = c.get("/v1/agent/connect/ca/leaf/web", headers={"X-Consul-Token": "nope"})
        assert r.status_code == 403
        assert r.text == "ACL not found"
