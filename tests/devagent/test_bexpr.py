"""The go-bexpr subset behind ``?filter=``: parsing, matching, selector validation."""

from __future__ import annotations

import re
from typing import Any

import pytest

from consul_connect.devagent.bexpr import MAP, BexprError, compile_filter

SVC: dict[str, Any] = {
    "Service": "web",
    "ID": "web-1",
    "Port": 8443,
    "Tags": ["v1", "primary"],
    "Meta": {"version": "1.2", "team-name": "edge"},
    "EnableTagOverride": False,
    "Connect": {"Native": True},
    "Checks": [{"Status": "passing"}, {"Status": "critical"}],
}

SCHEMA = {
    "Service": None,
    "ID": None,
    "Port": None,
    "Tags": [None],
    "Meta": MAP,
    "EnableTagOverride": None,
    "Connect": {"Native": None},
    "Checks": [{"Status": None}],
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('Service == "web"', True),
        ("Service == web", True),
        ("Service == `web`", True),
        ('Service != "web"', False),
        ("Port == 8443", True),
        ('Port == "8443"', True),
        ("Port == 80", False),
        ("EnableTagOverride == false", True),
        ("Connect.Native == true", True),
        ('"v1" in Tags', True),
        ('"v2" in Tags', False),
        ('"v2" not in Tags', True),
        ('Tags contains "primary"', True),
        ('Tags not contains "primary"', False),
        ("Tags is not empty", True),
        ("Meta is empty", False),
        ('Meta.version == "1.2"', True),
        ('Meta["team-name"] == "edge"', True),
        ('Meta.missing == "x"', False),
        ("Meta.missing is empty", True),
        ('"version" in Meta', True),
        ('Service matches "^w.b$"', True),
        ('Service not matches "^api"', True),
        ('Service == "web" and Port == 8443', True),
        ('Service == "api" or Port == 8443', True),
        ('not (Service == "web")', False),
        ('Service == "api" or (Port == 8443 and "v1" in Tags)', True),
        ('Checks.Status == "critical"', True),
        ('Checks.Status != "warning"', True),
        ('"passing" in Checks.Status', True),
    ],
)
def test_expression_matches_record(expr: str, expected: bool) -> None:
    assert compile_filter(expr, SCHEMA).matches(SVC) is expected


def test_empty_expression_matches_everything() -> None:
    assert compile_filter("  ").matches({})


@pytest.mark.parametrize(
    "expr",
    [
        "Service ==",
        "Service = web",
        "(Service == web",
        "Service == web and",
        "web",
        'Service == "unterminated',
    ],
)
def test_syntax_errors_carry_consul_prefix(expr: str) -> None:
    with pytest.raises(BexprError) as info:
        compile_filter(expr, SCHEMA)
    assert str(info.value).startswith("Failed to create boolean expression evaluator: ")


def test_unknown_selector_is_rejected_at_compile_time() -> None:
    with pytest.raises(BexprError, match=re.escape('Selector "Servce" is not valid')):
        compile_filter('Servce == "web"', SCHEMA)


def test_nested_unknown_selector_is_rejected() -> None:
    with pytest.raises(BexprError, match=re.escape('Selector "Connect.Nativ" is not valid')):
        compile_filter("Connect.Nativ == true", SCHEMA)


def test_map_keys_are_free_form() -> None:
    assert not compile_filter('Meta.anything == "x"', SCHEMA).matches(SVC)


def test_bad_regex_is_an_error() -> None:
    with pytest.raises(BexprError, match="Failed to create boolean expression evaluator"):
        compile_filter('Service matches "("', SCHEMA)


def test_apply_keeps_order_and_uses_key() -> None:
    flt = compile_filter('Service == "a"')
    items = [("x", {"Service": "a"}), ("y", {"Service": "b"}), ("z", {"Service": "a"})]
    assert flt.apply(items, key=lambda p: p[1]) == [items[0], items[2]]


def test_quoted_string_escapes() -> None:
    assert compile_filter('Service == "we\\"b"').matches({"Service": 'we"b'})
