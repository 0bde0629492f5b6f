"""Issue 3 acceptance without a dev agent: namespace/partition identities end to end,
expiry-driven leaf re-fetch, and a (leaf, roots) pair published only when it verifies."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from consul_connect import _hub
from consul_connect.agent.client import QueryMeta
from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import AllowIdentities, AllowTrustDomain
from consul_connect.certs import Leaf, RootSet
from consul_connect.discovery import Endpoint
from consul_connect.errors import NotReadyError
from consul_connect.identity import ServiceIdentity, parse_spiffe_id
from consul_connect.service import Service, ServiceEvent, get_peer_identity
from consul_connect.testing import TestCA


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


def _from_leaf(ca: TestCA, leaf: Leaf, authorizer: Any) -> Service:
    return Service.from_pem(
        leaf.service,
        cert_pem=leaf.full_chain_pem,
        key_pem=leaf.private_key_pem,
        roots_pem=ca.cadata,
        authorizer=authorizer,
    )


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- namespaces and partitions ---------------------------------------------------------


def test_namespace_and_partition_identities_round_trip_through_a_connection(
    ca: TestCA,
) -> None:
    web_leaf = ca.issue("web", namespace="team-b", partition="finance")
    api_leaf = ca.issue("api", namespace="team-a", partition="finance")
    web = _from_leaf(ca, web_leaf, AllowTrustDomain(ca.trust_domain))
    api = _from_leaf(ca, api_leaf, AllowIdentities(web_leaf.identity))
    default_web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    try:
        # Parse/format round trip of the identities the Services present.
        assert api.identity.uri == (
            f"spiffe://{ca.trust_domain}/ap/finance/ns/team-a/dc/dc1/svc/api"
        )
        for svc in (web, api):
            assert parse_spiffe_id(svc.identity.uri) == svc.identity
            assert parse_spiffe_id(svc.identity.uri).uri == svc.identity.uri

        with api.listen() as listener:
            host, port = listener.address
            seen: list[ServiceIdentity] = []

            def serve() -> None:
                with contextlib.suppress(OSError):
                    for sock, identity in listener:
                        seen.append(identity)
                        sock.close()

            t = threading.Thread(target=serve)
            t.start()
            # The expected identity as a caller would write it (another trust-domain
            # host is tolerated); the presented one carries namespace and partition.
            expected = ServiceIdentity("other.consul", "team-a", "dc1", "api", "finance")
            with web.connect(Endpoint(host, port, expected), timeout=5) as conn:
                assert get_peer_identity(conn) == expected
                assert conn.recv(1) == b""  # accepted, then closed by serve()
            # Same service name in another namespace or partition is not what we meant.
            for wrong in (
                ServiceIdentity(ca.trust_domain, "default", "dc1", "api", "finance"),
                ServiceIdentity(ca.trust_domain, "team-a", "dc1", "api", "default"),
            ):
                assert not api.identity.matches_expected(wrong)
                with pytest.raises(Exception, match="mismatch") as info:
                    web.connect(Endpoint(host, port, wrong), timeout=5)
                assert type(info.value).__name__ == "ServerIdentityError"
            # "web" from the default namespace/partition is another identity: refused.
            events: list[ServiceEvent] = []
            api.on_event(events.append)
            with default_web.connect(Endpoint(host, port, api.identity), timeout=5) as conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    assert conn.recv(1) == b""
            _wait_for(lambda: any(e.kind == "peer_denied" for e in events), what="refusal")
            listener.close()
            t.join(10)
        assert seen[0] == web_leaf.identity
        assert (seen[0].namespace, seen[0].partition) == ("team-b", "finance")
    finally:
        default_web.close()
        web.close()
        api.close()


# -- expiry-driven re-fetch --------------------------------------------------------------


class _SilentAgent:
    """An agent double whose leaf blocking queries never wake: a renewed leaf is only
    seen by a client that asks again on its own (when its leaf nears expiry)."""

    def __init__(self, leaf: Leaf) -> None:
        self.leaf = leaf
        self.waits: list[float] = []
        self.calls = 0

    async def leaf_cert(
        self, service: str, index: int = 0, wait: float | None = None
    ) -> tuple[dict[str, Any], QueryMeta]:
        self.calls += 1
        if index:
            self.waits.append(float(wait or 0))
            await asyncio.sleep(wait or 0)
        return self.leaf.to_json(), QueryMeta(index=7)


class _FakeHub:
    def __init__(self, client: _SilentAgent, roots: RootSet) -> None:
        self.client = client
        self.roots = roots
        self.released = False

    def add_listeners(self, on_roots: Callable[[RootSet], None], on_error: Any) -> None:
        on_roots(self.roots)

    def remove_listeners(self, on_roots: Any, on_error: Any) -> None:
        pass

    async def release(self) -> None:
        self.released = True


@pytest.fixture
def silent_agent(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> Iterator[_SilentAgent]:
    # Backdated one minute by the CA: valid for about 4 more seconds.
    agent = _SilentAgent(ca.issue("web", ttl=timedelta(seconds=64)))
    hub = _FakeHub(agent, ca.roots())
    monkeypatch.setattr(_hub.AgentHub, "acquire", classmethod(lambda cls, config: hub))
    yield agent
    assert hub.released


def test_leaf_is_fetched_again_before_it_expires_even_if_the_watch_stays_quiet(
    ca: TestCA, silent_agent: _SilentAgent
) -> None:
    svc = Service(
        "web",
        agent=AgentConfig.from_address("127.0.0.1:1"),
        authorizer=AllowTrustDomain(ca.trust_domain),
    )
    try:
        svc.wait_ready(5)
        first = svc.statistics().leaf_serial
        expires = silent_agent.leaf.valid_before.timestamp()
        # The agent renews its leaf but its blocking query never returns early.
        silent_agent.leaf = ca.issue("web")
        _wait_for(
            lambda: svc.statistics().leaf_serial != first,
            timeout=max(0.1, expires - time.time()),
            what="the renewed leaf before the old one expired",
        )
        assert svc.statistics().leaf_rotations == 1
        # The wait for the short-lived leaf was cut by its expiry, not the 5 min default.
        assert silent_agent.waits[0] <= 5
    finally:
        svc.close()


# -- publication only of verified pairs -----------------------------------------------


def test_a_leaf_from_another_ca_is_never_published_and_the_old_one_keeps_serving(
    ca: TestCA, silent_agent: _SilentAgent
) -> None:
    silent_agent.leaf = ca.issue("web")
    svc = Service(
        "web",
        agent=AgentConfig.from_address("127.0.0.1:1"),
        authorizer=AllowTrustDomain(ca.trust_domain),
    )
    events: list[ServiceEvent] = []
    svc.on_event(events.append)
    try:
        svc.wait_ready(5)
        good = svc.statistics().leaf_serial
        svc._set_leaf(ca.untrusted().issue("web"))  # what a watch would hand over
        assert svc.statistics().leaf_serial == good
        assert svc.ready
        assert any(e.kind == "watch_error" for e in events)
    finally:
        svc.close()


def test_an_agent_handing_out_an_expired_leaf_is_not_asked_in_a_hot_loop(
    ca: TestCA, silent_agent: _SilentAgent
) -> None:
    expired = ca.issue("web", ttl=timedelta(seconds=30))  # backdated 60 s: expired
    silent_agent.leaf = expired
    svc = Service(
        "web",
        agent=AgentConfig.from_address("127.0.0.1:1"),
        authorizer=AllowTrustDomain(ca.trust_domain),
    )
    try:
        with pytest.raises(NotReadyError, match="do not verify"):
            svc.wait_ready(1.5)
        assert not svc.ready
        assert silent_agent.calls <= 6  # backing off, not spinning
        # A valid leaf is picked up once the agent has one.
        silent_agent.leaf = ca.issue("web")
        svc.wait_ready(10)
        assert svc.statistics().leaf_serial == silent_agent.leaf.serial_number
    finally:
        svc.close()
