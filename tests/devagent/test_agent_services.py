"""Agent service registration, checks and TTL behaviour of the dev agent, over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent


def register(http: httpx.Client, body: dict[str, Any], **params: str) -> httpx.Response:
    return http.put("/v1/agent/service/register", json=body, params=params)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


NATIVE = {"Name": "web", "ID": "web-1", "Port": 8443, "Connect": {"Native": True}}


@pytest.fixture(scope="module")
def empty_agent_http() -> Iterator[httpx.Client]:
    """One agent shared by tests whose requests must all fail (so it stays empty)."""
    with DevAgent() as a, httpx.Client(base_url=a.http_addr, timeout=30) as c:
        yield c


# -- registration ------------------------------------------------------------------------------


def test_register_answers_empty_200_and_lists_the_service(http: httpx.Client) -> None:
    r = register(http, {**NATIVE, "Tags": ["v1"], "Meta": {"version": "1"}})
    assert r.status_code == 200
    assert r.content == b""
    svc = http.get("/v1/agent/services").json()["web-1"]
    assert svc["Service"] == "web"
    assert svc["Tags"] == ["v1"]
    assert svc["Meta"] == {"version": "1"}
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    assert svc["Connect"] == {"Native": True}
    assert svc["Datacenter"] == "dc1"
    assert "Proxy" not in svc and "Kind" not in svc


def test_id_defaults_to_name_and_keys_are_case_insensitive(http: httpx.Client) -> None:
    body = {"name": "api", "port": 9000, "tags": ["a"], "enable_tag_override": True}
    assert register(http, body).status_code == 200
    svc = http.get("/v1/agent/service/api").json()
    assert svc["ID"] == "api"
    assert svc["Port"] == 9000
    assert svc["EnableTagOverride"] is True


def test_ip_address_adds_default_tagged_addresses(http: httpx.Client) -> None:
    register(http, {"Name": "db", "Address": "10.1.2.3", "Port": 5432})
    tagged = http.get("/v1/agent/service/db").json()["TaggedAddresses"]
    assert tagged == {
        "lan_ipv4": {"Address": "10.1.2.3", "Port": 5432},
        "wan_ipv4": {"Address": "10.1.2.3", "Port": 5432},
    }


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"Port": 1}, 400, "Missing service name"),
        ({"Name": "x", "Address": "0.0.0.0"}, 400, "Invalid service address"),
        (
            {"Name": "x", "Weights": {"Passing": 0, "Warning": 1}},
            400,
            "Invalid Weights: Passing must be greater than 0",
        ),
        (
            {"Name": "x", "Meta": {"consul-x": "1"}},
            400,
            "Invalid Service Meta: Couldn't load metadata pair ('consul-x', '1'): "
            "Key prefix 'consul-' is reserved for internal use",
        ),
        (
            {"Name": "x", "Connect": {"Native": True}},
            400,
            "Validation failed: 1 error occurred:\n"
            "\t* Port or SocketPath must be set for a Connect native service.\n\n",
        ),
        (
            {"Name": "p", "Kind": "connect-proxy", "Port": 1},
            400,
            "Validation failed: 1 error occurred:\n\t* Proxy.DestinationServiceName must be "
            "non-empty for Connect proxy services\n\n",
        ),
        (
            {
                "Name": "p",
                "Kind": "connect-proxy",
                "Port": 1,
                "Proxy": {"DestinationServiceName": "web"},
                "Connect": {"Native": True},
            },
            400,
            "Validation failed: 1 error occurred:\n"
            "\t* A Proxy cannot also be Connect Native, only typical services\n\n",
        ),
        (
            {"Name": "x", "Check": {"HTTP": "http://127.0.0.1/"}},
            400,
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP "
            "or OSService checks",
        ),
        (
            {"Name": "x", "Check": {"TTL": "5s", "Interval": "5s"}},
            400,
            "Invalid check: Interval and TTL cannot both be specified",
        ),
        (
            {"Name": "x", "Checks": [{"Name": "c"}]},
            400,
            "Invalid check: TTL must be > 0 for TTL checks",
        ),
        (
            {"Name": "x", "Check": {"TTL": "5s", "Status": "bogus"}},
            400,
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
        (
            {"Name": "x", "Check": {"TTL": "five"}},
            400,
            'Request decode failed: time: invalid duration "five"',
        ),
        (
            {"Name": "x", "Port": "80"},
            400,
            "Request decode failed: json: cannot unmarshal string into Go struct field "
            "ServiceDefinition.Port of type int",
        ),
        (
            {"Name": "x", "Port": 1, "Connect": {"SidecarService": {"ID": "nope"}}},
            400,
            "Validation failed: 1 error occurred:\n\t* A SidecarService cannot specify an ID "
            "as this is managed by the agent\n\n",
        ),
    ],
)
def test_invalid_registration_is_rejected_with_consul_text_and_changes_nothing(
    empty_agent_http: httpx.Client, body: dict[str, Any], status: int, text: str
) -> None:
    http = empty_agent_http
    r = register(http, body)
    assert (r.status_code, r.text) == (status, text)
    assert http.get("/v1/agent/services").json() == {}
    assert http.get("/v1/agent/checks").json() == {}


def test_bad_json_body_is_a_decode_error(http: httpx.Client) -> None:
    r = http.put("/v1/agent/service/register", content=b"{nope")
    assert r.status_code == 400
    assert r.text.startswith("Request decode failed: ")
    assert http.get("/v1/agent/services").json() == {}


def test_enterprise_namespace_is_refused(http: httpx.Client) -> None:
    r = http.put("/v1/agent/service/register", json=NATIVE, params={"ns": "default"})
    assert r.status_code == 400
    assert "Namespaces are a Consul Enterprise feature" in r.text


def test_connect_proxy_registration_keeps_proxy_config(http: httpx.Client) -> None:
    body = {
        "Name": "web-proxy",
        "Kind": "connect-proxy",
        "Port": 21000,
        "Proxy": {
            "destination_service_name": "web",
            "DestinationServiceID": "web-1",
            "LocalServicePort": 8080,
            "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
            "Config": {"protocol": "http"},
        },
    }
    assert register(http, body).status_code == 200
    svc = http.get("/v1/agent/service/web-proxy").json()
    assert svc["Kind"] == "connect-proxy"
    proxy = svc["Proxy"]
    assert proxy["DestinationServiceName"] == "web"
    assert proxy["DestinationServiceID"] == "web-1"
    assert proxy["LocalServicePort"] == 8080
    assert proxy["Config"] == {"protocol": "http"}
    assert proxy["Upstreams"][0]["DestinationName"] == "db"
    assert proxy["Upstreams"][0]["LocalBindPort"] == 9191


def test_sidecar_service_registers_a_proxy_and_goes_with_its_parent(http: httpx.Client) -> None:
    assert (
        register(http, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}}).status_code
        == 200
    )
    services = http.get("/v1/agent/services").json()
    sidecar = services["web-sidecar-proxy"]
    assert sidecar["Service"] == "web-sidecar-proxy"
    assert sidecar["Kind"] == "connect-proxy"
    assert sidecar["Port"] == 21000
    assert sidecar["Proxy"]["DestinationServiceName"] == "web"
    assert sidecar["Proxy"]["LocalServiceAddress"] == "127.0.0.1"
    assert sidecar["Proxy"]["LocalServicePort"] == 8080
    assert http.put("/v1/agent/service/deregister/web").status_code == 200
    assert http.get("/v1/agent/services").json() == {}


def test_deregister_removes_service_and_checks(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "30s"}})
    r = http.put("/v1/agent/service/deregister/web-1")
    assert (r.status_code, r.content) == (200, b"")
    assert http.get("/v1/agent/services").json() == {}
    assert http.get("/v1/agent/checks").json() == {}


def test_deregister_unknown_id_is_404_with_consul_text(http: httpx.Client) -> None:
    r = http.put("/v1/agent/service/deregister/web")
    assert r.status_code == 404
    assert (
        r.text
        == 'Unknown service ID "web". Ensure that the service ID is passed, not the service name.'
    )


def test_deregister_needs_put(http: httpx.Client) -> None:
    r = http.get("/v1/agent/service/deregister/web")
    assert r.status_code == 405


def test_services_filter_and_bad_filter(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Meta": {"version": "2"}})
    register(http, {"Name": "api", "Port": 1})
    assert list(
        http.get("/v1/agent/services", params={"filter": 'Meta.version == "2"'}).json()
    ) == ["web-1"]
    assert list(
        http.get("/v1/agent/services", params={"filter": "Connect.Native != true"}).json()
    ) == ["api"]
    r = http.get("/v1/agent/services", params={"filter": "Service =="})
    assert r.status_code == 500
    assert r.text.startswith("Failed to create boolean expression evaluator")


# -- single service and hash blocking --------------------------------------------------------------


def test_unknown_service_read_is_404(http: httpx.Client) -> None:
    r = http.get("/v1/agent/service/nope")
    assert (r.status_code, r.text) == (404, "unknown service ID: nope")


def test_service_read_carries_content_hash(http: httpx.Client) -> None:
    register(http, NATIVE)
    r = http.get("/v1/agent/service/web-1")
    assert r.headers["X-Consul-ContentHash"] == r.json()["ContentHash"]
    assert "X-Consul-Index" not in r.headers
    again = http.get("/v1/agent/service/web-1")
    assert again.headers["X-Consul-ContentHash"] == r.headers["X-Consul-ContentHash"]


def test_hash_blocking_times_out_with_the_same_hash(http: httpx.Client) -> None:
    register(http, NATIVE)
    h = http.get("/v1/agent/service/web-1").headers["X-Consul-ContentHash"]
    start = time.monotonic()
    r = http.get("/v1/agent/service/web-1", params={"hash": h, "wait": "300ms"})
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert r.headers["X-Consul-ContentHash"] == h
    assert 0.25 <= elapsed < 3


def test_hash_blocking_returns_when_the_service_changes(
    agent: DevAgent, http: httpx.Client
) -> None:
    import threading

    register(http, NATIVE)
    h = http.get("/v1/agent/service/web-1").headers["X-Consul-ContentHash"]
    result: dict[str, Any] = {}

    def block() -> None:
        with httpx.Client(base_url=agent.http_addr, timeout=30) as c:
            result["r"] = c.get("/v1/agent/service/web-1", params={"hash": h, "wait": "10s"})

    t = threading.Thread(target=block)
    start = time.monotonic()
    t.start()
    # Whether the change lands before or while the request waits, it must see the new hash.
    register(http, {**NATIVE, "Tags": ["changed"]})
    t.join(10)
    r = result["r"]
    assert time.monotonic() - start < 5
    assert r.headers["X-Consul-ContentHash"] != h
    assert r.json()["Tags"] == ["changed"]


def test_identical_reregistration_keeps_the_hash(http: httpx.Client) -> None:
    register(http, NATIVE)
    h1 = http.get("/v1/agent/service/web-1").headers["X-Consul-ContentHash"]
    register(http, NATIVE)
    assert http.get("/v1/agent/service/web-1").headers["X-Consul-ContentHash"] == h1


# -- checks ---------------------------------------------------------------------------------------


def test_service_checks_get_consul_ids_names_and_start_critical(http: httpx.Client) -> None:
    register(
        http,
        {
            **NATIVE,
            "Checks": [{"TTL": "30s"}, {"TTL": "30s", "Name": "second", "Status": "passing"}],
        },
    )
    checks = http.get("/v1/agent/checks").json()
    assert set(checks) == {"service:web-1:1", "service:web-1:2"}
    first = checks["service:web-1:1"]
    assert first["Name"] == "Service 'web' check"
    assert first["Status"] == "critical"
    assert first["Type"] == "ttl"
    assert first["ServiceID"] == "web-1"
    assert first["ServiceName"] == "web"
    assert first["ServiceTags"] == []
    assert checks["service:web-1:2"]["Status"] == "passing"
    assert checks["service:web-1:2"]["Name"] == "second"


def test_single_check_id_and_serf_health_is_not_an_agent_check(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"CheckID": "web-ttl", "TTL": "30s"}})
    assert list(http.get("/v1/agent/checks").json()) == ["web-ttl"]
    r = http.put("/v1/agent/check/pass/serfHealth")
    assert r.status_code == 404


def test_pass_warn_fail_set_status_and_output(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "30s"}})
    for verb, status in (("pass", "passing"), ("warn", "warning"), ("fail", "critical")):
        r = http.put(f"/v1/agent/check/{verb}/service:web-1", params={"note": f"{verb} note"})
        assert (r.status_code, r.content) == (200, b"")
        check = http.get("/v1/agent/checks").json()["service:web-1"]
        assert check["Status"] == status
        assert check["Output"] == f"{verb} note"
        assert check["Notes"] == ""


def test_check_update_validates_status(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "30s"}})
    r = http.put("/v1/agent/check/update/service:web-1", json={"Status": "bogus"})
    assert (r.status_code, r.text) == (400, "Invalid check status: 'bogus'")
    r = http.put(
        "/v1/agent/check/update/service:web-1", json={"Status": "passing", "Output": "fine"}
    )
    assert r.status_code == 200
    check = http.get("/v1/agent/checks").json()["service:web-1"]
    assert (check["Status"], check["Output"]) == ("passing", "fine")


def test_long_output_is_truncated_like_consul(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "30s"}})
    http.put(
        "/v1/agent/check/update/service:web-1", json={"Status": "passing", "Output": "x" * 5000}
    )
    out = http.get("/v1/agent/checks").json()["service:web-1"]["Output"]
    assert out == "x" * 4096 + " ... (captured 4096 of 5000 bytes)"


def test_unknown_check_update_is_404(http: httpx.Client) -> None:
    r = http.put("/v1/agent/check/pass/nope")
    assert r.status_code == 404
    assert (
        r.text == 'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.'
    )


def test_ttl_update_on_non_ttl_check_is_500(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TCP": "127.0.0.1:1", "Interval": "10s"}})
    r = http.put("/v1/agent/check/pass/service:web-1")
    assert (r.status_code, r.text) == (500, 'CheckID "service:web-1" does not have associated TTL')


def test_check_register_and_deregister(http: httpx.Client) -> None:
    register(http, NATIVE)
    r = http.put(
        "/v1/agent/check/register", json={"name": "mem", "ttl": "30s", "serviceid": "web-1"}
    )
    assert (r.status_code, r.content) == (200, b"")
    check = http.get("/v1/agent/checks").json()["mem"]
    assert check["ServiceID"] == "web-1" and check["Status"] == "critical"
    assert http.put("/v1/agent/check/deregister/mem").status_code == 200
    assert http.get("/v1/agent/checks").json() == {}
    r = http.put("/v1/agent/check/deregister/mem")
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"TTL": "5s"}, 400, "Missing check name"),
        ({"Name": "c", "TTL": "5s", "Status": "nah"}, 400, "Bad check status"),
        ({"Name": "c"}, 400, "Invalid check: TTL must be > 0 for TTL checks"),
        ({"Name": "c", "TTL": "5s", "ServiceID": "ghost"}, 404, 'ServiceID "ghost" does not exist'),
    ],
)
def test_check_register_errors(
    empty_agent_http: httpx.Client, body: dict[str, Any], status: int, text: str
) -> None:
    http = empty_agent_http
    r = http.put("/v1/agent/check/register", json=body)
    assert (r.status_code, r.text) == (status, text)
    assert http.get("/v1/agent/checks").json() == {}


def test_replace_existing_checks_drops_missing_checks(http: httpx.Client) -> None:
    register(
        http, {**NATIVE, "Checks": [{"CheckID": "a", "TTL": "30s"}, {"CheckID": "b", "TTL": "30s"}]}
    )
    register(http, {**NATIVE, "Checks": [{"CheckID": "a", "TTL": "30s"}]})
    assert set(http.get("/v1/agent/checks").json()) == {"a", "b"}
    register(
        http,
        {**NATIVE, "Checks": [{"CheckID": "a", "TTL": "30s"}]},
        **{"replace-existing-checks": "true"},
    )
    assert set(http.get("/v1/agent/checks").json()) == {"a"}


def test_reregistration_keeps_check_status(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "30s"}})
    http.put("/v1/agent/check/pass/service:web-1")
    register(http, {**NATIVE, "Check": {"TTL": "30s"}})
    assert http.get("/v1/agent/checks").json()["service:web-1"]["Status"] == "passing"


def test_ttl_expiry_turns_critical_and_pass_recovers(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "300ms", "Status": "passing"}})
    http.put("/v1/agent/check/pass/service:web-1", params={"note": "alive"})

    def check() -> dict[str, Any]:
        result: dict[str, Any] = http.get("/v1/agent/checks").json()["service:web-1"]
        return result

    wait_for(lambda: check()["Status"] == "critical")
    assert check()["Output"] == "TTL expired (last output before timeout follows): alive"
    http.put("/v1/agent/check/pass/service:web-1")
    assert check()["Status"] == "passing"


def test_ttl_expiry_without_output_says_ttl_expired(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "200ms", "Status": "passing"}})
    wait_for(lambda: http.get("/v1/agent/checks").json()["service:web-1"]["Status"] == "critical")
    assert http.get("/v1/agent/checks").json()["service:web-1"]["Output"] == "TTL expired"


def test_updates_reset_the_ttl_timer(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "600ms", "Status": "passing"}})
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        http.put("/v1/agent/check/pass/service:web-1")
        assert http.get("/v1/agent/checks").json()["service:web-1"]["Status"] == "passing"
        time.sleep(0.1)


def test_deregister_critical_service_after_reaps_the_service(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "30s", "DeregisterCriticalServiceAfter": "300ms"}})
    wait_for(lambda: http.get("/v1/agent/services").json() == {})
    assert http.get("/v1/agent/checks").json() == {}


def test_agent_health_by_id_and_name(http: httpx.Client) -> None:
    register(http, {**NATIVE, "Check": {"TTL": "30s"}})
    r = http.get("/v1/agent/health/service/id/web-1")
    assert r.status_code == 503
    assert r.json()["AggregatedStatus"] == "critical"
    assert r.json()["Service"]["ID"] == "web-1"
    http.put("/v1/agent/check/warn/service:web-1")
    r = http.get("/v1/agent/health/service/name/web", params={"format": "text"})
    assert (r.status_code, r.text) == (429, "warning")
    http.put("/v1/agent/check/pass/service:web-1")
    assert http.get("/v1/agent/health/service/name/web").status_code == 200
    r = http.get("/v1/agent/health/service/id/ghost")
    assert r.status_code == 404
    assert r.json() == {"AggregatedStatus": "critical", "Service": None, "Checks": None}


def test_registrations_survive_a_restart_with_data_dir(
    start_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    first = start_agent(data_dir=str(tmp_path), node_name="node-a")
    with httpx.Client(base_url=first.http_addr, timeout=30) as c:
        assert register(c, {**NATIVE, "Check": {"TTL": "30s"}}).status_code == 200
        c.put("/v1/agent/check/pass/service:web-1", params={"note": "kept"})
    first.stop()
    second = start_agent(data_dir=str(tmp_path), node_name="node-a")
    with httpx.Client(base_url=second.http_addr, timeout=30) as c:
        assert list(c.get("/v1/agent/services").json()) == ["web-1"]
        check = c.get("/v1/agent/checks").json()["service:web-1"]
        assert (check["Status"], check["Output"]) == ("passing", "kept")
        assert [e["Service"]["ID"] for e in c.get("/v1/health/connect/web").json()] == ["web-1"]
