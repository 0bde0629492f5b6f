"""The demo (the project's main job) runs end to end and says so."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx

from consul_connect.devagent import DevAgent


def _demo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consul_connect.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _without_consul_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}


def test_demo_passes_and_reports_every_step() -> None:
    out = _demo("--json", env=_without_consul_env())
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["ok"] is True
    names = [s["name"] for s in summary["steps"]]
    assert any("deny" in n for n in names)
    assert any("L7" in n for n in names)
    assert any("rotation" in n for n in names)
    rotation = next(s for s in summary["steps"] if "rotation" in s["name"])
    assert ", 0 failed" in rotation["detail"]
    l7 = next(s for s in summary["steps"] if "L7" in s["name"])
    assert "POST /orders -> 403" in l7["detail"]
    assert "one keep-alive connection" in l7["detail"]


def test_demo_shows_progress_then_a_summary_with_timings() -> None:
    out = _demo(env=_without_consul_env())
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    started = [n for n, line in enumerate(lines) if line.startswith("… ")]
    done = [n for n, line in enumerate(lines) if line.startswith("✓ ")]
    assert len(started) == len(done) >= 5
    # Each step is announced before it finishes, and finishes with its duration.
    assert all(s < d for s, d in zip(started, done, strict=True))
    assert all(re.search(r"\(\d+ ms\)$", lines[d]) for d in done)
    summary = lines.index("summary")
    assert summary > done[-1]
    assert re.search(r"^\s+\d+ ms\s+total: every step behaved as expected$", lines[-1])


def test_demo_uses_a_real_agent_from_the_environment_and_cleans_up(agent: DevAgent) -> None:
    env = dict(_without_consul_env(), CONSUL_HTTP_ADDR=agent.address)
    out = _demo(env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"using the Consul agent at http://{agent.address}" in out.stdout
    assert "rotation skipped" in out.stdout
    with httpx.Client(base_url=agent.http_addr, timeout=10) as http:
        assert http.get("/v1/config/service-intentions").json() in (None, [])
        assert http.get("/v1/config/service-defaults").json() in (None, [])
        services = http.get("/v1/agent/services").json()
    assert not any(name.startswith("demo-") for name in services)


def test_demo_fails_clearly_when_the_agent_is_unreachable() -> None:
    env = dict(_without_consul_env(), CONSUL_HTTP_ADDR="127.0.0.1:1")
    out = _demo("--json", env=env)
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["ok"] is False
    assert "unreachable" in doc["error"]
    human = _demo(env=env)
    assert human.returncode == 1
    assert "demo failed: the Consul agent at http://127.0.0.1:1 is unreachable" in human.stderr
    assert "Traceback" not in human.stderr
