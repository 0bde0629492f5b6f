"""Dev agent benchmarks: held blocking queries vs memory, and leaf signing rate.

Run: ``python bench/devagent_bench.py [--queries 1000] [--leaves 200] [--out FILE]``.
The agent runs as a separate ``consul-connect dev`` process so its memory (RSS) is
measured alone. Figures are reported next to a baseline from the same run: the
agent's idle RSS, and the raw ``cryptography`` signing rate on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _start_agent(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consul_connect.cli",
            "dev",
            "--http-port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/status/leader", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("dev agent did not start")


async def _blocking_get(port: int, path: str) -> int:
    """One blocking GET on its own connection; returns the answer's X-Consul-Index.

    A raw asyncio client, so the figures are the agent's: an HTTP client library's
    own per-connection bookkeeping would dominate with a thousand connections.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-consul-index":
            return int(value.strip())
    return 0


async def held_queries(base: str, pid: int, total: int) -> dict[str, object]:
    """Hold ``total`` blocking queries open; sample the agent's RSS as they pile up."""
    port = int(base.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        r = await client.get("/v1/catalog/services")
        index = int(r.headers["X-Consul-Index"])
        idle = _rss_kib(pid)
        samples = [(0, idle)]
        tasks: list[asyncio.Task[int]] = []
        step = max(1, total // 4)
        path = f"/v1/catalog/services?index={index}&wait=60s"
        for i in range(total):
            tasks.append(asyncio.create_task(_blocking_get(port, path)))
            if (i + 1) % step == 0:
                await asyncio.sleep(0.5)
                samples.append((i + 1, _rss_kib(pid)))
        await asyncio.sleep(1.0)
        held = sum(1 for t in tasks if not t.done())
        samples.append((total, _rss_kib(pid)))
        t0 = time.perf_counter()
        await client.put("/v1/agent/service/register", json={"Name": "wake", "Port": 1})
        done = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        release_s = time.perf_counter() - t0
    changed = sum(1 for got in done if got > index)
    peak = max(k for _, k in samples)
    return {
        "queries": total,
        "held_open": held,
        "returned_on_change": changed,
        "release_all_seconds": round(release_s, 3),
        "rss_kib_samples": samples,
        "idle_rss_kib": idle,
        "added_kib_per_query": round((peak - idle) / total, 2),
    }


def leaf_signing(base: str, count: int) -> dict[str, object]:
    """Leaf signing through the agent vs. raw key generation + signing with cryptography."""
    with httpx.Client(base_url=base, timeout=30) as client:
        client.get("/v1/agent/connect/ca/leaf/warmup")
        t0 = time.perf_counter()
        for i in range(count):
            r = client.get(f"/v1/agent/connect/ca/leaf/svc-{i}")
            r.raise_for_status()
        agent_rate = count / (time.perf_counter() - t0)
        # The HTTP round trip alone, for reading the signing rate against it.
        t0 = time.perf_counter()
        for _ in range(count):
            client.get("/v1/status/leader").raise_for_status()
        http_rate = count / (time.perf_counter() - t0)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(i + 1)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(hours=72))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(
                            f"spiffe://x.consul/ns/default/dc/dc1/svc/s{i}"
                        )
                    ]
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
    raw_rate = count / (time.perf_counter() - t0)
    return {
        "leaves": count,
        "agent_leaves_per_second": round(agent_rate, 1),
        "raw_cryptography_per_second": round(raw_rate, 1),
        "agent_trivial_requests_per_second": round(http_rate, 1),
        "ratio_agent_to_raw": round(agent_rate / raw_rate, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--leaves", type=int, default=200)
    parser.add_argument("--out", default="bench/results/devagent.json")
    args = parser.parse_args()
    port = _free_port()
    proc = _start_agent(port)
    base = f"http://127.0.0.1:{port}"
    try:
        result = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": (
                f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
            ),
            "blocking": asyncio.run(held_queries(base, proc.pid, args.queries)),
            "signing": leaf_signing(base, args.leaves),
        }
    finally:
        proc.terminate()
        proc.wait(15)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
