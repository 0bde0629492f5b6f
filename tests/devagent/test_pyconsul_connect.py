"""The unmodified third-party ``py-consul`` client against the dev agent.

Covers what py-consul 1.8 offers for Connect: CA roots, the exact-API intentions
(upsert/read/list/match/check/delete), config entries, and ACL tokens/policies.
"""

from __future__ import annotations

from collections.abc import Callable

import consul
import pytest

from consul_connect.devagent import DevAgent


def client(agent: DevAgent, token: str | None = None) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port, token=token)


def test_ca_roots(agent: DevAgent) -> None:
    roots = client(agent).connect.ca.roots()
    assert roots["ActiveRootID"] in {r["ID"] for r in roots["Roots"]}
    assert roots["TrustDomain"].endswith(".consul")
    assert any(r["Active"] and "BEGIN CERTIFICATE" in r["RootCert"] for r in roots["Roots"])


def test_intentions_lifecycle(agent: DevAgent) -> None:
    c = client(agent)
    ixns = c.connect.intentions
    assert ixns.upsert("web", "db", action="allow", description="web to db") is True
    assert ixns.upsert("*", "db", action="deny") is True

    got = ixns.read("web", "db")
    assert got["Action"] == "allow" and got["Description"] == "web to db"
    assert got["Precedence"] == 9

    assert [(i["SourceName"], i["Precedence"]) for i in ixns.list()] == [("web", 9), ("*", 8)]
    matched = ixns.match("destination", "db")
    assert [i["SourceName"] for i in matched["db"]] == ["web", "*"]

    assert ixns.check("web", "db") is True
    assert ixns.check("other", "db") is False
    assert ixns.check("other", "cache") is True

    assert ixns.delete("web", "db") is True
    assert ixns.read("web", "db") is None  # py-consul maps 404 to None
    assert ixns.check("web", "db") is False


def test_l7_intention_through_config_entries(agent: DevAgent) -> None:
    c = client(agent)
    with pytest.raises(consul.ConsulException, match="incompatible with L7 intentions"):
        c.connect.intentions.upsert(
            "web", "api", permissions=[{"Action": "allow", "HTTP": {"PathPrefix": "/v1"}}]
        )
    assert c.config.set("service-defaults", "api", {"Protocol": "http"}) is True
    assert c.connect.intentions.upsert(
        "web", "api", permissions=[{"Action": "allow", "HTTP": {"PathPrefix": "/v1"}}]
    )
    entry = c.config.get("service-intentions", "api")
    assert entry["Sources"][0]["Permissions"] == [
        {"Action": "allow", "HTTP": {"PathPrefix": "/v1"}}
    ]
    assert [e["Name"] for e in c.config.list("service-defaults")] == ["api"]

    idx = c.config.get("service-defaults", "api")["ModifyIndex"]
    assert c.config.set("service-defaults", "api", {"Protocol": "grpc"}, cas=idx + 1) is False
    assert c.config.set("service-defaults", "api", {"Protocol": "grpc"}, cas=idx) is True
    assert c.connect.intentions.check("web", "api") is False  # L7 counts as deny

    assert c.config.delete("service-intentions", "api") is True
    assert c.config.get("service-intentions", "api") is None


def test_acl_tokens_and_policies(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    root = client(agent, "root")
    assert root.acl.token.read_self()["Description"] == "Initial Management Token"

    policy = root.acl.policy.create(
        "intentions-db",
        rules={"service": {"db": {"policy": "read", "intentions": "write"}}},
    )
    tok = root.acl.token.create(
        description="web",
        service_identities=[{"ServiceName": "web"}],
        policies_name=["intentions-db"],
    )
    assert tok["Policies"] == [{"ID": policy["ID"], "Name": "intentions-db"}]
    assert root.acl.token.read(tok["AccessorID"])["SecretID"] == tok["SecretID"]
    assert tok["AccessorID"] in {t["AccessorID"] for t in root.acl.token.list()}

    web = client(agent, tok["SecretID"])
    assert web.acl.token.read_self()["AccessorID"] == tok["AccessorID"]
    assert web.connect.intentions.upsert("web", "db", action="allow") is True
    with pytest.raises(consul.ACLPermissionDenied, match="intention:write"):
        web.connect.intentions.upsert("web", "cache", action="allow")
    anonymous = client(agent)
    assert anonymous.connect.intentions.list() == []  # filtered by ACLs, not refused
    with pytest.raises(consul.ACLPermissionDenied, match="anonymous token"):
        anonymous.connect.intentions.match("destination", "db")

    assert root.acl.token.delete(tok["AccessorID"]) is True
    with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
        web.connect.intentions.list()


def test_acl_disabled_is_reported(agent: DevAgent) -> None:
    with pytest.raises(consul.ACLDisabled):
        client(agent).acl.token.list()
