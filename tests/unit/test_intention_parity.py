"""Decisions checked against Consul's own source, one rule per test.

Each test names the Consul (or Envoy, which enforces L7 intentions for Consul) function it
follows. Where this library is deliberately stricter than Consul the test says so.
"""

from __future__ import annotations

from typing import Any

import pytest

from consul_connect.authz.intentions import (
    DEFAULT_REASON,
    HeaderMatch,
    HTTPMatch,
    Intention,
    IntentionSet,
    Permission,
)


def l4(src: str, dst: str, action: str = "allow", **kw: Any) -> Intention:
    return Intention(source_name=src, destination_name=dst, action=action, **kw)


def l7(src: str, dst: str, *perms: Permission, **kw: Any) -> Intention:
    return Intention(source_name=src, destination_name=dst, permissions=perms, **kw)


def perm(action: str, **http: Any) -> Permission:
    headers = tuple(HeaderMatch(**h) for h in http.pop("headers", ()))
    methods = tuple(http.pop("methods", ()))
    return Permission(action, HTTPMatch(headers=headers, methods=methods, **http))


def web_to_api(*perms: Permission, default_allow: bool = False) -> IntentionSet:
    return IntentionSet([l7("web", "api", *perms)], default_allow=default_allow)


def allowed(ixns: IntentionSet, method: str, path: str, headers: Any = ()) -> bool:
    return ixns.decide_l7("default", "web", method, path, headers).allowed


# --------------------------------------------------------------------------------------------
# Precedence and which intention applies (L4)


# The nine-row precedence table itself: tests/unit/test_intentions.py.


def test_wildcard_source_to_exact_destination_beats_exact_source_to_wildcard() -> None:
    # agent/connect_auth.go / agent/agent_endpoint.go AgentConnectAuthorize: the first
    # intention of the precedence-sorted match list whose source matches decides
    # (connect.AuthorizeIntentionTarget with IntentionMatchSource). "* => db" (8) precedes
    # "web => *" (6). (Envoy's RBAC in agent/xds/rbac.go removeSourcePrecedence only carves
    # less-wildcarded sources out of more-wildcarded ones, so there the exact source wins;
    # authorize is the contract for Connect-native services.)
    ixns = IntentionSet([l4("web", "*", "allow"), l4("*", "db", "deny")], default_allow=True)
    decision = ixns.decide_l4("default", "web")
    assert not decision.allowed
    assert decision.reason == (
        "Matched L4 intention: default/* => default/db (Precedence: 8, Action: DENY)"
    )
    ixns = IntentionSet([l4("web", "*", "deny"), l4("*", "db", "allow")], default_allow=False)
    assert ixns.decide_l4("default", "web").allowed


def test_wildcard_namespace_source_matches_any_namespace_below_exact_namespace() -> None:
    # connect.IntentionMatch: SourceNS "*" matches any namespace; precedence 7 < 8.
    ixns = IntentionSet(
        [
            l4("*", "db", "allow", source_ns="*"),
            l4("*", "db", "deny", source_ns="team"),
        ],
        default_allow=False,
    )
    assert not ixns.decide_l4("team", "web").allowed
    assert ixns.decide_l4("other", "web").allowed


def test_source_names_compare_case_sensitively() -> None:
    # connect.IntentionMatch: ixn.SourceName != target is a plain Go string comparison.
    ixns = IntentionSet([l4("Web", "db", "allow")], default_allow=False)
    assert not ixns.decide_l4("default", "web").allowed


def test_peered_intention_never_matches_a_local_caller() -> None:
    # AgentConnectAuthorize passes targetPeer "" and IntentionMatch requires equal peers.
    ixns = IntentionSet([l4("*", "db", "allow", source_peer="other")], default_allow=False)
    assert ixns.decide_l4("default", "web").reason == DEFAULT_REASON


@pytest.mark.parametrize("default_allow", [True, False])
def test_no_match_gives_the_default_with_consuls_reason(default_allow: bool) -> None:
    # AgentConnectAuthorize: "Default behavior configured by ACLs", authz.IntentionDefaultAllow.
    decision = IntentionSet([l4("api", "db")], default_allow=default_allow).decide_l4(
        "default", "web"
    )
    assert decision.allowed is default_allow
    assert decision.reason == DEFAULT_REASON


@pytest.mark.parametrize("default_allow", [True, False])
def test_l7_intention_asked_an_l4_question_denies(default_allow: bool) -> None:
    # AgentConnectAuthorize: "This is an L7 intention, so DENY", whatever its permissions.
    ixns = web_to_api(perm("allow", path_prefix="/"), default_allow=default_allow)
    decision = ixns.decide_l4("default", "web")
    assert not decision.allowed
    assert decision.reason.startswith("Matched L7 intention: default/web => default/api")


