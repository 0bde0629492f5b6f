"""The two-host view: the server side pinned to one core, a C load generator on the other.

The main matrix runs a Python load generator beside the server on the same two cores,
so every scenario pays for its client's TLS too. This view models two machines, as the
issue's baseline was measured: CPU 0 is the server host (the Python server, the
server-side nginx of the sidecar pair, the dev agent) and CPU 1 is the client host
(the C load generator of ``bench/cgen/loadgen.c`` and the client-side nginx). The
generator does TLS in C, presenting the "web" leaf and verifying the server's chain
(not its URI SAN: it stands in for any caller); towards the sidecar pair it speaks
plaintext to the client-side nginx. So native, plain mTLS and the ceiling face the same
client, and the figure that matters is what one server core does: requests per CPU
second of the server host. Its ratios do not depend on whether the client core ran
out first.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import cgen
from common import Proc, fetch_pem

CONN = ["plain", "mtls", "native-intentions", "native-agent", "sidecar", "ceiling",
        "mtls+resume", "native-intentions+resume", "sidecar+resume", "ceiling+resume",
        "plain-uvloop", "mtls-uvloop", "native-intentions-uvloop", "sidecar-uvloop",
        "mtls-uvloop+resume", "native-intentions-uvloop+resume", "sidecar-uvloop+resume"]
KEEP = ["plain", "mtls", "native-intentions", "native-agent", "sidecar", "sidecar-l7", "ceiling",
        "plain-uvloop", "mtls-uvloop", "native-intentions-uvloop", "sidecar-uvloop",
        "sidecar-l7-uvloop"]
NATIVES = ["native-intentions", "native-agent", "native-intentions+resume",
           "native-intentions-uvloop", "native-intentions-uvloop+resume"]
SERVER_CPU, CLIENT_CPU = 0, 1


def family(name: str) -> dict[str, str]:
    """Baselines of a scenario here: same server loop, same resumption; one nginx ceiling
    (with a C client, the "-uvloop" ceiling is the same measurement)."""
    uv = "-uvloop" if "-uvloop" in name else ""
    rs = "+resume" if name.endswith("+resume") else ""
    return {"mtls": f"mtls{uv}{rs}", "sidecar": f"sidecar{uv}{rs}", "sidecar_l7": f"sidecar-l7{uv}",
            "ceiling": f"ceiling{rs}", "plain": f"plain{uv}"}


def _pin(procs: list[Proc], cpus: set[int]) -> None:
    """Pin every thread of every process (and its direct children) to ``cpus``."""
    for proc in procs:
        for pid in proc.pids():
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(tid), cpus)


def run(bench: Any, log: Any) -> dict[str, Any]:
    """Every scenario of :data:`CONN` and :data:`KEEP` that the matrix started, in
    ``bench.args.rounds`` interleaved rounds; raw results per mode and scenario."""
    a = bench.args
    if (os.cpu_count() or 1) < 2:
        return {"skipped": "needs two CPUs"}
    exe = cgen.build()
    if isinstance(exe, str):
        return {"skipped": exe}
    scns = bench.scenarios
    server_side = {id(p): p for s in scns.values() for p in s.server}
    client_side = {id(p): p for s in scns.values() for p in s.client_side}
    agent = [bench.agent] if bench.agent is not None else []
    everything = set(range(os.cpu_count() or 2))
    keys = cgen.KeyFds(fetch_pem(bench.addr, "web"))
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        _pin([*server_side.values(), *agent], {SERVER_CPU})
        _pin(list(client_side.values()), {CLIENT_CPU})
        for rnd in range(a.rounds):
            for mode, names in (("conn", CONN), ("keep", KEEP)):
                order = [n for n in names if n in scns]
                k = rnd % max(1, len(order))
                for name in order[k:] + order[:k]:
                    scn = scns[name]
                    command = [str(exe), "--port", str(scn.port), "--mode", mode,
                               "--conns", str(a.conns), "--warmup", str(a.warmup),
                               "--duration", str(a.duration),
                               *(keys.args() if scn.tls != "none" else []),
                               *(["--resume"] if scn.resume else [])]
                    res = bench.loadgen(scn, mode, duration=a.duration, command=command,
                                        pass_fds=keys.fds, cpus={CLIENT_CPU})
                    res["round"] = rnd
                    res["per_server_cpu_s"] = (res["requests"] / res["server_cpu_s"]
                                               if res["server_cpu_s"] > 0 else 0.0)
                    res["client_core_use"] = res["client_total_cpu_s"] / max(res["window_s"],
                                                                             1e-9)
                    raw.setdefault(mode, {}).setdefault(name, []).append(res)
                    log(f"two-host round {rnd + 1} {mode:4s} {name:32s} {res['rps']:8.0f} req/s "
                        f"{res['per_server_cpu_s']:8.0f} per server CPU-s, "
                        f"fail {res['failures']}")
    finally:
        keys.close()
        _pin([*server_side.values(), *client_side.values(), *agent], everything)
    return {"raw": raw, "generator": Path(exe).name}
