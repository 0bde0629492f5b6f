"""Acceptance: bad input of every kind gets Consul's answer and leaves the state as it was.

For every write endpoint, bad JSON, wrong types and invalid values are sent; the
status and plain-text body are Consul's, and a snapshot of the whole store (index,
table indexes, tables) is identical before and after. A seeded fuzz run then throws
a few hundred random requests at a running agent: none may hit a handler bug.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import httpx
import pytest

from consul_connect.devagent import DevAgent
from tests.devagent.acceptance_support import MGMT, ok, snapshot


@pytest.fixture(scope="module")
def populated() -> Iterator[tuple[DevAgent, httpx.Client, dict[str, str]]]:
    """An agent (ACLs on, default allow) with one of everything to be damaged."""
    with (
        DevAgent(
            leaf_root_change_jitter=0, acl_enabled=True, acl_initial_management_token=MGMT
        ) as agent,
        httpx.Client(base_url=agent.http_addr, timeout=30, headers={"X-Consul-Token": MGMT}) as c,
    ):
        ok(
            c.put(
                "/v1/agent/service/register",
                json={
                    "Name": "web",
                    "Port": 80,
                    "Connect": {"Native": True},
                    "Check": {"TTL": "1h", "CheckID": "web-ttl"},
                },
            )
        )
        ok(
            c.put(
                "/v1/config",
                json={
                    "Kind": "service-intentions",
                    "Name": "web",
                    "Sources": [{"Name": "api", "Action": "allow"}],
                },
            )
        )
        ids = {
            "intention": c.post(
                "/v1/connect/intentions",
                json={"SourceName": "db", "DestinationName": "api", "Action": "allow"},
            ).json()["ID"],
            "query": c.post("/v1/query", json={"Name": "q1", "Service": {"Service": "web"}}).json()[
                "ID"
            ],
            "token": c.put(
                "/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": "web"}]}
            ).json()["AccessorID"],
        }
        c.get("/v1/agent/connect/ca/leaf/web")
        yield agent, c, ids


SV = "/v1/agent/service/register"
CK = "/v1/agent/check/register"
MULTI = "1 error occurred:\n\t* Action must be set to 'allow' or 'deny'\n\n"

# (method, path, body, status, text the body starts with)
BAD_WRITES: list[tuple[str, str, bytes, int, str]] = [
    ("PUT", SV, b"{", 400, "Request decode failed: unexpected EOF"),
    ("PUT", SV, b"", 400, "Request decode failed: EOF"),
    ("PUT", SV, b"\xff\xfe", 400, "Request decode failed: "),
    (
        "PUT",
        SV,
        b"[]",
        400,
        "Request decode failed: json: cannot unmarshal array into Go value "
        "of type structs.ServiceDefinition",
    ),
    (
        "PUT",
        SV,
        b'{"Name":"x","Port":"80"}',
        400,
        "Request decode failed: json: cannot unmarshal "
        "string into Go struct field ServiceDefinition.Port of type int",
    ),
    (
        "PUT",
        SV,
        b'{"Name":"x","Check":{"TTL":"abc"}}',
        400,
        'Request decode failed: time: invalid duration "abc"',
    ),
    ("PUT", SV, b'{"Port":1}', 400, "Missing service name"),
    # Go leaves its target untouched for a JSON null: the same as an empty object.
    ("PUT", SV, b"null", 400, "Missing service name"),
    ("PUT", CK, b"null", 400, "Missing check name"),
    ("PUT", "/v1/catalog/register", b"null", 500, "Must provide node"),
    ("PUT", "/v1/agent/check/update/web-ttl", b"null", 400, "Invalid check status: ''"),
    ("POST", "/v1/agent/connect/authorize", b"null", 400, "Target service must be specified"),
    ("PUT", "/v1/config", b"null", 400, "Request decoding failed: Payload does not contain a"),
    (
        "PUT",
        "/v1/catalog/register",
        b"7",
        400,
        "Request decode failed: json: cannot unmarshal "
        "number into Go value of type structs.RegisterRequest",
    ),
    (
        "POST",
        "/v1/connect/intentions",
        b'"x"',
        500,
        "Failed to decode request body: json: "
        "cannot unmarshal string into Go value of type structs.Intention",
    ),
    (
        "PUT",
        "/v1/config",
        b"true",
        400,
        "Request decoding failed: json: cannot unmarshal bool "
        "into Go value of type map[string]interface {}",
    ),
    ("PUT", SV, b'{"Name":"x","Kind":"connect-proxy"}', 400, "Validation failed: 2 errors"),
    (
        "PUT",
        SV,
        b'{"Name":"x","Weights":{"Passing":0}}',
        400,
        "Invalid Weights: Passing must be greater than 0",
    ),
    ("PUT", SV, b'{"Name":"x","Meta":{"a b":"c"}}', 400, "Invalid Service Meta: "),
    ("PUT", SV, b'{"Name":"x","Address":"0.0.0.0"}', 400, "Invalid service address"),
    ("PUT", "/v1/agent/service/deregister/nope", b"", 404, 'Unknown service ID "nope". '),
    ("PUT", CK, b'{"Name":"c","TTL":"bad"}', 400, "Request decode failed: time: invalid duration"),
    (
        "PUT",
        CK,
        b'{"Name":"c","ServiceID":"nope","TTL":"5s"}',
        404,
        'ServiceID "nope" does not exist',
    ),
    ("PUT", CK, b'{"TTL":"5s"}', 400, "Missing check name"),
    ("PUT", CK, b'{"Name":"c","TTL":"5s","Status":"great"}', 400, "Bad check status"),
    ("PUT", CK, b"7", 400, "Request decode failed: json: cannot unmarshal"),
    ("PUT", "/v1/agent/check/pass/nope", b"", 404, 'Unknown check ID "nope". '),
    ("PUT", "/v1/agent/check/warn/nope", b"", 404, 'Unknown check ID "nope". '),
    ("PUT", "/v1/agent/check/fail/nope", b"", 404, 'Unknown check ID "nope". '),
    (
        "PUT",
        "/v1/agent/check/update/web-ttl",
        b'{"Status":"bogus"}',
        400,
        "Invalid check status: 'bogus'",
    ),
    (
        "PUT",
        "/v1/agent/check/update/web-ttl",
        b"xx",
        400,
        "Request decode failed: invalid character 'x' looking for beginning of value",
    ),
    (
        "PUT",
        "/v1/agent/check/update/web-ttl",
        b'{"Status":"passing","Output":5}',
        400,
        "Request decode failed: json: cannot unmarshal number",
    ),
    ("PUT", "/v1/agent/check/deregister/nope", b"", 404, 'Unknown check ID "nope". '),
    ("PUT", "/v1/catalog/register", b'{"Node":""}', 500, "Must provide node"),
    ("PUT", "/v1/catalog/register", b'{"Node":"n1"}', 500, "Must provide address"),
    (
        "PUT",
        "/v1/catalog/register",
        b'{"Node":"n1","Address":"1.2.3.4","Service":{"Service":"s","Port":"x"}}',
        400,
        "Request decode failed: json: cannot unmarshal string",
    ),
    (
        "PUT",
        "/v1/catalog/register",
        b'{"Node":"n1","Address":"1.2.3.4","Check":{"CheckID":"c","ServiceID":"ghost"}}',
        500,
        'Unknown service ID "ghost"',
    ),
    ("PUT", "/v1/catalog/deregister", b"{}", 500, "Must provide node"),
    ("PUT", "/v1/catalog/deregister", b"[1]", 400, "Request decode failed: "),
    (
        "PUT",
        "/v1/connect/ca/configuration",
        b'{"Provider":"vault"}',
        500,
        "error configuring provider",
    ),
    (
        "PUT",
        "/v1/connect/ca/configuration",
        b'{"Provider":"consul","Config":{"LeafCertTTL":"1s"}}',
        500,
        "error configuring provider: leaf cert TTL must be greater or equal than 1h0m0s",
    ),
    (
        "PUT",
        "/v1/connect/ca/configuration",
        b'{"Provider":"consul","Config":{"PrivateKeyType":"dsa"}}',
        500,
        "error configuring provider: private key type must be either 'ec' or 'rsa'",
    ),
    ("PUT", "/v1/connect/ca/configuration", b"nope", 400, "Request decode failed: invalid char"),
    (
        "PUT",
        "/v1/connect/ca/configuration",
        b'{"Provider":5}',
        400,
        "Request decode failed: json: cannot unmarshal number",
    ),
    (
        "POST",
        "/v1/connect/intentions",
        b'{"SourceName":"a","DestinationName":"web","Action":"maybe"}',
        500,
        MULTI,
    ),
    ("POST", "/v1/connect/intentions", b'{"SourceName":"a","DestinationName":"web"}', 500, MULTI),
    ("POST", "/v1/connect/intentions", b"{", 500, "Failed to decode request body: unexpected EOF"),
    (
        "PUT",
        "/v1/connect/intentions/{intention}",
        b'{"SourceName":"db","DestinationName":"web","Action":"allow"}',
        500,
        "Cannot modify DestinationNS or DestinationName for an intention once it exists.",
    ),
    (
        "DELETE",
        "/v1/connect/intentions/00000000-0000-0000-0000-000000000000",
        b"",
        500,
        "Cannot delete non-existent intention: '00000000-0000-0000-0000-000000000000'",
    ),
    (
        "PUT",
        "/v1/connect/intentions/exact?source=api",
        b'{"Action":"allow"}',
        500,
        "required query parameter 'destination' not set",
    ),
    (
        "PUT",
        "/v1/connect/intentions/exact?source=api&destination=web",
        b'{"Action":"x"}',
        500,
        "Sources[0].Action must be set to 'allow' or 'deny'",
    ),
    (
        "DELETE",
        "/v1/connect/intentions/exact?destination=web",
        b"",
        500,
        "required query parameter 'source' not set",
    ),
    (
        "PUT",
        "/v1/config",
        b'{"Kind":"nope","Name":"x"}',
        400,
        "Request decoding failed: invalid config entry kind: nope",
    ),
    ("PUT", "/v1/config", b"{", 400, "Request decoding failed: "),
    (
        "PUT",
        "/v1/config",
        b'{"Kind":"service-intentions","Name":"web","Sources":[{"Name":"api","Action":"allow",'
        b'"Permissions":[{"Action":"allow","HTTP":{"PathExact":"/a"}}]}]}',
        500,
        "Sources[0].Action must be omitted if Permissions are specified",
    ),
    (
        "PUT",
        "/v1/config",
        b'{"Kind":"service-intentions","Name":"web","Sources":[{"Name":"api",'
        b'"Permissions":[{"Action":"allow","HTTP":{"PathExact":"a","PathPrefix":"/b"}}]}]}',
        500,
        "Sources[0].Permissions[0].HTTP.PathExact doesn't start with '/': \"a\"",
    ),
    (
        "PUT",
        "/v1/config?cas=abc",
        b'{"Kind":"service-intentions","Name":"web","Sources":[{"Name":"x","Action":"deny"}]}',
        500,
        'strconv.ParseUint: parsing "abc": invalid syntax',
    ),
    (
        "PUT",
        "/v1/config",
        b'{"Kind":"service-defaults","Name":"web","Protocol":5}',
        400,
        "Request decoding failed: ",
    ),
    (
        "DELETE",
        "/v1/config/service-intentions/web?cas=x",
        b"",
        500,
        'strconv.ParseUint: parsing "x": invalid syntax',
    ),
    ("DELETE", "/v1/config/bogus/web", b"", 400, "invalid config entry kind: bogus"),
    (
        "POST",
        "/v1/query",
        b'{"Name":"q2"}',
        500,
        "Invalid prepared query: Must provide a Service name to query",
    ),
    (
        "POST",
        "/v1/query",
        b'{"Name":"q1","Service":{"Service":"web"}}',
        500,
        "Name 'q1' aliases an existing query name",
    ),
    ("POST", "/v1/query", b"{{", 400, "Request decode failed: "),
    (
        "PUT",
        "/v1/query/{query}",
        b'{"Service":{"Service":""}}',
        500,
        "Invalid prepared query: Must be bound to a session",
    ),
    ("DELETE", "/v1/query/nope", b"", 500, "Cannot modify non-existent prepared query: 'nope'"),
    (
        "POST",
        "/v1/agent/connect/authorize",
        b'{"Target":"web"}',
        400,
        "ClientCertURI not a valid Connect identifier",
    ),
    ("POST", "/v1/agent/connect/authorize", b"{", 400, "Request decode failed: "),
    ("PUT", "/v1/acl/token", b"{", 400, "Token decoding failed: "),
    (
        "PUT",
        "/v1/acl/token",
        b'{"ServiceIdentities":[{"ServiceName":"bad name!"}]}',
        500,
        'Service identity "bad name!" has an invalid name.',
    ),
    (
        "PUT",
        "/v1/acl/token",
        b'{"Policies":[{"ID":"00000000-0000-0000-0000-00000000dead"}]}',
        500,
        'No such ACL policy with ID "00000000-0000-0000-0000-00000000dead"',
    ),
    (
        "PUT",
        "/v1/acl/token/{token}",
        b'{"AccessorID":"other"}',
        400,
        "Token Accessor ID in URL and payload do not match",
    ),
    ("PUT", "/v1/acl/policy", b'{"Name":""}', 500, "Invalid Policy: no Name is set"),
    (
        "PUT",
        "/v1/acl/policy",
        b'{"Name":"p","Rules":"service \\"x\\" { policy = "}',
        500,
        "Failed to parse ACL rules: ",
    ),
    ("PUT", "/v1/acl/bootstrap", b"", 403, "Permission denied: ACL bootstrap no longer allowed"),
]


def test_bad_writes_answer_as_consul_and_change_nothing(
    populated: tuple[DevAgent, httpx.Client, dict[str, str]],
) -> None:
    agent, c, ids = populated
    before = snapshot(agent)
    for method, path, body, status, text in BAD_WRITES:
        r = c.request(method, path.format(**ids), content=body)
        assert (r.status_code, r.text[: len(text)]) == (status, text), (method, path, body, r.text)
        assert r.headers["Content-Type"].startswith("text/plain"), (path, r.headers)
        assert r.text, (method, path)
    assert snapshot(agent) == before


def test_denied_writes_change_nothing(
    populated: tuple[DevAgent, httpx.Client, dict[str, str]],
) -> None:
    agent, _, _ = populated
    before = snapshot(agent)
    with httpx.Client(base_url=agent.http_addr, timeout=30) as anon:
        # Default policy allow, but ACL management needs a privileged token.
        r = anon.put("/v1/acl/token", json={"Description": "x"})
        assert r.status_code == 403
        assert r.text.startswith("Permission denied")
        r = anon.put("/v1/acl/token", json={}, headers={"X-Consul-Token": "unknown-secret"})
        assert (r.status_code, r.text) == (403, "ACL not found")
    assert snapshot(agent) == before


def test_wrong_methods_and_unknown_paths_change_nothing(
    populated: tuple[DevAgent, httpx.Client, dict[str, str]],
) -> None:
    agent, c, _ = populated
    before = snapshot(agent)
    for method, path, allow in [
        ("POST", "/v1/agent/service/register", "PUT,OPTIONS"),
        ("GET", "/v1/agent/service/register", "PUT,OPTIONS"),
        ("DELETE", "/v1/config", "PUT,OPTIONS"),
        ("PUT", "/v1/connect/ca/roots", "GET,OPTIONS"),
        ("PATCH", "/v1/connect/intentions", "GET,POST,OPTIONS"),
        ("POST", "/v1/agent/connect/ca/leaf/web", "GET,OPTIONS"),
    ]:
        r = c.request(method, path, json={"Name": "x"})
        assert (r.status_code, r.text) == (405, f"method {method} not allowed"), path
        assert r.headers["Allow"] == allow
    for path in ("/v1/agent/servicez", "/v1/kv/x", "/v2/status/leader", "/v1"):
        r = c.put(path, json={"Name": "x"})
        assert r.status_code == 404
        assert r.text.startswith("Invalid URL path: ")
    assert snapshot(agent) == before


# -- fuzz ---------------------------------------------------------------------------------------

_PATHS = [
    "/v1/agent/self",
    "/v1/status/leader",
    "/v1/status/peers",
    "/v1/agent/services",
    "/v1/agent/service/",
    "/v1/agent/service/register",
    "/v1/agent/service/deregister/",
    "/v1/agent/checks",
    "/v1/agent/check/register",
    "/v1/agent/check/pass/",
    "/v1/agent/check/update/",
    "/v1/agent/check/deregister/",
    "/v1/agent/health/service/id/",
    "/v1/agent/health/service/name/",
    "/v1/agent/connect/ca/roots",
    "/v1/connect/ca/roots",
    "/v1/agent/connect/ca/leaf/",
    "/v1/connect/ca/configuration",
    "/v1/agent/connect/authorize",
    "/v1/connect/intentions",
    "/v1/connect/intentions/",
    "/v1/connect/intentions/exact",
    "/v1/connect/intentions/match",
    "/v1/connect/intentions/check",
    "/v1/config",
    "/v1/config/",
    "/v1/config/service-intentions/",
    "/v1/config/service-defaults/",
    "/v1/health/service/",
    "/v1/health/connect/",
    "/v1/health/checks/",
    "/v1/health/node/",
    "/v1/health/state/",
    "/v1/catalog/services",
    "/v1/catalog/service/",
    "/v1/catalog/connect/",
    "/v1/catalog/nodes",
    "/v1/catalog/node/",
    "/v1/catalog/register",
    "/v1/catalog/deregister",
    "/v1/query",
    "/v1/query/",
    "/v1/acl/token",
    "/v1/acl/token/",
    "/v1/acl/token/self",
    "/v1/acl/tokens",
    "/v1/acl/policy",
    "/v1/acl/policies",
    "/v1/acl/bootstrap",
    "/v1/",
    "/v1/nope/",
]
_SUFFIXES = ["", "web", "web-ttl", "x/y", "%00", "..%2f", "q1/execute", "q1/explain", "é", "*"]
_PARAMS = [
    "",
    "index=abc",
    "index=3&wait=5ms",
    "index=99999&wait=1ms",
    "wait=-1s",
    "wait=1h&index=0",
    "stale",
    "consistent",
    "stale&consistent",
    "cached",
    "dc=dc9",
    "dc=dc1",
    "ns=x",
    "partition=",
    "filter=Service.Port%20%3D%3D%201",
    "filter=%28%28",
    "passing=maybe",
    "pem=true",
    "source=a&destination=web",
    "by=destination&name=web",
    "by=nope",
    "cas=0",
    "cas=-1",
    "token=nope",
    "near=_agent",
    "limit=x",
    "connect=true",
    "tag=a&tag=b",
    "node-meta=a",
    "hash=zz&wait=1ms",
    "max_stale=x",
    "replace-existing-checks",
    "note=%ff",
]
_BODIES: list[bytes] = [
    b"",
    b"{",
    b"[]",
    b"null",
    b"1",
    b'"x"',
    b"{}",
    b'{"Name":5}',
    b'{"Name":"fz","Port":-1}',
    b'{"Kind":"service-intentions","Name":"fz","Sources":[{"Name":"*","Action":"allow"}]}',
    b'{"Kind":"service-intentions","Name":"fz","Sources":[{"Permissions":[{}]}]}',
    b'{"SourceName":"","DestinationName":"*","Action":"deny"}',
    b'{"Target":"web","ClientCertURI":"spiffe://x/ns/default/dc/dc1/svc/a"}',
    b'{"Service":{"Service":"web","Failover":{"NearestN":"x"}}}',
    b'{"Node":"n","Address":"a","Checks":[{"Status":"x"}]}',
    b'{"Provider":"consul","Config":{"RotationPeriod":"x"}}',
    b'{"Status":"passing"}',
    b'{"Name":"fz","Check":{"HTTP":"::","Interval":"x"}}',
    b'{"ServiceIdentities":[{}],"Policies":[{"Name":5}]}',
]


def _garbage(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))


def test_a_seeded_fuzz_run_never_hits_a_handler_bug(
    populated: tuple[DevAgent, httpx.Client, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent, _, _ = populated
    rng = random.Random(20240611)
    caplog.set_level(logging.ERROR, logger="consul_connect.devagent")
    methods = ["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    tokens = [None, MGMT, "nope", ""]
    with httpx.Client(base_url=agent.http_addr, timeout=10) as c:
        for _ in range(400):
            path = rng.choice(_PATHS)
            if path.endswith("/"):
                path += rng.choice(_SUFFIXES)
            query = "&".join(rng.sample(_PARAMS, rng.randrange(0, 3)))
            body = rng.choice(_BODIES) if rng.random() < 0.8 else _garbage(rng)
            headers = {}
            token = rng.choice(tokens)
            if token is not None:
                headers["X-Consul-Token"] = token
            if rng.random() < 0.1:
                headers["X-Consul-Namespace"] = "team"
            method = rng.choice(methods)
            r = c.request(
                method, path + ("?" + query if query else ""), content=body, headers=headers
            )
            assert 100 <= r.status_code < 600
            what = (method, path, query, body)
            # Agent health-by-service answers carry the aggregated status as a JSON 404/429/503.
            if r.status_code >= 400 and "/agent/health/" not in path:
                assert r.headers.get("Content-Type", "").startswith("text/plain") or not r.content
                assert "Traceback" not in r.text, what
            if r.status_code == 500:
                assert 'File "' not in r.text, what
    bugs = [rec.getMessage() for rec in caplog.records if "internal error" in rec.getMessage()]
    assert bugs == []
    with httpx.Client(base_url=agent.http_addr, timeout=10) as c:
        assert c.get("/v1/status/leader").status_code == 200
