"""A/B of the native server's two TLS transports, in one script, two-host placement.

``python bench/ab.py [--app asgi|tcp] [--http h11|httptools] [--loop asyncio|uvloop]
[--mode keep|conn] [--rounds 6] [--duration 3] [--with-mtls]`` starts a dev agent and two
native servers (``serve(..., tls_transport="asyncio")`` and ``"direct"``; with ``--app
tcp`` a raw ``Service.start_server`` answering each request with a fixed response, on each
transport; ``--http`` and ``--loop`` apply to the ASGI app), pins them and the agent to
CPU 0, and drives each in turn from the C load generator on CPU 1, rotating the order
every round. ``--with-mtls`` adds plain mTLS on uvicorn (no identity check, no
authorization), the new-connection target's baseline, as a third server. It prints the
server CPU per request of each round and the medians: the "before and after" of the
direct transport, measured the way the two-host view is. Needs two CPUs and the C load
generator (``bench/setup.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))
import cgen
from common import Proc, fetch_pem, free_port, python_script, start_agent_allowing, wait_port

TRANSPORTS = ("asyncio", "direct")
SERVER_CPU, CLIENT_CPU = 0, 1


def _pin(proc: Proc, cpu: int) -> None:
    for pid in proc.pids():
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=["asgi", "tcp"], default="asgi")
    parser.add_argument("--http", choices=["h11", "httptools"], default="httptools")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--mode", choices=["keep", "conn"], default="keep")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--with-mtls", action="store_true",
                        help="also measure plain mTLS on uvicorn (the ASGI app's baseline)")
    args = parser.parse_args()
    exe = cgen.build()
    if isinstance(exe, str) or (os.cpu_count() or 1) < 2:
        print(f"skipped: needs two CPUs and the C load generator ({exe})")
        return 0
    agent, addr = start_agent_allowing("web", "api")
    servers: dict[str, tuple[Proc, int]] = {}
    keys = None
    try:
        for transport in TRANSPORTS:
            port = free_port()
            if args.app == "tcp":
                command = python_script("tcp_server.py", "--agent", addr, "--port", str(port),
                                        "--tls-transport", transport)
            else:
                command = python_script(
                    "server.py", "--kind", "native-intentions", "--port", str(port), "--agent",
                    addr, "--http", args.http, "--loop", args.loop, "--tls-transport", transport,
                    *(["--no-tickets"] if args.mode == "conn" else []))
            servers[transport] = (Proc(command, name=transport), port)
        if args.with_mtls and args.app == "asgi":
            port = free_port()
            servers["mtls"] = (Proc(python_script(
                "server.py", "--kind", "mtls", "--port", str(port), "--agent", addr, "--http",
                args.http, "--loop", args.loop,
                *(["--no-tickets"] if args.mode == "conn" else [])), name="mtls"), port)
        names = list(servers)
        for proc, port in servers.values():
            wait_port(port, 60, proc.popen)
            _pin(proc, SERVER_CPU)
        _pin(agent, SERVER_CPU)
        keys = cgen.KeyFds(fetch_pem(addr, "web"))
        per_request: dict[str, list[float]] = {t: [] for t in names}
        for rnd in range(args.rounds):
            k = rnd % len(names)
            for transport in names[k:] + names[:k]:
                proc, port = servers[transport]
                before = proc.cpu()
                done = subprocess.run(
                    ["taskset", "-c", str(CLIENT_CPU), str(exe), "--port", str(port),
                     "--mode", args.mode, "--conns", "8", "--warmup", "0.5",
                     "--duration", str(args.duration), *keys.args()],
                    pass_fds=keys.fds, capture_output=True, timeout=args.duration + 60,
                    check=True)
                cpu = proc.cpu() - before  # includes the warm-up: compare, do not quote
                result: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
                requests = float(result["requests"])
                per_request[transport].append(1e6 * cpu / requests if requests else 0.0)
                print(f"round {rnd + 1} {transport:8s} {result['rps']:9.0f} req/s "
                      f"{per_request[transport][-1]:8.1f} µs server CPU per request", flush=True)
        for transport, values in per_request.items():
            what = "tcp" if args.app == "tcp" else f"{args.http} {args.loop}"
            print(f"{what} {args.mode} {transport:8s} median "
                  f"{statistics.median(values):8.1f} µs per request (min {min(values):.1f}, "
                  f"max {max(values):.1f})")
    finally:
        for proc, _ in servers.values():
            proc.close()
        if keys is not None:
            keys.close()
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