# --------------------------------------------------------------------------------------------
# L7 permissions (agent/xds/rbac.go makeRBACRules, removePermissionPrecedence)


@pytest.mark.parametrize("default_allow", [True, False])
def test_first_matching_permission_decides(default_allow: bool) -> None:
    # removePermissionPrecedence: every permission is ANDed with NOT of all earlier ones.
    ixns = web_to_api(
        perm("deny", path_prefix="/admin"),
        perm("allow", path_prefix="/"),
        default_allow=default_allow,
    )
    assert not allowed(ixns, "GET", "/admin/x")
    assert allowed(ixns, "GET", "/x")
    ixns = web_to_api(
        perm("allow", path_prefix="/"),
        perm("deny", path_prefix="/admin"),
        default_allow=default_allow,
    )
    assert allowed(ixns, "GET", "/admin/x")


@pytest.mark.parametrize("default_allow", [True, False])
def test_no_matching_permission_falls_to_the_default_not_to_a_lower_intention(
    default_allow: bool,
) -> None:
    # removeIntentionPrecedence: permissions with the default's action are dropped, so an
    # unmatched request gets the default; removeSourcePrecedence: the L7 intention's source
    # is NOTed out of every lower intention, so "* => api" never applies to web.
    ixns = IntentionSet(
        [
            l7("web", "api", perm("allow", path_exact="/ok")),
            l4("*", "api", "allow" if not default_allow else "deny"),
        ],
        default_allow=default_allow,
    )
    decision = ixns.decide_l7("default", "web", "GET", "/other")
    assert decision.allowed is default_allow
    assert decision.intention is not None and decision.intention.source_name == "web"


def test_query_string_is_not_part_of_the_path() -> None:
    # convertPermission uses Envoy's url_path matcher: the path without the query string.
    ixns = web_to_api(perm("allow", path_exact="/ok"))
    assert allowed(ixns, "GET", "/ok?x=/admin")
    assert not allowed(ixns, "GET", "/ok/?x")


def test_path_matchers_are_case_sensitive_and_regex_must_match_whole_path() -> None:
    # convertPermission: StringMatcher exact/prefix (ignore_case unset) and SafeRegex, which
    # Envoy evaluates with RE2 FullMatch.
    assert not allowed(web_to_api(perm("allow", path_exact="/Admin")), "GET", "/admin")
    assert not allowed(web_to_api(perm("allow", path_prefix="/Admin")), "GET", "/admin/x")
    rx = web_to_api(perm("allow", path_regex="/v[12]/.*"))
    assert allowed(rx, "GET", "/v1/x")
    assert not allowed(rx, "GET", "/api/v1/x")
    assert not allowed(web_to_api(perm("allow", path_regex="/v1")), "GET", "/v1/x")
    assert not allowed(web_to_api(perm("allow", path_regex="/v1$")), "GET", "/v1\n")


def test_regex_classes_are_ascii_like_re2() -> None:
    # Envoy compiles SafeRegex with RE2, whose \d \w \s are ASCII-only; Python's default
    # Unicode classes would let "/items/\u0663" (ARABIC-INDIC DIGIT THREE) through.
    ixns = web_to_api(perm("allow", path_regex=r"/items/\d+"))
    assert allowed(ixns, "GET", "/items/3")
    assert not allowed(ixns, "GET", "/items/\u0663")
    hdr = web_to_api(perm("allow", headers=[{"name": "x-id", "regex": r"\w+"}]))
    assert not allowed(hdr, "GET", "/", [("x-id", "\u00e9")])


def test_methods_match_exactly_and_case_sensitively() -> None:
    # convertPermission: a SafeRegex "GET|HEAD" on ":method" (RE2 FullMatch, case-sensitive).
    ixns = web_to_api(perm("allow", methods=["GET", "HEAD"]))
    assert allowed(ixns, "HEAD", "/")
    assert not allowed(ixns, "get", "/")
    assert not allowed(ixns, "GETX", "/")
    assert not allowed(ixns, "POST", "/")


