"""Consul's intention model: precedence, ordering, matching, validation, L4/L7 decisions."""

from __future__ import annotations

import random
from typing import Any

import pytest

from consul_connect.authz.intentions import (
    DEFAULT_REASON,
    Decision,
    HeaderMatch,
    HTTPMatch,
    Intention,
    IntentionDecodeError,
    IntentionSet,
    IntentionValidationError,
    Permission,
    ServiceIntentionsEntry,
    compute_precedence,
    config_entry_from_intentions,
    intentions_from_config_entry,
    normalize_config_entry,
    sort_intentions,
    source_matches,
    validate_config_entry,
    validate_legacy_intention,
    validate_wildcards,
)


def l4(src: str, dst: str, action: str = "allow", **kw: Any) -> Intention:
    return Intention(source_name=src, destination_name=dst, action=action, **kw)


def l7(src: str, dst: str, *perms: Permission, **kw: Any) -> Intention:
    return Intention(source_name=src, destination_name=dst, permissions=perms, **kw)


def allow(**http: Any) -> Permission:
    return Permission("allow", HTTPMatch(**http))


def deny(**http: Any) -> Permission:
    return Permission("deny", HTTPMatch(**http))


def entry(*sources: dict[str, Any], name: str = "db", **extra: Any) -> dict[str, Any]:
    return {"Kind": "service-intentions", "Name": name, "Sources": list(sources), **extra}


def validation_message(obj: dict[str, Any], *, legacy: bool = False) -> str:
    with pytest.raises(IntentionValidationError) as info:
        validate_config_entry(obj, legacy=legacy)
    return str(info.value)


# ------------------------------------------------------------------------------ precedence


@pytest.mark.parametrize(
    ("src_ns", "src", "dst_ns", "dst", "expected"),
    [
        ("default", "web", "default", "db", 9),
        ("default", "*", "default", "db", 8),
        ("*", "*", "default", "db", 7),
        ("default", "web", "default", "*", 6),
        ("default", "*", "default", "*", 5),
        ("*", "*", "default", "*", 4),
        ("default", "web", "*", "*", 3),
        ("default", "*", "*", "*", 2),
        ("*", "*", "*", "*", 1),
    ],
)
def test_precedence_follows_the_nine_row_table(
    src_ns: str, src: str, dst_ns: str, dst: str, expected: int
) -> None:
    assert compute_precedence(src_ns, src, dst_ns, dst) == expected
    ixn = Intention(source_ns=src_ns, source_name=src, destination_ns=dst_ns, destination_name=dst)
    assert ixn.precedence == expected


def test_ce_namespaces_only_yield_precedence_9_8_6_5() -> None:
    seen = {
        compute_precedence(ns1, s, ns2, d)
        for ns1 in ("default", "")
        for ns2 in ("default", "")
        for s in ("web", "*")
        for d in ("db", "*")
    }
    assert seen == {9, 8, 6, 5}


def test_precedence_in_json_input_is_ignored_and_recomputed() -> None:
    ixn = Intention.from_json(
        {"SourceName": "*", "DestinationName": "db", "Action": "deny", "Precedence": 1}
    )
    assert ixn.precedence == 8
    assert ixn.to_json()["Precedence"] == 8


# ------------------------------------------------------------------------------ ordering


def test_sort_puts_higher_precedence_first() -> None:
    items = [l4("*", "*"), l4("web", "*"), l4("*", "db"), l4("web", "db")]
    assert [i.precedence for i in sort_intentions(items)] == [9, 8, 6, 5]


def test_ties_break_on_source_then_destination_bytewise() -> None:
    items = [
        l4("web", "db"),
        l4("api", "zeta"),
        l4("api", "db"),
        l4("Web", "db"),  # upper case sorts before lower case byte-wise
    ]
    ordered = [(i.source_name, i.destination_name) for i in sort_intentions(items)]
    assert ordered == [("Web", "db"), ("api", "db"), ("api", "zeta"), ("web", "db")]


def test_ties_break_on_peer_before_names() -> None:
    local = l4("zzz", "db")
    peered = l4("aaa", "db", source_peer="p1")
    assert sort_intentions([peered, local]) == [local, peered]


