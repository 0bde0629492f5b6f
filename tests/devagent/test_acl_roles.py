"""ACL roles of the dev agent: role API, validation texts, and rights a role lends a token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from tests.conftest import client_for

MISSING_ID = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"


@pytest.fixture
def acl_agent(start_agent: Callable[..., DevAgent]) -> DevAgent:
    """ACLs on, default deny, management token ``root``."""
    return start_agent(
        acl_enabled=True,
        acl_default_policy="deny",
        acl_initial_management_token="root",
        leaf_root_change_jitter=0.0,
    )


@pytest.fixture
def root(acl_agent: DevAgent) -> Iterator[httpx.Client]:
    with client_for(acl_agent, "root") as c:
        yield c


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def create_policy(root: httpx.Client, name: str, rules: str) -> dict[str, Any]:
    return ok(root.put("/v1/acl/policy", json={"Name": name, "Rules": rules}))


def create_role(root: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    return ok(root.put("/v1/acl/role", json=body))


def create_token(root: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    return ok(root.put("/v1/acl/token", json=body))


def leaf_status(agent: DevAgent, secret: str, service: str) -> int:
    with client_for(agent, secret) as c:
        return c.get(f"/v1/agent/connect/ca/leaf/{service}").status_code


# -- API ------------------------------------------------------------------------------------------


def test_role_endpoints_answer_401_when_disabled(http: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v1/acl/roles"),
        ("PUT", "/v1/acl/role"),
        ("GET", f"/v1/acl/role/{MISSING_ID}"),
        ("GET", "/v1/acl/role/name/web"),
        ("DELETE", f"/v1/acl/role/{MISSING_ID}"),
    ]:
        r = http.request(method, path)
        assert (r.status_code, r.text) == (401, "ACL support disabled"), path


def test_create_read_by_id_and_name_update_list_delete(root: httpx.Client) -> None:
    pol = create_policy(root, "kv-read", 'key_prefix "" { policy = "read" }')
    role = create_role(
        root,
        {
            "Name": "web-role",
            "Description": "for web",
            "Policies": [{"Name": "kv-read"}, {"ID": pol["ID"]}],
            "ServiceIdentities": [{"ServiceName": "web"}],
            "NodeIdentities": [{"NodeName": "node-1", "Datacenter": "dc1"}],
        },
    )
    assert list(role) == [
        "ID",
        "Name",
        "Description",
        "Policies",
        "ServiceIdentities",
        "NodeIdentities",
        "Hash",
        "CreateIndex",
        "ModifyIndex",
    ]
    # Links by name are resolved to the ID, duplicates dropped, the name filled in on reads.
    assert role["Policies"] == [{"ID": pol["ID"], "Name": "kv-read"}]
    assert role["ServiceIdentities"] == [{"ServiceName": "web"}]
    assert role["NodeIdentities"] == [{"NodeName": "node-1", "Datacenter": "dc1"}]
    assert len(role["Hash"]) == 44
    assert role["CreateIndex"] == role["ModifyIndex"]

    r = root.get(f"/v1/acl/role/{role['ID']}")
    assert ok(r) == role
    assert int(r.headers["X-Consul-Index"]) >= role["ModifyIndex"]
    assert ok(root.get("/v1/acl/role/name/web-role")) == role
    assert [x["ID"] for x in root.get("/v1/acl/roles").json()] == [role["ID"]]
    assert root.get("/v1/acl/roles", params={"policy": pol["ID"]}).json() == [role]
    assert root.get("/v1/acl/roles", params={"policy": MISSING_ID}).json() == []

    # PUT replaces the whole role; the name may change.
    updated = ok(root.put(f"/v1/acl/role/{role['ID']}", json={"Name": "web-role-2"}))
    assert updated["ID"] == role["ID"]
    assert updated["Description"] == ""
    assert "Policies" not in updated and "ServiceIdentities" not in updated
    assert updated["CreateIndex"] == role["CreateIndex"]
    assert updated["ModifyIndex"] > role["ModifyIndex"]
    assert updated["Hash"] != role["Hash"]
    r = root.get("/v1/acl/role/name/web-role")
    assert (r.status_code, r.text) == (404, "Requested role does not exist: ACL not found")

    assert root.delete(f"/v1/acl/role/{role['ID']}").json() is True
    r = root.get(f"/v1/acl/role/{role['ID']}")
    assert (r.status_code, r.text) == (404, "Requested role does not exist: ACL not found")
    assert root.get("/v1/acl/roles").json() == []
    # Deleting an unknown role is a no-op that still answers true.
    assert root.delete(f"/v1/acl/role/{MISSING_ID}").json() is True


def test_role_read_drops_deleted_policies_and_shows_renamed_ones(root: httpx.Client) -> None:
    a = create_policy(root, "pa", "")
    b = create_policy(root, "pb", "")
    role = create_role(root, {"Name": "r", "Policies": [{"ID": a["ID"]}, {"ID": b["ID"]}]})
    ok(root.put(f"/v1/acl/policy/{a['ID']}", json={"Name": "pa-renamed"}))
    assert root.delete(f"/v1/acl/policy/{b['ID']}").json() is True
    got = ok(root.get(f"/v1/acl/role/{role['ID']}"))
    assert got["Policies"] == [{"ID": a["ID"], "Name": "pa-renamed"}]


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({}, "Invalid Role: no Name is set"),
        (
            {"Name": "bad name"},
            "Invalid Role: invalid Name. Only alphanumeric characters, '-' and '_' are allowed",
        ),
        (
            {"Name": "x" * 257},
            "Invalid Role: invalid Name. Only alphanumeric characters, '-' and '_' are allowed",
        ),
        (
            {"Name": "r\n"},
            "Invalid Role: invalid Name. Only alphanumeric characters, '-' and '_' are allowed",
        ),
        ({"Name": "r", "Policies": [{"Name": "nope"}]}, 'No such ACL policy with name "nope"'),
        (
            {"Name": "r", "Policies": [{"ID": MISSING_ID}]},
            f"Failed to apply role upsert request: No such policy with ID: {MISSING_ID}",
        ),
        (
            {"Name": "r", "ServiceIdentities": [{"ServiceName": ""}]},
            "Service identity is missing the service name field on this role",
        ),
        (
            {"Name": "r", "ServiceIdentities": [{"ServiceName": "Web"}]},
            'Service identity "Web" has an invalid name. Only lowercase alphanumeric '
            "characters, '-' and '_' are allowed",
        ),
        (
            {"Name": "r", "NodeIdentities": [{"Datacenter": "dc1"}]},
            "Node identity is missing the node name field on this role",
        ),
        (
            {"Name": "r", "NodeIdentities": [{"NodeName": "n1"}]},
            "Node identity is missing the datacenter field on this role",
        ),
        (
            {"Name": "r", "NodeIdentities": [{"NodeName": "N1", "Datacenter": "dc1"}]},
            "Node identity has an invalid name. Only lowercase alphanumeric characters, "
            "'-' and '_' are allowed",
        ),
    ],
)
def test_role_validation_texts(root: httpx.Client, body: dict[str, Any], text: str) -> None:
    r = root.put("/v1/acl/role", json=body)
    assert (r.status_code, r.text) == (500, text)
    assert root.get("/v1/acl/roles").json() == []


def test_role_names_are_unique(root: httpx.Client) -> None:
    a = create_role(root, {"Name": "a"})
    create_role(root, {"Name": "b"})
    r = root.put("/v1/acl/role", json={"Name": "a"})
    assert (r.status_code, r.text) == (500, 'Invalid Role: A Role with Name "a" already exists')
    r = root.put(f"/v1/acl/role/{a['ID']}", json={"Name": "b"})
    assert (r.status_code, r.text) == (500, 'Invalid Role: A role with name "b" already exists')
    # Keeping its own name is fine.
    assert ok(root.put(f"/v1/acl/role/{a['ID']}", json={"Name": "a", "Description": "d"}))


def test_role_request_errors(root: httpx.Client) -> None:
    for method in ("GET", "DELETE"):
        r = root.request(method, "/v1/acl/role/")
        assert (r.status_code, r.text) == (400, "Missing role ID")
    r = root.get("/v1/acl/role/name/")
    assert (r.status_code, r.text) == (400, "Missing role Name")
    r = root.put("/v1/acl/role", json={"ID": MISSING_ID, "Name": "r"})
    assert (r.status_code, r.text) == (400, "Role ID in URL and payload do not match")
    r = root.put(f"/v1/acl/role/{MISSING_ID}", json={"ID": "other", "Name": "r"})
    assert (r.status_code, r.text) == (400, "Role ID in URL and payload do not match")
    r = root.put("/v1/acl/role", content=b"{")
    assert r.status_code == 400 and r.text.startswith("Role decoding failed: ")
    r = root.put("/v1/acl/role", json={"Name": 5})
    assert r.status_code == 400
    assert r.text == (
        "Role decoding failed: json: cannot unmarshal number into Go struct field "
        "ACLRole.Name of type string"
    )
    r = root.put("/v1/acl/role/not-a-uuid", json={"Name": "r"})
    assert (r.status_code, r.text) == (500, "Role ID invalid UUID")
    r = root.put(f"/v1/acl/role/{MISSING_ID}", json={"Name": "r"})
    assert (r.status_code, r.text) == (500, f"cannot find role {MISSING_ID}")


def test_role_endpoints_need_acl_read_or_write(acl_agent: DevAgent, root: httpx.Client) -> None:
    create_policy(root, "acl-read", 'acl = "read"')
    reader = create_token(root, {"Policies": [{"Name": "acl-read"}]})
    role = create_role(root, {"Name": "r"})
    with client_for(acl_agent, reader["SecretID"]) as c:
        assert ok(c.get(f"/v1/acl/role/{role['ID']}"))["Name"] == "r"
        assert len(c.get("/v1/acl/roles").json()) == 1
        for method, path in [
            ("PUT", "/v1/acl/role"),
            ("PUT", f"/v1/acl/role/{role['ID']}"),
            ("DELETE", f"/v1/acl/role/{role['ID']}"),
        ]:
            r = c.request(method, path, json={"Name": "r2"})
            assert r.status_code == 403, path
            assert r.text == (
                f"Permission denied: token with AccessorID '{reader['AccessorID']}' "
                "lacks permission 'acl:write'"
            )
    with client_for(acl_agent) as anon:
        r = anon.get("/v1/acl/roles")
        assert r.status_code == 403
        assert r.text.startswith("Permission denied: anonymous token lacks permission 'acl:read'")
    with client_for(acl_agent, "no-such-secret") as c:
        r = c.delete(f"/v1/acl/role/{role['ID']}")
        assert (r.status_code, r.text) == (404, "Cannot find role to delete")
        r = c.get(f"/v1/acl/role/{role['ID']}")
        assert (r.status_code, r.text) == (403, "ACL not found")


# -- tokens linking roles -------------------------------------------------------------------------


def test_token_role_links_are_resolved_and_normalized(root: httpx.Client) -> None:
    role = create_role(root, {"Name": "web-role"})
    tok = create_token(root, {"Roles": [{"Name": "web-role"}, {"ID": role["ID"]}]})
    assert tok["Roles"] == [{"ID": role["ID"], "Name": "web-role"}]
    assert list(tok)[:5] == ["AccessorID", "SecretID", "Description", "Roles", "Local"]
    r = root.put("/v1/acl/token", json={"Roles": [{"Name": "nope"}]})
    assert (r.status_code, r.text) == (500, 'No such ACL role with name "nope"')
    r = root.put("/v1/acl/token", json={"Roles": [{"ID": MISSING_ID}]})
    assert (r.status_code, r.text) == (500, f'No such ACL role with ID "{MISSING_ID}"')

    # A renamed role shows its new name on token reads; the list filters by role ID.
    ok(root.put(f"/v1/acl/role/{role['ID']}", json={"Name": "renamed"}))
    got = ok(root.get(f"/v1/acl/token/{tok['AccessorID']}"))
    assert got["Roles"] == [{"ID": role["ID"], "Name": "renamed"}]
    listed = root.get("/v1/acl/tokens", params={"role": role["ID"]}).json()
    assert [t["AccessorID"] for t in listed] == [tok["AccessorID"]]
    assert root.get("/v1/acl/tokens", params={"role": MISSING_ID}).json() == []

    # A clone keeps the role link; an update can drop it.
    clone = ok(root.put(f"/v1/acl/token/{tok['AccessorID']}/clone", json={}))
    assert clone["Roles"] == [{"ID": role["ID"], "Name": "renamed"}]
    upd = ok(root.put(f"/v1/acl/token/{tok['AccessorID']}", json={"Description": "x"}))
    assert "Roles" not in upd


def test_role_service_identity_lets_the_token_fetch_a_leaf(
    acl_agent: DevAgent, root: httpx.Client
) -> None:
    role = create_role(root, {"Name": "web-role", "ServiceIdentities": [{"ServiceName": "web"}]})
    tok = create_token(root, {"Roles": [{"Name": "web-role"}]})
    assert leaf_status(acl_agent, tok["SecretID"], "web") == 200
    assert leaf_status(acl_agent, tok["SecretID"], "db") == 403

    # Taking the identity off the role takes the right away at once.
    ok(root.put(f"/v1/acl/role/{role['ID']}", json={"Name": "web-role"}))
    assert leaf_status(acl_agent, tok["SecretID"], "web") == 403


def test_role_policy_rights_come_and_go_with_the_role(
    acl_agent: DevAgent, root: httpx.Client
) -> None:
    create_policy(root, "db-write", 'service "db" { policy = "write" }')
    role = create_role(root, {"Name": "db-role", "Policies": [{"Name": "db-write"}]})
    tok = create_token(root, {"Roles": [{"ID": role["ID"]}]})
    secret = tok["SecretID"]
    assert leaf_status(acl_agent, secret, "db") == 200

    # Removing the policy from the role revokes it.
    ok(root.put(f"/v1/acl/role/{role['ID']}", json={"Name": "db-role"}))
    assert leaf_status(acl_agent, secret, "db") == 403
    ok(
        root.put(
            f"/v1/acl/role/{role['ID']}",
            json={"Name": "db-role", "Policies": [{"Name": "db-write"}]},
        )
    )
    assert leaf_status(acl_agent, secret, "db") == 200

    # Deleting the role revokes it too; the token lives on without the link.
    assert root.delete(f"/v1/acl/role/{role['ID']}").json() is True
    assert leaf_status(acl_agent, secret, "db") == 403
    with client_for(acl_agent, secret) as c:
        self_view = ok(c.get("/v1/acl/token/self"))
    assert "Roles" not in self_view
    # A new role with the same name is a different role: the old link does not revive.
    create_role(root, {"Name": "db-role", "Policies": [{"Name": "db-write"}]})
    assert leaf_status(acl_agent, secret, "db") == 403


def test_token_rights_are_the_union_of_its_own_and_its_roles(
    acl_agent: DevAgent, root: httpx.Client
) -> None:
    create_policy(root, "db-write", 'service "db" { policy = "write" }')
    create_role(root, {"Name": "api-role", "ServiceIdentities": [{"ServiceName": "api"}]})
    create_role(root, {"Name": "db-role", "Policies": [{"Name": "db-write"}]})
    tok = create_token(
        root,
        {
            "ServiceIdentities": [{"ServiceName": "web"}],
            "Roles": [{"Name": "api-role"}, {"Name": "db-role"}],
        },
    )
    for svc in ("web", "api", "db"):
        assert leaf_status(acl_agent, tok["SecretID"], svc) == 200, svc
    assert leaf_status(acl_agent, tok["SecretID"], "other") == 403


def test_role_identity_in_another_datacenter_grants_nothing(
    acl_agent: DevAgent, root: httpx.Client
) -> None:
    create_role(
        root,
        {"Name": "r", "ServiceIdentities": [{"ServiceName": "web", "Datacenters": ["dc2"]}]},
    )
    tok = create_token(root, {"Roles": [{"Name": "r"}]})
    assert leaf_status(acl_agent, tok["SecretID"], "web") == 403


def test_roles_survive_a_restart(tmp_path: Path) -> None:
    cfg: dict[str, Any] = {
        "acl_enabled": True,
        "acl_default_policy": "deny",
        "acl_initial_management_token": "root",
        "data_dir": str(tmp_path),
        "leaf_root_change_jitter": 0.0,
    }
    with DevAgent(**cfg) as agent, client_for(agent, "root") as root:
        role = create_role(root, {"Name": "r", "ServiceIdentities": [{"ServiceName": "web"}]})
        tok = create_token(root, {"Roles": [{"Name": "r"}]})
    with DevAgent(**cfg) as agent, client_for(agent, "root") as root:
        assert ok(root.get("/v1/acl/role/name/r")) == role
        assert leaf_status(agent, tok["SecretID"], "web") == 200
