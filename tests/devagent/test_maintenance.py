"""Maintenance mode on the dev agent, as Consul's agent endpoints: a critical check named
``_service_maintenance:<id>`` (or ``_node_maintenance``) takes instances out of queries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent
from tests.conftest import client_for

WEB_1 = {"Name": "web", "ID": "web-1", "Port": 8443, "Connect": {"Native": True}}
WEB_2 = {**WEB_1, "ID": "web-2", "Port": 8444}
DEFAULT_SERVICE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. "
    "This is a default message."
)


def passing_ids(http: httpx.Client) -> list[str]:
    entries = http.get("/v1/health/connect/web", params={"passing": "1"}).json()
    return sorted(e["Service"]["ID"] for e in entries)


def checks(http: httpx.Client) -> dict[str, Any]:
    found: dict[str, Any] = http.get("/v1/agent/checks").json()
    return found


@pytest.fixture
def two_instances(http: httpx.Client) -> httpx.Client:
    for body in (WEB_1, WEB_2):
        assert http.put("/v1/agent/service/register", json=body).is_success
    assert passing_ids(http) == ["web-1", "web-2"]
    return http


def test_an_instance_in_maintenance_leaves_discovery_until_it_is_disabled(
    two_instances: httpx.Client,
) -> None:
    http = two_instances
    r = http.put(
        "/v1/agent/service/maintenance/web-1", params={"enable": "true", "reason": "deploying"}
    )
    assert r.status_code == 200
    check = checks(http)["_service_maintenance:web-1"]
    fields = ("Name", "Status", "Notes", "ServiceID", "ServiceName", "Type")
    assert {k: check[k] for k in fields} == {
        "Name": "Service Maintenance Mode",
        "Status": "critical",
        "Notes": "deploying",
        "ServiceID": "web-1",
        "ServiceName": "web",
        "Type": "maintenance",
    }
    assert passing_ids(http) == ["web-2"]
    agent_view = http.get("/v1/agent/health/service/id/web-1")
    assert agent_view.status_code == 503
    assert agent_view.json()["AggregatedStatus"] == "maintenance"

    assert http.put("/v1/agent/service/maintenance/web-1", params={"enable": "false"}).is_success
    assert "_service_maintenance:web-1" not in checks(http)
    assert passing_ids(http) == ["web-1", "web-2"]


def test_enabling_twice_keeps_the_first_reason_and_moves_no_index(
    two_instances: httpx.Client,
) -> None:
    http = two_instances
    assert http.put("/v1/agent/service/maintenance/web-1", params={"enable": "1"}).is_success
    assert checks(http)["_service_maintenance:web-1"]["Notes"] == DEFAULT_SERVICE_REASON
    index = http.get("/v1/health/connect/web").headers["X-Consul-Index"]
    again = http.put(
        "/v1/agent/service/maintenance/web-1", params={"enable": "T", "reason": "other"}
    )
    assert again.is_success
    assert checks(http)["_service_maintenance:web-1"]["Notes"] == DEFAULT_SERVICE_REASON
    assert http.get("/v1/health/connect/web").headers["X-Consul-Index"] == index
    # Disabling an instance that is not in maintenance is not an error either.
    assert http.put("/v1/agent/service/maintenance/web-2", params={"enable": "0"}).is_success


def test_deregistering_an_instance_ends_its_maintenance(two_instances: httpx.Client) -> None:
    http = two_instances
    assert http.put("/v1/agent/service/maintenance/web-1", params={"enable": "true"}).is_success
    assert http.put("/v1/agent/service/deregister/web-1").is_success
    assert "_service_maintenance:web-1" not in checks(http)


@pytest.mark.parametrize(
    ("path", "params", "status", "text"),
    [
        ("/v1/agent/service/maintenance/web-1", {}, 400, "Missing value for enable"),
        (
            "/v1/agent/service/maintenance/web-1",
            {"enable": "yes"},
            400,
            'Invalid value for enable: "yes"',
        ),
        ("/v1/agent/service/maintenance/", {"enable": "true"}, 400, "Missing service ID"),
        (
            "/v1/agent/service/maintenance/nope",
            {"enable": "true"},
            404,
            'Unknown service ID "nope". Ensure that the service ID is passed, '
            "not the service name.",
        ),
        ("/v1/agent/maintenance", {"enable": ""}, 400, 'Invalid value for enable: ""'),
    ],
)
def test_bad_maintenance_requests_get_consuls_answers(
    two_instances: httpx.Client, path: str, params: dict[str, str], status: int, text: str
) -> None:
    r = two_instances.put(path, params=params)
    assert (r.status_code, r.text) == (status, text)
    assert two_instances.get(path, params={"enable": "true"}).status_code == 405


def test_node_maintenance_takes_every_instance_on_the_node_out(
    two_instances: httpx.Client,
) -> None:
    http = two_instances
    assert http.put("/v1/agent/maintenance", params={"enable": "true"}).is_success
    check = checks(http)["_node_maintenance"]
    assert check["Name"] == "Node Maintenance Mode" and check["ServiceID"] == ""
    assert check["Notes"].startswith("Maintenance mode is enabled for this node")
    assert passing_ids(http) == []
    assert http.put("/v1/agent/maintenance", params={"enable": "false"}).is_success
    assert passing_ids(http) == ["web-1", "web-2"]


def test_maintenance_needs_write_rights(start_agent: Callable[..., DevAgent]) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    with client_for(agent, "root") as root:
        assert root.put("/v1/agent/service/register", json=WEB_1).is_success
        token = root.put("/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": "api"}]})
        other = token.json()["SecretID"]
        token = root.put("/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": "web"}]})
        web = token.json()["SecretID"]
    with client_for(agent, other) as api:
        r = api.put("/v1/agent/service/maintenance/web-1", params={"enable": "true"})
        assert r.status_code == 403 and "service:write" in r.text
    with client_for(agent, web) as owner:
        r = owner.put("/v1/agent/service/maintenance/web-1", params={"enable": "true"})
        assert r.status_code == 200
        # A service identity has no node:write.
        r = owner.put("/v1/agent/maintenance", params={"enable": "true"})
        assert r.status_code == 403 and "node:write" in r.text