def test_header_rules_follow_envoys_header_matcher() -> None:
    # Envoy HeaderUtility::matchHeaders: names case-insensitive; repeated headers joined with
    # ","; a missing header fails every value matcher, inverted or not; present+invert on a
    # missing header matches.
    exact = web_to_api(perm("allow", headers=[{"name": "X-Env", "exact": "a,b"}]))
    assert allowed(exact, "GET", "/", [("x-env", "a"), ("X-ENV", "b")])
    assert not allowed(exact, "GET", "/", [("x-env", "a")])
    inv = web_to_api(perm("allow", headers=[{"name": "x-env", "exact": "prod", "invert": True}]))
    assert allowed(inv, "GET", "/", [("x-env", "dev")])
    assert not allowed(inv, "GET", "/", [("x-env", "prod")])
    assert not allowed(inv, "GET", "/")
    absent = web_to_api(perm("allow", headers=[{"name": "x-dbg", "present": True, "invert": True}]))
    assert allowed(absent, "GET", "/")
    assert not allowed(absent, "GET", "/", {"X-Dbg": ""})
    fixes = web_to_api(
        perm("allow", headers=[{"name": "a", "prefix": "Pre"}, {"name": "b", "suffix": "Suf"}])
    )
    assert allowed(fixes, "GET", "/", [("a", "Prefix"), ("b", "xSuf")])
    assert not allowed(fixes, "GET", "/", [("a", "prefix"), ("b", "xSuf")])


def test_a_host_header_rule_never_sees_a_value_as_in_envoy() -> None:
    # Envoy stores Host only as ":authority" (Http::Headers::Host is ":authority"), so a
    # Consul rule on "Host" never matches there; ":authority" does.
    host = web_to_api(perm("allow", headers=[{"name": "Host", "exact": "internal"}]))
    assert not allowed(host, "GET", "/", [("host", "internal")])
    authority = web_to_api(perm("allow", headers=[{"name": ":authority", "exact": "internal"}]))
    assert allowed(authority, "GET", "/", [("host", "internal")])


# --------------------------------------------------------------------------------------------
# The path Envoy matches: normalize_path (Consul's default), merge_slashes off, %2F kept
# (agent/xds/listeners.go with structs.RequestNormalizationMeshConfig defaults)


@pytest.mark.parametrize(
    "target",
    [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public\\..\\admin",
        "/%61dmin",
        "/public/./../admin/x?y",
    ],
)
def test_paths_are_normalized_like_envoy_before_matching(target: str) -> None:
    # Envoy normalize_path (RFC 3986 dot segments, "\\" to "/", unreserved escapes
    # decoded) runs before the RBAC filter; Consul turns it on unless
    # InsecureDisablePathNormalization is set.
    ixns = web_to_api(
        perm("deny", path_prefix="/admin"),
        perm("allow", path_prefix="/"),
    )
    assert not allowed(ixns, "GET", target)


def test_escaped_slash_is_not_a_separator_and_slashes_are_not_merged() -> None:
    # PathWithEscapedSlashesAction default (keep unchanged) and merge_slashes false.
    ixns = web_to_api(perm("allow", path_exact="/a/b"))
    assert not allowed(ixns, "GET", "/a%2Fb")
    assert not allowed(ixns, "GET", "//a/b")


def test_a_path_that_normalizes_differently_must_also_be_allowed_as_given() -> None:
    # Stricter than Envoy on purpose: Envoy forwards "/public" to the application, but
    # without a proxy the application routes "/admin/../public" itself.
    ixns = web_to_api(
        perm("deny", path_prefix="/admin"),
        perm("allow", path_prefix="/"),
    )
    decision = ixns.decide_l7("default", "web", "GET", "/admin/../public")
    assert not decision.allowed
    assert decision.permission_index == 0
    assert allowed(ixns, "GET", "/public")


# --------------------------------------------------------------------------------------------
# Integrations hand decide_l7 a decoded path (outside consul_connect.authz; not fixed here)


def test_asgi_decoded_question_mark_does_not_end_the_path() -> None:
    from consul_connect.integrations.asgi import _authz_path

    # Raw "/items/5%3Fx": Envoy matches "/items/5%3Fx" against the regex and denies; the
    # application routes on "/items/5?x" (id "5?x").
    ixns = web_to_api(perm("allow", path_regex="/items/[0-9]+"))
    assert not allowed(ixns, "GET", _authz_path({"path": "/items/5?x"}))


def test_asgi_encoded_slash_dot_segments_do_not_escape_a_deny() -> None:
    from consul_connect.integrations.asgi import _authz_path

    # Raw "/admin%2F..%2Fpublic": Envoy keeps %2F, so the deny on /admin matches; the
    # application routes on the decoded "/admin/../public" (an /admin handler).
    ixns = web_to_api(
        perm("deny", path_prefix="/admin"),
        perm("allow", path_prefix="/"),
    )
    assert not allowed(ixns, "GET", _authz_path({"path": "/admin/../public"}))
