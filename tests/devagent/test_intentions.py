"""Intentions over real HTTP: legacy ID API, exact API, match ordering, check, errors."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

EXACT = "/v1/connect/intentions/exact"


def put_exact(http: httpx.Client, src: str, dst: str, body: dict[str, Any]) -> httpx.Response:
    return http.put(EXACT, params={"source": src, "destination": dst}, json=body)


def index_of(r: httpx.Response) -> int:
    return int(r.headers["X-Consul-Index"])


def pairs(items: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(i["SourceName"], i["DestinationName"], i["Precedence"]) for i in items]


# -- exact API and agreement of the views ----------------------------------------------------


def test_exact_upsert_is_visible_in_every_view(http: httpx.Client) -> None:
    r = put_exact(http, "web", "db", {"Action": "allow", "Description": "web may use db"})
    assert r.status_code == 200 and r.json() is True

    one = http.get(EXACT, params={"source": "web", "destination": "db"})
    assert one.status_code == 200
    body = one.json()
    assert body == {
        "Description": "web may use db",
        "SourceNS": "default",
        "SourceName": "web",
        "DestinationNS": "default",
        "DestinationName": "db",
        "SourceType": "consul",
        "Action": "allow",
        "Precedence": 9,
        "CreateIndex": body["CreateIndex"],
        "ModifyIndex": body["ModifyIndex"],
    }
    assert "ID" not in body and "CreatedAt" not in body

    assert http.get("/v1/connect/intentions").json() == [body]
    assert http.get(
        "/v1/connect/intentions/match", params={"by": "destination", "name": "db"}
    ).json() == {"db": [body]}
    entry = http.get("/v1/config/service-intentions/db").json()
    assert entry["Sources"] == [
        {
            "Name": "web",
            "Action": "allow",
            "Precedence": 9,
            "Type": "consul",
            "Description": "web may use db",
        }
    ]
    assert entry["ModifyIndex"] == body["ModifyIndex"]


def test_exact_upsert_replaces_the_same_source(http: httpx.Client) -> None:
    put_exact(http, "web", "db", {"Action": "allow"})
    put_exact(http, "web", "db", {"Action": "deny"})
    items = http.get("/v1/connect/intentions").json()
    assert [(i["SourceName"], i["Action"]) for i in items] == [("web", "deny")]


def test_exact_get_of_missing_intention_is_404(http: httpx.Client) -> None:
    r = http.get(EXACT, params={"source": "web", "destination": "db"})
    assert r.status_code == 404
    assert r.text == "Intention not found"


def test_exact_delete_removes_source_and_last_one_removes_entry(http: httpx.Client) -> None:
    put_exact(http, "web", "db", {"Action": "allow"})
    put_exact(http, "api", "db", {"Action": "deny"})
    r = http.delete(EXACT, params={"source": "web", "destination": "db"})
    assert r.status_code == 200 and r.json() is True
    names = [s["Name"] for s in http.get("/v1/config/service-intentions/db").json()["Sources"]]
    assert names == ["api"]
    http.delete(EXACT, params={"source": "api", "destination": "db"})
    r = http.get("/v1/config/service-intentions/db")
    assert r.status_code == 404
    assert r.text == 'Config entry not found for "service-intentions" / "db"'


def test_exact_delete_of_nothing_is_a_true_noop(http: httpx.Client) -> None:
    before = index_of(http.get("/v1/connect/intentions"))
    r = http.delete(EXACT, params={"source": "nobody", "destination": "nothing"})
    assert r.status_code == 200 and r.json() is True
    assert index_of(http.get("/v1/connect/intentions")) == before


def test_exact_meta_is_refused_on_a_new_entry(http: httpx.Client) -> None:
    r = put_exact(http, "web", "db", {"Action": "allow", "Meta": {"a": "b"}})
    assert r.status_code == 500
    assert r.text == "Meta must not be specified"


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"destination": "db"}, "required query parameter 'source' not set"),
        ({"source": "web"}, "required query parameter 'destination' not set"),
        ({"source": "", "destination": "db"}, "required query parameter 'source' not set"),
        (
            {"source": "a/b/c/d", "destination": "db"},
            "source \"a/b/c/d\" is invalid: input can contain at most two '/'",
        ),
        (
            {"source": "peer:p/web", "destination": "db"},
            'source "peer:p/web" is invalid: cannot specify a peer here',
        ),
    ],
)
def test_exact_put_parameter_errors_are_500s(
    http: httpx.Client, params: dict[str, str], text: str
) -> None:
    r = http.put(EXACT, params=params, json={"Action": "allow"})
    assert r.status_code == 500
    assert r.text == text


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"Action": "maybe"}, "Sources[0].Action must be set to 'allow' or 'deny'"),
        ({}, "Sources[0].Action must be set to 'allow' or 'deny'"),
        ({"Action": "allow", "SourceType": "other"}, "Sources[0].Type must be set to 'consul'"),
    ],
)
def test_exact_put_validation_errors_leave_state_unchanged(
    http: httpx.Client, body: dict[str, Any], text: str
) -> None:
    before = index_of(http.get("/v1/connect/intentions"))
    r = put_exact(http, "web", "db", body)
    assert r.status_code == 500
    assert r.text == text
    after = http.get("/v1/connect/intentions")
    assert after.json() == [] and index_of(after) == before


def test_partial_wildcard_source_is_refused(http: httpx.Client) -> None:
    r = put_exact(http, "web*", "db", {"Action": "allow"})
    assert r.status_code == 500
    assert r.text == "Sources[0].Name: wildcard character '*' cannot be used with partial values"


def test_undecodable_body_is_400_and_changes_nothing(http: httpx.Client) -> None:
    r = http.put(
        EXACT, params={"source": "web", "destination": "db"}, content=b'{"Action": "allow"'
    )
    assert r.status_code == 400
    assert r.text.startswith("Request decode failed: ")
    r = http.put(EXACT, params={"source": "web", "destination": "db"}, json={"Action": 3})
    assert r.status_code == 400
    assert r.text.startswith("Request decode failed: json: cannot unmarshal number")
    assert http.get("/v1/connect/intentions").json() == []


def test_namespace_query_parameter_is_an_enterprise_error(http: httpx.Client) -> None:
    r = http.get("/v1/connect/intentions", params={"ns": "default"})
    assert r.status_code == 400
    assert r.text == 'Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature'


# -- legacy ID API --------------------------------------------------------------------------


def create_legacy(http: httpx.Client, src: str, dst: str, action: str = "allow") -> str:
    r = http.post(
        "/v1/connect/intentions",
        json={"SourceName": src, "DestinationName": dst, "Action": action},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["ID"])


def test_legacy_create_read_update_delete(http: httpx.Client) -> None:
    ixn_id = create_legacy(http, "web", "db")
    got = http.get(f"/v1/connect/intentions/{ixn_id}")
    assert got.status_code == 200
    body = got.json()
    assert body["ID"] == ixn_id
    assert body["Action"] == "allow" and body["Precedence"] == 9
    assert body["CreatedAt"] == body["UpdatedAt"] and body["CreatedAt"].endswith("Z")

    entry = http.get("/v1/config/service-intentions/db").json()
    assert entry["Sources"][0]["LegacyID"] == ixn_id
    assert http.get(EXACT, params={"source": "web", "destination": "db"}).json()["ID"] == ixn_id

    r = http.put(
        f"/v1/connect/intentions/{ixn_id}",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    assert r.status_code == 200 and r.json() == {"ID": ixn_id}
    updated = http.get(f"/v1/connect/intentions/{ixn_id}").json()
    assert updated["Action"] == "deny"
    assert updated["CreatedAt"] == body["CreatedAt"]

    r = http.delete(f"/v1/connect/intentions/{ixn_id}")
    assert r.status_code == 200 and r.json() is True
    assert http.get(f"/v1/connect/intentions/{ixn_id}").status_code == 404
    assert http.get("/v1/config/service-intentions/db").status_code == 404


def test_legacy_duplicate_pair_is_refused(http: httpx.Client) -> None:
    create_legacy(http, "web", "db")
    r = http.post(
        "/v1/connect/intentions",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    assert r.status_code == 500
    assert r.text == 'Sources[1] defines "web" more than once'
    assert len(http.get("/v1/connect/intentions").json()) == 1


def test_legacy_write_after_config_entry_write_is_refused(http: httpx.Client) -> None:
    put_exact(http, "web", "db", {"Action": "allow"})
    r = http.post(
        "/v1/connect/intentions",
        json={"SourceName": "api", "DestinationName": "db", "Action": "allow"},
    )
    assert r.status_code == 500
    assert r.text == (
        'cannot use legacy intention API to edit intentions with a destination of "db" '
        "after editing them via a service-intentions config entry"
    )


def test_legacy_create_refuses_id_and_permissions(http: httpx.Client) -> None:
    r = http.post(
        "/v1/connect/intentions",
        json={
            "ID": "8c7e2cc7-3d77-4d6c-a4c4-ee2b4bb6aa19",
            "SourceName": "web",
            "DestinationName": "db",
            "Action": "allow",
        },
    )
    assert r.status_code == 500 and r.text == "ID must be empty when creating a new intention"
    r = http.post(
        "/v1/connect/intentions",
        json={
            "SourceName": "web",
            "DestinationName": "db",
            "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}],
        },
    )
    assert r.status_code == 500
    assert r.text == "Permissions must not be set when using the legacy APIs"


def test_legacy_missing_action_uses_multierror_text(http: httpx.Client) -> None:
    r = http.post("/v1/connect/intentions", json={"SourceName": "web", "DestinationName": "db"})
    assert r.status_code == 500
    assert r.text == "1 error occurred:\n\t* Action must be set to 'allow' or 'deny'\n\n"


def test_legacy_unknown_and_malformed_ids(http: httpx.Client) -> None:
    unknown = "8c7e2cc7-3d77-4d6c-a4c4-ee2b4bb6aa19"
    r = http.get(f"/v1/connect/intentions/{unknown}")
    assert r.status_code == 404 and r.text == "Intention not found"
    r = http.get("/v1/connect/intentions/not-a-uuid")
    assert r.status_code == 400 and "UUID" in r.text
    r = http.put(
        f"/v1/connect/intentions/{unknown}",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    assert r.status_code == 500
    assert r.text == f"Cannot modify non-existent intention: '{unknown}'"
    r = http.delete(f"/v1/connect/intentions/{unknown}")
    assert r.status_code == 500
    assert r.text == f"Cannot delete non-existent intention: '{unknown}'"


def test_legacy_update_cannot_move_destination(http: httpx.Client) -> None:
    ixn_id = create_legacy(http, "web", "db")
    r = http.put(
        f"/v1/connect/intentions/{ixn_id}",
        json={"SourceName": "web", "DestinationName": "cache", "Action": "allow"},
    )
    assert r.status_code == 500
    assert r.text == (
        "Cannot modify DestinationNS or DestinationName for an intention once it exists."
    )


def test_legacy_create_with_bad_json_is_500_decode_error(http: httpx.Client) -> None:
    r = http.post("/v1/connect/intentions", content=b"{nope")
    assert r.status_code == 500
    assert r.text.startswith("Failed to decode request body: ")


# -- match ordering and precedence -----------------------------------------------------------


@pytest.fixture
def precedence_set(http: httpx.Client) -> None:
    for src, dst, action in [
        ("*", "*", "deny"),
        ("web", "*", "allow"),
        ("*", "db", "deny"),
        ("web", "db", "allow"),
        ("api", "db", "allow"),
        ("web", "cache", "allow"),
    ]:
        assert put_exact(http, src, dst, {"Action": action}).status_code == 200


@pytest.mark.usefixtures("precedence_set")
def test_match_by_destination_orders_by_precedence_then_names(http: httpx.Client) -> None:
    r = http.get("/v1/connect/intentions/match", params={"by": "destination", "name": "db"})
    assert r.status_code == 200
    assert r.headers["X-Consul-Effective-Consistency"] == "leader"
    assert pairs(r.json()["db"]) == [
        ("api", "db", 9),
        ("web", "db", 9),
        ("*", "db", 8),
        ("web", "*", 6),
        ("*", "*", 5),
    ]


@pytest.mark.usefixtures("precedence_set")
def test_match_by_source_includes_wildcard_sources(http: httpx.Client) -> None:
    r = http.get(
        "/v1/connect/intentions/match",
        params=[("by", "source"), ("name", "web"), ("name", "other")],
    )
    body = r.json()
    assert list(body) == ["other", "web"]
    assert pairs(body["web"]) == [
        ("web", "cache", 9),
        ("web", "db", 9),
        ("*", "db", 8),
        ("web", "*", 6),
        ("*", "*", 5),
    ]
    assert pairs(body["other"]) == [("*", "db", 8), ("*", "*", 5)]


@pytest.mark.usefixtures("precedence_set")
def test_list_is_ordered_like_match(http: httpx.Client) -> None:
    assert [p[2] for p in pairs(http.get("/v1/connect/intentions").json())] == [9, 9, 9, 8, 6, 5]


@pytest.mark.usefixtures("precedence_set")
def test_check_applies_the_first_matching_intention(http: httpx.Client) -> None:
    cases = [
        ("web", "db", True),  # exact/exact (9) allow
        ("api", "db", True),
        ("other", "db", False),  # */db (8) deny
        ("web", "cache", True),
        ("web", "queue", True),  # web/* (6) allow beats */* (5)
        ("other", "queue", False),  # */* (5) deny
    ]
    for src, dst, allowed in cases:
        r = http.get("/v1/connect/intentions/check", params={"source": src, "destination": dst})
        assert r.status_code == 200
        assert r.json() == {"Allowed": allowed}, (src, dst)


def test_wildcard_source_on_exact_destination_beats_exact_source_on_wildcard(
    http: httpx.Client,
) -> None:
    put_exact(http, "web", "*", {"Action": "allow"})
    put_exact(http, "*", "db", {"Action": "deny"})
    r = http.get("/v1/connect/intentions/check", params={"source": "web", "destination": "db"})
    assert r.json() == {"Allowed": False}


def test_check_without_intentions_is_allowed_with_acls_off(http: httpx.Client) -> None:
    r = http.get("/v1/connect/intentions/check", params={"source": "a", "destination": "b"})
    assert r.json() == {"Allowed": True}


def test_check_errors(http: httpx.Client) -> None:
    r = http.get("/v1/connect/intentions/check", params={"destination": "db"})
    assert r.status_code == 500 and r.text == "required query parameter 'source' not set"
    r = http.get(
        "/v1/connect/intentions/check",
        params={"source": "web", "destination": "db", "source-type": "k8s"},
    )
    assert r.status_code == 500 and r.text == 'unsupported SourceType: "k8s"'


def test_check_treats_l7_intentions_as_deny(http: httpx.Client) -> None:
    http.put("/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
    r = put_exact(
        http, "web", "api", {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}
    )
    assert r.status_code == 200, r.text
    r = http.get("/v1/connect/intentions/check", params={"source": "web", "destination": "api"})
    assert r.json() == {"Allowed": False}


def test_match_parameter_errors(http: httpx.Client) -> None:
    cases: list[tuple[list[tuple[str, str | int | float | bool | None]], str]] = [
        ([("name", "db")], "required query parameter 'by' not set"),
        (
            [("by", "source"), ("by", "source"), ("name", "db")],
            "required query parameter 'by' not set",
        ),
        (
            [("by", "both"), ("name", "db")],
            "'by' parameter must be one of 'source' or 'destination'",
        ),
        ([("by", "source")], "required query parameter 'name' not set"),
        (
            [("by", "source"), ("name", "a/b/c/d")],
            "name \"a/b/c/d\" is invalid: input can contain at most two '/'",
        ),
    ]
    for params, text in cases:
        r = http.get("/v1/connect/intentions/match", params=params)
        assert r.status_code == 500
        assert r.text == text


def test_match_blocks_until_an_intention_changes(http: httpx.Client) -> None:
    first = http.get("/v1/connect/intentions/match", params={"by": "destination", "name": "db"})
    assert first.json() == {"db": []}
    idx = index_of(first)
    result: dict[str, httpx.Response] = {}

    def blocked() -> None:
        result["r"] = http.get(
            "/v1/connect/intentions/match",
            params={"by": "destination", "name": "db", "index": str(idx), "wait": "20s"},
        )

    t = threading.Thread(target=blocked)
    t.start()
    put_exact(http, "web", "db", {"Action": "allow"})
    t.join(timeout=20)
    assert not t.is_alive()
    r = result["r"]
    assert index_of(r) > idx
    assert pairs(r.json()["db"]) == [("web", "db", 9)]


def test_blocking_list_returns_on_timeout_with_same_index(http: httpx.Client) -> None:
    first = http.get("/v1/connect/intentions")
    r = http.get("/v1/connect/intentions", params={"index": index_of(first), "wait": "100ms"})
    assert r.status_code == 200
    assert index_of(r) == index_of(first)


def test_list_filter_expression(http: httpx.Client) -> None:
    put_exact(http, "web", "db", {"Action": "allow"})
    put_exact(http, "api", "db", {"Action": "deny"})
    r = http.get("/v1/connect/intentions", params={"filter": 'Action == "deny"'})
    assert r.status_code == 200
    assert [i["SourceName"] for i in r.json()] == ["api"]
    r = http.get("/v1/connect/intentions", params={"filter": "Nope == 1"})
    assert r.status_code == 500
    assert r.text.startswith("Failed to create boolean expression evaluator")