def test_exact_source_on_wildcard_destination_loses_to_wildcard_source_on_exact_destination() -> (
    None
):
    ixns = [l4("web", "*", "allow"), l4("*", "db", "deny")]
    assert sort_intentions(ixns)[0].source_name == "*"
    decision = IntentionSet(ixns, default_allow=True).decide_l4("default", "web")
    assert decision.allowed is False
    assert decision.reason == (
        "Matched L4 intention: default/* => default/db (Precedence: 8, Action: DENY)"
    )


# ------------------------------------------------------------------------------ source matching


def test_source_matching_is_exact_case_sensitive_or_wildcard() -> None:
    assert source_matches(l4("web", "db"), "default", "web")
    assert not source_matches(l4("web", "db"), "default", "Web")
    assert source_matches(l4("*", "db"), "default", "anything")
    assert not source_matches(l4("web", "db", source_ns="other"), "default", "web")
    assert source_matches(l4("*", "db", source_ns="*"), "other", "x")


def test_source_matching_requires_same_peer_and_partition() -> None:
    local = l4("web", "db")
    peered = l4("web", "db", source_peer="east")
    assert not source_matches(peered, "default", "web")
    assert source_matches(peered, "default", "web", peer="east")
    assert not source_matches(local, "default", "web", peer="east")
    assert source_matches(local, "default", "web", partition="")
    assert not source_matches(local, "default", "web", partition="team-a")
    assert source_matches(l4("web", "db", source_partition="team-a"), "default", "web", "team-a")


# ------------------------------------------------------------------------------ describe()


def test_describe_matches_consul_intention_string() -> None:
    assert l4("web", "db").describe() == "default/web => default/db (Precedence: 9, Action: ALLOW)"
    assert l4("*", "db", "deny").describe() == (
        "default/* => default/db (Precedence: 8, Action: DENY)"
    )
    admin = l7("admin", "db", deny(path_prefix="/admin"), allow(path_exact="/"))
    assert admin.describe() == "default/admin => default/db (Precedence: 9, Permissions: 2)"
    legacy = l4("web", "db", id="3b2f")
    assert legacy.describe() == (
        "default/web => default/db (ID: 3b2f, Precedence: 9, Action: ALLOW)"
    )
    assert str(legacy) == legacy.describe()


def test_describe_prefixes_peer_and_partitions() -> None:
    assert l4("web", "db", source_peer="east").describe() == (
        "peer(east)/default/web => default/db (Precedence: 9, Action: ALLOW)"
    )
    ent = l4("web", "db", source_partition="ap1", destination_partition="ap2")
    assert ent.describe() == "ap1/default/web => ap2/default/db (Precedence: 9, Action: ALLOW)"


# ------------------------------------------------------------------------------ JSON


def test_to_json_emits_consul_ce_keys_and_omits_empty_ones() -> None:
    ixn = l4("web", "db", create_index=30, modify_index=31)
    assert ixn.to_json() == {
        "SourceNS": "default",
        "SourceName": "web",
        "DestinationNS": "default",
        "DestinationName": "db",
        "SourceType": "consul",
        "Action": "allow",
        "Precedence": 9,
        "CreateIndex": 30,
        "ModifyIndex": 31,
    }


def test_to_json_of_legacy_and_l7_intentions() -> None:
    legacy = l4(
        "web",
        "db",
        id="8c3e",
        description="d",
        meta={"b": "2", "a": "1"},
        created_at="2025-03-01T10:00:00.123456789Z",
        updated_at="2025-03-01T10:00:01Z",
    )
    out = legacy.to_json()
    assert list(out) == [
        "ID",
        "Description",
        "SourceNS",
        "SourceName",
        "DestinationNS",
        "DestinationName",
        "SourceType",
        "Action",
        "Meta",
        "Precedence",
        "CreatedAt",
        "UpdatedAt",
        "CreateIndex",
        "ModifyIndex",
    ]
    assert list(out["Meta"]) == ["a", "b"]

    perm = Permission(
        "allow",
        HTTPMatch(
            path_regex="^/v[12]/.*",
            methods=("GET", "HEAD"),
            headers=(
                HeaderMatch("X-Env", exact="prod"),
                HeaderMatch("X-Dbg", present=True, invert=True),
            ),
        ),
    )
    out = l7("admin", "db", perm).to_json()
    assert "Action" not in out
    assert out["Permissions"] == [
        {
            "Action": "allow",
            "HTTP": {
                "PathRegex": "^/v[12]/.*",
                "Header": [
                    {"Name": "X-Env", "Exact": "prod"},
                    {"Name": "X-Dbg", "Present": True, "Invert": True},
                ],
                "Methods": ["GET", "HEAD"],
            },
        }
    ]


