"""The dev agent runs HTTP and TCP checks itself, as a Consul agent does (all on loopback)."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from consul_connect.devagent.probes import Thresholds
from consul_connect.testing import TestCA
from consul_connect.tls import load_cert_chain_from_memory
from tests.integrations import wait_until as wait_for

NATIVE = {"Name": "web", "ID": "web-1", "Port": 8443, "Connect": {"Native": True}}


class HealthEndpoint:
    """A loopback HTTP(S) server whose answer (status, body) the test sets."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.status = 200
        self.body = b"all good"
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(dict(self.headers.items()))
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/health"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[HealthEndpoint]:
    ep = HealthEndpoint()
    yield ep
    ep.close()


def _check(http: httpx.Client, check_id: str = "service:web-1") -> dict[str, Any]:
    checks: dict[str, Any] = http.get("/v1/agent/checks").json()
    return checks.get(check_id, {})


def _status_is(http: httpx.Client, status: str) -> Callable[[], bool]:
    return lambda: _check(http).get("Status") == status


def test_an_http_check_follows_the_endpoint_with_consuls_output(
    http: httpx.Client, endpoint: HealthEndpoint
) -> None:
    check = {"HTTP": endpoint.url, "Interval": "100ms"}
    assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
    wait_for(_status_is(http, "passing"))
    assert _check(http)["Output"] == f"HTTP GET {endpoint.url}: 200 OK Output: all good"
    assert endpoint.requests[0]["User-Agent"] == "Consul Health Check"
    assert endpoint.requests[0]["Accept"] == "text/plain, text/*, */*"
    # Discovery follows: the instance is now among the passing Connect instances.
    passing = http.get("/v1/health/connect/web", params={"passing": "1"}).json()
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]

    endpoint.status, endpoint.body = 429, b"slow down"
    wait_for(_status_is(http, "warning"))
    endpoint.status, endpoint.body = 503, b"down"
    wait_for(_status_is(http, "critical"))
    assert _check(http)["Output"] == (
        f"HTTP GET {endpoint.url}: 503 Service Unavailable Output: down"
    )
    assert http.get("/v1/health/connect/web", params={"passing": "1"}).json() == []


def test_an_http_check_that_cannot_connect_is_critical(http: httpx.Client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/"
    check = {"HTTP": url, "Interval": "100ms", "Status": "passing"}
    assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
    wait_for(_status_is(http, "critical"))
    assert _check(http)["Output"] == (
        f'Get "{url}": dial tcp 127.0.0.1:{port}: connect: connection refused'
    )


def test_a_tcp_check_passes_while_the_port_listens(http: httpx.Client) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        check = {"TCP": addr, "Interval": "100ms"}
        assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
        wait_for(_status_is(http, "passing"))
        assert _check(http)["Output"] == f"TCP connect {addr}: Success"
    finally:
        listener.close()
    wait_for(_status_is(http, "critical"))
    assert _check(http)["Output"] == f"dial tcp {addr}: connect: connection refused"


def test_failures_before_critical_hold_the_status_for_that_many_failures(
    http: httpx.Client, endpoint: HealthEndpoint
) -> None:
    check = {
        "HTTP": endpoint.url,
        "Interval": "100ms",
        "FailuresBeforeWarning": 1,
        "FailuresBeforeCritical": 3,
        "SuccessBeforePassing": 2,
    }
    assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
    wait_for(_status_is(http, "passing"))
    endpoint.status = 500
    wait_for(_status_is(http, "warning"))
    wait_for(_status_is(http, "critical"))


def test_thresholds_follow_consuls_status_handler() -> None:
    t = Thresholds(failures_before_warning=0, failures_before_critical=2)
    assert t.apply("critical", "a") is None  # 1 failure: not yet (warning defaults to 2)
    assert t.apply("critical", "b") == ("critical", "b")
    assert t.apply("passing", "ok") == ("passing", "ok")  # a success resets the count
    assert t.apply("critical", "c") is None
    assert Thresholds().apply("critical", "x") == ("critical", "x")
    slow = Thresholds(success_before_passing=2)
    assert slow.apply("passing", "1") is None
    assert slow.apply("passing", "2") == ("passing", "2")
    assert slow.apply("critical", "down") == ("critical", "down")
    assert slow.apply("passing", "1") is None  # a failure resets the success count
    assert Thresholds().apply("warning", "w") == ("warning", "w")


def test_a_deregistered_check_is_no_longer_run(
    http: httpx.Client, endpoint: HealthEndpoint
) -> None:
    check = {"HTTP": endpoint.url, "Interval": "50ms"}
    assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
    wait_for(lambda: len(endpoint.requests) >= 2)
    assert http.put("/v1/agent/service/deregister/web-1").is_success
    # At most a probe already in flight lands after the deregistration.
    settled = len(endpoint.requests) + 1
    deadline = time.monotonic() + 0.5  # ten intervals
    while time.monotonic() < deadline:
        assert len(endpoint.requests) <= settled
        time.sleep(0.05)


def test_an_https_check_verifies_the_server_unless_told_to_skip(http: httpx.Client) -> None:
    leaf = TestCA().issue("health")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain_from_memory(ctx, leaf.cert_pem, leaf.private_key_pem)
    endpoint = HealthEndpoint(tls=ctx)
    try:
        check = {"HTTP": endpoint.url, "Interval": "100ms", "Status": "passing"}
        assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
        # A certificate no system root signs: the request fails.
        wait_for(_status_is(http, "critical"))
        assert "certificate" in _check(http)["Output"].lower()
        check["TLSSkipVerify"] = True
        assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
        wait_for(_status_is(http, "passing"))
    finally:
        endpoint.close()


def test_stopping_the_agent_does_not_wait_for_a_probe_in_flight() -> None:
    from consul_connect.devagent import DevAgent

    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    silent.settimeout(10)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
    agent = DevAgent().start()
    try:
        with httpx.Client(base_url=agent.http_addr, timeout=10) as c:
            check = {"HTTP": url, "Interval": "10s", "Timeout": "30s"}
            assert c.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
        conn, _ = silent.accept()  # the probe is connected and waits for an answer
        t0 = time.monotonic()
        agent.stop()
        assert time.monotonic() - t0 < 10.0
        conn.close()
    finally:
        agent.stop()
        silent.close()


def test_an_http_check_that_gets_no_answer_times_out_as_consul_says(http: httpx.Client) -> None:
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
    try:
        check = {"HTTP": url, "Interval": "10s", "Timeout": "200ms", "Status": "passing"}
        assert http.put("/v1/agent/service/register", json={**NATIVE, "Check": check}).is_success
        wait_for(_status_is(http, "critical"))
        assert _check(http)["Output"] == (
            f'Get "{url}": context deadline exceeded '
            "(Client.Timeout exceeded while awaiting headers)"
        )
    finally:
        silent.close()
