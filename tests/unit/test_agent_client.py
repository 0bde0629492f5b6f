"""AgentClient request building and error mapping, against httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from consul_connect.agent.client import AgentClient, QueryMeta, error_for_status
from consul_connect.agent.config import AgentConfig
from consul_connect.errors import (
    AgentNotFoundError,
    AgentPermissionError,
    AgentRateLimitedError,
    AgentRequestError,
    AgentResponseError,
    AgentUnavailableError,
    ConfigError,
)

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers from a fixed reply."""

    def __init__(
        self,
        status: int = 200,
        body: Any = None,
        *,
        text: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.text = text if text is not None else ("" if body is None else json.dumps(body))
        self.headers = headers or {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, text=self.text, headers=self.headers)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def make_client(handler: Handler, config: AgentConfig | None = None) -> AgentClient:
    return AgentClient(config or AgentConfig(), transport=httpx.MockTransport(handler))


def query(request: httpx.Request) -> list[tuple[str, str]]:
    return list(request.url.params.multi_items())


# -- request building ---------------------------------------------------------


async def test_ca_roots_blocking_request_carries_index_and_wait() -> None:
    rec = Recorder(body={"Roots": []}, headers={"X-Consul-Index": "42", "X-Cache": "HIT"})
    async with make_client(rec) as client:
        data, meta = await client.ca_roots(index=41, wait=30.0)
    assert data == {"Roots": []}
    assert meta.index == 42 and meta.cache == "HIT"
    req = rec.last
    assert req.method == "GET"
    assert req.url.path == "/v1/agent/connect/ca/roots"
    assert query(req) == [("index", "41"), ("wait", "30000ms")]


async def test_non_blocking_request_sends_no_index() -> None:
    rec = Recorder(body={"Roots": []}, headers={"X-Consul-Index": "3"})
    async with make_client(rec) as client:
        await client.ca_roots()
    assert query(rec.last) == []


async def test_blocking_request_timeout_outlasts_server_wait() -> None:
    rec = Recorder(body={}, headers={"X-Consul-Index": "3"})
    async with AgentClient(AgentConfig(), timeout=5.0, transport=httpx.MockTransport(rec)) as c:
        await c.leaf_cert("web", index=2, wait=160.0)
        blocking_timeout = rec.last.extensions["timeout"]["read"]
        await c.leaf_cert("web")
        plain_timeout = rec.last.extensions["timeout"]["read"]
        await c.leaf_cert("web", index=2)  # no wait: server may hold it 10 minutes
        default_wait_timeout = rec.last.extensions["timeout"]["read"]
    assert blocking_timeout == pytest.approx(160.0 + 10.0 + 5.0)
    assert plain_timeout == pytest.approx(5.0)
    assert default_wait_timeout == pytest.approx(600.0 + 37.5 + 5.0)


async def test_token_header_only_when_token_set() -> None:
    rec = Recorder(body={})
    async with make_client(rec) as client:
        await client.agent_self()
    assert "X-Consul-Token" not in rec.last.headers
    async with make_client(rec, AgentConfig(token="tok")) as client:
        await client.agent_self()
    assert rec.last.headers["X-Consul-Token"] == "tok"
    assert "token" not in dict(query(rec.last))


async def test_basic_auth_is_sent_when_configured() -> None:
    rec = Recorder(body={})
    async with make_client(rec, AgentConfig(http_auth=("alice", "pw"))) as client:
        await client.agent_self()
    assert rec.last.headers["Authorization"] == "Basic YWxpY2U6cHc="


async def test_namespace_and_partition_only_when_configured() -> None:
    rec = Recorder(body=[])
    async with make_client(rec) as client:
        await client.health_connect("web")
    names = [k for k, _ in query(rec.last)]
    assert "ns" not in names and "partition" not in names and "dc" not in names
    cfg = AgentConfig(namespace="team", partition="p1", datacenter="dc2")
    async with make_client(rec, cfg) as client:
        await client.health_connect("web")
    params = dict(query(rec.last))
    assert (params["ns"], params["partition"], params["dc"]) == ("team", "p1", "dc2")


async def test_health_connect_builds_consul_query() -> None:
    rec = Recorder(
        body=[{"Node": {}, "Service": {}, "Checks": []}], headers={"X-Consul-Index": "7"}
    )
    async with make_client(rec) as client:
        entries, meta = await client.health_connect(
            "web", dc="dc3", filter='Service.Meta.v == "1"', index=6, wait=5.0, near="_agent"
        )
    assert len(entries) == 1 and meta.index == 7
    req = rec.last
    assert req.url.path == "/v1/health/connect/web"
    assert query(req) == [
        ("dc", "dc3"),
        ("passing", ""),
        ("stale", ""),
        ("near", "_agent"),
        ("filter", 'Service.Meta.v == "1"'),
        ("index", "6"),
        ("wait", "5000ms"),
    ]
    # Flag parameters are sent as "key=" (the server only checks presence).
    assert b"passing=&stale=" in req.url.query


async def test_health_service_without_passing_or_stale() -> None:
    rec = Recorder(body=[])
    async with make_client(rec) as client:
        await client.health_service("db", passing=False, stale=False, tags=["v1", "v2"])
    assert rec.last.url.path == "/v1/health/service/db"
    assert query(rec.last) == [("tag", "v1"), ("tag", "v2")]


async def test_catalog_connect_path() -> None:
    rec = Recorder(body=[])
    async with make_client(rec) as client:
        await client.catalog_connect("db")
    assert rec.last.url.path == "/v1/catalog/connect/db"
    assert ("passing", "") not in query(rec.last)


async def test_service_names_are_escaped_in_paths() -> None:
    rec = Recorder(body={})
    async with make_client(rec) as client:
        await client.leaf_cert("we b/../x")
    assert rec.last.url.raw_path == b"/v1/agent/connect/ca/leaf/we%20b%2F..%2Fx"


async def test_intention_match_returns_the_list_for_the_name() -> None:
    body = {"db": [{"SourceName": "web", "Action": "allow", "Precedence": 9}]}
    rec = Recorder(body=body, headers={"X-Consul-Index": "31"})
    async with make_client(rec) as client:
        entries, meta = await client.intention_match_destination("db", index=30, wait=1.0)
    assert entries == body["db"]
    assert meta.index == 31
    assert rec.last.url.path == "/v1/connect/intentions/match"
    assert query(rec.last)[:2] == [("by", "destination"), ("name", "db")]


async def test_authorize_posts_json_body() -> None:
    rec = Recorder(body={"Authorized": True, "Reason": "ok"})
    async with make_client(rec) as client:
        data, _ = await client.authorize("db", "spiffe://td/ns/default/dc/dc1/svc/web", "0b")
    req = rec.last
    assert req.method == "POST"
    assert req.url.path == "/v1/agent/connect/authorize"
    assert req.headers["Content-Type"] == "application/json"
    assert json.loads(req.content) == {
        "Target": "db",
        "ClientCertURI": "spiffe://td/ns/default/dc/dc1/svc/web",
        "ClientCertSerial": "0b",
    }
    assert data["Authorized"] is True


async def test_authorize_without_boolean_answer_is_a_response_error() -> None:
    rec = Recorder(body={"Reason": "?"})
    async with make_client(rec) as client:
        with pytest.raises(AgentResponseError):
            await client.authorize("db", "spiffe://x", "01")


async def test_register_and_deregister_service() -> None:
    rec = Recorder(text="")
    definition = {"Name": "web", "Port": 8443, "Connect": {"Native": True}}
    async with make_client(rec) as client:
        await client.register_service(definition, replace_existing_checks=True)
        reg = rec.last
        await client.deregister_service("web-1")
        dereg = rec.last
    assert reg.method == "PUT" and reg.url.path == "/v1/agent/service/register"
    assert query(reg) == [("replace-existing-checks", "true")]
    assert json.loads(reg.content) == definition
    assert reg.headers["Content-Type"] == "application/json"
    assert dereg.method == "PUT" and dereg.url.path == "/v1/agent/service/deregister/web-1"
    assert dereg.content == b""
    assert "Content-Type" not in dereg.headers


async def test_update_ttl_check_body() -> None:
    rec = Recorder(text="")
    async with make_client(rec) as client:
        await client.update_ttl_check("service:web-1", "warning", "slow")
    assert rec.last.url.raw_path == b"/v1/agent/check/update/service:web-1"
    assert json.loads(rec.last.content) == {"Status": "warning", "Output": "slow"}


async def test_agent_service_hash_blocking() -> None:
    rec = Recorder(body={"ID": "web-1"}, headers={"X-Consul-ContentHash": "abc123"})
    async with make_client(rec) as client:
        data, meta = await client.agent_service("web-1", hash="old", wait=10.0)
    assert data == {"ID": "web-1"}
    assert meta.content_hash == "abc123"
    assert query(rec.last) == [("hash", "old"), ("wait", "10000ms")]
    assert rec.last.extensions["timeout"]["read"] > 10.0


async def test_intention_exact_crud() -> None:
    rec = Recorder(text="true")
    async with make_client(rec) as client:
        assert await client.upsert_intention_exact("web", "db", {"Action": "allow"}) is True
        put = rec.last
        assert await client.delete_intention_exact("web", "db") is True
        delete = rec.last
    assert put.method == "PUT" and put.url.path == "/v1/connect/intentions/exact"
    assert query(put) == [("source", "web"), ("destination", "db")]
    assert json.loads(put.content) == {"Action": "allow"}
    assert delete.method == "DELETE"


async def test_intention_check_and_list() -> None:
    async with make_client(Recorder(body={"Allowed": False})) as client:
        assert await client.intention_check("web", "db") is False
    rec = Recorder(body=[{"SourceName": "web"}], headers={"X-Consul-Index": "4"})
    async with make_client(rec) as client:
        items, meta = await client.list_intentions()
    assert items == [{"SourceName": "web"}] and meta.index == 4


async def test_ca_configuration_get_and_set() -> None:
    rec = Recorder(body={"Provider": "consul", "Config": {}})
    async with make_client(rec) as client:
        cfg, _ = await client.connect_ca_config()
        rec.text = ""
        await client.set_connect_ca_config(
            {"Provider": "consul", "Config": {"PrivateKeyBits": 384}}
        )
    assert cfg["Provider"] == "consul"
    assert rec.last.method == "PUT" and rec.last.url.path == "/v1/connect/ca/configuration"


async def test_prepared_query_execute_with_connect() -> None:
    rec = Recorder(body={"Service": "web", "Nodes": []})
    async with make_client(rec) as client:
        data, _ = await client.prepared_query_execute("web-query")
    assert rec.last.url.path == "/v1/query/web-query/execute"
    assert query(rec.last) == [("connect", "true")]
    assert data["Nodes"] == []


async def test_acl_token_self_and_status_leader() -> None:
    async with make_client(Recorder(body={"AccessorID": "a"})) as client:
        data, _ = await client.acl_token_self()
    assert data == {"AccessorID": "a"}
    async with make_client(Recorder(body="10.0.0.5:8300")) as client:
        leader, _ = await client.status_leader()
    assert leader == "10.0.0.5:8300"


async def test_path_prefix_is_prepended() -> None:
    rec = Recorder(body={})
    cfg = AgentConfig.from_address("http://proxy:8080/consul")
    async with make_client(rec, cfg) as client:
        await client.agent_self()
    assert str(rec.last.url) == "http://proxy:8080/consul/v1/agent/self"


async def test_tls_server_name_is_sent_as_sni_extension() -> None:
    rec = Recorder(body={})
    cfg = AgentConfig(address="10.0.0.1:8501", scheme="https", tls_server_name="consul.local")
    async with make_client(rec, cfg) as client:
        await client.agent_self()
    assert rec.last.extensions["sni_hostname"] == "consul.local"


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = AgentConfig(scheme="https", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError):
        AgentClient(cfg)


async def test_real_transport_builds_for_https_and_unix_socket(tmp_path: Path) -> None:
    https = AgentClient(AgentConfig(scheme="https", verify=False))
    await https.aclose()
    unix = AgentClient(AgentConfig.from_address(f"unix://{tmp_path}/agent.sock"))
    with pytest.raises(AgentUnavailableError):
        await unix.agent_self()  # nothing listens on the socket
    await unix.aclose()


# -- QueryMeta ----------------------------------------------------------------


def test_query_meta_reads_consul_headers() -> None:
    meta = QueryMeta.from_headers(
        httpx.Headers(
            {
                "X-Consul-Index": "12",
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Cache": "MISS",
                "Age": "3",
            }
        )
    )
    assert meta == QueryMeta(index=12, known_leader=True, last_contact_ms=0, cache="MISS", age=3)


def test_query_meta_defaults_when_headers_absent_or_garbled() -> None:
    meta = QueryMeta.from_headers(httpx.Headers({"X-Consul-Index": "x", "Age": "old"}))
    assert meta == QueryMeta()


# -- error mapping ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, AgentResponseError),
        (404, AgentNotFoundError),
        (405, AgentResponseError),
        (429, AgentRateLimitedError),
        (500, AgentUnavailableError),
        (503, AgentUnavailableError),
    ],
)
async def test_status_codes_map_to_error_tree(status: int, error: type[Exception]) -> None:
    rec = Recorder(status, text="some reason\n")
    async with make_client(rec) as client:
        with pytest.raises(error) as info:
            await client.ca_roots()
    assert isinstance(info.value, AgentResponseError | AgentUnavailableError)
    assert info.value.status == status
    assert info.value.body == "some reason"
    assert "some reason" in str(info.value)


