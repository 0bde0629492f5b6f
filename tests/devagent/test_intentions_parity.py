"""Intention and service-intentions parity with Consul, pinned against Consul's source.

Each test names the Consul function whose behaviour it pins down.
"""

from __future__ import annotations

from typing import Any

import httpx

EXACT = "/v1/connect/intentions/exact"
WEB_URI = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"


def put_entry(http: httpx.Client, name: str, sources: list[dict[str, Any]]) -> httpx.Response:
    return http.put(
        "/v1/config", json={"Kind": "service-intentions", "Name": name, "Sources": sources}
    )


def sources_of(http: httpx.Client, name: str) -> list[tuple[str, str, str]]:
    entry = http.get(f"/v1/config/service-intentions/{name}").json()
    return [(s["Name"], s.get("Peer", ""), s.get("Action", "")) for s in entry["Sources"]]


# -- sameness groups are Enterprise-only ------------------------------------------------------


def test_sameness_group_source_is_refused_not_stored_as_a_local_source(
    http: httpx.Client,
) -> None:
    # Consul CE: ServiceIntentionsConfigEntry.validate calls src.validateSamenessGroup()
    # (agent/structs/config_entry_intentions_ce.go), which fails for any SamenessGroup, and
    # formats it as "Sources[%d].SamenessGroup: %v " (agent/structs/config_entry_intentions.go).
    r = put_entry(http, "db", [{"Name": "web", "SamenessGroup": "sg1", "Action": "allow"}])
    assert r.status_code == 500
    assert r.text == ("Sources[0].SamenessGroup: Sameness groups are a Consul Enterprise feature. ")
    assert http.get("/v1/config/service-intentions/db").status_code == 404
    # So the local service "web" gets the default decision, not an allow.
    auth = http.post(
        "/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": WEB_URI}
    ).json()
    assert auth["Reason"] == "Default behavior configured by ACLs"


def test_sameness_group_error_comes_after_missing_name(http: httpx.Client) -> None:
    # validate(): "Sources[%d].Name is required" is checked before validateSamenessGroup().
    r = put_entry(http, "db", [{"SamenessGroup": "sg1", "Action": "allow"}])
    assert r.status_code == 500
    assert r.text == "Sources[0].Name is required"


# -- exact API: sources are matched by service name, whatever their peer ----------------------


def test_exact_put_replaces_a_peered_source_of_the_same_name(http: httpx.Client) -> None:
    # agent/consul/state/intention.go intentionMutationUpsert -> UpsertSourceByName
    # (agent/structs/config_entry_intentions.go) compares src.SourceServiceName() only, so
    # the peered "web" is the element replaced: its allow is gone.
    assert put_entry(http, "api", [{"Name": "web", "Peer": "p1", "Action": "allow"}]).json()
    r = http.put(EXACT, params={"source": "web", "destination": "api"}, json={"Action": "deny"})
    assert r.status_code == 200 and r.json() is True
    assert sources_of(http, "api") == [("web", "", "deny")]


def test_exact_delete_removes_a_peered_source_of_the_same_name(http: httpx.Client) -> None:
    # intentionMutationDelete -> DeleteSourceByName compares SourceServiceName() only; the
    # last source gone, the entry is deleted.
    assert put_entry(http, "api", [{"Name": "web", "Peer": "p1", "Action": "allow"}]).json()
    r = http.delete(EXACT, params={"source": "web", "destination": "api"})
    assert r.status_code == 200 and r.json() is True
    assert http.get("/v1/config/service-intentions/api").status_code == 404


def test_exact_get_still_tells_peered_and_local_sources_apart(http: httpx.Client) -> None:
    # configIntentionGetExactTxn compares the peer as well as the service name.
    assert put_entry(http, "api", [{"Name": "web", "Peer": "p1", "Action": "allow"}]).json()
    r = http.get(EXACT, params={"source": "web", "destination": "api"})
    assert r.status_code == 404
    r = http.get(EXACT, params={"source": "peer:p1/web", "destination": "api"})
    assert r.status_code == 200 and r.json()["SourcePeer"] == "p1"


# -- match by source --------------------------------------------------------------------------


def test_match_by_source_lists_peered_sources_of_entries_found_by_a_local_one(
    http: httpx.Client,
) -> None:
    # readSourceIntentionsFromConfigEntriesForServiceTxn (agent/consul/state/
    # config_entry_intention.go): the "intention-source" index only finds entries through a
    # local source, but then every source with the same SourceServiceName() is returned,
    # peered or not. An entry with only the peered source is not found.
    assert put_entry(
        http,
        "api",
        [{"Name": "web", "Action": "allow"}, {"Name": "web", "Peer": "p1", "Action": "deny"}],
    ).json()
    assert put_entry(http, "db", [{"Name": "web", "Peer": "p1", "Action": "deny"}]).json()
    got = http.get("/v1/connect/intentions/match", params={"by": "source", "name": "web"})
    assert got.status_code == 200
    items = got.json()["web"]
    # Equal precedence and names: their relative order is not something Consul fixes.
    assert sorted((i["DestinationName"], i.get("SourcePeer", "")) for i in items) == [
        ("api", ""),
        ("api", "p1"),
    ]


def test_exact_delete_removes_only_the_first_source_of_that_name(http: httpx.Client) -> None:
    # DeleteSourceByName stops at the first source whose SourceServiceName() matches.
    assert put_entry(
        http,
        "api",
        [{"Name": "web", "Peer": "p1", "Action": "deny"}, {"Name": "web", "Action": "allow"}],
    ).json()
    assert http.delete(EXACT, params={"source": "web", "destination": "api"}).json() is True
    assert sources_of(http, "api") == [("web", "", "allow")]


# -- SourcePeer in an intention body ----------------------------------------------------------

PEER_REFUSED = "SourcePeer field is not supported on this endpoint. Use config entries instead"


def test_exact_put_with_source_peer_is_refused_not_stored_as_local(http: httpx.Client) -> None:
    # Intention.Apply (agent/consul/intention_endpoint.go) refuses any SourcePeer first;
    # IntentionPutExact (agent/intentions_endpoint.go) does not overwrite it from the URL.
    r = http.put(
        EXACT,
        params={"source": "web", "destination": "db"},
        json={"SourcePeer": "p1", "Action": "allow"},
    )
    assert r.status_code == 500
    assert r.text == PEER_REFUSED
    assert http.get("/v1/config/service-intentions/db").status_code == 404


def test_legacy_create_and_update_with_source_peer_are_refused(http: httpx.Client) -> None:
    body = {"SourceName": "web", "DestinationName": "db", "Action": "allow"}
    r = http.post("/v1/connect/intentions", json={**body, "SourcePeer": "p1"})
    assert r.status_code == 500
    assert r.text == PEER_REFUSED
    ixn_id = http.post("/v1/connect/intentions", json=body).json()["ID"]
    r = http.put(f"/v1/connect/intentions/{ixn_id}", json={**body, "SourcePeer": "p1"})
    assert r.status_code == 500
    assert r.text == PEER_REFUSED
    # Checked before the ID is looked up.
    r = http.put(
        "/v1/connect/intentions/00000000-0000-0000-0000-000000000000",
        json={**body, "SourcePeer": "p1"},
    )
    assert r.text == PEER_REFUSED
