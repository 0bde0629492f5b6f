"""Acceptance: index regression, persistence of every table, the ``dev`` command, DevAgent forms.

Consul's blocking-query rules (features/blocking.mdx): an index given by the client
that is larger than the server's blocks for the whole wait and then returns the
smaller current index; a client that sees the index go backwards resets to 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from consul_connect.devagent import DevAgent, DevAgentConfig
from tests.devagent.acceptance_support import MGMT, ok


def _index(r: httpx.Response) -> int:
    return int(r.headers["X-Consul-Index"])


# -- index regression ---------------------------------------------------------------------------


def test_a_client_sees_the_index_go_backwards_after_a_restart_and_recovers(
    start_agent: Callable[..., DevAgent],
) -> None:
    first = start_agent()
    port = first.port
    with httpx.Client(base_url=first.http_addr, timeout=10) as c:
        for i in range(5):
            ok(c.put("/v1/agent/service/register", json={"Name": f"s{i}", "Port": 1000 + i}))
        last_seen = _index(c.get("/v1/catalog/services"))
    first.stop()

    # Same address, no data dir: the state and its index start over.
    second = start_agent(port=port)
    with httpx.Client(base_url=second.http_addr, timeout=10) as c:
        started = time.monotonic()
        r = c.get("/v1/catalog/services", params={"index": last_seen, "wait": "150ms"})
        waited = time.monotonic() - started
        assert r.status_code == 200
        assert waited >= 0.15  # blocked for the whole wait, nothing changed past our index
        regressed = _index(r)
        assert 0 < regressed < last_seen

        # The client's rule: a smaller index means reset to 0 and start over.
        fresh = c.get("/v1/catalog/services")
        current = _index(fresh)
        assert "s0" not in fresh.json()

        result: dict[str, Any] = {}

        def watch() -> None:
            with httpx.Client(base_url=second.http_addr, timeout=10) as w:
                result["r"] = w.get("/v1/catalog/services", params={"index": current, "wait": "5s"})

        t = threading.Thread(target=watch)
        t.start()
        time.sleep(0.05)  # let the watch block; the assertion below does not depend on it
        assert c.put("/v1/agent/service/register", json={"Name": "late", "Port": 1}).status_code
        t.join(10)
        assert _index(result["r"]) > current
        assert "late" in result["r"].json()


def test_an_index_ahead_of_the_server_times_out_with_the_current_index(
    start_agent: Callable[..., DevAgent],
) -> None:
    agent = start_agent()
    with httpx.Client(base_url=agent.http_addr, timeout=10) as c:
        now = _index(c.get("/v1/health/service/web"))
        paths = ("/v1/health/service/web", "/v1/connect/ca/roots", "/v1/config/service-defaults")
        for path in paths:
            r = c.get(path, params={"index": now + 1000, "wait": "30ms"})
            assert r.status_code == 200
            assert _index(r) < now + 1000


# -- persistence --------------------------------------------------------------------------------


def _populate(c: httpx.Client) -> None:
    ok(
        c.put(
            "/v1/agent/service/register",
            json={
                "Name": "web",
                "ID": "web-1",
                "Port": 8443,
                "Tags": ["a"],
                "Meta": {"k": "v"},
                "Connect": {"Native": True},
                "Check": {"TTL": "1h", "CheckID": "web-ttl"},
            },
        )
    )
    ok(c.put("/v1/agent/check/warn/web-ttl", params={"note": "slow"}))
    ok(
        c.put(
            "/v1/catalog/register",
            json={"Node": "ext", "Address": "10.0.0.9", "Service": {"Service": "db", "Port": 5432}},
        )
    )
    ok(c.put("/v1/config", json={"Kind": "service-defaults", "Name": "web", "Protocol": "http"}))
    ok(
        c.put(
            "/v1/config",
            json={
                "Kind": "service-intentions",
                "Name": "web",
                "Sources": [
                    {
                        "Name": "api",
                        "Permissions": [
                            {"Action": "allow", "HTTP": {"PathPrefix": "/v1", "Methods": ["GET"]}}
                        ],
                    }
                ],
            },
        )
    )
    ok(
        c.post(
            "/v1/connect/intentions",
            json={"SourceName": "db", "DestinationName": "api", "Action": "deny"},
        )
    )
    assert c.post("/v1/query", json={"Name": "web-q", "Service": {"Service": "web"}}).status_code
    ok(
        c.put(
            "/v1/acl/token",
            json={"Description": "web svc", "ServiceIdentities": [{"ServiceName": "web"}]},
        )
    )
    # Rotate the root so the CA state holds two roots and a cross-signed certificate.
    ok(
        c.put(
            "/v1/connect/ca/configuration",
            json={"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
        )
    )


READS = [
    "/v1/agent/services",
    "/v1/agent/checks",
    "/v1/catalog/services",
    "/v1/catalog/nodes",
    "/v1/catalog/service/db",
    "/v1/health/service/web",
    "/v1/health/checks/web",
    "/v1/config/service-defaults/web",
    "/v1/config/service-intentions/web",
    "/v1/connect/intentions",
    "/v1/connect/intentions/match?by=destination&name=web",
    "/v1/query",
    "/v1/acl/tokens",
    "/v1/acl/policies",
    "/v1/connect/ca/roots",
    "/v1/connect/ca/configuration",
]
ROOTS = "/v1/connect/ca/roots"
INDEXED = [p for p in READS if not p.startswith("/v1/agent/") and "configuration" not in p]


def test_every_table_survives_a_restart_and_the_index_never_goes_back(
    start_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    settings: dict[str, Any] = {
        "data_dir": str(tmp_path),
        "node_name": "persist-node",
        "acl_enabled": True,
        "acl_initial_management_token": MGMT,
    }
    first = start_agent(**settings)
    headers = {"X-Consul-Token": MGMT}
    with httpx.Client(base_url=first.http_addr, timeout=30, headers=headers) as c:
        _populate(c)
        before = {p: c.get(p) for p in READS}
        leaf_before = c.get("/v1/agent/connect/ca/leaf/web")
        assert leaf_before.status_code == 200
    store_index = first.call(lambda ctx: ctx.store.index)
    first.stop()

    second = start_agent(**settings)
    with httpx.Client(base_url=second.http_addr, timeout=30, headers=headers) as c:
        for path, old in before.items():
            new = c.get(path)
            assert new.status_code == 200, (path, new.text)
            if path == ROOTS:
                # The CA key was never written to disk: the CA goes on with a fresh
                # active root, and every earlier root stays listed.
                old_ids = [r["ID"] for r in old.json()["Roots"]]
                new_roots = new.json()["Roots"]
                assert [r["ID"] for r in new_roots[:-1]] == old_ids
                assert new_roots[-1]["Active"] and new_roots[-1]["ID"] not in old_ids
            else:
                assert new.json() == old.json(), path
            if path in INDEXED:
                assert _index(new) >= _index(old), path
        assert len(before[ROOTS].json()["Roots"]) == 2
        assert second.call(lambda ctx: ctx.store.index) >= store_index
        leaf_after = c.get("/v1/agent/connect/ca/leaf/web")
        assert _index(leaf_after) >= _index(leaf_before)
        assert leaf_after.json()["SerialNumber"] != ""
        # A write after the restart gets an index above everything acknowledged before it.
        assert c.put("/v1/agent/service/register", json={"Name": "new", "Port": 1}).status_code
        assert _index(c.get("/v1/catalog/services")) > store_index
        # The management token still works and the service token still has its rights.
        assert c.get("/v1/acl/token/self").json()["SecretID"] == MGMT


def test_an_interrupted_write_leaves_the_acknowledged_state(
    start_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    first = start_agent(data_dir=str(tmp_path), node_name="n")
    with httpx.Client(base_url=first.http_addr, timeout=30) as c:
        assert c.put("/v1/agent/service/register", json={"Name": "kept", "Port": 1}).status_code
        services = c.get("/v1/agent/services").json()
    first.stop()
    # A crash between writing the temporary file and renaming it over the state.
    (tmp_path / "state.json.tmp").write_bytes(b'{"version": 1, "index": 99999, "tabl')
    second = start_agent(data_dir=str(tmp_path), node_name="n")
    with httpx.Client(base_url=second.http_addr, timeout=30) as c:
        assert c.get("/v1/agent/services").json() == services
    assert not (tmp_path / "state.json.tmp").exists()


# -- the dev command ------------------------------------------------------------------------------


def _dev_config(monkeypatch: pytest.MonkeyPatch, *argv: str) -> DevAgentConfig:
    from consul_connect import cli
    from consul_connect.devagent import server

    seen: list[DevAgentConfig] = []

    def fake_serve(config: DevAgentConfig, announce: Any = None) -> None:
        seen.append(config)
        if announce is not None:
            host = f"[{config.bind}]" if ":" in config.bind else config.bind
            announce(f"{host}:{config.http_port}")

    monkeypatch.setattr(server, "serve_forever", fake_serve)
    assert cli.main(["dev", *argv]) == 0
    assert len(seen) == 1
    return seen[0]


def test_dev_command_binds_loopback_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _dev_config(monkeypatch)
    assert (cfg.bind, cfg.http_port) == ("127.0.0.1", 8500)
    assert "http://127.0.0.1:8500" in capsys.readouterr().out
    assert (cfg.acl_enabled, cfg.data_dir) == (False, None)


def test_dev_command_takes_another_bind_address_and_the_other_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = _dev_config(
        monkeypatch,
        "--bind",
        "0.0.0.0",
        "--http-port",
        "18500",
        "--datacenter",
        "east",
        "--node-name",
        "n1",
        "--acl-default-policy",
        "deny",
        "--acl-initial-management-token",
        "s3cret",
        "--data-dir",
        str(tmp_path),
        "--leaf-cert-ttl",
        "2h",
        "--log-level",
        "warning",
    )
    assert cfg.bind == "0.0.0.0"
    assert cfg.http_port == 18500
    assert (cfg.datacenter, cfg.node_name) == ("east", "n1")
    assert (cfg.acl_enabled, cfg.acl_default_policy) == (True, "deny")
    assert cfg.acl_initial_management_token == "s3cret"
    assert (cfg.data_dir, cfg.leaf_cert_ttl, cfg.log_level) == (str(tmp_path), 7200.0, "warning")
    assert "0.0.0.0:18500" in capsys.readouterr().out


# -- DevAgent in Python ---------------------------------------------------------------------------


async def test_dev_agent_is_an_async_context_manager_on_a_free_loopback_port() -> None:
    async with DevAgent() as agent:
        assert agent.address.startswith("127.0.0.1:")
        assert agent.port > 0
        async with httpx.AsyncClient(base_url=agent.http_addr, timeout=10) as c:
            r = await c.get("/v1/status/leader")
            assert r.status_code == 200
            assert r.json().endswith(":8300")
            r = await c.put("/v1/agent/service/register", json={"Name": "a", "Port": 1})
            assert r.status_code == 200
        addr = agent.http_addr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{addr}/v1/status/leader", timeout=2)


def test_two_agents_run_side_by_side_on_different_ports() -> None:
    with DevAgent() as a, DevAgent() as b:
        assert a.port != b.port
        with httpx.Client(timeout=10) as c:
            c.put(f"{a.http_addr}/v1/agent/service/register", json={"Name": "only-a", "Port": 1})
            assert "only-a" in c.get(f"{a.http_addr}/v1/agent/services").json()
            assert c.get(f"{b.http_addr}/v1/agent/services").json() == {}


# -- blocking timeouts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "base"), [(0.0, 300.0), (0.2, 0.2), (90.0, 90.0), (3600.0, 600.0)]
)
def test_blocking_timeout_is_capped_at_ten_minutes_with_up_to_a_sixteenth_of_jitter(
    wait: float, base: float
) -> None:
    from consul_connect.devagent.http import block_timeout

    draws = [block_timeout(wait) for _ in range(300)]
    assert all(base <= t <= base + base / 16 for t in draws)
    assert max(draws) - min(draws) > base / 64  # the jitter is really random


@pytest.mark.parametrize("wait", ["80ms", "0.08s", "0m0.08s", "80000us"])
def test_wait_takes_go_durations(agent: DevAgent, http: httpx.Client, wait: str) -> None:
    idx = _index(http.get("/v1/catalog/services"))
    started = time.monotonic()
    r = http.get("/v1/catalog/services", params={"index": idx, "wait": wait})
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert _index(r) == idx
    assert 0.08 <= elapsed < 0.08 * 17 / 16 + 1.0
