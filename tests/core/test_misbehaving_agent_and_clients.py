"""A misbehaving agent must not stop a Service from renewing its leaf or following its
roots, nor make it hammer the agent, nor hand it an identity it did not ask for; and
clients that connect and stall must not keep good clients from a sync listener.

The agent here is a small HTTP double on 127.0.0.1 (what it isolates: exact answers a
real agent does not give on purpose), serving a :class:`TestCA`'s roots and leaves.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from consul_connect.agent.client import AgentClient
from consul_connect.agent.config import AgentConfig
from consul_connect.authz.authorizers import AllowTrustDomain
from consul_connect.certs import Leaf
from consul_connect.discovery import Endpoint
from consul_connect.errors import AgentResponseError, CertificateError, NotReadyError
from consul_connect.service import Service
from consul_connect.testing import TestCA

from .support import wait_for

ROOTS = "/v1/agent/connect/ca/roots"
LEAF = "/v1/agent/connect/ca/leaf/"

# JSON nested deeper than Python's parser recurses: json.loads raises RecursionError.
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000

Answer = tuple[int, dict[str, str], bytes]


class FakeAgent:
    """Answers the roots and leaf endpoints from ``ca``; ``leaf_answer``/``roots_answer``
    replace the honest answer when set. A blocking request on the current index waits
    (at most ``block`` seconds) until :meth:`changed` is called, as Consul's would."""

    def __init__(self, ca: TestCA, leaf: Leaf, *, block: float = 2.0) -> None:
        self.ca = ca
        self.leaf = leaf
        self.index = 10
        self.block = block
        self.leaf_answer: Callable[[], Answer] | None = None
        self.roots_answer: Callable[[], Answer] | None = None
        self.requests: dict[str, int] = {ROOTS: 0, LEAF: 0}
        self._changed = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, headers, body = fake.answer(self.path)
                head = f"HTTP/1.1 {status} X\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in headers.items()
                )
                # Head and body in one write: the client must not wait for delayed ACKs.
                self.wfile.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def changed(self, **state: Any) -> None:
        """Change what the agent holds (``leaf=``...), move its index, wake blocked queries."""
        with self._changed:
            for name, value in state.items():
                setattr(self, name, value)
            self.index += 1
            self._changed.notify_all()

    def answer(self, target: str) -> Answer:
        url = urlsplit(target)
        endpoint = ROOTS if url.path == ROOTS else LEAF if url.path.startswith(LEAF) else ""
        if not endpoint:
            return 404, {}, b"not found"
        self.requests[endpoint] += 1
        override = self.roots_answer if endpoint == ROOTS else self.leaf_answer
        if override is not None:
            return override()
        asked = parse_qs(url.query).get("index", ["0"])[0]
        with self._changed:
            if asked == str(self.index):
                self._changed.wait(self.block)
            data = self.ca.roots().to_json() if endpoint == ROOTS else self.leaf.to_json()
            return 200, {"X-Consul-Index": str(self.index)}, json.dumps(data).encode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def fake(ca: TestCA) -> Iterator[FakeAgent]:
    agent = FakeAgent(ca, ca.issue("web"))
    yield agent
    agent.close()


@pytest.fixture
def web(ca: TestCA, fake: FakeAgent) -> Iterator[Service]:
    svc = Service(
        "web",
        agent=AgentConfig.from_address(fake.address),
        authorizer=AllowTrustDomain(ca.trust_domain),
    )
    yield svc
    svc.close()


def test_an_agent_that_ignores_the_blocking_index_is_not_asked_in_a_hot_loop(
    fake: FakeAgent, web: Service
) -> None:
    # No X-Consul-Index and no blocking: every leaf query returns at once.
    fake.leaf_answer = lambda: (200, {}, json.dumps(fake.leaf.to_json()).encode())
    web.wait_ready(5)
    before = fake.requests[LEAF]
    window = 2.0
    time.sleep(window)  # a measuring window, not a synchronisation
    asked = fake.requests[LEAF] - before
    # The roots watch's limit (a burst of 3, then one a second) allows about 5 here.
    assert asked <= 3 + window + 2, f"{asked} leaf queries in {window:g}s"
    assert web.ready


