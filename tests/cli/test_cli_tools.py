"""The operator commands against a dev agent: cert, intention, call, dial, doctor."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import httpx
import pytest

from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent
from consul_connect.service import ConnectListener, Service
from tests.cli.support import Run, runner


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run one command in-process (:func:`tests.cli.support.runner`)."""
    return runner(capsys, monkeypatch)


@pytest.fixture
def addr(agent: DevAgent) -> list[str]:
    return ["--http-addr", agent.address]


@pytest.fixture
def dead_addr() -> list[str]:
    """An address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["--http-addr", f"127.0.0.1:{port}", "--timeout", "3"]


def _serve(listener: ConnectListener) -> None:
    """Answer each authorized peer: ``PING`` gets ``PONG``, anything else one HTTP reply."""
    while True:
        try:
            sock, identity = listener.accept()
        except OSError:
            return
        with sock:
            sock.settimeout(5)
            try:
                data = sock.recv(65536)
                if data.startswith(b"PING"):
                    sock.sendall(b"PONG " + identity.service.encode() + b"\n")
                    continue
                while b"\r\n\r\n" not in data:
                    more = sock.recv(65536)
                    if not more:
                        break
                    data += more
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                while len(body) < length:
                    body += sock.recv(65536)
                method, path, _ = lines[0].split(" ", 2)
                payload = f"{method} {path} from {identity.service}: ".encode() + body
                sock.sendall(
                    b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nX-Echo: yes\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
            except OSError:
                continue


@pytest.fixture
def api(agent: DevAgent) -> Iterator[Service]:
    """A Connect-native ``api`` registered in the agent, answering PING and HTTP."""
    svc = Service("api", agent=AgentConfig.from_address(agent.address))
    svc.wait_ready(10)
    listener = svc.listen()
    port = listener.address[1]
    httpx.put(
        f"{agent.http_addr}/v1/agent/service/register",
        json={"Name": "api", "Port": port, "Address": "127.0.0.1", "Connect": {"Native": True}},
        timeout=10,
    ).raise_for_status()
    thread = threading.Thread(target=_serve, args=(listener,), daemon=True)
    thread.start()
    yield svc
    listener.close()
    svc.close()
    thread.join(5)


def _deny(agent: DevAgent, api: Service, source: str, caller: str) -> None:
    """Write a deny intention ``source => api`` and wait until ``api`` applies it to ``caller``."""
    httpx.put(
        f"{agent.http_addr}/v1/connect/intentions/exact",
        params={"source": source, "destination": "api"},
        json={"Action": "deny"},
        timeout=10,
    ).raise_for_status()
    caller_id = replace(api.identity, service=caller)
    deadline = time.monotonic() + 10
    while True:
        decision = api.authorizer.decide(caller_id)
        if decision is not None and not decision.allowed:
            return
        assert time.monotonic() < deadline, "the deny intention never reached the service"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------- cert


def test_cert_shows_identity_serial_expiry_and_roots(cli: Run, addr: list[str]) -> None:
    human = cli("cert", "web", *addr)
    assert human.code == 0, human.err
    assert "/svc/web" in human.out
    assert "renewal" in human.out and "trust domain" in human.out
    assert "PRIVATE KEY" not in human.out

    doc = cli("cert", "web", "--json", *addr).json()
    assert isinstance(doc, dict)
    leaf, roots = doc["leaf"], doc["roots"]
    assert leaf["identity"].endswith("/dc/dc1/svc/web")
    assert leaf["verifies"] is True
    assert leaf["valid_after"] < leaf["renewal_window"]["start"] < leaf["renewal_window"]["end"]
    assert leaf["renewal_window"]["end"] < leaf["valid_before"]
    assert 0 < leaf["expires_in_seconds"] <= 72 * 3600
    assert roots["trust_domain"] and roots["roots"][0]["active"] is True
    assert "PRIVATE KEY" not in json.dumps(doc)


def test_cert_reports_an_unreachable_agent(cli: Run, dead_addr: list[str]) -> None:
    res = cli("cert", "web", "--json", *dead_addr)
    assert res.code == 1
    assert "cannot reach the Consul agent" in res.err
    assert res.json() == {
        "error": res.err.removeprefix("error: ").strip(),
        "kind": "agent_unreachable",
    }


# ----------------------------------------------------------------------------- intention


def test_intentions_can_be_created_listed_checked_and_deleted(cli: Run, addr: list[str]) -> None:
    assert cli("intention", "create", "web", "api", "--description", "front", *addr).code == 0
    assert cli("intention", "create", "*", "api", "--deny", *addr).code == 0

    listed = cli("intention", "list", "--json", *addr).json()
    assert [(i["source"], i["destination"], i["action"]) for i in listed] == [
        ("web", "api", "allow"),
        ("*", "api", "deny"),
    ]
    human = cli("intention", "list", *addr)
    assert "SOURCE" in human.out and "front" in human.out

    allowed = cli("intention", "check", "web", "api", *addr)
    assert (allowed.code, allowed.out.strip()) == (0, "Allowed")
    denied = cli("intention", "check", "db", "api", "--json", *addr)
    assert denied.code == 2
    assert denied.json() == {"source": "db", "destination": "api", "allowed": False}

    again = cli("intention", "create", "web", "api", *addr)
    assert again.code == 1 and "already exists" in again.err
    replaced = cli("intention", "create", "web", "api", "--deny", "--replace", *addr)
    assert replaced.code == 0
    assert cli("intention", "check", "web", "api", *addr).code == 2

    assert cli("intention", "delete", "web", "api", *addr).code == 0
    missing = cli("intention", "get", "web", "api", "--json", *addr)
    assert missing.code == 1
    assert missing.json() == {"error": "no intention web => api", "kind": "not_found"}
    gone = cli("intention", "delete", "web", "api", *addr)
    assert gone.code == 1 and "no intention web => api" in gone.err


def test_intention_commands_need_the_right_token(
    cli: Run, start_agent: Callable[..., DevAgent]
) -> None:
    secured = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    where = ["--http-addr", secured.address]
    res = cli("intention", "create", "web", "api", *where)
    assert res.code == 1
    assert "lacks permission" in res.err and "--token" in res.err
    assert cli("intention", "create", "web", "api", "--token", "root", *where).code == 0


# ------------------------------------------------------------------------------ call/dial


@pytest.mark.usefixtures("api")
def test_call_sends_one_request_and_prints_status_and_body(cli: Run, addr: list[str]) -> None:
    res = cli("call", "--as", "web", "api.service.consul", "/hello", "-i", *addr)
    assert res.code == 0, res.err
    assert res.out.startswith("HTTP/1.1 201 Created\n")
    assert "x-echo: yes" in res.out.lower()
    assert res.out.endswith("GET /hello from web: ")

    doc = cli(
        "call", "--as", "web", "api", "/items", "-d", "payload", "-H", "X-Test: 1", "--json", *addr
    ).json()
    assert isinstance(doc, dict)
    assert doc["status"] == 201
    assert doc["body"] == "POST /items from web: payload"
    assert doc["headers"]["x-echo"] == "yes"
    assert doc["server_identity"].endswith("/svc/api")


def test_call_denied_by_intentions_says_so(
    cli: Run, addr: list[str], agent: DevAgent, api: Service
) -> None:
    _deny(agent, api, "web", "web")
    res = cli("call", "--as", "web", "api", "/", "--json", *addr)
    assert res.code == 1
    assert "likely denied by intentions" in res.err
    assert "web => api: denied" in res.err
    doc = res.json()
    assert isinstance(doc, dict) and doc["kind"] == "denied"


def test_call_to_an_unknown_service_reports_no_instances(cli: Run, addr: list[str]) -> None:
    res = cli("call", "--as", "web", "nope.service.consul", "/", "--json", *addr)
    assert res.code == 1
    assert "no healthy Connect-capable instance of 'nope'" in res.err
    doc = res.json()
    assert isinstance(doc, dict) and doc["kind"] == "no_instances"


def test_call_without_service_write_names_the_missing_right(
    cli: Run, start_agent: Callable[..., DevAgent]
) -> None:
    secured = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    res = cli("call", "--as", "web", "api", "--http-addr", secured.address, "--timeout", "5")
    assert res.code == 1
    assert "service:write" in res.err


@pytest.mark.usefixtures("api")
def test_dial_pipes_stdin_to_the_service_and_its_reply_to_stdout(cli: Run, addr: list[str]) -> None:
    res = cli("dial", "--as", "web", "api.connect.consul", "-v", *addr, stdin=b"PING\n")
    assert res.code == 0, res.err
    assert res.out == "PONG web\n"
    assert "sent 5 bytes, received 9 bytes" in res.err


def test_dial_denied_by_intentions_says_so(
    cli: Run, addr: list[str], agent: DevAgent, api: Service
) -> None:
    _deny(agent, api, "*", "web")
    res = cli("dial", "--as", "web", "api", *addr, stdin=b"PING\n")
    assert res.code == 1
    assert "likely denied by intentions" in res.err
    assert res.out == ""


def test_dial_to_an_unknown_service_reports_no_instances(cli: Run, addr: list[str]) -> None:
    res = cli("dial", "--as", "web", "nope", *addr, stdin=b"PING\n")
    assert res.code == 1
    assert "no healthy Connect-capable instance" in res.err


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "--as", "web", "api"],
        ["dial", "--as", "web", "api"],
        ["intention", "list"],
        ["intention", "check", "web", "api"],
    ],
    ids=["call", "dial", "intention-list", "intention-check"],
)
def test_commands_report_an_unreachable_agent(
    cli: Run, dead_addr: list[str], argv: list[str]
) -> None:
    res = cli(*argv, *dead_addr)
    assert res.code == 1
    assert "cannot reach the Consul agent" in res.err
    assert "Traceback" not in res.err


# -------------------------------------------------------------------------------- doctor


@pytest.mark.usefixtures("api")
def test_doctor_passes_on_a_healthy_dev_agent(cli: Run, addr: list[str]) -> None:
    res = cli("doctor", "--service", "api", "--json", *addr)
    assert res.code == 0, res.out
    doc = res.json()
    assert isinstance(doc, dict) and doc["ok"] is True
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert status == {
        "agent": "ok",
        "agent-info": "ok",
        "token": "ok",
        "ca-roots": "ok",
        "ca-config": "ok",
        "leaf": "ok",
        "intentions": "ok",
        "discovery": "ok",
        "clock": "ok",
    }
    human = cli("doctor", *addr)
    assert human.code == 0 and "all checks passed" in human.out


def test_doctor_fails_when_the_agent_is_unreachable(cli: Run, dead_addr: list[str]) -> None:
    res = cli("doctor", "--json", *dead_addr)
    assert res.code == 1
    doc = res.json()
    assert isinstance(doc, dict)
    assert doc["ok"] is False
    assert [(c["name"], c["status"]) for c in doc["checks"]] == [("agent", "fail")]


def test_doctor_names_missing_token_rights(cli: Run, start_agent: Callable[..., DevAgent]) -> None:
    secured = start_agent(
        acl_enabled=True, acl_default_policy="deny", acl_initial_management_token="root"
    )
    created = httpx.put(
        f"{secured.http_addr}/v1/acl/token",
        headers={"X-Consul-Token": "root"},
        json={"Description": "web only", "ServiceIdentities": [{"ServiceName": "web"}]},
        timeout=10,
    )
    created.raise_for_status()
    web_token = created.json()["SecretID"]
    where = ["--http-addr", secured.address]

    res = cli("doctor", "--service", "api", "--token", web_token, "--json", *where)
    assert res.code == 1
    checks = {c["name"]: c for c in res.json()["checks"]}
    assert checks["token"]["status"] == "ok" and "web only" in checks["token"]["detail"]
    assert checks["leaf"]["status"] == "fail"
    assert "service:write" in checks["leaf"]["detail"]
    assert checks["ca-config"]["status"] == "warn"

    bogus = cli("doctor", "--token", "not-a-token", "--json", *where)
    assert bogus.code == 1
    checks = {c["name"]: c for c in bogus.json()["checks"]}
    assert checks["token"]["status"] == "fail"
    assert "not known to the agent" in checks["token"]["detail"]


def test_intention_commands_print_one_json_document_each(cli: Run, addr: list[str]) -> None:
    created = cli("intention", "create", "web", "api", "--deny", "--json", *addr)
    assert created.code == 0
    assert created.json() == {
        "source": "web",
        "destination": "api",
        "action": "deny",
        "created": True,
    }
    got = cli("intention", "get", "web", "api", "--json", *addr).json()
    assert (got["source"], got["destination"], got["action"]) == ("web", "api", "deny")
    assert got["permissions"] == [] and isinstance(got["precedence"], int)
    deleted = cli("intention", "delete", "web", "api", "--json", *addr)
    assert (deleted.code, deleted.json()) == (
        0,
        {"source": "web", "destination": "api", "deleted": True},
    )
    assert cli("intention", "list", "--json", *addr).json() == []


def test_doctor_warns_about_a_service_without_instances(cli: Run, addr: list[str]) -> None:
    res = cli("doctor", "--service", "nope", "--json", *addr)
    checks = {c["name"]: c for c in res.json()["checks"]}
    assert checks["discovery"]["status"] in ("warn", "fail")
    assert "nope" in checks["discovery"]["detail"]


def test_maint_lists_enters_and_leaves_maintenance_mode(
    cli: Run, addr: list[str], agent: DevAgent
) -> None:
    body = {"ID": "api-1", "Name": "api", "Port": 8443, "Connect": {"Native": True}}
    httpx.put(f"{agent.http_addr}/v1/agent/service/register", json=body).raise_for_status()
    assert cli("maint", *addr).out == "nothing is in maintenance mode\n"

    r = cli("maint", "--enable", "--service", "api-1", "--reason", "deploying", *addr)
    assert (r.code, r.out) == (0, "service 'api-1' entered maintenance mode\n")
    assert cli("maint", "--enable", *addr).code == 0
    listed = cli("maint", "--json", *addr).json()["maintenance"]
    assert [(e["service_id"], e["reason"]) for e in listed] == [
        (
            None,
            "Maintenance mode is enabled for this node, but no reason was provided. "
            "This is a default message.",
        ),
        ("api-1", "deploying"),
    ]
    passing = httpx.get(f"{agent.http_addr}/v1/health/connect/api?passing=1").json()
    assert passing == []

    assert cli("maint", "--disable", *addr).out == "the node left maintenance mode\n"
    assert cli("maint", "--disable", "--service", "api-1", *addr).code == 0
    assert cli("maint", *addr).out == "nothing is in maintenance mode\n"


def test_maint_reports_unknown_instances_and_bad_flag_combinations(
    cli: Run, addr: list[str]
) -> None:
    r = cli("maint", "--enable", "--service", "nope", *addr)
    assert r.code == 1 and 'Unknown service ID "nope"' in r.err
    r = cli("maint", "--service", "nope", *addr)
    assert r.code == 2 and "needs --enable or --disable" in r.err
    r = cli("maint", "--disable", "--reason", "x", *addr)
    assert r.code == 2 and "--reason only goes with --enable" in r.err