def test_from_json_is_case_insensitive_and_round_trips() -> None:
    raw = {
        "id": "abc",
        "sourcename": "web",
        "DESTINATIONNAME": "db",
        "Action": "deny",
        "meta": {"k": "v"},
        "createIndex": 3,
        "ModifyIndex": 4,
        "CreatedAt": "0001-01-01T00:00:00Z",
        "Permissions": None,
    }
    ixn = Intention.from_json(raw)
    assert (ixn.id, ixn.source_ns, ixn.source_name, ixn.destination_name) == (
        "abc",
        "default",
        "web",
        "db",
    )
    assert ixn.created_at == ""  # Go's zero time counts as unset
    assert Intention.from_json(ixn.to_json()) == ixn


def test_snake_case_aliases_are_accepted_only_in_config_entries() -> None:
    ixns = intentions_from_config_entry(
        entry({"name": "web", "permissions": [{"action": "allow", "http": {"path_prefix": "/a"}}]})
    )
    http = ixns[0].permissions[0].http
    assert http is not None and http.path_prefix == "/a"

    legacy_json = Intention.from_json(
        {
            "SourceName": "web",
            "DestinationName": "db",
            "Permissions": [{"Action": "allow", "HTTP": {"path_prefix": "/a"}}],
        }
    )
    legacy_http = legacy_json.permissions[0].http
    assert legacy_http is not None and legacy_http.path_prefix is None


def test_wrongly_typed_json_values_raise_decode_error() -> None:
    with pytest.raises(IntentionDecodeError, match="Action of type string"):
        Intention.from_json({"SourceName": "web", "Action": 5})
    with pytest.raises(IntentionDecodeError):
        Intention.from_json({"CreateIndex": True})
    with pytest.raises(IntentionDecodeError):
        intentions_from_config_entry(entry({"Name": "web", "Permissions": "nope"}))


# ------------------------------------------------------------------------------ legacy validation


def test_legacy_validation_reports_partial_wildcards_in_multierror_form() -> None:
    with pytest.raises(IntentionValidationError) as info:
        validate_legacy_intention(l4("web*", "db"))
    assert str(info.value) == (
        "1 error occurred:\n\t* SourceName: wildcard character '*' cannot be used with "
        "partial values\n\n"
    )


def test_legacy_validation_collects_every_problem() -> None:
    bad = Intention(
        source_ns="*", source_name="web", destination_name="d*b", action="maybe", source_type="x"
    )
    with pytest.raises(IntentionValidationError) as info:
        validate_legacy_intention(bad)
    assert info.value.errors == (
        "SourceName: exact value cannot follow wildcard namespace",
        "DestinationName: wildcard character '*' cannot be used with partial values",
        "Action must be set to 'allow' or 'deny'",
        "SourceType must be set to 'consul'",
    )
    assert str(info.value).startswith("4 errors occurred:\n\t* SourceName: exact value")


def test_legacy_validation_rejects_id_on_create_and_permissions() -> None:
    with pytest.raises(IntentionValidationError, match=r"^ID must be empty when creating"):
        validate_legacy_intention(l4("web", "db", id="x"), creating=True)
    with pytest.raises(
        IntentionValidationError, match=r"^Permissions must not be set when using the legacy APIs$"
    ):
        validate_legacy_intention(l7("web", "db", allow(path_exact="/")))
    validate_legacy_intention(l4("web", "db", id="x"))  # updates carry their ID


