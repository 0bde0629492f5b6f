"""Registration and TTL checks as Consul does them, and a registration that is never lost.

Each test cites the Consul source it pins (hashicorp/consul, ``agent/`` and ``agent/structs/``).
All traffic is real HTTP to a dev agent on 127.0.0.1; the library's traffic may pass through
:class:`StallingTransport`, which holds chosen requests until the caller gives up on them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from consul_connect.agent.client import AgentClient
from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.registration import Registration

UPDATE_PATH = "/v1/agent/check/update/"


async def until(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


class StallingTransport(httpx.AsyncBaseTransport):
    """Forwards to the dev agent, but holds the next ``hang`` TTL updates forever.

    A held request ends only when the client cancels it (its timeout), like an agent
    that accepted the connection and never answered.
    """

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.hang = 0
        self.hung = 0
        self._never = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and request.url.path.startswith(UPDATE_PATH) and self.hang:
            self.hang -= 1
            self.hung += 1
            await self._never.wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def client_via(agent: DevAgent, transport: httpx.AsyncBaseTransport | None) -> AgentClient:
    return AgentClient(AgentConfig.from_address(agent.address), timeout=5, transport=transport)


# -- the dev agent's answers ---------------------------------------------------------------


def test_an_empty_object_in_checks_is_an_invalid_check(http: httpx.Client) -> None:
    # agent/structs/service_definition.go, ServiceDefinition.CheckTypes: an empty ``Check`` is
    # skipped (``if !s.Check.Empty()``) but every ``Checks`` entry goes through
    # CheckType.Validate, whose "TTL must be > 0 for TTL checks" AgentRegisterService answers
    # as 400 "Invalid check: ..." (agent/agent_endpoint.go).
    body: dict[str, Any] = {"Name": "web", "Port": 8443, "Checks": [{"TTL": "10s"}, {}]}
    r = http.put("/v1/agent/service/register", json=body)
    assert (r.status_code, r.text) == (400, "Invalid check: TTL must be > 0 for TTL checks")
    assert http.get("/v1/agent/services").json() == {}

    # Validation comes before the status check.
    body["Checks"] = [{"TTL": "10s", "Status": "up"}, {}]
    r = http.put("/v1/agent/service/register", json=body)
    assert (r.status_code, r.text) == (400, "Invalid check: TTL must be > 0 for TTL checks")

    r = http.put("/v1/agent/service/register", json={"Name": "web", "Port": 8443, "Check": {}})
    assert r.status_code == 200
    assert http.get("/v1/agent/checks").json() == {}


def test_output_max_size_can_only_lower_the_agents_limit(http: httpx.Client) -> None:
    # agent/agent.go, addCheck: maxOutputSize is the agent's check_output_max_size (default
    # checks.DefaultBufSize = 4096); chkType.OutputMaxSize replaces it only when smaller.
    # CheckTTL.SetStatus (agent/checks/check.go) truncates to it.
    body = {
        "Name": "web",
        "Port": 8443,
        "Check": {"CheckID": "big", "TTL": "30s", "OutputMaxSize": 8192},
    }
    assert http.put("/v1/agent/service/register", json=body).status_code == 200
    output = "x" * 5000
    r = http.put("/v1/agent/check/update/big", json={"Status": "passing", "Output": output})
    assert r.status_code == 200
    got = http.get("/v1/agent/checks").json()["big"]["Output"]
    assert got == "x" * 4096 + " ... (captured 4096 of 5000 bytes)"

    check = {"ID": "node-big", "Name": "n", "TTL": "30s", "OutputMaxSize": 100000}
    assert http.put("/v1/agent/check/register", json=check).status_code == 200
    http.put("/v1/agent/check/update/node-big", json={"Status": "passing", "Output": output})
    got = http.get("/v1/agent/checks").json()["node-big"]["Output"]
    assert got.endswith(" ... (captured 4096 of 5000 bytes)")


# -- the library keeps its registration ----------------------------------------------------


async def test_one_hung_heartbeat_does_not_let_the_ttl_run_out(agent: DevAgent) -> None:
    # agent/checks/check.go, CheckTTL: the check turns critical ("TTL expired") when no update
    # arrives within TTL of the last one. A heartbeat that hangs until ``timeout`` must be
    # retried soon, not a full interval after it gave up (same ttl:timeout ratio as the
    # defaults, 15 s : 5 s).
    transport = StallingTransport()
    errors: list[BaseException] = []
    statuses: list[str] = []
    async with (
        client_via(agent, transport) as client,
        httpx.AsyncClient(base_url=agent.http_addr, timeout=30) as watcher,
    ):
        reg = Registration(
            client, name="web", port=8443, ttl=1.5, timeout=0.5, on_error=errors.append
        )

        async def watch() -> None:
            index = "0"
            while True:
                r = await watcher.get(
                    "/v1/health/checks/web", params={"index": index, "wait": "5s"}
                )
                index = r.headers["X-Consul-Index"]
                statuses.extend(c["Status"] for c in r.json() if c["CheckID"] == reg.check_id)

        await reg.start()
        watching = asyncio.create_task(watch())
        try:

            async def beaten(n: int) -> bool:
                return reg.heartbeats >= n

            await until(lambda: beaten(1))
            transport.hang = 1
            before = reg.heartbeats
            await until(lambda: beaten(before + 3))
            assert transport.hung == 1
            assert any(isinstance(e, TimeoutError) for e in errors)
            assert "critical" not in statuses
            assert statuses[-1] == "passing"
        finally:
            watching.cancel()
            await reg.aclose()


async def test_a_start_that_fails_after_registering_leaves_nothing_behind(
    agent: DevAgent,
) -> None:
    # The register request succeeded (AgentRegisterService stored the service), then the
    # status update timed out: start() raises, and no service with a TTL check nobody will
    # ever pass may stay on the agent.
    transport = StallingTransport()
    transport.hang = 1
    async with client_via(agent, transport) as client:
        reg = Registration(
            client, name="web", port=8443, ttl=30, timeout=0.3, healthy=lambda: (True, "ready")
        )
        with pytest.raises(TimeoutError):
            await reg.start()
        assert transport.hung == 1
        async with httpx.AsyncClient(base_url=agent.http_addr, timeout=30) as operator:
            assert (await operator.get("/v1/agent/services")).json() == {}
        await reg.aclose()


async def test_start_sets_the_status_of_a_check_the_agent_already_holds(agent: DevAgent) -> None:
    # agent/agent.go, addServiceInternal: a check that already exists keeps its Status and
    # Output ("Restore the fields from the snapshot"), whatever ``Status`` the new definition
    # gives. A previous instance's expired check must not stay critical until the first beat.
    async with client_via(agent, None) as client:
        reg = Registration(client, name="web", port=8443, ttl=60)
        await client.register_service(reg.definition("critical"))
        await reg.start()
        try:
            checks, _ = await client.agent_checks()
            assert checks[reg.check_id]["Status"] == "passing"
        finally:
            await reg.aclose()


async def test_a_check_the_agent_no_longer_times_is_registered_again(agent: DevAgent) -> None:
    # agent/agent.go, updateTTLCheck: a check ID without a TTL timer is a plain error, 500
    # 'CheckID "<id>" does not have associated TTL'. Agents from before the 404 for unknown
    # check IDs (vetCheckUpdate returned early with ACLs off, agent/acl.go) answer exactly
    # that for a check they forgot, e.g. after a restart: the heartbeat must register again.
    errors: list[BaseException] = []
    async with client_via(agent, None) as client:
        reg = Registration(client, name="web", port=8443, ttl=0.6, on_error=errors.append)
        await reg.start()
        try:
            replacement = {
                "ID": reg.check_id,
                "Name": "not a TTL check",
                "ServiceID": reg.service_id,
                "TCP": "127.0.0.1:1",
                "Interval": "10s",
            }
            async with httpx.AsyncClient(base_url=agent.http_addr, timeout=30) as operator:
                r = await operator.put("/v1/agent/check/register", json=replacement)
                assert r.status_code == 200

            async def ttl_again() -> bool:
                checks, _ = await client.agent_checks()
                check = checks.get(reg.check_id, {})
                return bool(check.get("Type") == "ttl" and check.get("Status") == "passing")

            await until(ttl_again)
            assert reg.registrations == 2
        finally:
            await reg.aclose()
