"""Authorizers: intention-backed local decisions, the agent's authorize endpoint, fixed rules."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httpx
import pytest

from consul_connect.agent.client import AgentClient, QueryMeta
from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import (
    AgentAuthorizer,
    AllowAnyServiceInsecure,
    AllowIdentities,
    AllowTrustDomain,
    Authorizer,
    IntentionAuthorizer,
    all_of,
    any_of,
)
from consul_connect.authz.intentions import DEFAULT_REASON, Decision
from consul_connect.devagent import DevAgent
from consul_connect.errors import (
    AgentPermissionError,
    AgentUnavailableError,
    IdentityError,
    NotReadyError,
)
from consul_connect.identity import ServiceIdentity

TD = "11111111-2222-3333-4444-555555555555.consul"


def ident(service: str, *, td: str = TD, ns: str = "default", dc: str = "dc1") -> ServiceIdentity:
    return ServiceIdentity(td, ns, dc, service)


def ixn(source: str, dest: str = "db", action: str = "allow", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "SourceNS": "default",
        "SourceName": source,
        "DestinationNS": "default",
        "DestinationName": dest,
        "SourceType": "consul",
        **extra,
    }
    if "Permissions" not in extra:
        out["Action"] = action
    return out


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


class FakeAgent:
    """Just enough of AgentClient for the authorizers, with blocking intention matches."""

    def __init__(self, intentions: list[dict[str, Any]] | None = None) -> None:
        self.config = AgentConfig.from_address("127.0.0.1:1")
        self.intentions = list(intentions or [])
        self.index = 1
        self.changed = asyncio.Event()
        self.self_info: dict[str, Any] = {"DebugConfig": {"ACLsEnabled": False}}
        self.self_error: BaseException | None = None
        self.match_error: BaseException | None = None
        self.match_calls = 0
        self.authorize_calls: list[tuple[str, str, str]] = []
        self.authorize_answer: Callable[[str], Awaitable[dict[str, Any]]] | None = None

    def set_intentions(self, intentions: list[dict[str, Any]]) -> None:
        self.intentions = list(intentions)
        self.index += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def agent_self(self) -> tuple[dict[str, Any], QueryMeta]:
        if self.self_error is not None:
            raise self.self_error
        return self.self_info, QueryMeta(index=0)

    async def intention_match_destination(
        self, name: str, index: int = 0, wait: float | None = None, *, cached: bool = False
    ) -> tuple[list[dict[str, Any]], QueryMeta]:
        self.match_calls += 1
        if self.match_error is not None:
            raise self.match_error
        if index >= self.index:
            event = self.changed
            try:
                async with asyncio.timeout(wait or 1.0):
                    await event.wait()
            except TimeoutError:
                pass
            if self.match_error is not None:
                raise self.match_error
        return list(self.intentions), QueryMeta(index=self.index)

    async def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> tuple[dict[str, Any], QueryMeta]:
        self.authorize_calls.append((target, client_cert_uri, client_cert_serial))
        if self.authorize_answer is None:
            raise AgentPermissionError("lacks permission 'service:write'", status=403)
        return await self.authorize_answer(client_cert_uri), QueryMeta()


def as_client(fake: FakeAgent) -> AgentClient:
    return cast(AgentClient, fake)


# --------------------------------------------------------------------------------------------
# IntentionAuthorizer (unit)


async def test_intention_authorizer_denies_everything_before_data() -> None:
    authz = IntentionAuthorizer(as_client(FakeAgent([ixn("web")])), "db", default_allow=True)
    assert not authz.ready
    decision = authz.decide(ident("web"))
    assert decision == Decision(False, "no intention data yet")
    assert not authz.decide_request(ident("web"), "GET", "/", {}).allowed
    assert not (await authz.authorize(ident("web"))).allowed


async def test_intention_change_reaches_decide_and_listeners() -> None:
    fake = FakeAgent([ixn("web", action="allow")])
    authz = IntentionAuthorizer(as_client(fake), "db", default_allow=True)
    changes: list[int] = []
    authz.add_listener(lambda: changes.append(authz.updates))
    await authz.start()
    try:
        await authz.wait_ready(5)
        assert authz.decide(ident("web")).allowed
        assert changes == [1]
        fake.set_intentions([ixn("web", action="deny")])
        await until(lambda: not authz.decide(ident("web")).allowed)
        assert authz.decide(ident("web")).reason.startswith("Matched L4 intention")
        assert changes == [1, 2]
    finally:
        await authz.aclose()


@pytest.mark.parametrize(
    ("debug", "allowed"),
    [
        ({"ACLsEnabled": False, "ACLDefaultPolicy": "deny"}, True),
        ({"ACLsEnabled": True, "ACLDefaultPolicy": "deny"}, False),
        ({"ACLsEnabled": True, "ACLDefaultPolicy": "allow"}, True),
        ({"ACLsEnabled": True, "ACLResolverSettings": {"ACLDefaultPolicy": "deny"}}, False),
    ],
)
async def test_default_decision_follows_the_agents_acl_policy(
    debug: dict[str, Any], allowed: bool
) -> None:
    fake = FakeAgent([ixn("web", action="deny")])
    fake.self_info = {"DebugConfig": debug}
    authz = IntentionAuthorizer(as_client(fake), "db")
    await authz.start()
    try:
        await authz.wait_ready(5)
        decision = authz.decide(ident("stranger"))
        assert decision.allowed is allowed
        assert decision.reason == DEFAULT_REASON
    finally:
        await authz.aclose()


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ({"Authorized": False, "Reason": DEFAULT_REASON}, False),
        ({"Authorized": True, "Reason": "ACLs disabled, access is allowed by default"}, True),
        # A matching (Enterprise wildcard) intention is not the default: use agent/self.
        ({"Authorized": False, "Reason": "Matched L4 intention: */* => default/db"}, True),
    ],
)
async def test_default_decision_is_probed_through_authorize(
    probe: dict[str, Any], expected: bool
) -> None:
    fake = FakeAgent([])
    fake.self_info = {"DebugConfig": {"ACLsEnabled": False}}

    async def answer(uri: str) -> dict[str, Any]:
        return probe

    fake.authorize_answer = answer
    authz = IntentionAuthorizer(as_client(fake), "db")
    await authz.start()
    try:
        await authz.wait_ready(5)
        assert authz.decide(ident("web")).allowed is expected
        ((target, uri, _),) = fake.authorize_calls
        assert target == "db" and "/ns/consul-connect-probe/" in uri
    finally:
        await authz.aclose()


async def test_unreadable_acl_policy_defaults_to_deny() -> None:
    fake = FakeAgent([])
    fake.self_error = AgentPermissionError("lacks agent:read", status=403)
    authz = IntentionAuthorizer(as_client(fake), "db")
    await authz.start()
    try:
        await authz.wait_ready(5)
        assert not authz.decide(ident("web")).allowed
    finally:
        await authz.aclose()


async def test_explicit_default_skips_agent_self() -> None:
    fake = FakeAgent([])
    fake.self_error = AssertionError("agent_self must not be called")
    authz = IntentionAuthorizer(as_client(fake), "db", default_allow=False)
    await authz.start()
    try:
        await authz.wait_ready(5)
        assert authz.decide(ident("web")) == Decision(False, DEFAULT_REASON)
    finally:
        await authz.aclose()


async def test_last_intentions_keep_deciding_while_the_agent_fails() -> None:
    fake = FakeAgent([ixn("web", action="allow")])
    errors: list[BaseException] = []
    authz = IntentionAuthorizer(as_client(fake), "db", default_allow=False, on_error=errors.append)
    await authz.start()
    try:
        await authz.wait_ready(5)
        fake.match_error = AgentUnavailableError("agent went away")
        fake.set_intentions([])
        await until(lambda: len(errors) >= 1)
        assert authz.decide(ident("web")).allowed
        assert not authz.decide(ident("other")).allowed
        assert authz.ready
    finally:
        await authz.aclose()


async def test_missing_intentions_read_right_is_raised_from_wait_ready_then_retried() -> None:
    fake = FakeAgent([])
    fake.match_error = AgentPermissionError("lacks permission 'intentions:read'", status=403)
    errors: list[BaseException] = []
    authz = IntentionAuthorizer(as_client(fake), "db", default_allow=True, on_error=errors.append)
    await authz.start()
    try:
        with pytest.raises(AgentPermissionError):
            await authz.wait_ready(5)
        assert fake.match_calls == 1, "a permission error is raised at once, not waited out"
        assert isinstance(errors[-1], AgentPermissionError)
        assert not authz.decide(ident("web")).allowed
        # The right is granted later (e.g. through a role): the watch, retrying, picks it up.
        fake.match_error = None
        await until(lambda: authz.ready, timeout=10)  # wait_ready raises the latest 403 at once
        assert authz.failure is None
        assert authz.decide(ident("web")).allowed
    finally:
        await authz.aclose()


async def test_wait_ready_times_out_with_not_ready_error() -> None:
    fake = FakeAgent([])
    fake.match_error = AgentUnavailableError("down")
    authz = IntentionAuthorizer(as_client(fake), "db", default_allow=True, on_error=lambda e: None)
    await authz.start()
    try:
        with pytest.raises(NotReadyError):
            await authz.wait_ready(0.05)
    finally:
        await authz.aclose()


async def test_l7_intention_denies_connections_but_decides_requests() -> None:
    perms = [
        {"Action": "allow", "HTTP": {"PathPrefix": "/api", "Methods": ["GET"]}},
        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
    ]
    fake = FakeAgent([ixn("web", Permissions=perms)])
    authz = IntentionAuthorizer(as_client(fake), "db", default_allow=True)
    await authz.start()
    try:
        await authz.wait_ready(5)
        assert authz.decide(ident("web")).reason.startswith("Matched L7 intention")
        assert not authz.decide(ident("web")).allowed
        assert authz.decide_request(ident("web"), "GET", "/api/x?y=1", {}).allowed
        post = authz.decide_request(ident("web"), "POST", "/api/x", {})
        assert not post.allowed and post.permission_index == 1
        # An L4-only caller is decided by the default for requests too.
        assert authz.decide_request(ident("other"), "POST", "/", []).allowed
    finally:
        await authz.aclose()


async def test_undecodable_intentions_keep_the_last_good_set() -> None:
    fake = FakeAgent([ixn("web", action="allow")])
    errors: list[BaseException] = []
    authz = IntentionAuthorizer(as_client(fake), "db", default_allow=False, on_error=errors.append)
    await authz.start()
    try:
        await authz.wait_ready(5)
        fake.set_intentions([{"SourceName": 42}])
        await until(lambda: len(errors) == 1)
        assert authz.decide(ident("web")).allowed
    finally:
        await authz.aclose()


# --------------------------------------------------------------------------------------------
# AgentAuthorizer (unit)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_agent_authorizer_caches_per_identity_until_ttl() -> None:
    fake = FakeAgent()

    async def answer(uri: str) -> dict[str, Any]:
        return {"Authorized": "web" in uri, "Reason": f"asked about {uri}"}

    fake.authorize_answer = answer
    clock = Clock()
    authz = AgentAuthorizer(as_client(fake), "db", cache_ttl=1.0, clock=clock)
    assert authz.decide(ident("web")) is None
    first = await authz.authorize(ident("web"), "0b")
    assert first.allowed and fake.authorize_calls == [("db", ident("web").uri, "0b")]
    assert authz.decide(ident("web")) == first
    assert (await authz.authorize(ident("web"))) == first
    assert len(fake.authorize_calls) == 1
    assert not (await authz.authorize(ident("other"))).allowed
    assert len(fake.authorize_calls) == 2
    clock.now += 1.5
    assert authz.decide(ident("web")) is None
    await authz.authorize(ident("web"))
    assert len(fake.authorize_calls) == 3


async def test_concurrent_authorizations_of_one_identity_share_one_request() -> None:
    fake = FakeAgent()
    gate = asyncio.Event()

    async def answer(uri: str) -> dict[str, Any]:
        await gate.wait()
        return {"Authorized": True, "Reason": "ok"}

    fake.authorize_answer = answer
    authz = AgentAuthorizer(as_client(fake), "db")
    tasks = [asyncio.create_task(authz.authorize(ident("web"))) for _ in range(20)]
    other = asyncio.create_task(authz.authorize(ident("api")))
    await until(lambda: len(fake.authorize_calls) == 2)
    tasks[0].cancel()  # one impatient caller must not cancel the shared answer
    gate.set()
    results = await asyncio.gather(*tasks[1:], other)
    assert all(r.allowed for r in results)
    assert len(fake.authorize_calls) == 2
    assert tasks[0].cancelled()


async def test_slow_agent_means_denial_with_reason_and_no_cache() -> None:
    fake = FakeAgent()
    slow = True

    async def answer(uri: str) -> dict[str, Any]:
        if slow:
            await asyncio.sleep(10)
        return {"Authorized": True, "Reason": "ok"}

    fake.authorize_answer = answer
    errors: list[BaseException] = []
    authz = AgentAuthorizer(as_client(fake), "db", timeout=0.05, on_error=errors.append)
    started = time.monotonic()
    decision = await authz.authorize(ident("web"))
    assert time.monotonic() - started < 2
    assert not decision.allowed and "timed out" in decision.reason
    assert isinstance(errors[0], TimeoutError)
    assert authz.decide(ident("web")) is None
    slow = False
    assert (await authz.authorize(ident("web"))).allowed


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (AgentPermissionError("lacks permission 'service:write'", status=403), "refused"),
        (AgentUnavailableError("connection refused"), "failed"),
    ],
)
async def test_agent_errors_become_denials(exc: BaseException, words: str) -> None:
    fake = FakeAgent()

    async def answer(uri: str) -> dict[str, Any]:
        raise exc

    fake.authorize_answer = answer
    errors: list[BaseException] = []
    authz = AgentAuthorizer(as_client(fake), "db", on_error=errors.append)
    decision = await authz.authorize(ident("web"))
    assert not decision.allowed and words in decision.reason
    assert errors == [exc]
    assert authz.decide_request(ident("web"), "GET", "/", {}).allowed is False


async def test_agent_authorizer_requests_use_the_last_connection_decision() -> None:
    fake = FakeAgent()

    async def answer(uri: str) -> dict[str, Any]:
        return {"Authorized": True, "Reason": "Matched L4 intention"}

    fake.authorize_answer = answer
    clock = Clock()
    authz = AgentAuthorizer(as_client(fake), "db", cache_ttl=1.0, clock=clock)
    assert not authz.decide_request(ident("web"), "GET", "/", {}).allowed
    await authz.authorize(ident("web"))
    clock.now += 60
    assert authz.decide_request(ident("web"), "GET", "/", {}).allowed


async def test_agent_authorizer_cache_is_bounded() -> None:
    fake = FakeAgent()

    async def answer(uri: str) -> dict[str, Any]:
        return {"Authorized": True, "Reason": "ok"}

    fake.authorize_answer = answer
    authz = AgentAuthorizer(as_client(fake), "db", max_entries=3, clock=Clock())
    for i in range(10):
        await authz.authorize(ident(f"svc{i}"))
    assert authz.decide(ident("svc9")) is not None
    assert authz.decide(ident("svc0")) is None
    assert sum(authz.decide(ident(f"svc{i}")) is not None for i in range(10)) == 3


# --------------------------------------------------------------------------------------------
# Fixed rules and combinators


def test_allow_identities_matches_listed_identities_only() -> None:
    authz = AllowIdentities(ident("web").uri, ServiceIdentity("", "default", "", "api"))
    assert authz.decide(ident("web")).allowed
    assert authz.decide(ident("web", td=TD.upper())).allowed
    assert not authz.decide(ident("web", dc="dc2")).allowed
    assert not authz.decide(ident("web", ns="other")).allowed
    assert not authz.decide(ident("db")).allowed
    # Empty trust domain / datacenter in the rule mean "any".
    assert authz.decide(ident("api", td="other.consul", dc="dc9")).allowed


def test_allow_identities_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        AllowIdentities()
    with pytest.raises(IdentityError):
        AllowIdentities("spiffe://x.consul/agent/server/dc/dc1")


def test_allow_trust_domain() -> None:
    authz = AllowTrustDomain(TD)
    assert authz.decide(ident("web")).allowed
    assert not authz.decide(ident("web", td="evil.consul")).allowed
    with pytest.raises(ValueError):
        AllowTrustDomain("")


async def test_allow_any_is_explicitly_insecure() -> None:
    authz = AllowAnyServiceInsecure()
    assert "insecure" in authz.name
    assert (await authz.authorize(ident("anything"))).allowed


async def test_any_of_asks_async_members_only_when_needed() -> None:
    fake = FakeAgent()

    async def answer(uri: str) -> dict[str, Any]:
        return {"Authorized": "api" in uri, "Reason": "agent says"}

    fake.authorize_answer = answer
    agent = AgentAuthorizer(as_client(fake), "db")
    combined = any_of(AllowIdentities(ident("web")), agent)
    assert combined.decide(ident("web")) is not None
    assert combined.decide(ident("api")) is None  # the agent must be asked
    assert (await combined.authorize(ident("web"))).allowed
    assert fake.authorize_calls == []
    assert (await combined.authorize(ident("api"))).allowed
    denied = await combined.authorize(ident("other"))
    assert not denied.allowed and "not in the allowed list" in denied.reason
    assert "agent says" in denied.reason


async def test_all_of_requires_every_member() -> None:
    combined = all_of(AllowTrustDomain(TD), AllowIdentities(ident("web"), ident("api")))
    assert combined.decide(ident("web")) is not None
    assert (combined.decide(ident("web")) or Decision(False, "")).allowed
    assert not (await combined.authorize(ident("web", td="evil.consul"))).allowed
    assert not combined.decide_request(ident("db"), "GET", "/", {}).allowed
    with pytest.raises(ValueError):
        any_of()


async def test_combinators_forward_change_notifications() -> None:
    fake = FakeAgent([ixn("web")])
    intentions = IntentionAuthorizer(as_client(fake), "db", default_allow=False)
    combined = any_of(AllowIdentities(ident("ops")), intentions)
    seen: list[bool] = []
    combined.add_listener(lambda: seen.append(True))
    assert not combined.ready
    await combined.start()
    try:
        await until(lambda: bool(seen))
        assert combined.ready
        assert (combined.decide(ident("web")) or Decision(False, "")).allowed
    finally:
        await combined.aclose()


def test_every_authorizer_satisfies_the_protocol() -> None:
    fake = as_client(FakeAgent())
    for a in (
        IntentionAuthorizer(fake, "db"),
        AgentAuthorizer(fake, "db"),
        AllowIdentities(ident("web")),
        AllowTrustDomain(TD),
        AllowAnyServiceInsecure(),
        any_of(AllowTrustDomain(TD)),
    ):
        assert isinstance(a, Authorizer), a


# --------------------------------------------------------------------------------------------
# Against the dev agent (real HTTP)


@pytest.fixture
async def client(agent: DevAgent) -> AsyncIterator[AgentClient]:
    async with AgentClient(AgentConfig.from_address(agent.address), timeout=5) as c:
        yield c


async def test_intention_change_to_deny_reaches_decide_within_deadline(
    client: AgentClient,
) -> None:
    await client.upsert_intention_exact("web", "db", {"Action": "allow"})
    authz = IntentionAuthorizer(client, "db")
    changed = asyncio.Event()
    authz.add_listener(changed.set)
    await authz.start()
    try:
        await authz.wait_ready(5)
        assert authz.decide(ident("web")).allowed
        assert authz.decide(ident("stranger")) == Decision(True, DEFAULT_REASON)
        changed.clear()
        await client.upsert_intention_exact("web", "db", {"Action": "deny"})
        async with asyncio.timeout(5):
            await changed.wait()
        decision = authz.decide(ident("web"))
        assert not decision.allowed
        assert decision.reason.startswith("Matched L4 intention: default/web => default/db")
    finally:
        await authz.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_intention_authorizer_fails_closed_when_the_agent_is_unreachable() -> None:
    errors: list[BaseException] = []
    config = AgentConfig.from_address(f"127.0.0.1:{_closed_port()}")
    async with AgentClient(config, timeout=1) as c:
        authz = IntentionAuthorizer(c, "db", on_error=errors.append)
        await authz.start()
        try:
            with pytest.raises(NotReadyError):
                await authz.wait_ready(0.3)
            assert errors and isinstance(errors[0], AgentUnavailableError)
            assert authz.decide(ident("web")) == Decision(False, "no intention data yet")
        finally:
            await authz.aclose()


async def test_intention_authorizer_keeps_last_data_after_the_agent_stops(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent()
    errors: list[BaseException] = []
    async with AgentClient(AgentConfig.from_address(agent.address), timeout=1) as c:
        await c.upsert_intention_exact("web", "db", {"Action": "allow"})
        await c.upsert_intention_exact("*", "db", {"Action": "deny"})
        authz = IntentionAuthorizer(c, "db", wait=0.5, on_error=errors.append)
        await authz.start()
        try:
            await authz.wait_ready(5)
            await asyncio.to_thread(agent.stop)
            await until(lambda: bool(errors))
            assert authz.decide(ident("web")).allowed
            assert not authz.decide(ident("other")).allowed
        finally:
            await authz.aclose()


async def test_agent_authorizer_asks_the_dev_agent(client: AgentClient) -> None:
    await client.upsert_intention_exact("web", "db", {"Action": "allow"})
    await client.upsert_intention_exact("api", "db", {"Action": "deny"})
    authz = AgentAuthorizer(client, "db")
    allowed = await authz.authorize(ident("web"), "0b")
    assert allowed.allowed
    assert allowed.reason.startswith("Matched L4 intention")
    assert not (await authz.authorize(ident("api"))).allowed
    assert authz.decide(ident("web")) == allowed


PRECEDENCE_INTENTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("web", "db", {"Action": "allow"}),
    ("*", "db", {"Action": "deny"}),
    ("admin", "*", {"Action": "allow"}),
    ("api", "db", {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}),
    ("web", "cache", {"Action": "deny"}),
]

# destination, source, allowed (ACLs off: the default is allow)
PRECEDENCE_TABLE = [
    ("db", "web", True),  # exact beats the wildcard-source deny (9 > 8)
    ("db", "admin", False),  # * -> db (8) beats admin -> * (6)
    ("db", "api", False),  # an L7 intention denies connections
    ("db", "other", False),  # * -> db
    ("cache", "web", False),
    ("cache", "admin", True),  # admin -> * (6)
    ("cache", "api", True),  # default
]


async def put_config_entry(agent: DevAgent, entry: dict[str, Any]) -> None:
    def put() -> None:
        with httpx.Client(base_url=agent.http_addr, timeout=10) as http:
            http.put("/v1/config", json=entry).raise_for_status()

    await asyncio.to_thread(put)


async def test_both_authorizers_agree_on_the_precedence_table(
    agent: DevAgent, client: AgentClient
) -> None:
    # L7 permissions need an HTTP destination.
    await put_config_entry(agent, {"Kind": "service-defaults", "Name": "db", "Protocol": "http"})
    for source, dest, body in PRECEDENCE_INTENTIONS:
        await client.upsert_intention_exact(source, dest, body)
    local = {d: IntentionAuthorizer(client, d) for d in ("db", "cache")}
    remote = {d: AgentAuthorizer(client, d, cache_ttl=0) for d in ("db", "cache")}
    for a in local.values():
        await a.start()
    try:
        for a in local.values():
            await a.wait_ready(5)
        for dest, source, allowed in PRECEDENCE_TABLE:
            mine = local[dest].decide(ident(source))
            theirs = await remote[dest].authorize(ident(source))
            assert mine.allowed is allowed, (dest, source, mine)
            assert theirs.allowed is allowed, (dest, source, theirs)
            assert mine.reason == theirs.reason, (dest, source)
    finally:
        for a in local.values():
            await a.aclose()


async def test_both_authorizers_deny_by_default_under_acl_deny(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    async with AgentClient(AgentConfig.from_address(agent.address, token="root")) as root:
        await root.upsert_intention_exact("web", "db", {"Action": "allow"})

    def service_token() -> str:
        with httpx.Client(base_url=agent.http_addr, headers={"X-Consul-Token": "root"}) as h:
            body = {"ServiceIdentities": [{"ServiceName": "db"}]}
            response = h.put("/v1/acl/token", json=body)
            response.raise_for_status()
            return str(response.json()["SecretID"])

    # The service's own token: service:write on db, intentions:read, but no agent:read.
    token = await asyncio.to_thread(service_token)
    config = AgentConfig.from_address(agent.address, token=token)
    async with AgentClient(config, timeout=5) as c:
        with pytest.raises(AgentPermissionError):
            await c.agent_self()
        local = IntentionAuthorizer(c, "db")
        await local.start()
        try:
            await local.wait_ready(5)
            remote = AgentAuthorizer(c, "db")
            for source, allowed in (("web", True), ("stranger", False)):
                mine = local.decide(ident(source))
                theirs = await remote.authorize(ident(source))
                assert mine.allowed is theirs.allowed is allowed
                assert mine.reason == theirs.reason
        finally:
            await local.aclose()