def test_legacy_validation_requires_names_and_bounds_meta() -> None:
    with pytest.raises(IntentionValidationError) as info:
        validate_legacy_intention(l4("", "db", meta={"k" * 129: "v"}))
    assert info.value.errors == (
        "SourceName must be set",
        f'Meta key "{"k" * 129}" exceeds maximum length 128',
    )


def test_wildcard_rules_for_config_entry_sides() -> None:
    validate_wildcards("*")
    validate_wildcards("*", "*")
    cases = {
        (
            "web*",
            "default",
            "",
            "",
        ): "Name: wildcard character '*' cannot be used with partial values",
        ("web", "*", "", ""): "Name: exact value cannot follow wildcard namespace",
        ("web", "ns*", "", ""): (
            "Namespace: wildcard character '*' cannot be used with partial values"
        ),
        ("web", "default", "*", ""): "Partition: cannot use wildcard '*' in partition",
        ("web", "default", "", "*"): "Peer: cannot use wildcard '*' in peer",
    }
    for args, message in cases.items():
        with pytest.raises(IntentionValidationError) as info:
            validate_wildcards(*args)
        assert str(info.value) == message


# ------------------------------------------------------------------------------ entry validation


def test_valid_entry_from_the_docs_passes() -> None:
    validate_config_entry(
        entry(
            {"Name": "web", "Action": "allow"},
            {
                "Name": "admin",
                "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                    {
                        "Action": "allow",
                        "HTTP": {
                            "PathRegex": "^/v[12]/.*",
                            "Methods": ["get", "HEAD"],
                            "Header": [
                                {"Name": "X-Env", "Exact": "prod"},
                                {"Name": "X-Debug", "Present": True, "Invert": True},
                            ],
                        },
                    },
                ],
            },
            {"Name": "*", "Action": "deny"},
            Meta={"owner": "team-a"},
        )
    )


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"Kind": "service-intentions"}, "Name is required"),
        (entry(name="db*"), "Name: wildcard character '*' cannot be used with partial values"),
        (entry(), "At least one source is required"),
        (entry({"Action": "allow"}), "Sources[0].Name is required"),
        (
            entry({"Name": "we*b", "Action": "allow"}),
            "Sources[0].Name: wildcard character '*' cannot be used with partial values",
        ),
        (entry({"Name": "web"}), "Sources[0].Action must be set to 'allow' or 'deny'"),
        (
            entry({"Name": "web", "Action": "block"}),
            "Sources[0].Action must be set to 'allow' or 'deny'",
        ),
        (
            entry({"Name": "web", "Action": "allow", "Type": "external"}),
            "Sources[0].Type must be set to 'consul'",
        ),
        (
            entry({"Name": "web", "Action": "allow", "Description": "x" * 513}),
            "Sources[0].Description exceeds maximum length 512",
        ),
        (
            entry({"Name": "web", "Action": "allow", "LegacyMeta": {"a": "b"}}),
            "Sources[0].LegacyMeta must be omitted",
        ),
        (
            entry({"Name": "web", "Action": "allow", "Peer": "p*"}),
            "Sources[0].Peer: cannot use wildcard '*' in peer",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Action": "allow",
                    "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}],
                }
            ),
            "Sources[0].Action must be omitted if Permissions are specified",
        ),
        (
            entry(
                {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}]},
                name="*",
            ),
            "Sources[0].Permissions cannot be specified on intentions with wildcarded destinations",
        ),
        (
            entry({"Name": "web", "Permissions": [{"HTTP": {"PathExact": "/"}}]}),
            "Sources[0].Permissions[0].Action must be set to 'allow' or 'deny'",
        ),
        (
            entry({"Name": "web", "Permissions": [{"Action": "allow"}]}),
            "Sources[0].Permissions[0].HTTP is required",
        ),
        (
            entry({"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {}}]}),
            "Sources[0].Permissions[0].HTTP should not be empty",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"PathExact": "/", "PathRegex": "/b"}}
                    ],
                }
            ),
            "Sources[0].Permissions[0].HTTP should only contain at most one of PathExact, "
            "PathPrefix, or PathRegex",
        ),
        (
            entry(
                {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "x"}}]}
            ),
            "Sources[0].Permissions[0].HTTP.PathExact doesn't start with '/': \"x\"",
        ),
        (
            entry(
                {"Name": "web", "Permissions": [{"Action": "deny", "HTTP": {"PathPrefix": "a"}}]}
            ),
            "Sources[0].Permissions[0].HTTP.PathPrefix doesn't start with '/': \"a\"",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Exact": "x"}]}}],
                }
            ),
            "Sources[0].Permissions[0].HTTP.Header[0] missing required Name field",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [
                        {
                            "Action": "allow",
                            "HTTP": {"Header": [{"Name": "x", "Present": True, "Exact": "y"}]},
                        }
                    ],
                }
            ),
            "Sources[0].Permissions[0].HTTP.Header[0] should only contain one of Present, Exact, "
            "Prefix, Suffix, or Regex",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Name": "x"}]}}],
                }
            ),
            "Sources[0].Permissions[0].HTTP.Header[0] should only contain one of Present, Exact, "
            "Prefix, Suffix, or Regex",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["GET", "FETCH"]}}],
                }
            ),
            'Sources[0].Permissions[0].HTTP.Methods contains an invalid method "FETCH"',
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["get", "GET"]}}],
                }
            ),
            'Sources[0].Permissions[0].HTTP.Methods contains "GET" more than once',
        ),
        (
            entry({"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}),
            'Sources[1] defines "web" more than once',
        ),
        (
            entry(
                {"Name": "web", "Action": "allow", "Peer": "east"},
                {"Name": "web", "Action": "deny", "Peer": "east"},
            ),
            'Sources[1] defines peer("east") "web" more than once',
        ),
    ],
)
def test_entry_validation_uses_consul_texts(obj: dict[str, Any], message: str) -> None:
    assert validation_message(obj) == message