async def test_not_found_is_also_a_response_error() -> None:
    rec = Recorder(404, text='Unknown service ID "x"')
    async with make_client(rec) as client:
        with pytest.raises(AgentResponseError):
            await client.deregister_service("x")


async def test_permission_error_names_the_missing_right() -> None:
    body = (
        "Permission denied: token with AccessorID 'a1b2' lacks permission "
        "'service:write' on \"web\""
    )
    async with make_client(Recorder(403, text=body)) as client:
        with pytest.raises(AgentPermissionError) as info:
            await client.leaf_cert("web")
    err = info.value
    assert isinstance(err, PermissionError)
    assert err.status == 403 and err.body == body
    assert "service:write" in str(err) and '"web"' in str(err)
    assert "/v1/agent/connect/ca/leaf/web" in str(err)


def test_permission_error_for_global_resource_and_unknown_token() -> None:
    err = error_for_status(
        "GET",
        "/v1/connect/ca/configuration",
        403,
        "Permission denied: token with AccessorID 'x' lacks permission 'operator:write'",
    )
    assert isinstance(err, AgentPermissionError)
    assert "'operator:write'" in str(err) and " on " not in str(err).split("'operator:write'")[1]
    unknown = error_for_status("GET", "/v1/agent/self", 403, "ACL not found")
    assert "not known" in str(unknown)
    blocked = error_for_status("GET", "/v1/agent/self", 403, "Endpoint is blocked by agent")
    assert isinstance(blocked, AgentPermissionError) and "blocked" in str(blocked)


