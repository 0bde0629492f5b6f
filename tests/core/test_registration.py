"""Registration: Connect-native service with a heartbeated TTL check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import httpx
import pytest

from consul_connect.agent.client import AgentClient
from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.errors import (
    AgentNotFoundError,
    AgentPermissionError,
    AgentUnavailableError,
    ConfigError,
)
from consul_connect.registration import Registration


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


async def until_async(cond: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


class FakeAgent:
    """An agent that remembers registrations and TTL updates."""

    def __init__(self) -> None:
        self.config = AgentConfig.from_address("127.0.0.1:1")
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, tuple[str, str]] = {}
        self.log: list[tuple[str, ...]] = []
        self.register_error: BaseException | None = None
        self.update_error: BaseException | None = None
        self.deregister_delay = 0.0

    async def register_service(
        self, definition: Mapping[str, Any], *, replace_existing_checks: bool = False
    ) -> None:
        self.log.append(("register", definition["ID"]))
        if self.register_error is not None:
            raise self.register_error
        self.services[definition["ID"]] = dict(definition)
        check = definition["Check"]
        self.checks[check["CheckID"]] = (check["Status"], "")

    async def agent_checks(self, *, filter: str | None = None) -> tuple[dict[str, Any], None]:
        return {}, None

    async def update_ttl_check(self, check_id: str, status: str, output: str = "") -> None:
        self.log.append(("update", check_id, status, output))
        if self.update_error is not None:
            raise self.update_error
        if check_id not in self.checks:
            raise AgentNotFoundError(f'Unknown check ID "{check_id}"', status=404)
        self.checks[check_id] = (status, output)

    async def deregister_service(self, service_id: str) -> None:
        self.log.append(("deregister", service_id))
        await asyncio.sleep(self.deregister_delay)
        if service_id not in self.services:
            raise AgentNotFoundError("Unknown service ID", status=404)
        del self.services[service_id]
        self.checks = {k: v for k, v in self.checks.items() if not k.endswith(service_id)}


def as_client(fake: FakeAgent) -> AgentClient:
    return cast(AgentClient, fake)


def test_definition_is_connect_native_with_a_ttl_check() -> None:
    reg = Registration(
        as_client(FakeAgent()),
        name="web",
        port=8443,
        address="10.0.0.5",
        tags=["v1"],
        meta={"version": "1"},
        ttl=15.0,
        deregister_critical_after=600,
    )
    assert reg.definition() == {
        "ID": "web-8443",
        "Name": "web",
        "Port": 8443,
        "Address": "10.0.0.5",
        "Tags": ["v1"],
        "Meta": {"version": "1"},
        "Connect": {"Native": True},
        "Check": {
            "CheckID": "service:web-8443",
            "Name": "web heartbeat (consul-connect TTL)",
            "TTL": "15s",
            "Status": "passing",
            "DeregisterCriticalServiceAfter": "10m0s",
        },
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "", "port": 1},
        {"name": "web", "port": 0},
        {"name": "web", "port": 70000},
        {"name": "web", "port": 1, "address": "0.0.0.0"},
        {"name": "web", "port": 1, "ttl": 0},
    ],
)
def test_invalid_registrations_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Registration(as_client(FakeAgent()), **kwargs)


async def test_heartbeat_passes_then_warns_with_the_health_note() -> None:
    fake = FakeAgent()
    health: tuple[bool, str] = (True, "")
    reg = Registration(as_client(fake), name="web", port=1, ttl=0.09, healthy=lambda: health)
    await reg.start()
    try:
        assert fake.checks["service:web-1"] == ("passing", "")
        await until(lambda: reg.heartbeats >= 2)
        health = (False, "leaf certificate expires in 5m")
        await until(lambda: fake.checks["service:web-1"][0] == "warning")
        assert fake.checks["service:web-1"][1] == "leaf certificate expires in 5m"
        health = (True, "")
        reg.beat_now()
        await until(lambda: fake.checks["service:web-1"][0] == "passing")
    finally:
        await reg.aclose()


async def test_unhealthy_at_start_registers_critical() -> None:
    fake = FakeAgent()
    reg = Registration(as_client(fake), name="web", port=1, healthy=lambda: (False, "no leaf"))
    await reg.start()
    try:
        assert fake.services["web-1"]["Check"]["Status"] == "critical"
        assert fake.checks["service:web-1"] == ("critical", "no leaf")
    finally:
        await reg.aclose()


async def test_forgotten_service_is_registered_again() -> None:
    fake = FakeAgent()
    reg = Registration(as_client(fake), name="web", port=1, ttl=0.06)
    await reg.start()
    try:
        fake.services.clear()
        fake.checks.clear()  # what an agent restart without persistence looks like
        await until(lambda: "web-1" in fake.services)
        assert reg.registrations == 2
        await until(lambda: reg.heartbeats >= 1 and fake.log[-1][0] == "update")
    finally:
        await reg.aclose()


async def test_permission_error_is_raised_from_start() -> None:
    fake = FakeAgent()
    fake.register_error = AgentPermissionError("lacks permission 'service:write'", status=403)
    reg = Registration(as_client(fake), name="web", port=1)
    with pytest.raises(AgentPermissionError):
        await reg.start()
    await reg.aclose()
    assert ("deregister", "web-1") not in fake.log


async def test_heartbeat_errors_are_reported_every_time() -> None:
    fake = FakeAgent()
    errors: list[BaseException] = []
    reg = Registration(as_client(fake), name="web", port=1, ttl=0.03, on_error=errors.append)
    await reg.start()
    try:
        fake.update_error = AgentPermissionError("lacks permission", status=403)
        await until(lambda: len(errors) >= 2)
        assert all(isinstance(e, AgentPermissionError) for e in errors)
        fake.update_error = AgentUnavailableError("down")
        await until(lambda: isinstance(errors[-1], AgentUnavailableError))
        fake.update_error = None
        count = reg.heartbeats
        await until(lambda: reg.heartbeats > count)
    finally:
        await reg.aclose()


async def test_close_deregisters_once_and_is_bounded() -> None:
    fake = FakeAgent()
    errors: list[BaseException] = []
    reg = Registration(as_client(fake), name="web", port=1, timeout=0.05, on_error=errors.append)
    await reg.start()
    await reg.aclose()
    await reg.aclose()
    assert fake.services == {}
    assert fake.log.count(("deregister", "web-1")) == 1

    slow = FakeAgent()
    slow.deregister_delay = 30
    reg2 = Registration(as_client(slow), name="web", port=1, timeout=0.05, on_error=errors.append)
    await reg2.start()
    started = time.monotonic()
    await reg2.aclose()
    assert time.monotonic() - started < 2
    assert isinstance(errors[-1], TimeoutError)


# --------------------------------------------------------------------------------------------
# Against the dev agent (real HTTP)


async def check_of(client: AgentClient, service: str, check_id: str) -> dict[str, Any] | None:
    entries, _ = await client.health_service(service, passing=False, stale=False)
    for entry in entries:
        for check in entry["Checks"]:
            if check["CheckID"] == check_id:
                return cast(dict[str, Any], check)
    return None


async def test_registers_native_service_and_keeps_the_ttl_passing(agent: DevAgent) -> None:
    async with AgentClient(AgentConfig.from_address(agent.address), timeout=5) as client:
        health: tuple[bool, str] = (True, "")
        reg = Registration(
            client,
            name="web",
            port=8443,
            address="127.0.0.1",
            tags=["v1"],
            ttl=0.6,
            healthy=lambda: health,
        )
        await reg.start()
        try:
            svc, _ = await client.agent_service("web-8443")
            assert svc["Service"] == "web" and svc["Port"] == 8443
            assert svc["Connect"] == {"Native": True}
            # Several heartbeats span more than one TTL: the check must still pass.
            await until(lambda: reg.heartbeats >= 4)
            check = await check_of(client, "web", "service:web-8443")
            assert check is not None and check["Status"] == "passing"
            entries, _ = await client.health_connect("web", passing=True, stale=False)
            assert [e["Service"]["ID"] for e in entries] == ["web-8443"]

            health = (False, "leaf certificate expires in 4m")
            reg.beat_now()

            async def warned() -> bool:
                c = await check_of(client, "web", "service:web-8443")
                return c is not None and c["Status"] == "warning"

            await until_async(warned)
            check = await check_of(client, "web", "service:web-8443")
            assert check is not None and check["Output"] == "leaf certificate expires in 4m"
        finally:
            await reg.aclose()
        with pytest.raises(AgentNotFoundError):
            await client.agent_service("web-8443")


async def test_registers_again_after_the_agent_forgets(agent: DevAgent) -> None:
    async with AgentClient(AgentConfig.from_address(agent.address), timeout=5) as client:
        reg = Registration(client, name="web", port=8443, ttl=0.3)
        await reg.start()
        try:
            await client.deregister_service("web-8443")  # as after an agent restart

            async def back() -> bool:
                try:
                    await client.agent_service("web-8443")
                except AgentNotFoundError:
                    return False
                return True

            await until_async(back)
            assert reg.registrations == 2
            check = await check_of(client, "web", "service:web-8443")
            assert check is not None and check["Status"] == "passing"
        finally:
            await reg.aclose()


async def test_a_new_registration_replaces_stale_checks_but_keeps_maintenance_mode(
    agent: DevAgent,
) -> None:
    async with (
        AgentClient(AgentConfig.from_address(agent.address), timeout=5) as client,
        httpx.AsyncClient(base_url=agent.http_addr, timeout=5) as http,
    ):
        crashed = Registration(client, name="web", port=8443, ttl=5)
        await crashed.start()
        stale = {"Name": "old probe", "CheckID": "old", "ServiceID": "web-8443", "TTL": "5s"}
        assert (await http.put("/v1/agent/check/register", json=stale)).is_success
        await client.service_maintenance("web-8443", True, "investigating")
        # The process dies without deregistering; its successor registers the same instance.
        crashed._task.cancel()  # type: ignore[union-attr]
        successor = Registration(client, name="web", port=8443, ttl=5)
        await successor.start()
        try:
            local, _ = await client.agent_checks()
            assert local["_service_maintenance:web-8443"]["Notes"] == "investigating"
            assert local["service:web-8443"]["Status"] == "passing"
            entries, _ = await client.health_connect("web", passing=True, stale=False)
            assert entries == []
            # Out of maintenance, a registration replaces the checks it does not define.
            await client.service_maintenance("web-8443", False)
            await Registration(client, name="web", port=8443, ttl=5)._register()
            local, _ = await client.agent_checks()
            assert sorted(local) == ["service:web-8443"]
            entries, _ = await client.health_connect("web", passing=True, stale=False)
            assert [e["Service"]["ID"] for e in entries] == ["web-8443"]
            # The node-wide switch, and an unknown instance.
            await client.node_maintenance(True, "kernel upgrade")
            local, _ = await client.agent_checks(filter='Type == "maintenance"')
            assert [c["Notes"] for c in local.values()] == ["kernel upgrade"]
            await client.node_maintenance(False)
            with pytest.raises(AgentNotFoundError, match="Unknown service ID"):
                await client.service_maintenance("nope", True)
        finally:
            await successor.aclose()


async def test_registers_again_on_a_restarted_agent(
    start_agent: Callable[..., DevAgent],
) -> None:
    first = start_agent()
    port = first.port
    errors: list[BaseException] = []
    async with AgentClient(AgentConfig.from_address(first.address), timeout=1) as client:
        reg = Registration(client, name="web", port=8443, ttl=0.3, on_error=errors.append)
        await reg.start()
        try:
            await asyncio.to_thread(first.stop)
            await until(lambda: bool(errors))
            assert isinstance(errors[0], AgentUnavailableError)
            await asyncio.to_thread(start_agent, port=port)
            await until(lambda: reg.registrations == 2)
            svc, _ = await client.agent_service("web-8443")
            assert svc["Connect"] == {"Native": True}
        finally:
            await reg.aclose()


async def test_permission_error_from_start_against_an_acl_agent(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    async with AgentClient(AgentConfig.from_address(agent.address), timeout=5) as client:
        reg = Registration(client, name="web", port=8443)
        with pytest.raises(AgentPermissionError, match=r"service:write|Permission denied"):
            await reg.start()
        await reg.aclose()