def test_same_name_from_local_and_peer_is_not_a_duplicate() -> None:
    validate_config_entry(
        entry({"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny", "Peer": "e"})
    )


def test_duplicate_index_refers_to_sorted_sources() -> None:
    # "*" (precedence 8) moves behind both "web" sources (9), so the duplicate is Sources[1].
    obj = entry(
        {"Name": "*", "Action": "deny"},
        {"Name": "web", "Action": "allow"},
        {"Name": "web", "Action": "deny"},
    )
    assert validation_message(obj) == 'Sources[1] defines "web" more than once'


def test_entry_meta_limits_use_multierror_text() -> None:
    msg = validation_message(
        entry({"Name": "web", "Action": "allow"}, Meta={str(i): "v" for i in range(65)})
    )
    assert msg == "1 error occurred:\n\t* Meta exceeds maximum element count 64\n\n"


def test_legacy_entry_writes_need_legacy_fields_and_no_entry_meta() -> None:
    src = {
        "Name": "web",
        "Action": "allow",
        "LegacyID": "id-1",
        "LegacyCreateTime": "2025-01-01T00:00:00Z",
        "LegacyUpdateTime": "2025-01-01T00:00:00Z",
    }
    validate_config_entry(entry(src), legacy=True)
    assert (
        validation_message(entry(src, Meta={"a": "b"}), legacy=True)
        == "Meta must be omitted for legacy intention writes"
    )
    no_id = {k: v for k, v in src.items() if k != "LegacyID"}
    assert validation_message(entry(no_id), legacy=True) == "Sources[0].LegacyID must be set"
    no_time = {k: v for k, v in src.items() if k != "LegacyCreateTime"}
    assert (
        validation_message(entry(no_time), legacy=True) == "Sources[0].LegacyCreateTime must be set"
    )
    # A normal write silently drops the legacy ID and timestamps, as Consul's normalize does.
    validate_config_entry(entry(src))


# ------------------------------------------------------------------------ entries <-> intentions


