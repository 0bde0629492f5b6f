"""Config entries over real HTTP: service-intentions (incl. L7), service-defaults, CAS, blocking."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from tests.conftest import client_for


def index_of(r: httpx.Response) -> int:
    return int(r.headers["X-Consul-Index"])


def put(http: httpx.Client, entry: dict[str, Any], **params: Any) -> httpx.Response:
    return http.put("/v1/config", json=entry, params=params)


def l7_entry(name: str = "api", **http_match: Any) -> dict[str, Any]:
    return {
        "Kind": "service-intentions",
        "Name": name,
        "Sources": [
            {
                "Name": "web",
                "Permissions": [{"Action": "allow", "HTTP": http_match or {"PathPrefix": "/"}}],
            }
        ],
    }


def test_service_intentions_are_normalized_and_sorted(http: httpx.Client) -> None:
    r = put(
        http,
        {
            "kind": "service-intentions",
            "name": "db",
            "sources": [
                {"name": "*", "action": "deny", "Precedence": 42},
                {"Name": "web", "Action": "allow"},
            ],
            "Meta": {"owner": "team-a"},
        },
    )
    assert r.status_code == 200 and r.json() is True
    got = http.get("/v1/config/service-intentions/db")
    assert got.status_code == 200
    body = got.json()
    assert body == {
        "Kind": "service-intentions",
        "Name": "db",
        "Sources": [
            {"Name": "web", "Action": "allow", "Precedence": 9, "Type": "consul"},
            {"Name": "*", "Action": "deny", "Precedence": 8, "Type": "consul"},
        ],
        "Meta": {"owner": "team-a"},
        "CreateIndex": body["CreateIndex"],
        "ModifyIndex": body["ModifyIndex"],
    }
    assert index_of(got) >= body["ModifyIndex"]
    # The intention views show the entry's Meta on each intention.
    ixns = http.get("/v1/connect/intentions").json()
    assert [(i["SourceName"], i["Meta"]) for i in ixns] == [
        ("web", {"owner": "team-a"}),
        ("*", {"owner": "team-a"}),
    ]


def test_list_of_a_kind_and_empty_list(http: httpx.Client) -> None:
    r = http.get("/v1/config/service-intentions")
    assert r.status_code == 200 and r.json() == []
    for name in ("b", "a"):
        put(
            http,
            {
                "Kind": "service-intentions",
                "Name": name,
                "Sources": [{"Name": "x", "Action": "allow"}],
            },
        )
    assert [e["Name"] for e in http.get("/v1/config/service-intentions").json()] == ["a", "b"]


def test_missing_entry_and_unknown_kind(http: httpx.Client) -> None:
    r = http.get("/v1/config/service-defaults/web")
    assert r.status_code == 404
    assert r.text == 'Config entry not found for "service-defaults" / "web"'
    r = http.get("/v1/config/no-such-kind/web")
    assert r.status_code == 500 and r.text == "invalid config entry kind: no-such-kind"
    r = http.delete("/v1/config/no-such-kind/web")
    assert r.status_code == 400 and r.text == "invalid config entry kind: no-such-kind"
    r = http.delete("/v1/config/service-defaults")
    assert r.status_code == 404 and r.text == "Must provide both a kind and name to delete"


def test_delete_answers_empty_object_or_cas_boolean(http: httpx.Client) -> None:
    put(http, {"Kind": "service-defaults", "Name": "web", "Protocol": "http"})
    idx = http.get("/v1/config/service-defaults/web").json()["ModifyIndex"]
    r = http.delete("/v1/config/service-defaults/web", params={"cas": idx + 100})
    assert r.json() is False
    assert http.get("/v1/config/service-defaults/web").status_code == 200
    r = http.delete("/v1/config/service-defaults/web", params={"cas": idx})
    assert r.json() is True
    assert http.get("/v1/config/service-defaults/web").status_code == 404
    r = http.delete("/v1/config/service-defaults/web")
    assert r.status_code == 200 and r.json() == {}


def test_cas_upsert(http: httpx.Client) -> None:
    entry = {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}
    assert put(http, entry, cas=0).json() is True
    assert put(http, entry, cas=0).json() is False
    idx = http.get("/v1/config/service-defaults/web").json()["ModifyIndex"]
    assert put(http, {**entry, "Protocol": "grpc"}, cas=idx).json() is True
    assert put(http, {**entry, "Protocol": "tcp"}, cas=idx).json() is False
    assert http.get("/v1/config/service-defaults/web").json()["Protocol"] == "grpc"
    r = put(http, entry, cas="abc")
    assert r.status_code == 500
    assert r.text == 'strconv.ParseUint: parsing "abc": invalid syntax'


def test_service_defaults_json_shape(http: httpx.Client) -> None:
    put(http, {"Kind": "service-defaults", "Name": "web", "Protocol": "HTTP"})
    body = http.get("/v1/config/service-defaults/web").json()
    assert body == {
        "Kind": "service-defaults",
        "Name": "web",
        "Protocol": "http",
        "TransparentProxy": {},
        "MeshGateway": {},
        "Expose": {},
        "CreateIndex": body["CreateIndex"],
        "ModifyIndex": body["ModifyIndex"],
    }


def test_proxy_defaults_must_be_named_global(http: httpx.Client) -> None:
    r = put(http, {"Kind": "proxy-defaults", "Name": "other"})
    assert r.status_code == 500
    assert r.text == 'invalid name ("other"), only "global" is supported'


def test_identical_write_does_not_move_the_index(http: httpx.Client) -> None:
    entry = {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}
    put(http, entry)
    first = http.get("/v1/config/service-defaults/web").json()["ModifyIndex"]
    assert put(http, entry).json() is True
    assert http.get("/v1/config/service-defaults/web").json()["ModifyIndex"] == first


def test_decode_errors(http: httpx.Client) -> None:
    r = http.put("/v1/config", json={"Name": "web"})
    assert r.status_code == 400
    assert r.text == (
        "Request decoding failed: Payload does not contain a kind/Kind key at the top level"
    )
    r = http.put("/v1/config", content=b"{not json")
    assert r.status_code == 400 and r.text.startswith("Request decoding failed: ")
    r = http.put("/v1/config", json={"Kind": "bogus", "Name": "web"})
    assert r.status_code == 400
    assert r.text == "Request decoding failed: invalid config entry kind: bogus"
    r = put(http, {"Kind": "service-intentions", "Name": "db", "Sources": "web"})
    assert r.status_code == 400 and r.text.startswith("Request decoding failed: json: cannot")
    assert http.get("/v1/config/service-intentions").json() == []


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        (
            {"Kind": "service-intentions", "Sources": [{"Name": "a", "Action": "allow"}]},
            "Name is required",
        ),
        (
            {"Kind": "service-intentions", "Name": "db", "Sources": []},
            "At least one source is required",
        ),
        (
            {
                "Kind": "service-intentions",
                "Name": "db",
                "Sources": [{"Name": "a", "Action": "allow"}, {"Name": "a", "Action": "deny"}],
            },
            'Sources[1] defines "a" more than once',
        ),
    ],
)
def test_intentions_entry_validation(http: httpx.Client, entry: dict[str, Any], text: str) -> None:
    r = put(http, entry)
    assert r.status_code == 500
    assert r.text == text


def test_l7_permissions_need_an_http_protocol(http: httpx.Client) -> None:
    r = put(http, l7_entry())
    assert r.status_code == 500
    assert r.text == (
        'service "api" has protocol "tcp", which is incompatible with L7 intentions permissions'
    )
    assert http.get("/v1/config/service-intentions/api").status_code == 404

    assert put(http, {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}).json() is True
    r = put(http, l7_entry())
    assert r.status_code == 200, r.text
    perm = http.get("/v1/config/service-intentions/api").json()["Sources"][0]
    assert perm == {
        "Name": "web",
        "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}],
        "Precedence": 9,
        "Type": "consul",
    }

    # Switching the service back to tcp (or deleting its defaults) would orphan the L7 rules.
    r = put(http, {"Kind": "service-defaults", "Name": "api", "Protocol": "tcp"})
    assert r.status_code == 500
    assert "incompatible with L7 intentions permissions" in r.text
    r = http.delete("/v1/config/service-defaults/api")
    assert r.status_code == 500
    assert http.get("/v1/config/service-defaults/api").json()["Protocol"] == "http"


def test_proxy_defaults_protocol_also_enables_l7(http: httpx.Client) -> None:
    put(http, {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}})
    assert put(http, l7_entry()).status_code == 200


@pytest.mark.parametrize(
    ("source", "text"),
    [
        (
            {"Name": "web", "Permissions": [{"Action": "allow"}]},
            "Sources[0].Permissions[0].HTTP is required",
        ),
        (
            {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "x"}}]},
            "Sources[0].Permissions[0].HTTP.PathExact doesn't start with '/': \"x\"",
        ),
        (
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "allow", "HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}
                ],
            },
            "Sources[0].Permissions[0].HTTP should only contain at most one of PathExact, "
            "PathPrefix, or PathRegex",
        ),
        (
            {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["FETCH"]}}]},
            'Sources[0].Permissions[0].HTTP.Methods contains an invalid method "FETCH"',
        ),
        (
            {
                "Name": "web",
                "Permissions": [
                    {
                        "Action": "allow",
                        "HTTP": {"Header": [{"Name": "X", "Exact": "a", "Prefix": "b"}]},
                    }
                ],
            },
            "Sources[0].Permissions[0].HTTP.Header[0] should only contain one of Present, "
            "Exact, Prefix, Suffix, or Regex",
        ),
        (
            {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {}}]},
            "Sources[0].Permissions[0].HTTP should not be empty",
        ),
        (
            {
                "Name": "web",
                "Action": "allow",
                "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}],
            },
            "Sources[0].Action must be omitted if Permissions are specified",
        ),
    ],
)
def test_l7_permission_validation_texts(
    http: httpx.Client, source: dict[str, Any], text: str
) -> None:
    put(http, {"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
    r = put(http, {"Kind": "service-intentions", "Name": "api", "Sources": [source]})
    assert r.status_code == 500
    assert r.text == text
    assert http.get("/v1/config/service-intentions/api").status_code == 404


def test_l7_permissions_refused_on_wildcard_destination(http: httpx.Client) -> None:
    r = put(http, l7_entry("*"))
    assert r.status_code == 500
    assert r.text == (
        "Sources[0].Permissions cannot be specified on intentions with wildcarded destinations"
    )


def test_get_blocks_until_the_entry_changes(http: httpx.Client) -> None:
    put(http, {"Kind": "service-defaults", "Name": "web", "Protocol": "http"})
    first = http.get("/v1/config/service-defaults/web")
    idx = index_of(first)
    out: dict[str, httpx.Response] = {}

    def blocked() -> None:
        out["r"] = http.get("/v1/config/service-defaults/web", params={"index": idx, "wait": "20s"})

    t = threading.Thread(target=blocked)
    t.start()
    put(http, {"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"})
    t.join(timeout=20)
    assert not t.is_alive()
    assert index_of(out["r"]) > idx
    assert out["r"].json()["Protocol"] == "grpc"


def test_intentions_entry_write_needs_intention_write(start_agent: Any) -> None:
    agent: DevAgent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    with client_for(agent, "root") as root:
        tok = root.put("/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": "web"}]}).json()
        entry = {
            "Kind": "service-intentions",
            "Name": "web",
            "Sources": [{"Name": "a", "Action": "allow"}],
        }
        with client_for(agent, tok["SecretID"]) as web:
            r = put(web, entry)
            assert r.status_code == 403
            assert r.text == (
                f"Permission denied: token with AccessorID '{tok['AccessorID']}' lacks "
                "permission 'intention:write' on \"web\""
            )
            assert root.get("/v1/config/service-intentions").json() == []
            # Service identities grant intentions:read everywhere.
            assert put(root, entry).json() is True
            assert web.get("/v1/config/service-intentions/web").status_code == 200
            # ... and service:write on their own service, so service-defaults is writable.
            r = put(web, {"Kind": "service-defaults", "Name": "web", "Protocol": "http"})
            assert r.status_code == 200
            r = put(web, {"Kind": "service-defaults", "Name": "db", "Protocol": "http"})
            assert r.status_code == 403
