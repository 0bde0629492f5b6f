"""Prometheus metrics follow the Service's real events: handshakes, decisions, rotations."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry

from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import AllowIdentities, AllowTrustDomain
from consul_connect.devagent import DevAgent
from consul_connect.discovery import Endpoint
from consul_connect.errors import DialError
from consul_connect.metrics import instrument, reason_label
from consul_connect.service import Service
from consul_connect.testing import TestCA


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.02)


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def api(ca: TestCA) -> Iterator[Service]:
    svc = Service.from_test_ca(ca, "api", authorizer=AllowIdentities(ca.issue("web").identity))
    yield svc
    svc.close()


def test_handshake_and_decision_counters_move_on_allowed_and_denied_peers(
    ca: TestCA, api: Service
) -> None:
    registry = CollectorRegistry()
    instrument(api, registry)
    web = Service.from_test_ca(ca, "web", authorizer=AllowTrustDomain(ca.trust_domain))
    evil = Service.from_test_ca(ca, "evil", authorizer=AllowTrustDomain(ca.trust_domain))
    try:
        with api.listen() as listener:
            host, port = listener.address
            accepted: list[str] = []

            def serve() -> None:
                sock, identity = listener.accept(timeout=10)
                accepted.append(identity.service)
                sock.close()

            t = threading.Thread(target=serve)
            t.start()
            target = Endpoint(host, port, api.identity)
            # The refused peer comes first: accept() skips it and returns the allowed one.
            evil.connect(target, timeout=5).close()
            web.connect(target, timeout=5).close()
            t.join(10)
        assert accepted == ["web"]
    finally:
        web.close()
        evil.close()

    name = "consul_connect_handshakes_total"
    assert _value(registry, name, service="api", result="allowed") == 1
    assert _value(registry, name, service="api", result="denied") == 1
    assert _value(registry, name, service="api", result="failed") == 0
    decisions = "consul_connect_authz_decisions_total"
    assert _value(registry, decisions, service="api", decision="allow", reason="allow_list") == 1
    assert _value(registry, decisions, service="api", decision="deny", reason="allow_list") == 1


def test_untrusted_certificate_counts_as_failed_handshake_without_a_decision(
    ca: TestCA, api: Service
) -> None:
    registry = CollectorRegistry()
    instrument(api, registry)
    stranger_ca = ca.untrusted()
    stranger = Service.from_test_ca(
        stranger_ca, "web", authorizer=AllowTrustDomain(stranger_ca.trust_domain)
    )
    try:
        with api.listen() as listener:
            host, port = listener.address

            def serve() -> None:
                with contextlib.suppress(TimeoutError, OSError):
                    listener.accept(timeout=3)

            t = threading.Thread(target=serve)
            t.start()
            with pytest.raises(DialError):
                stranger.connect(Endpoint(host, port, api.identity), timeout=3)
            _wait_for(
                lambda: (
                    _value(
                        registry, "consul_connect_handshakes_total", service="api", result="failed"
                    )
                    == 1
                )
            )
            listener.close()
            t.join(10)
    finally:
        stranger.close()
    assert _value(registry, "consul_connect_handshakes_total", service="api", result="allowed") == 0
    samples = [
        s
        for metric in registry.collect()
        if metric.name == "consul_connect_authz_decisions"
        for s in metric.samples
    ]
    assert samples == []


def test_leaf_expiry_gauge_reports_the_current_leaf_until_closed(api: Service) -> None:
    registry = CollectorRegistry()
    handle = instrument(api, registry)
    stats = api.statistics()
    assert stats.leaf_valid_before is not None
    expiry = "consul_connect_leaf_expiry_timestamp_seconds"
    assert _value(registry, expiry, service="api") == pytest.approx(
        stats.leaf_valid_before.timestamp()
    )
    assert _value(registry, "consul_connect_ready", service="api") == 1
    handle.close()
    handle.close()
    assert registry.get_sample_value(expiry, {"service": "api"}) is None


def test_two_services_share_one_registry(ca: TestCA, api: Service) -> None:
    registry = CollectorRegistry()
    other = Service.from_test_ca(ca, "db", authorizer=AllowTrustDomain(ca.trust_domain))
    try:
        instrument(api, registry)
        instrument(other, registry)
        expiry = "consul_connect_leaf_expiry_timestamp_seconds"
        assert _value(registry, expiry, service="api") > time.time()
        assert _value(registry, expiry, service="db") > time.time()
    finally:
        other.close()


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        (
            "Matched L4 intention: default/web => default/api (Precedence: 9, Action: ALLOW)",
            "l4_intention",
        ),
        ("Matched L7 intention: default/web => default/api (Precedence: 9)", "l7_intention"),
        ("Default behavior configured by ACLs", "default"),
        ("no intention data yet", "no_data"),
        ("authorization timed out after 2.0s", "agent_error"),
        (
            "identity spiffe://x.consul/ns/default/dc/dc1/svc/web is not in the allowed list",
            "allow_list",
        ),
        ("handshake failed: timed out", "handshake"),
        ("something new", "other"),
    ],
)
def test_reason_labels_stay_a_small_vocabulary(reason: str, label: str) -> None:
    assert reason_label(reason) == label


def test_rotation_and_roots_counters_move_when_the_agent_rotates_its_ca(
    agent: DevAgent,
) -> None:
    registry = CollectorRegistry()
    cfg = AgentConfig.from_address(agent.address)
    with Service("web", agent=cfg) as web:
        web.wait_ready(10)
        instrument(web, registry)
        first_serial = web.statistics().leaf_serial
        httpx.put(
            f"{agent.http_addr}/v1/connect/ca/configuration",
            json={"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
            timeout=10,
        ).raise_for_status()
        _wait_for(
            lambda: (
                _value(registry, "consul_connect_roots_changes_total", service="web") >= 1
                and _value(registry, "consul_connect_leaf_rotations_total", service="web") >= 1
            ),
            timeout=20,
        )
        assert web.statistics().leaf_serial != first_serial
        expiry = _value(registry, "consul_connect_leaf_expiry_timestamp_seconds", service="web")
        valid_before = web.statistics().leaf_valid_before
        assert valid_before is not None
        assert expiry == pytest.approx(valid_before.timestamp())


def test_watch_errors_are_counted_by_error_class_when_the_agent_goes_away(
    start_agent: Callable[..., DevAgent],
) -> None:
    registry = CollectorRegistry()
    doomed = start_agent()
    cfg = AgentConfig.from_address(doomed.address)
    with Service("web", agent=cfg) as web:
        web.wait_ready(10)
        instrument(web, registry)
        doomed.stop()
        _wait_for(
            lambda: (
                _value(
                    registry,
                    "consul_connect_watch_errors_total",
                    service="web",
                    error="AgentUnavailableError",
                )
                >= 1
            ),
            timeout=20,
        )