def test_entry_normalization_sorts_stably_and_upper_cases_methods() -> None:
    out = normalize_config_entry(
        entry(
            {"Name": "*", "Action": "deny", "Precedence": 99},
            {"Name": "b", "Action": "allow"},
            {"Name": "a", "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["get"]}}]},
            kind="ignored",
        )
    )
    assert [s["Name"] for s in out["Sources"]] == ["b", "a", "*"]
    assert [s["Precedence"] for s in out["Sources"]] == [9, 9, 8]
    assert out["Sources"][1]["Permissions"][0]["HTTP"]["Methods"] == ["GET"]
    assert all(s["Type"] == "consul" for s in out["Sources"])
    assert out["Kind"] == "service-intentions"


def test_entry_becomes_one_intention_per_source_with_entry_meta_and_indexes() -> None:
    ixns = intentions_from_config_entry(
        entry(
            {"Name": "web", "Action": "allow", "Type": "consul", "Precedence": 9},
            {"Name": "*", "Action": "deny"},
            {"Name": "old", "Action": "allow", "LegacyID": "L1", "LegacyMeta": {"x": "y"}},
            Meta={"owner": "team-a"},
            CreateIndex=30,
            ModifyIndex=31,
        )
    )
    assert [i.describe() for i in ixns] == [
        "default/web => default/db (Precedence: 9, Action: ALLOW)",
        "default/* => default/db (Precedence: 8, Action: DENY)",
        "default/old => default/db (ID: L1, Precedence: 9, Action: ALLOW)",
    ]
    assert dict(ixns[0].meta) == {"owner": "team-a"}
    assert dict(ixns[2].meta) == {"x": "y"}
    assert (ixns[1].create_index, ixns[1].modify_index) == (30, 31)


def test_intentions_round_trip_through_a_config_entry() -> None:
    ixns = [
        l4("*", "db", "deny"),
        l7("admin", "db", deny(path_prefix="/admin"), allow(methods=("GET",))),
        l4("web", "db", description="front"),
    ]
    obj = config_entry_from_intentions(ixns, meta={"o": "t"}, create_index=5, modify_index=6)
    assert [s["Name"] for s in obj["Sources"]] == ["admin", "web", "*"]
    validate_config_entry(obj)
    back = intentions_from_config_entry(obj)
    assert {i.describe() for i in back} == {i.describe() for i in ixns}
    assert all(dict(i.meta) == {"o": "t"} and i.modify_index == 6 for i in back)
    assert ServiceIntentionsEntry.from_json(obj).to_json() == obj


def test_intentions_for_different_destinations_do_not_form_one_entry() -> None:
    with pytest.raises(IntentionValidationError):
        config_entry_from_intentions([l4("web", "db"), l4("web", "cache")])


# ------------------------------------------------------------------------------ L4 decisions


def test_l4_allow_and_deny_reasons_match_authorize() -> None:
    ixns = IntentionSet([l4("web", "db", "allow"), l4("*", "db", "deny")], default_allow=True)
    allowed = ixns.decide_l4("default", "web")
    assert allowed == Decision(
        True,
        "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)",
        ixns.intentions[0],
    )
    denied = ixns.decide_l4("default", "other")
    assert not denied.allowed
    assert denied.intention is not None and denied.intention.source_name == "*"


@pytest.mark.parametrize("default_allow", [True, False])
def test_no_match_falls_back_to_the_configured_default(default_allow: bool) -> None:
    ixns = IntentionSet([l4("web", "db")], default_allow=default_allow)
    decision = ixns.decide_l4("default", "api")
    assert decision == Decision(default_allow, DEFAULT_REASON, None)
    assert ixns.decide_l7("default", "api", "GET", "/") == decision
    assert ixns.first_match("default", "api") is None


def test_l7_intention_denies_at_l4_whatever_its_permissions_say() -> None:
    ixns = IntentionSet([l7("web", "db", allow(path_prefix="/"))], default_allow=True)
    decision = ixns.decide_l4("default", "web")
    assert not decision.allowed
    assert decision.reason == (
        "Matched L7 intention: default/web => default/db (Precedence: 9, Permissions: 1)"
    )


def test_peer_identities_only_match_peer_intentions() -> None:
    ixns = IntentionSet(
        [l4("web", "db", "deny", source_peer="east"), l4("*", "db", "allow")], default_allow=False
    )
    assert ixns.decide_l4("default", "web").allowed
    peered = ixns.decide_l4("default", "web", peer="east")
    assert not peered.allowed
    assert peered.reason.startswith("Matched L4 intention: peer(east)/default/web")


# ------------------------------------------------------------------------------ L7 decisions


def decide(perm: Permission, method: str = "GET", path: str = "/", headers: Any = ()) -> bool:
    """Whether a single-permission L7 intention's permission matched the request."""
    ixns = IntentionSet([l7("web", "db", perm)], default_allow=False)
    decision = ixns.decide_l7("default", "web", method, path, headers)
    return decision.permission_index == 0


def test_path_exact_ignores_query_string_and_fragment() -> None:
    perm = allow(path_exact="/health")
    assert decide(perm, path="/health")
    assert decide(perm, path="/health?verbose=1")
    assert decide(perm, path="/health#top")
    assert not decide(perm, path="/health/")
    assert not decide(perm, path="/Health")


def test_path_prefix_and_regex_full_match() -> None:
    assert decide(allow(path_prefix="/api"), path="/api/v1?x")
    assert not decide(allow(path_prefix="/api"), path="/ap")
    rx = allow(path_regex="/v[12]/[a-z]+")
    assert decide(rx, path="/v1/users")
    assert decide(rx, path="/v2/users?page=2")
    assert not decide(rx, path="/v1/users/7")  # a search would match, a full match does not
    assert not decide(rx, path="/x/v1/users")


def test_methods_must_contain_the_request_method() -> None:
    perm = allow(methods=("GET", "HEAD"))
    assert decide(perm, method="HEAD")
    assert not decide(perm, method="POST")


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        (HeaderMatch("X-Env", present=True), "anything", True),
        (HeaderMatch("X-Env", present=True), None, False),
        (HeaderMatch("X-Env", present=True, invert=True), None, True),
        (HeaderMatch("X-Env", present=True, invert=True), "x", False),
        (HeaderMatch("X-Env", exact="prod"), "prod", True),
        (HeaderMatch("X-Env", exact="prod"), "production", False),
        (HeaderMatch("X-Env", exact="prod", invert=True), "dev", True),
        (HeaderMatch("X-Env", exact="prod", invert=True), "prod", False),
        # Envoy: a missing header fails value matchers even when inverted.
        (HeaderMatch("X-Env", exact="prod", invert=True), None, False),
        (HeaderMatch("X-Env", prefix="pr"), "prod", True),
        (HeaderMatch("X-Env", prefix="pr"), "dev", False),
        (HeaderMatch("X-Env", suffix="od"), "prod", True),
        (HeaderMatch("X-Env", suffix="od"), "dev", False),
        (HeaderMatch("X-Env", regex="p.*d"), "prod", True),
        (HeaderMatch("X-Env", regex="p.*d"), "prod-eu", False),
        (HeaderMatch("X-Env", regex="p.*d", invert=True), "prod-eu", True),
    ],
)
def test_header_criteria(header: HeaderMatch, value: str | None, expected: bool) -> None:
    headers = {} if value is None else {"x-env": value}
    assert decide(allow(headers=(header,)), headers=headers) is expected


