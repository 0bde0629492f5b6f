"""Corners of Consul's API where the dev agent once answered differently from Consul.

Each test names the Consul behaviour it pins and the ``hashicorp/consul`` source that
decides it. Real HTTP against a dev agent on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import time

import httpx
import pytest

CLIENT_URI = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"


# -- /v1/agent/connect/authorize --------------------------------------------------------------


@pytest.mark.parametrize("partition", ["foo", "Foo"])
def test_authorize_refuses_a_client_uri_from_another_partition(
    http: httpx.Client, partition: str
) -> None:
    # agent/agent_endpoint.go AgentConnectAuthorize: after the service:write check,
    # `if !uriService.MatchesPartition(authReq.TargetPartition())` answers 400
    # `Mismatched partitions: %q != %q`. In CE the target side is always "default"
    # (acl/enterprisemeta_ce.go PartitionOrDefault) while the URI side keeps its
    # lower-cased /ap/ segment (agent/connect/uri_service_ce.go PartitionOrDefault),
    # so no intention default (allow, with ACLs off) may authorize such a client.
    uri = CLIENT_URI.replace("/ns/", f"/ap/{partition}/ns/")
    r = http.post("/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": uri})
    assert (r.status_code, r.text) == (400, 'Mismatched partitions: "foo" != "default"')
    assert "X-Cache" not in r.headers


def test_authorize_accepts_an_explicit_default_partition(http: httpx.Client) -> None:
    # Same check: "/ap/DEFAULT/" lower-cases to the target's "default" partition.
    uri = CLIENT_URI.replace("/ns/", "/ap/DEFAULT/ns/")
    r = http.post("/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": uri})
    assert r.status_code == 200, r.text
    assert r.json()["Authorized"] is True


# -- blocking query parameters ------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["index=", "wait=", "index=&wait=", "max_stale=", "wait=-1s", "wait=-5m&stale"],
)
def test_empty_blocking_params_and_negative_waits_are_accepted(
    http: httpx.Client, query: str
) -> None:
    # agent/http.go parseWait: `if wait := query.Get("wait"); wait != ""` and
    # `if idx := query.Get("index"); idx != ""` skip empty values; parseConsistency does
    # the same for max_stale. time.ParseDuration accepts a negative duration, and the
    # server turns a non-positive MaxQueryTime into the default query time
    # (agent/consul/server.go RPCQueryTimeout), so none of these is a 400.
    t0 = time.monotonic()
    r = http.get(f"/v1/catalog/services?{query}")
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 5  # no index given: answered at once


def test_a_wait_beyond_go_duration_range_is_invalid(http: httpx.Client) -> None:
    # agent/http.go parseWait: time.ParseDuration fails on overflow (more than
    # 2^63-1 ns, about 2562047h), which is answered 400 "Invalid wait time".
    r = http.get("/v1/catalog/services?index=1&wait=99999999999h", timeout=5)
    assert (r.status_code, r.text) == (400, "Invalid wait time")
    ok = http.get("/v1/catalog/services?wait=2562047h")
    assert ok.status_code == 200, ok.text


# -- config entries -------------------------------------------------------------------------------


def _index(http: httpx.Client) -> int:
    return int(http.get("/v1/config/service-defaults").headers["X-Consul-Index"])


def test_deleting_a_missing_config_entry_is_a_skipped_success(http: httpx.Client) -> None:
    # agent/consul/config_endpoint.go Delete: shouldSkipOperation is true when the entry
    # does not exist, so no raft write happens (the index stays) and reply.Deleted is
    # true, which agent/config_endpoint.go configDelete returns for a CAS delete.
    before = _index(http)
    r = http.delete("/v1/config/service-defaults/ghost", params={"cas": "7"})
    assert (r.status_code, r.json()) == (200, True)
    r = http.delete("/v1/config/service-defaults/ghost")
    assert (r.status_code, r.json()) == (200, {})
    assert _index(http) == before


def test_config_list_filter_is_refused_for_kinds_without_filter_support(
    http: httpx.Client,
) -> None:
    # agent/consul/config_endpoint.go List: a filter is only supported for
    # service-defaults; any other kind fails with
    # "filtering not supported for config entry kind=<kind>" (a plain error: 500).
    body = {
        "Kind": "service-intentions",
        "Name": "db",
        "Sources": [{"Name": "web", "Action": "allow"}],
    }
    assert http.put("/v1/config", json=body).json() is True
    r = http.get("/v1/config/service-intentions", params={"filter": 'Name == "nope"'})
    assert (r.status_code, r.text) == (
        500,
        "filtering not supported for config entry kind=service-intentions",
    )


def test_config_list_filter_applies_to_service_defaults(http: httpx.Client) -> None:
    # agent/consul/config_endpoint.go List: for service-defaults the bexpr filter runs
    # over the (ACL-filtered) entries.
    for name, proto in (("web", "http"), ("db", "tcp")):
        entry = {"Kind": "service-defaults", "Name": name, "Protocol": proto}
        assert http.put("/v1/config", json=entry).json() is True
    r = http.get("/v1/config/service-defaults", params={"filter": 'Protocol == "http"'})
    assert r.status_code == 200, r.text
    assert [e["Name"] for e in r.json()] == ["web"]


# -- agent-local lists ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/agent/services", "/v1/agent/checks"])
@pytest.mark.parametrize("query", ["index=abc", "wait=forever", "stale&consistent", "max_stale=x"])
def test_agent_local_lists_ignore_query_options(http: httpx.Client, path: str, query: str) -> None:
    # agent/agent_endpoint.go AgentServices/AgentChecks call only parseToken and
    # parseFilter, never parseWait/parseConsistency: these parameters are ignored there
    # (the same values are a 400 on /v1/catalog/* and /v1/health/*).
    r = http.get(f"{path}?{query}")
    assert r.status_code == 200, r.text
    assert r.json() == {}
