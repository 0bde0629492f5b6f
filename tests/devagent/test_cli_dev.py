"""``consul-connect dev``: the dev agent as a command."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dev_command_prints_its_address_and_serves_until_stopped(tmp_path: object) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consul_connect.cli",
            "dev",
            "--http-port",
            str(port),
            "--node-name",
            "cli-node",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline() + proc.stdout.readline()
        assert f"127.0.0.1:{port}" in banner
        deadline = time.monotonic() + 20
        leader = None
        while time.monotonic() < deadline:
            try:
                leader = httpx.get(f"http://127.0.0.1:{port}/v1/status/leader", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert leader
        cfg = httpx.get(f"http://127.0.0.1:{port}/v1/agent/self", timeout=5).json()["Config"]
        assert cfg["NodeName"] == "cli-node"
        assert cfg["Datacenter"] == "dc1"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_dev_command_reports_a_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "consul_connect.cli", "dev", "--http-port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert "cannot listen" in out.stderr


def test_dev_command_rejects_a_bad_leaf_ttl() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "consul_connect.cli", "dev", "--leaf-cert-ttl", "soon"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "invalid duration" in out.stderr


def test_dev_command_on_port_zero_prints_the_port_it_bound() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "consul_connect.cli", "dev", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        line = proc.stdout.readline()
        address = line.split("http://", 1)[1].split()[0]
        port = int(address.rsplit(":", 1)[1])
        assert port > 0
        leader = httpx.get(f"http://{address}/v1/status/leader", timeout=10).json()
        assert leader
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_dev_command_can_announce_itself_as_json() -> None:
    import json

    proc = subprocess.Popen(
        [sys.executable, "-m", "consul_connect.cli", "dev", "--http-port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["datacenter"] == "dc1" and info["acl_enabled"] is False
        assert httpx.get(f"{info['http_addr']}/v1/status/leader", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