def test_header_names_are_case_insensitive_and_repeats_are_comma_joined() -> None:
    perm = allow(headers=(HeaderMatch("x-tag", exact="a,b"),))
    assert decide(perm, headers=[("X-Tag", "a"), ("x-TAG", "b")])
    assert not decide(perm, headers=[("X-Tag", "a")])


def test_all_criteria_of_a_permission_must_hold() -> None:
    perm = allow(path_prefix="/api", methods=("POST",), headers=(HeaderMatch("A", exact="1"),))
    assert decide(perm, "POST", "/api/x", {"a": "1"})
    assert not decide(perm, "GET", "/api/x", {"a": "1"})
    assert not decide(perm, "POST", "/other", {"a": "1"})
    assert not decide(perm, "POST", "/api/x", {"a": "2"})


def test_first_matching_permission_decides_and_is_named_in_the_reason() -> None:
    admin = l7("web", "db", deny(path_prefix="/admin"), allow(path_prefix="/"))
    ixns = IntentionSet([admin, l4("*", "db", "allow")], default_allow=True)
    denied = ixns.decide_l7("default", "web", "GET", "/admin/users")
    assert denied == Decision(
        False,
        "Matched L7 intention: default/web => default/db (Precedence: 9, Permissions: 2), "
        "Permissions[0] (DENY)",
        ixns.intentions[0],
        0,
    )
    allowed = ixns.decide_l7("default", "web", "GET", "/home")
    assert allowed.allowed and allowed.permission_index == 1
    assert allowed.reason.endswith("Permissions[1] (ALLOW)")


