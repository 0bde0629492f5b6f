"""The demo (the project's main job) runs end to end and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_passes_and_reports_every_step() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    out = subprocess.run(
        [sys.executable, "-m", "consul_connect.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["ok"] is True
    names = [s["name"] for s in summary["steps"]]
    assert any("deny" in n for n in names)
    assert any("L7" in n for n in names)
    assert any("rotation" in n for n in names)
    rotation = next(s for s in summary["steps"] if "rotation" in s["name"])
    assert ", 0 failed" in rotation["detail"]


def test_demo_fails_clearly_when_the_agent_is_unreachable() -> None:
    env = dict(os.environ, CONSUL_HTTP_ADDR="127.0.0.1:1")
    out = subprocess.run(
        [sys.executable, "-m", "consul_connect.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 1
    assert json.loads(out.stdout)["ok"] is False