def test_leaf_renewal_resumes_once_an_agent_answering_403_recovers(
    ca: TestCA, fake: FakeAgent, web: Service
) -> None:
    web.wait_ready(5)
    first = web.statistics().leaf_serial
    # e.g. a token not yet replicated to the agent's servers ("ACL not found").
    fake.leaf_answer = lambda: (403, {}, b"ACL not found")
    fake.changed()
    wait_for(lambda: web.statistics().watch_errors >= 1, what="the 403 to be reported")
    assert "not known to the agent" in web.statistics().last_error
    assert web.ready and web.statistics().leaf_serial == first  # last good leaf kept
    fake.leaf_answer = None
    fake.changed(leaf=ca.issue("web"))
    wait_for(
        lambda: web.statistics().leaf_serial == fake.leaf.serial_number,
        timeout=20,
        what="the renewed leaf once the agent recovered",
    )
    assert web.ready


def test_a_leaf_for_another_service_is_never_published(ca: TestCA, fake: FakeAgent) -> None:
    fake.leaf = ca.issue("db")
    svc = Service(
        "web",
        agent=AgentConfig.from_address(fake.address),
        authorizer=AllowTrustDomain(ca.trust_domain),
    )
    try:
        with pytest.raises(NotReadyError) as info:
            svc.wait_ready(1.5)
        assert isinstance(info.value.cause, CertificateError)
        assert "db" in str(info.value.cause)
        fake.changed(leaf=ca.issue("web"))
        svc.wait_ready(10)
        good = svc.statistics().leaf_serial
        errors = svc.statistics().watch_errors
        fake.changed(leaf=ca.issue("db"))
        wait_for(lambda: svc.statistics().watch_errors > errors, what="the refusal")
        assert svc.identity.service == "web"
        assert svc.statistics().leaf_serial == good
    finally:
        svc.close()


async def test_deeply_nested_json_from_the_agent_is_an_agent_response_error(
    ca: TestCA, fake: FakeAgent
) -> None:
    fake.roots_answer = lambda: (200, {"X-Consul-Index": "3"}, DEEP_JSON)
    async with AgentClient(AgentConfig.from_address(fake.address)) as client:
        with pytest.raises(AgentResponseError, match="not JSON"):
            await client.ca_roots()


def test_deeply_nested_json_does_not_end_the_leaf_and_roots_watches(
    ca: TestCA, fake: FakeAgent, web: Service
) -> None:
    web.wait_ready(5)
    deep: Callable[[], Answer] = lambda: (200, {"X-Consul-Index": "99"}, DEEP_JSON)  # noqa: E731
    fake.roots_answer = fake.leaf_answer = deep
    fake.changed()
    wait_for(lambda: web.statistics().watch_errors >= 2, what="both watches to report it")
    assert web.ready
    # The agent recovers, with a rotated CA and a leaf of the new root.
    fake.roots_answer = fake.leaf_answer = None
    ca.rotate()
    fake.changed(leaf=ca.issue("web"))
    wait_for(
        lambda: (
            web.statistics().roots_changes >= 1
            and web.statistics().leaf_serial == fake.leaf.serial_number
        ),
        timeout=20,
        what="the new roots and leaf after the agent recovered",
    )


# -- the blocking listener -------------------------------------------------------------


def test_silent_clients_do_not_keep_a_good_client_from_the_sync_listener(ca: TestCA) -> None:
    domain = AllowTrustDomain(ca.trust_domain)
    api = Service.from_test_ca(ca, "api", authorizer=domain)
    web = Service.from_test_ca(ca, "web", authorizer=domain)
    listener = api.listen(handshake_timeout=30)
    port = listener.address[1]
    # More silent connections than the listener has handshake workers, one half-sent
    # ClientHello among them.
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
    silent[0].sendall(b"\x16\x03\x01\x02\x00\x01")
    try:
        started = time.monotonic()
        with web.connect(Endpoint("127.0.0.1", port, api.identity), timeout=5) as conn:
            accepted, identity = listener.accept(timeout=5)
            with accepted:
                assert identity == web.identity
                conn.sendall(b"ping")
                assert accepted.recv(4) == b"ping"
        assert time.monotonic() - started < 5
        assert api.statistics().rejected == 0  # the silent ones are still within their time
    finally:
        for sock in silent:
            sock.close()
        listener.close()
        web.close()
        api.close()


def test_the_sync_listener_refuses_a_client_that_stalls_past_its_handshake_deadline(
    ca: TestCA,
) -> None:
    api = Service.from_test_ca(ca, "api", authorizer=AllowTrustDomain(ca.trust_domain))
    listener = api.listen(handshake_timeout=0.3)
    try:
        with socket.create_connection(listener.address, timeout=5) as stalled:
            stalled.settimeout(5)
            assert stalled.recv(1) == b""  # closed by the listener at its deadline
        wait_for(lambda: api.statistics().rejected == 1, what="the refusal")
        assert api.statistics().rejected_by_reason == {"handshake failed": 1}
    finally:
        listener.close()
        api.close()