@pytest.mark.parametrize("default_allow", [True, False])
def test_request_matching_no_permission_gets_the_default_not_lower_intentions(
    default_allow: bool,
) -> None:
    ixns = IntentionSet(
        [l7("web", "db", allow(path_exact="/ok")), l4("*", "db", "allow")],
        default_allow=default_allow,
    )
    decision = ixns.decide_l7("default", "web", "GET", "/other")
    assert decision.allowed is default_allow
    assert decision.intention is ixns.intentions[0]
    assert decision.permission_index is None
    assert decision.reason.endswith(DEFAULT_REASON)


def test_l4_intention_decides_http_requests_by_its_action() -> None:
    ixns = IntentionSet([l4("web", "db", "deny")], default_allow=True)
    decision = ixns.decide_l7("default", "web", "GET", "/")
    assert not decision.allowed
    assert decision.reason.startswith("Matched L4 intention:")


def test_uncompilable_regex_fails_closed() -> None:
    bad_allow = allow(path_regex="([")
    bad_deny = deny(headers=(HeaderMatch("x", regex="(["),))
    ixns = IntentionSet([l7("web", "db", bad_deny, allow(path_prefix="/"))], default_allow=True)
    assert not ixns.decide_l7("default", "web", "GET", "/").allowed
    assert not decide(bad_allow, path="/")


# ------------------------------------------------------------------------------ O(1) == linear walk


def brute_force(
    intentions: list[Intention], ns: str, name: str, partition: str, peer: str
) -> Intention | None:
    for ixn in sort_intentions(intentions):
        if source_matches(ixn, ns, name, partition, peer):
            return ixn
    return None


def test_indexed_lookup_agrees_with_a_linear_walk_on_random_tables() -> None:
    rng = random.Random(20250301)
    names = ["web", "api", "db", "*"]
    namespaces = ["default", "other", "*"]
    peers = ["", "", "", "east"]
    partitions = ["", "", "default", "ap1"]
    for _ in range(300):
        dest = rng.choice(["db", "cache"])
        seen: set[tuple[str, str, str, str, str]] = set()
        table: list[Intention] = []
        for _ in range(rng.randint(0, 12)):
            src_ns = rng.choice(namespaces)
            src = "*" if src_ns == "*" else rng.choice(names)
            dst_ns, dst = rng.choice([("default", dest), ("default", "*"), ("*", "*")])
            peer = rng.choice(peers)
            partition = "" if peer else rng.choice(partitions)
            key = (peer, partition, src_ns, src, dst)
            if key in seen:
                continue
            seen.add(key)
            table.append(
                Intention(
                    source_ns=src_ns,
                    source_name=src,
                    destination_ns=dst_ns,
                    destination_name=dst,
                    source_peer=peer,
                    source_partition=partition,
                    action=rng.choice(["allow", "deny"]),
                    permissions=(allow(path_prefix="/"),) if rng.random() < 0.2 else (),
                )
            )
        rng.shuffle(table)
        default_allow = rng.random() < 0.5
        ixns = IntentionSet(table, default_allow=default_allow)
        for ns in ("default", "other"):
            for name in ("web", "api", "db", "zzz"):
                for peer in ("", "east"):
                    for partition in ("default", "ap1"):
                        expected = brute_force(table, ns, name, partition, peer)
                        got = ixns.first_match(ns, name, partition=partition, peer=peer)
                        assert got == expected
                        decision = ixns.decide_l4(ns, name, partition, peer=peer)
                        if expected is None:
                            assert decision == Decision(default_allow, DEFAULT_REASON)
                        else:
                            assert decision.allowed == (
                                expected.action == "allow" and not expected.permissions
                            )
                            assert decision.intention == expected