def test_a_filter_consul_cannot_compile_is_not_retryable() -> None:
    body = 'Failed to create boolean expression evaluator: Selector "Nope" is not valid'
    err = error_for_status("GET", "/v1/health/connect/db", 500, body)
    assert isinstance(err, AgentRequestError) and not isinstance(err, AgentUnavailableError)
    assert isinstance(err, AgentResponseError)
    assert "rejected the filter" in str(err) and err.status == 500
    other = error_for_status("GET", "/v1/health/connect/db", 500, "rpc error: leader lost")
    assert isinstance(other, AgentUnavailableError)


async def test_bad_json_is_a_response_error() -> None:
    async with make_client(Recorder(200, text="{not json")) as client:
        with pytest.raises(AgentResponseError) as info:
            await client.ca_roots()
    assert info.value.status == 200 and info.value.body == "{not json"


async def test_wrong_json_shape_is_a_response_error() -> None:
    async with make_client(Recorder(200, body={"not": "a list"})) as client:
        with pytest.raises(AgentResponseError):
            await client.health_connect("web")


async def test_connection_refused_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with make_client(refuse) as client:
        with pytest.raises(AgentUnavailableError) as info:
            await client.agent_self()
    assert info.value.status is None
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert "connection refused" in str(info.value)


async def test_timeout_is_unavailable() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with make_client(slow) as client:
        with pytest.raises(AgentUnavailableError, match="did not answer in time"):
            await client.ca_roots(index=3, wait=1.0)


async def test_unreachable_real_port_is_unavailable() -> None:
    # Port 9 on loopback (discard) is closed on test hosts: connect is refused.
    cfg = AgentConfig(address="127.0.0.1:9")
    async with AgentClient(cfg, timeout=2.0) as client:
        with pytest.raises(AgentUnavailableError):
            await client.agent_self()


async def test_unix_socket_agent_is_reached_over_the_socket() -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        body = b'{"Config": {"Datacenter": "dc1"}}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"X-Consul-Index: 5\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        path = os.path.join(directory, "a.sock")
        server = await asyncio.start_unix_server(serve, path=path)
        try:
            async with AgentClient(AgentConfig.from_address(f"unix://{path}")) as client:
                data, meta = await client.agent_self()
        finally:
            server.close()
            await server.wait_closed()
    assert data["Config"]["Datacenter"] == "dc1"
    assert meta.index == 5
    assert seen[0].startswith(b"GET /v1/agent/self HTTP/1.1\r\n")
