"""The whole benchmark in one command: ``python bench/run.py`` (``--smoke`` for a quick check).

Starts a dev agent, the Python servers, the nginx sidecars and the nginx ceiling (each
its own process, all on 127.0.0.1), then measures every scenario for (a) a new
connection per request and (b) keep-alive, in interleaved rounds so that each ratio is
taken against a baseline measured seconds earlier on the same (shared, noisy) machine.
Then: the OpenSSL ``s_time`` reference, library micro-benchmarks, leaf renewal and root
rotation under load, and a pyinstrument profile of the native server. Writes
``results.json``, PNG plots and ``RESULTS.md`` into ``--out`` (default bench/results).

Every child process is started in its own process group and killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))
import twohost
from common import (
    BENCH_DIR,
    Proc,
    fetch_pem,
    free_port,
    machine,
    python_script,
    run_json,
    summary,
    wait_port,
)
from sidecar import NginxSet, nginx_available

DASH = "\u2013"

# Display order and meaning of the scenarios. Families: the event loop of both the
# Python server and the load generator (asyncio's default, or uvloop) and whether TLS
# clients resume sessions ("+resume").
DESCRIPTIONS = {
    "plain": "plaintext HTTP, Python client -> uvicorn (h11) serving the app (upper bound)",
    "mtls": "plain mTLS in Python: same server with an SSLContext, CA check only, no authz",
    "native-intentions": "consul-connect ASGI serve(), intention authorizer (complete), "
    "client Service('web', resume_sessions=False).open_connection (full handshakes)",
    "native-agent": "consul-connect ASGI serve(), agent authorize endpoint (simple); as shipped",
    "sidecar": "plaintext client -> nginx -> mTLS -> nginx -> plaintext server (one hop each side)",
    "sidecar-l7": "HTTP-aware sidecar pair: nginx HTTP proxy each side, pooled upstream "
    "connections (what a mesh proxy runs for HTTP intentions); keep-alive only",
    "ceiling": "nginx answering 200 itself over mTLS (OpenSSL + C HTTP server ceiling)",
    "plain-uvloop": "plain, server and load generator on uvloop",
    "mtls-uvloop": "mtls, server and load generator on uvloop",
    "native-intentions-uvloop": "native-intentions, server (serve() and its protocol) and "
    "client (Service.open_connection) on uvloop",
    "sidecar-uvloop": "sidecar pair in front of plain-uvloop, load generator on uvloop",
    "sidecar-l7-uvloop": "sidecar-l7 in front of plain-uvloop, load generator on uvloop",
    "ceiling-uvloop": "ceiling, load generator on uvloop",
    "mtls+resume": "mtls, the client resumes TLS sessions (plain SSLContext + session=)",
    "native-intentions+resume": "native-intentions, the client as shipped: "
    "Service('web').open_connection resumes sessions per instance",
    "sidecar+resume": "sidecar with tickets on the server side and proxy_ssl_session_reuse on",
    "ceiling+resume": "ceiling with tickets on, the client resumes sessions",
    "mtls-uvloop+resume": "mtls-uvloop, the client resumes sessions",
    "native-intentions-uvloop+resume": "native-intentions-uvloop, the client resumes sessions",
    "sidecar-uvloop+resume": "sidecar-uvloop, client-side nginx reuses sessions",
    "ceiling-uvloop+resume": "ceiling+resume, load generator on uvloop",
    "httpx-plain": "httpx.AsyncClient plaintext -> plain server",
    "httpx-native": "httpx AsyncConnectTransport(Service) -> native-intentions",
}

# The native variants judged against the targets, each with its like-for-like family.
NATIVES = ["native-intentions", "native-agent", "native-intentions+resume",
           "native-intentions-uvloop", "native-intentions-uvloop+resume"]


# Keep-alive at a fixed request rate (--rate): latency where no scenario is saturated.
RATE_SCENARIOS = ["plain", "mtls", "native-intentions", "native-agent", "sidecar", "sidecar-l7",
                  "ceiling", "plain-uvloop", "mtls-uvloop", "native-intentions-uvloop",
                  "sidecar-uvloop", "sidecar-l7-uvloop"]


def family(name: str) -> dict[str, str]:
    """The baselines a scenario is compared with: same event loops, same resumption."""
    uv = "-uvloop" if "-uvloop" in name else ""
    rs = "+resume" if name.endswith("+resume") else ""
    return {"mtls": f"mtls{uv}{rs}", "sidecar": f"sidecar{uv}{rs}", "sidecar_l7": f"sidecar-l7{uv}",
            "ceiling": f"ceiling{uv}{rs}", "plain": f"plain{uv}",
            "label": ("uvloop" if uv else "asyncio") + rs}


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


@dataclass
class Scenario:
    name: str
    port: int
    tls: str
    client: str = "raw"
    resume: bool = False  # TLS clients resume sessions (new-connection mode only)
    loop: str = "asyncio"  # the load generator's event loop
    keep_only: bool = False  # not measured with a new connection per request
    server: list[Proc] = field(default_factory=list)  # server app + server-side sidecar
    client_side: list[Proc] = field(default_factory=list)  # client-side sidecar
    proxies: list[Proc] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.nginx: NginxSet | None = None
        self.agent: Proc | None = None
        self.addr = ""
        self.scenarios: dict[str, Scenario] = {}
        self.notes: list[str] = []

    # ---------------------------------------------------------------- processes

    def start_agent(self) -> None:
        self.agent = Proc(python_script("agent.py"), name="agent", stdin=subprocess.PIPE)
        self.procs.append(self.agent)
        assert self.agent.popen.stdout is not None
        line = self.agent.popen.stdout.readline().decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"dev agent did not start: {self.agent.close()}")
        self.addr = line[1]
        r = httpx.put(f"http://{self.addr}/v1/connect/intentions/exact",
                      params={"source": "web", "destination": "api"},
                      json={"Action": "allow"}, timeout=10)
        r.raise_for_status()

    def agent_command(self, command: str) -> None:
        assert self.agent is not None and self.agent.popen.stdin is not None
        assert self.agent.popen.stdout is not None
        self.agent.popen.stdin.write(command.encode() + b"\n")
        self.agent.popen.stdin.flush()
        answer = self.agent.popen.stdout.readline().decode().strip()
        if answer != "ok":
            raise RuntimeError(f"agent command {command!r}: {answer}")

    def server(self, kind: str, *extra: str) -> tuple[Proc, int]:
        port = free_port()
        proc = Proc(python_script("server.py", "--kind", kind, "--port", str(port),
                                  "--agent", self.addr, *extra), name=kind)
        self.procs.append(proc)
        return proc, port

    def start_servers(self, with_nginx: bool) -> None:
        a = self.args
        with_uvloop = uvloop_available() and not a.no_uvloop
        wanted = ["plain", "mtls", "native-intentions", "native-agent"]
        if with_uvloop:
            wanted += ["native-intentions-uvloop"] if a.smoke else [
                "plain-uvloop", "mtls-uvloop", "native-intentions-uvloop"]
        started: dict[str, tuple[Proc, int]] = {}
        for name in wanted:
            kind = name.removesuffix("-uvloop")
            loop_args = ["--loop", "uvloop"] if name != kind else []
            # Full handshakes: no TLS server sends session tickets (nginx neither).
            started[name] = self.server(kind, *loop_args,
                                        *([] if kind == "plain" else ["--no-tickets"]))
        # Resumption changes only new connections: these run in "conn" mode only, each
        # against its own server, which sends tickets.
        for name in ("mtls", "native-intentions", "mtls-uvloop", "native-intentions-uvloop"):
            if name in wanted and (not a.smoke or name == "native-intentions"):
                kind = name.removesuffix("-uvloop")
                started[f"{name}+resume"] = self.server(
                    kind, *(["--loop", "uvloop"] if name != kind else []))
        for name, (proc, port) in started.items():
            wait_port(port, 60, proc.popen)
            base = name.removesuffix("+resume")
            tls = {"plain": "none", "mtls": "mtls"}.get(base.removesuffix("-uvloop"), "native")
            loop = "uvloop" if base.endswith("-uvloop") else "asyncio"
            self.scenarios[name] = Scenario(name, port, tls, resume=base != name,
                                            server=[proc], loop=loop)
        if with_nginx:
            api, web = fetch_pem(self.addr, "api"), fetch_pem(self.addr, "web")
            self.nginx = NginxSet(api, web)
            for uv in ("", "-uvloop"):
                if f"plain{uv}" not in started:
                    continue
                plain_proc, plain_port = started[f"plain{uv}"]
                for rs in ("",) if a.smoke else ("", "+resume"):
                    s_port = free_port()
                    s_side = self.nginx.server_sidecar(s_port, plain_port, tickets=bool(rs),
                                                       name=f"server-sidecar{uv}{rs}")
                    c_port = free_port()
                    c_side = self.nginx.client_sidecar(c_port, s_port, reuse=bool(rs),
                                                       name=f"client-sidecar{uv}{rs}")
                    self.scenarios[f"sidecar{uv}{rs}"] = Scenario(
                        f"sidecar{uv}{rs}", c_port, "none", resume=bool(rs),
                        server=[plain_proc, s_side], client_side=[c_side],
                        proxies=[s_side, c_side], loop="uvloop" if uv else "asyncio")
                if a.smoke and uv:
                    continue
                s_port = free_port()
                s_side = self.nginx.server_sidecar_http(s_port, plain_port,
                                                        name=f"server-sidecar-http{uv}")
                c_port = free_port()
                c_side = self.nginx.client_sidecar_http(c_port, s_port,
                                                        name=f"client-sidecar-http{uv}")
                self.scenarios[f"sidecar-l7{uv}"] = Scenario(
                    f"sidecar-l7{uv}", c_port, "none", server=[plain_proc, s_side],
                    client_side=[c_side], proxies=[s_side, c_side],
                    loop="uvloop" if uv else "asyncio", keep_only=True)
            ceil_port = free_port()
            ceil = self.nginx.ceiling(ceil_port)
            self.scenarios["ceiling"] = Scenario("ceiling", ceil_port, "mtls", server=[ceil])
            if with_uvloop and not a.smoke:
                self.scenarios["ceiling-uvloop"] = Scenario("ceiling-uvloop", ceil_port, "mtls",
                                                            server=[ceil], loop="uvloop")
            if not a.smoke:
                ceil_port = free_port()
                ceil = self.nginx.ceiling(ceil_port, tickets=True, name="ceiling-tickets")
                self.scenarios["ceiling+resume"] = Scenario("ceiling+resume", ceil_port, "mtls",
                                                            resume=True, server=[ceil])
                if with_uvloop:
                    self.scenarios["ceiling-uvloop+resume"] = Scenario(
                        "ceiling-uvloop+resume", ceil_port, "mtls", resume=True, server=[ceil],
                        loop="uvloop")
        if not a.smoke:
            self.scenarios["httpx-plain"] = Scenario(
                "httpx-plain", started["plain"][1], "none", "httpx", server=[started["plain"][0]])
            # As shipped: the server sends tickets and the httpx transport resumes.
            proc, port = started["native-intentions+resume"]
            r = httpx.put(f"http://{self.addr}/v1/agent/service/register", json={
                "Name": "api", "ID": "api-bench", "Address": "127.0.0.1", "Port": port,
                "Connect": {"Native": True}}, timeout=10)
            r.raise_for_status()
            self.scenarios["httpx-native"] = Scenario("httpx-native", port, "native", "httpx",
                                                      server=[proc])
        # Display order.
        order = [n for n in DESCRIPTIONS if n in self.scenarios]
        self.scenarios = {n: self.scenarios[n] for n in order}

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.close()
        for p in reversed(self.procs):
            p.close()

    # ---------------------------------------------------------------- measuring

    def loadgen(self, scn: Scenario, mode: str, *, duration: float, extra: list[str] | None = None,
                during: Any = None, command: list[str] | None = None,
                pass_fds: tuple[int, ...] = (), cpus: set[int] | None = None) -> dict[str, Any]:
        """One load-generator run; CPU of every process sampled around its window.

        ``command`` replaces the Python load generator (it must print ``start`` and
        one JSON line the same way); ``cpus`` pins it.
        """
        a = self.args
        args = command or python_script("loadgen.py", "--mode", mode, "--tls", scn.tls, "--client",
                             scn.client, "--port", str(scn.port), "--agent", self.addr,
                             "--conns", str(a.conns), "--warmup", str(a.warmup),
                             "--duration", str(duration), *(["--resume"] if scn.resume else []),
                             "--loop", scn.loop,
                             *(extra or []))
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            pass_fds=pass_fds,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        budget = duration + a.warmup + 60
        killer = threading.Timer(budget, lambda: _killpg(proc.pid))
        killer.start()
        watched = {"server": scn.server, "client_side": scn.client_side, "proxies": scn.proxies,
                   "agent": [self.agent] if self.agent else []}
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        result: dict[str, Any] | None = None
        runner: threading.Thread | None = None
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode().strip()
                if line == "start":
                    before = {k: sum(p.cpu() for p in v) for k, v in watched.items()}
                    if during is not None:
                        runner = threading.Thread(target=during, daemon=True)
                        runner.start()
                elif line.startswith("{"):
                    after = {k: sum(p.cpu() for p in v) for k, v in watched.items()}
                    result = json.loads(line)
            proc.wait(10)
        finally:
            killer.cancel()
            if proc.poll() is None:
                _killpg(proc.pid)
                proc.wait(5)
            err = proc.stderr.read().decode()[-1500:] if proc.stderr else ""
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    s.close()
            if runner is not None:
                runner.join(60)
        if result is None or not before:
            raise RuntimeError(f"load generator failed for {scn.name}/{mode}: {err}")
        cpu = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in watched}
        n = max(1, result["requests"])
        server_cpu = cpu["server"]
        client_cpu = result["client_cpu_s"] + cpu["client_side"]
        result.update({
            "server_cpu_s": server_cpu,
            "proxy_cpu_s": cpu["proxies"],
            "agent_cpu_s": cpu["agent"],
            "client_total_cpu_s": client_cpu,
            "server_cpu_per_1k": server_cpu / n * 1000,
            "total_cpu_per_1k": (server_cpu + client_cpu + cpu["agent"]) / n * 1000,
            "server_rss_kib": sum(p.rss() for p in scn.server),
            "proxy_rss_kib": sum(p.rss() for p in scn.proxies),
        })
        return result

    def matrix(self) -> dict[str, Any]:
        a = self.args
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for rnd in range(a.rounds):
            for mode in ("conn", "keep"):
                # Resumption only changes new connections: keep-alive skips those rows.
                order = [n for n, sc in self.scenarios.items()
                         if (not sc.keep_only if mode == "conn" else not sc.resume)]
                # Rotate the order each round so no scenario always runs first.
                k = rnd % len(order)
                for name in order[k:] + order[:k]:
                    res = self.loadgen(self.scenarios[name], mode, duration=a.duration)
                    res["round"] = rnd
                    raw.setdefault(mode, {}).setdefault(name, []).append(res)
                    _log(f"round {rnd + 1} {mode:4s} {name:22s} {res['rps']:9.0f} req/s "
                         f"p50 {res['p50_ms']:6.2f} p99 {res['p99_ms']:6.2f} ms "
                         f"fail {res['failures']}")
            # Latency at a fixed load: keep-alive, paced to --rate requests/s in total.
            order = [n for n in RATE_SCENARIOS if n in self.scenarios]
            k = rnd % max(1, len(order))
            for name in order[k:] + order[:k]:
                # Twice as long: a p99 needs samples at this low rate.
                res = self.loadgen(self.scenarios[name], "keep", duration=2 * a.duration,
                                   extra=["--rate", str(a.rate)])
                res["round"] = rnd
                raw.setdefault("rate", {}).setdefault(name, []).append(res)
                _log(f"round {rnd + 1} rate {name:22s} {res['rps']:9.0f} req/s "
                     f"p50 {res['p50_ms']:6.2f} p99 {res['p99_ms']:6.2f} ms "
                     f"fail {res['failures']}")
        return raw

    # ------------------------------------------------------------- extra pieces

    def openssl_reference(self) -> dict[str, Any]:
        """``openssl s_time`` (sequential new mTLS handshakes) against the nginx ceiling."""
        if self.nginx is None or "ceiling" not in self.scenarios or not shutil.which("openssl"):
            return {"skipped": "nginx or openssl not available"}
        if self.args.smoke:
            return {"skipped": "smoke run"}
        k = self.nginx.keys
        seconds = "1" if self.args.smoke else "3"
        runs = []
        for _ in range(1 if self.args.smoke else self.args.rounds):
            done = subprocess.run(
                ["openssl", "s_time", "-connect", f"127.0.0.1:{self.scenarios['ceiling'].port}",
                 "-new", "-time", seconds, "-cert", str(k / "web.crt"), "-key", str(k / "web.key"),
                 "-CAfile", str(k / "roots.pem"), "-www", "/"],
                capture_output=True, timeout=60, check=False)
            text = done.stdout.decode()
            m = re.search(r"(\d+) connections in ([\d.]+)s;\s*([\d.]+) connections/user sec", text)
            m2 = re.search(r"(\d+) connections in (\d+) real seconds", text)
            if m and m2:
                runs.append({"per_user_cpu_s": float(m.group(3)),
                             "wall_per_s": int(m2.group(1)) / max(1, int(m2.group(2)))})
        speed: dict[str, Any] = {}
        if not self.args.smoke:
            done = subprocess.run(["openssl", "speed", "-seconds", "1", "ecdsap256", "ecdhp256"],
                                  capture_output=True, timeout=60, check=False)
            for line in done.stdout.decode().splitlines():
                parts = line.split()
                if "(nistp256)" not in line or len(parts) < 5:
                    continue
                if "ecdsa" in parts:
                    speed["ecdsa_p256_sign_per_s"] = float(parts[-2])
                    speed["ecdsa_p256_verify_per_s"] = float(parts[-1])
                elif "ecdh" in parts:
                    speed["ecdh_p256_per_s"] = float(parts[-1])
        return {"s_time_new_tls13": runs,
                "wall_per_s": summary([r["wall_per_s"] for r in runs]),
                "per_client_cpu_s": summary([r["per_user_cpu_s"] for r in runs]),
                "speed": speed}

    def rotation(self) -> dict[str, Any]:
        """Leaf renewal then CA root rotation while native clients keep sending requests.

        Three timed runs: new connections with full handshakes, new connections with
        session resumption (sessions must be dropped on every material change and no
        request may fail), and keep-alive.
        """
        name = "native-intentions"
        dur = self.args.rotation_duration
        out: dict[str, Any] = {"scenario": name}
        # Each rotation must change the CA config, or Consul treats the PUT as a no-op.
        bits = {"conn": 384, "conn+resume": 521, "keep": 256}
        modes = ("conn", "conn+resume") if self.args.smoke else ("conn", "conn+resume", "keep")
        for label in modes:
            mode = label.split("+")[0]
            # Resuming clients need the server that sends tickets.
            base = self.scenarios[f"{name}+resume" if label.endswith("+resume") else name]
            scn = Scenario(name, base.port, base.tls, resume=label.endswith("+resume"),
                           server=base.server)
            events: list[tuple[str, float]] = []
            t_start: list[float] = []

            def drive(events: list[tuple[str, float]] = events,
                      t_start: list[float] = t_start, key_bits: int = bits[label]) -> None:
                t0 = time.monotonic()
                t_start.append(t0)
                _sleep_until(t0 + dur * 0.25)
                self.agent_command("renew api")
                self.agent_command("renew web")
                events.append(("leaf renewal (api, web)", time.monotonic() - t0))
                _sleep_until(t0 + dur * 0.55)
                r = httpx.put(f"http://{self.addr}/v1/connect/ca/configuration", json={
                    "Provider": "consul",
                    "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": key_bits}}, timeout=30)
                r.raise_for_status()
                events.append((f"CA root rotation (EC P-{key_bits})", time.monotonic() - t0))

            res = self.loadgen(scn, mode, duration=dur, extra=["--timeline"], during=drive)
            res["events"] = [{"what": w, "t_s": t} for w, t in events]
            if mode == "keep":
                res["distinct_server_certs"] = None  # no new connections by design
            blip = _steady_p99(res["timeline"], [t for _, t in events])
            res["latency_blip_ms"] = blip
            out[label] = res
            _log(f"rotation {label}: {res['requests']} requests, {res['failures']} failed, "
                 f"server certs seen {res.get('distinct_server_certs')}, "
                 f"worst {res['max_ms']:.1f} ms")
        return out

    def profile(self) -> dict[str, Any]:
        """pyinstrument on the native server (asyncio and uvloop, both modes, resumption)
        and on the native client (resuming, new connections)."""
        out: dict[str, Any] = {}
        runs: list[tuple[str, list[str], str, bool]] = [
            ("asyncio", [], "conn", False), ("asyncio", [], "keep", False),
            ("asyncio-resume", [], "conn", True)]
        if uvloop_available() and not self.args.no_uvloop:
            runs += [("uvloop", ["--loop", "uvloop"], "conn", False),
                     ("uvloop", ["--loop", "uvloop"], "keep", False)]
        for label, extra, mode, resume in runs:
            path = self.out / f"profile_native_{label}_{mode}.txt"
            proc, port = self.server("native-intentions", "--profile", str(path), *extra,
                                     *([] if resume else ["--no-tickets"]))
            try:
                wait_port(port, 60, proc.popen)
                scn = Scenario("profile", port, "native", resume=resume, server=[proc])
                res = self.loadgen(scn, mode, duration=self.args.duration)
                os.killpg(proc.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(60)
            finally:
                proc.close()
                self.procs.remove(proc)
            out[f"{label}_{mode}"] = {"rps": res["rps"], "file": path.name,
                                      "top": _profile_top(path)}
        # The native *client* too: Service.open_connection with resumption, new connections.
        path = self.out / "profile_client_native-resume_conn.txt"
        scn = self.scenarios["native-intentions+resume"]
        res = self.loadgen(Scenario("profile", scn.port, "native", resume=True,
                                    server=scn.server), "conn", duration=self.args.duration,
                           extra=["--profile", str(path)])
        out["client-resume_conn"] = {"rps": res["rps"], "file": path.name,
                                     "top": _profile_top(path)}
        return out


# ---------------------------------------------------------------------------- analysis


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _sleep_until(t: float) -> None:
    # Schedules the rotation events inside a timed run; bounded by the run's length.
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _steady_p99(timeline: list[list[float]], event_times: list[float]) -> dict[str, float]:
    """Worst latency in the 1 s after each event vs the median per-bucket worst elsewhere."""
    quiet = [b[3] for b in timeline if all(not (t - 0.2 <= b[0] <= t + 1.0) for t in event_times)]
    near = [b[3] for b in timeline if any(t - 0.2 <= b[0] <= t + 1.0 for t in event_times)]
    return {
        "steady_worst_per_100ms_ms": (statistics.median(quiet) * 1000) if quiet else float("nan"),
        "worst_near_events_ms": (max(near) * 1000) if near else float("nan"),
    }


def _profile_top(path: Path, lines: int = 45) -> str:
    try:
        text = path.read_text()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[:lines])


def analyse(raw: dict[str, Any], ratio_key: str = "rps") -> dict[str, Any]:
    """Per-scenario medians (min-max) and same-round ratios between every pair.

    ``_ratios[base][name]``: ``name``'s ``ratio_key`` (req/s) over ``base``'s, per
    round, summarised.
    ``_added_p99_ms[base][name]``: ``name``'s p99 minus ``base``'s, per round, for the
    plaintext baselines.
    """
    out: dict[str, Any] = {}
    metrics = ["rps", "p50_ms", "p99_ms", "server_cpu_per_1k", "total_cpu_per_1k",
               "server_rss_kib", "proxy_rss_kib", "failures"]
    for mode, by_name in raw.items():
        m: dict[str, Any] = {}
        for name, runs in by_name.items():
            m[name] = {k: summary([float(r[k]) for r in runs])
                       for k in [*metrics, ratio_key, "client_core_use"] if k in runs[0]}
        rounds = sorted({r["round"] for runs in by_name.values() for r in runs})

        def per_round(num: str, den: str, key: str = "rps", *, diff: bool = False,
                      by_name: dict[str, Any] = by_name, rounds: list[int] = rounds) -> list[float]:
            vals = []
            for rnd in rounds:
                a = [r[key] for r in by_name.get(num, []) if r["round"] == rnd]
                b = [r[key] for r in by_name.get(den, []) if r["round"] == rnd]
                if a and b:
                    if diff:
                        vals.append(a[0] - b[0])
                    elif b[0]:
                        vals.append(a[0] / b[0])
            return vals

        m["_ratios"] = {base: {name: summary(per_round(name, base, ratio_key))
                               for name in by_name} for base in by_name}
        m["_added_p99_ms"] = {
            base: {name: summary(per_round(name, base, "p99_ms", diff=True)) for name in by_name}
            for base in ("plain", "plain-uvloop") if base in by_name}
        out[mode] = m
    return out


def targets(an: dict[str, Any], micro: dict[str, Any], rot: dict[str, Any],
            rate: float = 1000.0, *, fam_of: Any = None,
            natives: list[str] | None = None) -> list[dict[str, Any]]:
    """Each acceptance target with its measured value, pass/miss and the margin.

    Every native variant is judged against the baselines of its own family (same
    event loops, same session resumption): :func:`family`. Added p99 is judged twice:
    at a fixed request rate every scenario carries (the latency a hop adds) and with
    the clients flat out (where p99 mostly follows throughput).
    """
    rows: list[dict[str, Any]] = []

    def ratio(mode: str, num: str, den: str) -> dict[str, float] | None:
        r: dict[str, float] | None = an.get(mode, {}).get("_ratios", {}).get(den, {}).get(num)
        return r

    def add(target: str, native: str, value: dict[str, float] | None, goal: float,
            higher: bool = True, unit: str = "x", vs: str = "") -> None:
        if value is None or value["median"] != value["median"]:
            rows.append({"target": target, "native": native, "vs": vs, "status": "not measured"})
            return
        v = value["median"]
        ok = v >= goal if higher else v <= goal
        margin = (v / goal - 1) * 100 if goal else float("nan")
        rows.append({"target": target, "native": native, "vs": vs, "goal": goal, "value": v,
                     "min": value["min"], "max": value["max"], "unit": unit,
                     "status": "pass" if ok else "miss", "margin_pct": margin})

    def add_p99(target: str, native: str, vs: str, nat: dict[str, float],
                side_added: float) -> None:
        goal = side_added / 2
        v = nat["median"]
        rows.append({"target": target, "native": native, "vs": vs, "goal": goal, "value": v,
                     "unit": "ms", "min": nat["min"], "max": nat["max"],
                     "status": "pass" if v <= goal else "miss",
                     # A sidecar that adds nothing leaves no room: no meaningful margin.
                     "margin_pct": ((goal - v) / goal * 100) if goal > 0 else float("nan")})

    for nat in [n for n in natives or NATIVES if n in an.get("conn", {})]:
        fam = (fam_of or family)(nat)
        for target, base, goal in (("new conn/s >= 0.9x plain Python mTLS", "mtls", 0.9),
                                   ("new conn/s >= 0.8x nginx mTLS ceiling", "ceiling", 0.8),
                                   ("new conn/s >= 1.3x sidecar pair", "sidecar", 1.3)):
            add(target, nat, ratio("conn", nat, fam[base]), goal, vs=fam[base])
        if nat.endswith("+resume"):
            continue  # keep-alive does not resume anything: same as the variant without
        add("keep-alive req/s >= 0.8x plaintext", nat, ratio("keep", nat, fam["plain"]), 0.8,
            vs=fam["plain"])
        for side in ("sidecar", "sidecar_l7"):
            add("keep-alive req/s >= 1.5x sidecar pair", nat, ratio("keep", nat, fam[side]),
                1.5, vs=fam[side])
        for mode, how in (("rate", f"at a fixed {rate:,.0f} req/s"),
                          ("keep", "saturated, clients flat out")):
            added = an.get(mode, {}).get("_added_p99_ms", {}).get(fam["plain"], {})
            for side in ("sidecar", "sidecar_l7"):
                if nat not in added or fam[side] not in added:
                    continue
                add_p99(f"keep-alive added p99 over plaintext <= 1/2 sidecar's ({how})", nat,
                        fam[side], added[nat], added[fam[side]]["median"])
    big = micro.get("authz", {}).get("10000") or micro.get("authz", {}).get(
        max(micro.get("authz", {"0": 0}), key=lambda k: int(k) if k.isdigit() else -1))
    if isinstance(big, dict):
        d = big["authorizer_decide"]
        add("authorization decision < 5 us at 10,000 intentions", "IntentionAuthorizer",
            {"median": d["median_us"], "min": d["min_us"], "max": d["median_us"]},
            5.0, higher=False, unit="us")
    for mode, r in rot.items():
        if isinstance(r, dict):
            fails = r["failures"]
            rows.append({"target": f"zero failed requests, leaf renewal + root rotation ({mode})",
                         "native": rot.get("scenario", ""), "vs": "", "goal": 0, "value": fails,
                         "unit": "failed", "status": "pass" if fails == 0 else "miss",
                         "margin_pct": float("nan"), "requests": r["requests"]})
    return rows


# ------------------------------------------------------------------------------ output


def plots(out: Path, an: dict[str, Any], rot: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[str] = []
    titles = {"conn": "new connection per request", "keep": "keep-alive connections"}
    for mode, base in (("conn", "mtls"), ("keep", "plain")):
        ratios = an.get(mode, {}).get("_ratios", {}).get(base)
        if not ratios:
            continue
        # Plaintext is ~8x mTLS on new connections: it would flatten every other bar.
        names = [n for n in DESCRIPTIONS if n in ratios
                 and not (mode == "conn" and n.startswith(("plain", "httpx-plain")))]
        med = [ratios[n]["median"] for n in names]
        lo = [ratios[n]["median"] - ratios[n]["min"] for n in names]
        hi = [ratios[n]["max"] - ratios[n]["median"] for n in names]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        colors = ["#4c72b0" if n.startswith("native") or n == "httpx-native" else "#999999"
                  for n in names]
        ax.bar(names, med, yerr=[lo, hi], capsize=4, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"req/s ratio to '{base}' (same round)")
        ax.set_title(f"Throughput, {titles[mode]}: median of rounds, min-max bars"
                     + (" (plaintext left out)" if mode == "conn" else ""))
        ax.tick_params(axis="x", rotation=35)
        for lbl in ax.get_xticklabels():
            lbl.set_horizontalalignment("right")
        fig.tight_layout()
        name = f"throughput_{mode}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    # Latency (p50/p99) per scenario: both modes, and keep-alive at a fixed rate.
    titles["rate"] = "keep-alive at a fixed rate"
    lat_modes = [m for m in ("conn", "keep", "rate") if an.get(m)]
    fig, axes = plt.subplots(1, len(lat_modes), figsize=(5.5 * len(lat_modes), 4.5),
                             squeeze=False)
    for ax, mode in zip(axes[0], lat_modes, strict=True):
        m = an.get(mode, {})
        names = [n for n in DESCRIPTIONS if n in m]
        if not names:
            continue
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [m[n]["p50_ms"]["median"] for n in names], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [m[n]["p99_ms"]["median"] for n in names], 0.4, label="p99")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=40, ha="right")
        ax.set_ylabel("ms (fixed rate)" if mode == "rate" else "ms (8 clients flat out)")
        ax.set_title(titles[mode])
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    made.append("latency.png")
    # Rotation timeline.
    if isinstance(rot.get("keep"), dict) and isinstance(rot.get("conn"), dict):
        fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=False)
        for ax, mode in zip(axes, ("conn", "keep"), strict=True):
            r = rot[mode]
            tl = r["timeline"]
            b = r["bucket_s"]
            ax.plot([t[0] for t in tl], [t[1] / b for t in tl], label="ok req/s")
            ax.plot([t[0] for t in tl], [t[2] / b for t in tl], "r", label="failed req/s")
            ax2 = ax.twinx()
            ax2.plot([t[0] for t in tl], [t[3] * 1000 for t in tl], color="#dd8452",
                     linewidth=0.8, label="worst latency (ms)")
            ax2.set_ylabel("worst ms per 100 ms")
            for ev in r["events"]:
                ax.axvline(ev["t_s"] - 0.0, color="green", linestyle="--")
                ax.text(ev["t_s"], 0, " " + ev["what"], rotation=90, va="bottom", fontsize=7)
            ax.set_title(f"rotation under load ({titles[mode]}): {r['failures']} failed of "
                         f"{r['requests']}")
            ax.set_ylabel("req/s")
            ax.legend(loc="upper left", fontsize=7)
        axes[-1].set_xlabel("seconds into the measured window")
        fig.tight_layout()
        fig.savefig(out / "rotation.png", dpi=110)
        plt.close(fig)
        made.append("rotation.png")
    return made


def _f(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        if v != v:
            return "\u2013"
        return f"{v:,.{digits}f}"
    return str(v)


def _mm(s: dict[str, float], digits: int = 2) -> str:
    return f"{_f(s['median'], digits)} ({_f(s['min'], digits)}\u2013{_f(s['max'], digits)})"


def _measured(t: dict[str, Any]) -> str:
    """A target's median with its unit and, when known, (min-max)."""
    meas = f"{_f(t['value'])} {t['unit']}"
    if "min" in t:
        meas += f" ({_f(t['min'])}\u2013{_f(t['max'])})"
    return meas


def _targets_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | native variant | vs | measured | goal | status | margin |",
             "| --- | --- | --- | ---: | ---: | --- | ---: |"]
    for t in rows:
        if t["status"] == "not measured":
            lines.append(f"| {t['target']} | {t['native']} | {t.get('vs') or DASH} | {DASH} "
                         f"| {DASH} | not measured | {DASH} |")
            continue
        lines.append(f"| {t['target']} | {t['native']} | {t.get('vs') or DASH} | {_measured(t)} "
                     f"| {_f(float(t['goal']))} {t['unit']} "
                     f"| **{t['status']}** | {_f(t['margin_pct'], 0)} % |")
    lines += ["", "Margin: how far the median is above (+) or below (\u2212) the goal, in % of the "
              "goal (for 'lower is better' targets, + means under the limit).", ""]
    return lines


def _twohost_md(th: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The two-host view: its method, its targets and its two tables."""
    if not th:
        return []
    lines = ["## Two-host view: one server core", ""]
    if "skipped" in th:
        return [*lines, f"Not measured: {th['skipped']}.", ""]
    an, an_rps = th["analysis"], th["analysis_rps"]
    lines += [
        "The matrix above runs a Python load generator on the same two cores as the server, "
        "so each scenario also pays for its client's TLS. Here CPU 0 is the server host (the "
        "Python server, the server-side nginx, the dev agent) and CPU 1 the client host (a "
        f"C load generator, `bench/cgen/loadgen.c`, and the client-side nginx), as the "
        "issue's baseline was measured. The generator does TLS in C with the \"web\" leaf "
        "and verifies the server's chain (not its URI SAN); towards the sidecar pair it "
        "speaks plaintext to the client-side nginx. `-uvloop` means the server's loop only. "
        f"{cfg['rounds']} interleaved rounds of {cfg['duration']} s, {cfg['conns']} "
        "connections. **Ratios are of requests per server-core CPU second** (server process "
        "+ server-side nginx), so a run whose client core ran out first is still compared "
        "fairly; the req/s ratio is shown beside it.",
        "",
        "### Targets, judged per server core",
        "",
    ]
    lines += _targets_md(th["targets"])
    for mode, title, base in (("conn", "New connection per request", "mtls"),
                              ("keep", "Keep-alive", "plain")):
        m = an.get(mode)
        if not m:
            continue
        lines += [f"### {title} (two hosts)", "",
                  f"| scenario | req/s | per server CPU-s | ratio to {base} | ratio to sidecar "
                  f"| req/s ratio to sidecar | p50 ms | p99 ms | server CPU s/1k "
                  "| client core use | failed |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in DESCRIPTIONS:
            if name not in m:
                continue
            st = m[name]
            fam = twohost.family(name)
            r_base = m["_ratios"].get(fam[base], {}).get(name)
            r_side = m["_ratios"].get(fam["sidecar"], {}).get(name)
            q_side = an_rps[mode]["_ratios"].get(fam["sidecar"], {}).get(name)
            lines.append(
                f"| {name} | {_mm(st['rps'], 0)} | {_mm(st['per_server_cpu_s'], 0)} | "
                f"{_mm(r_base) if r_base else DASH} | {_mm(r_side) if r_side else DASH} | "
                f"{_mm(q_side) if q_side else DASH} | {_f(st['p50_ms']['median'])} | "
                f"{_f(st['p99_ms']['median'])} | {_f(st['server_cpu_per_1k']['median'], 3)} | "
                f"{_f(st['client_core_use']['median'])} | {_f(st['failures']['max'], 0)} |")
        lines.append("")
    return lines


def markdown(res: dict[str, Any]) -> str:
    mach = res["machine"]
    an = res["analysis"]
    cfg = res["config"]
    lines = [
        "# consul-connect benchmark results",
        "",
        f"Run: {res['started']} (UTC), {res['elapsed_s']:.0f} s, command "
        f"`python bench/run.py{' --smoke' if cfg['smoke'] else ''}`.",
        "",
        f"Machine: {mach['cpus']} vCPU {mach['cpu_model']}, {mach['memory_gib']} GiB RAM, "
        f"{mach['os']}; Python {mach['python']}, {mach['openssl']}; {mach['nginx']}. "
        f"Load average at start: {', '.join(f'{x:.2f}' for x in mach['loadavg_at_start'])} "
        "(the machine is shared: other jobs were running).",
        "",
        f"Method: {cfg['rounds']} interleaved rounds; each round runs every scenario for "
        f"{cfg['duration']} s after a {cfg['warmup']} s warm-up with {cfg['conns']} concurrent "
        "clients. Client (load generator, Python streams) and server run in separate "
        "processes on the same 2 cores, nothing pinned; all traffic on 127.0.0.1. "
        "Every ratio is taken within a round and then summarised as **median (min\u2013max)** "
        "over rounds. TLS 1.3. Scenario families: the event loop of the Python processes, "
        "server and load generator alike (asyncio's default, or `-uvloop`), and whether TLS "
        "clients resume sessions (`+resume`: every TLS server, nginx included, sends "
        "session tickets; without `+resume` no TLS server sends any (nginx "
        "`ssl_session_tickets off`, Python `num_tickets = 0`, native "
        "`Service(session_tickets=False)`) and every handshake is full). Each native "
        "variant is judged against the baselines of its own family (column *vs*). "
        f"Latency at a fixed load: keep-alive, the same {cfg['conns']} clients paced to "
        f"{cfg.get('rate', 1000):,.0f} requests/s in total (open loop: a request due while "
        "the previous one is still out counts from when it was due). "
        "CPU s per 1,000 requests: *server* = server process + server-side sidecar; "
        "*total* = server + load generator + client-side sidecar + dev agent.",
        "",
        "![throughput, new connections](throughput_conn.png)",
        "![throughput, keep-alive](throughput_keep.png)",
        "![latency](latency.png)",
        "",
        "## Targets",
        "",
    ]
    lines += _targets_md(res["targets"])
    for mode, title in (("conn", "New connection per request"), ("keep", "Keep-alive"),
                        ("rate", f"Keep-alive at a fixed {cfg.get('rate', 1000):,.0f} req/s")):
        m = an.get(mode)
        if not m:
            continue
        base = "mtls" if mode == "conn" else "plain"
        lines += [f"## {title}", "",
                  f"Ratios are to the same family's `{base}` and `sidecar` (same round).", "",
                  f"| scenario | req/s | ratio to {base} | ratio to sidecar | p50 ms | p99 ms | "
                  "server CPU s/1k | total CPU s/1k | server RSS MiB | failed |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in DESCRIPTIONS:
            if name not in m:
                continue
            s = m[name]
            fam = family(name)
            r_base = m["_ratios"].get(fam[base], {}).get(name)
            r_side = m["_ratios"].get(fam["sidecar"], {}).get(name)
            lines.append(
                f"| {name} | {_mm(s['rps'], 0)} | "
                f"{_mm(r_base) if r_base else DASH} "
                f"| {_mm(r_side) if r_side else DASH} | "
                f"{_f(s['p50_ms']['median'])} | "
                f"{_f(s['p99_ms']['median'])} | {_f(s['server_cpu_per_1k']['median'], 3)} | "
                f"{_f(s['total_cpu_per_1k']['median'], 3)} | "
                f"{_f(s['server_rss_kib']['median'] / 1024, 1)} | "
                f"{_f(s['failures']['max'], 0)} |")
        if mode == "rate":
            added = m.get("_added_p99_ms", {})
            parts = [f"{name} {_mm(added[family(name)['plain']][name])}"
                     for name in DESCRIPTIONS if name in m and family(name)["plain"] in added
                     and not name.startswith("plain")]
            lines += ["", "Added p99 over the same family's plaintext (same round, ms): "
                      + ", ".join(parts)]
        lines.append("")
    lines += ["Scenarios:", ""] + [f"- **{k}**: {v}" for k, v in DESCRIPTIONS.items()
                                   if any(k in an.get(m, {}) for m in ("conn", "keep"))] + [""]
    lines += _twohost_md(res.get("twohost", {}), cfg)
    lines += _published_md(an, cfg)
    lines += _before_after_md(res)
    ref = res.get("openssl", {})
    if ref.get("s_time_new_tls13"):
        lines += ["## OpenSSL reference", "",
                  f"`openssl s_time -new` (one client, sequential full TLS 1.3 mTLS handshakes "
                  f"against the nginx ceiling): {_mm(ref['wall_per_s'], 0)} conn/s wall, "
                  f"{_mm(ref['per_client_cpu_s'], 0)} conn per client-CPU-s. "
                  f"`openssl speed`: {json.dumps(ref.get('speed', {}))}.", ""]
    lines += _micro_md(res.get("micro", {}))
    lines += _rotation_md(res.get("rotation", {}), res.get("rotation_rerun", ""))
    lines += _profile_md(res.get("profile", {}))
    lines += _where_md(res.get("where", {}))
    if res.get("reading"):
        lines += ["## Reading", "", res["reading"], ""]
    return "\n".join(lines) + "\n"


# Published costs of an Envoy sidecar pair (Istio's harness: 1,000 req/s, 16 connections,
# mTLS, one mesh hop; istio.io "Performance and scalability", releases 1.3-1.24).
PUBLISHED_PAIR_P99_MS = (2.7, 2.88)
PUBLISHED_SIDECAR_VCPU_PER_1K = (0.2, 0.6)


def _published_md(an: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Native's measured overhead next to the sidecar costs other projects publish."""
    m = an.get("rate", {})
    added = m.get("_added_p99_ms", {}).get("plain", {})
    if "native-intentions" not in m or "plain" not in m or "native-intentions" not in added:
        return []

    def extra_cpu(name: str) -> float:
        # CPU seconds per 1,000 requests over plaintext = vCPU at 1,000 req/s.
        val: float = m[name]["total_cpu_per_1k"]["median"] - m["plain"]["total_cpu_per_1k"][
            "median"]
        return val

    rows = [("native-intentions", "consul-connect native (both sides)")]
    if "sidecar" in m:
        rows.append(("sidecar", "nginx stream (L4) sidecar pair (this run)"))
    if "sidecar-l7" in m:
        rows.append(("sidecar-l7", "nginx HTTP (L7) sidecar pair (this run)"))
    lines = ["## Against published sidecar costs", "",
             f"At the fixed {cfg.get('rate', 1000):,.0f} req/s keep-alive load above, what "
             "each path adds over plaintext, next to what Istio publishes for an Envoy "
             "sidecar pair (1,000 req/s, 16 connections, mTLS, one mesh hop: the "
             "\"Performance and scalability\" pages of istio.io, releases 1.3 to 1.24). "
             "Different machines and harnesses: read it as an order of magnitude, not a "
             "target.", "",
             "| path | added p99 | added CPU at 1,000 req/s (client + server side) |",
             "| --- | ---: | ---: |"]
    for name, label in rows:
        if name in added:
            lines.append(f"| {label} | {_mm(added[name])} ms | "
                         f"{_f(extra_cpu(name), 3)} vCPU |")
    lo, hi = PUBLISHED_PAIR_P99_MS
    clo, chi = PUBLISHED_SIDECAR_VCPU_PER_1K
    lines.append(f"| Envoy sidecar pair (published) | {lo}\u2013{hi} ms | "
                 f"{2 * clo:.1f}\u2013{2 * chi:.1f} vCPU ({clo}\u2013{chi} per sidecar) |")
    return [*lines, ""]


BEFORE = BENCH_DIR / "results" / "before-fixes" / "results.json"
README = BENCH_DIR.parent / "README.md"
README_BEGIN = "<!-- bench results: written by bench/run.py -->"
README_END = "<!-- end of bench results -->"


def _readme_targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | native variant | vs | measured | status |",
             "| --- | --- | --- | ---: | --- |"]
    for t in rows:
        if "value" not in t or t["native"] == "native-agent":
            continue
        lines.append(f"| {t['target']} | {t['native']} | {t.get('vs') or DASH} | "
                     f"{_measured(t)} | {t['status']} |")
    return lines


def readme_block(res: dict[str, Any]) -> str:
    """The README's summary of a full run: date, machine, plots, the targets table."""
    mach = res["machine"]
    lines = [README_BEGIN,
             f"Latest run: {res['started']} UTC on {mach['cpus']} vCPU {mach['cpu_model']}, "
             f"{mach['memory_gib']} GiB RAM, Python {mach['python']}, {mach['openssl']}, "
             f"{mach['nginx']} (load average at start "
             f"{', '.join(f'{x:.2f}' for x in mach['loadavg_at_start'])}). Every figure is a "
             "ratio to a baseline measured in the same round; median (min\u2013max) over "
             f"{res['config']['rounds']} rounds.", "",
             "![throughput, new connections](bench/results/throughput_conn.png)",
             "![throughput, keep-alive](bench/results/throughput_keep.png)",
             "![latency](bench/results/latency.png)", "",
             *_readme_targets(res["targets"])]
    th = res.get("twohost", {})
    if th.get("targets"):
        lines += ["", "Two-host view (server side pinned to one core, a C client on the other; "
                  "ratios of requests per server CPU second):", "",
                  *_readme_targets(th["targets"])]
    lines += ["", "The agent authorizer's rows (`native-agent`), where each miss comes from, "
              "the profiles and every table: "
              "[`bench/results/RESULTS.md`](bench/results/RESULTS.md).", README_END]
    return "\n".join(lines)


def update_readme(res: dict[str, Any]) -> bool:
    """Replace the marked block in README.md; False when the markers are missing."""
    try:
        text = README.read_text()
    except OSError:
        return False
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    README.write_text(text[:start] + readme_block(res) + text[end + len(README_END):])
    return True


def _before_after_md(res: dict[str, Any]) -> list[str]:
    """Compare with the first run (``results/before-fixes``), target by target."""
    try:
        before = json.loads(BEFORE.read_text())
    except (OSError, ValueError):
        return []
    an = res.get("analysis", {})
    now_t = res.get("targets", [])
    old_t = before.get("targets", [])

    def find(rows: list[dict[str, Any]], target: str, native: str) -> str:
        for t in rows:
            if t["target"] == target and t["native"] == native and "value" in t:
                mark = "pass" if t["status"] == "pass" else "miss"
                return f"{_f(t['value'])} {t['unit']} ({mark})"
        return DASH

    perf = [t["target"] for t in now_t if t["native"] == "native-intentions"
            and ("conn/s" in t["target"] or "keep-alive" in t["target"])]
    cols = [("native-intentions", "now, as shipped"),
            ("native-intentions+resume", "now, +resume"),
            ("native-intentions-uvloop", "now, uvloop"),
            ("native-intentions-uvloop+resume", "now, uvloop+resume")]
    cols = [c for c in cols if c[0] in an.get("conn", {})]
    lines = ["## Before and after", "",
             f"Before: the first run, [before-fixes/RESULTS.md](before-fixes/RESULTS.md) "
             f"({before.get('started', '?')} UTC, load average "
             f"{', '.join(f'{x:.2f}' for x in before['machine']['loadavg_at_start'])}); its "
             "`+fix` rows had TCP_NODELAY on the Connect listener patched in, which is what "
             "ships now. Each value is a same-round ratio against its own family's baseline "
             "(the *vs* column of the targets above), median of rounds.", "",
             "| target | before, as shipped | before, +fix | "
             + " | ".join(label for _, label in cols) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for target in perf:
        lines.append(f"| {target} | {find(old_t, target, 'native-intentions')} | "
                     f"{find(old_t, target, 'native-intentions+fix')} | "
                     + " | ".join(find(now_t, target, n) for n, _ in cols) + " |")
    lines += ["", "Absolute req/s (median of rounds; the two runs had different machine load, "
              "so compare the ratios above rather than these):", "",
              "| scenario | mode | before | now |", "| --- | --- | ---: | ---: |"]
    old_an = before.get("analysis", {})
    for mode in ("conn", "keep"):
        for name in ("plain", "mtls", "native-intentions", "native-intentions+fix", "sidecar",
                     "ceiling", "httpx-native"):
            was = old_an.get(mode, {}).get(name, {}).get("rps")
            now_name = "native-intentions" if name == "native-intentions+fix" else name
            now = an.get(mode, {}).get(now_name, {}).get("rps")
            if was and now:
                shown = f"{name} (now: {now_name})" if now_name != name else name
                lines.append(f"| {shown} | {mode} | {_f(was['median'], 0)} | "
                             f"{_f(now['median'], 0)} |")
    lines += ["", "Each change and its effect, measured:", ""]

    def rel(mode: str, num: str, den: str) -> str:
        r = an.get(mode, {}).get("_ratios", {}).get(den, {}).get(num)
        return _mm(r) + " x" if r else DASH

    old_conn = old_an.get("conn", {})
    old_keep = old_an.get("keep", {})
    if "native-intentions+fix" in old_conn:
        lines.append(
            "- **TCP_NODELAY on Connect listeners** (shipped since the first run): native "
            f"keep-alive {_f(old_keep['native-intentions']['rps']['median'], 0)} -> "
            f"{_f(old_keep['native-intentions+fix']['rps']['median'], 0)} req/s, new "
            f"connections {_f(old_conn['native-intentions']['rps']['median'], 0)} -> "
            f"{_f(old_conn['native-intentions+fix']['rps']['median'], 0)} conn/s "
            "(first run, same rounds).")
    lines.append("- **Session resumption in `Service.open_connection`** (shipped: sessions "
                 "resumed per instance, no runtime-loop hop for an `Endpoint`; "
                 "`resume_sessions=False` turns it off): native new connections "
                 f"{rel('conn', 'native-intentions+resume', 'native-intentions')} of full "
                 "handshakes (same rounds); uvloop server: "
                 f"{rel('conn', 'native-intentions-uvloop+resume', 'native-intentions-uvloop')}.")
    lines.append("- **uvloop** (`serve()` and the client on uvloop loops): new connections "
                 f"{rel('conn', 'native-intentions-uvloop', 'native-intentions')}, keep-alive "
                 f"{rel('keep', 'native-intentions-uvloop', 'native-intentions')} of asyncio.")
    lines.append("- **Both**: new connections "
                 f"{rel('conn', 'native-intentions-uvloop+resume', 'native-intentions')} of "
                 "native as shipped.")
    hs = res.get("micro", {}).get("handshakes", {})
    if "full_tickets2" in hs and "full_tickets1" in hs:
        lines.append("- **One TLS 1.3 session ticket per server handshake** (`tls.py`, "
                     "OpenSSL's default is two): server CPU per full handshake "
                     f"{_f(hs['full_tickets2']['server_us'], 0)} -> "
                     f"{_f(hs['full_tickets1']['server_us'], 0)} µs (micro-benchmark, no "
                     "sockets); resumed handshakes are unchanged "
                     f"({_f(hs['resumed_tickets2']['server_us'], 0)} / "
                     f"{_f(hs['resumed_tickets1']['server_us'], 0)} µs).")
    old_micro = before.get("micro", {}).get("authz", {}).get("10000", {})
    new_micro = res.get("micro", {}).get("authz", {}).get("10000", {})
    if old_micro and new_micro:
        lines.append("- **Precomputed L4 decisions** (`IntentionSet`): decision at 10,000 "
                     f"intentions {_f(old_micro['authorizer_decide']['median_us'])} -> "
                     f"{_f(new_micro['authorizer_decide']['median_us'])} µs.")
    old_scale = before.get("micro", {}).get("scale_shipped", {})
    new_scale = res.get("micro", {}).get("scale_shipped", {})
    if "ready" in old_scale and "ready" in new_scale:
        lines.append("- **Unbounded agent connection pool**: one process asked for "
                     f"{new_scale['services']:,} Services: {old_scale['ready']:,} ready before, "
                     f"{new_scale['ready']:,} ready in {_f(new_scale['ready_s'], 1)} s now.")
    return [*lines, ""]


def _micro_md(micro: dict[str, Any]) -> list[str]:
    if not micro:
        return []
    lines = ["## Library micro-benchmarks", "",
             "| measurement | median | best |", "| --- | ---: | ---: |"]
    authz = micro.get("authz", {})
    base = authz.get("baseline_dict_lookup")
    if base:
        lines.append(f"| baseline: one dict lookup | {_f(base['median_us'], 3)} µs | "
                     f"{_f(base['min_us'], 3)} µs |")
    for n, d in authz.items():
        if not n.isdigit():
            continue
        for key, label in (("authorizer_decide", "IntentionAuthorizer.decide, exact match"),
                           ("authorizer_decide_nomatch", "IntentionAuthorizer.decide, wildcard"),
                           ("decide_l7_l4intention", "decide_l7 (per HTTP request)")):
            lines.append(f"| {label}, {int(n):,} intentions | {_f(d[key]['median_us'])} µs | "
                         f"{_f(d[key]['min_us'])} µs |")
        lines.append(f"| build IntentionSet, {int(n):,} intentions | {_f(d['build_set_ms'])} ms "
                     "| |")
    tls = micro.get("tls", {})
    for key, label in (("peer_identity_cached", "peer identity, cached leaf"),
                       ("peer_identity_cold", "peer identity, new leaf (parse + checks)"),
                       ("tlsmaterial_build", "snapshot build (verify + 2 contexts)"),
                       ("baseline_sslcontext_new", "baseline: ssl.SSLContext()"),
                       ("snapshot_publish", "snapshot publish (reference swap)"),
                       ("client_session_take_and_track",
                        "client session cache per connection (offer + remember), steady state"),
                       ("client_session_harvest",
                        "client session cache per connection, reading a new session"),
                       ("context_pick_per_handshake", "current context lookup per handshake")):
        if key in tls:
            lines.append(f"| {label} | {_f(tls[key]['median_us'])} µs | "
                         f"{_f(tls[key]['min_us'])} µs |")
    hs = micro.get("handshakes", {})
    for key, label in (("full_tickets2", "TLS 1.3 full handshake, server sends 2 tickets "
                        "(OpenSSL default)"),
                       ("full_tickets1", "TLS 1.3 full handshake, server sends 1 ticket "
                        "(library)"),
                       ("full_tickets0", "TLS 1.3 full handshake, no tickets "
                        "(`session_tickets=False`)"),
                       ("resumed_tickets2", "TLS 1.3 resumed handshake, 2 tickets"),
                       ("resumed_tickets1", "TLS 1.3 resumed handshake, 1 ticket")):
        if key in hs:
            d = hs[key]
            lines.append(f"| {label}: client / server CPU | {_f(d['client_us'], 0)} / "
                         f"{_f(d['server_us'], 0)} µs | |")
    for key, label in (("cpython_session_get", "CPython: read `SSLObject.session` (copies it)"),
                       ("wrap_bio_without_session", "client `wrap_bio`, no session"),
                       ("wrap_bio_with_session", "client `wrap_bio(session=...)` (copies it)")):
        if key in hs:
            lines.append(f"| {label} | {_f(hs[key]['median_us'])} µs | "
                         f"{_f(hs[key]['min_us'])} µs |")
    hop = micro.get("runtime_hop", {})
    if "hop" in hop:
        lines.append("| `Service.open_connection`: resolving on the runtime loop (thread hop) "
                     f"per dial, CPU | {_f(hop['hop']['cpu_us'])} µs | inline: "
                     f"{_f(hop['inline']['cpu_us'])} µs |")
    w = micro.get("watch", {})
    if w:
        d = w["intention_change_to_decision_ms"]
        lines.append(f"| intention PUT until the authorizer decides with it (n={d['n']}) | "
                     f"{_f(d['median'], 1)} ms | {_f(d['min'], 1)} ms |")
        lines.append(f"| idle CPU, one Service with its watches | "
                     f"{_f(w['idle_cpu_ms_per_s'], 3)} ms/s | |")
    for label, what in (("scale_shipped", "library as shipped"),):
        s = micro.get(label, {})
        if "error" in s:
            lines += ["", f"{what}: the scale run failed: {s['error'][-300:]}"]
            continue
        if not s:
            continue
        lines += ["", f"One process asked to hold **{s['services']:,} Services** against one "
                  f"agent ({what}): {s['created']:,} created and **{s['ready']:,} ready** "
                  f"after {_f(s['ready_s'], 1)} s (budget-bounded); "
                  f"errors {s['errors'] or 'none'}; "
                  f"{s['roots_watch_hubs']} roots watch (hub); {s['agent_connections']} TCP "
                  f"connections to the agent; {s['threads']} threads; "
                  f"{_f(s['rss_per_service_kib'], 1)} KiB RSS per ready Service "
                  f"({s['rss_before_kib'] / 1024:.0f} \u2192 {s['rss_after_kib'] / 1024:.0f} MiB); "
                  f"idle CPU {_f(s['idle_cpu_ms_per_s'], 2)} ms/s in the process, "
                  f"{_f(s['agent_idle_cpu_ms_per_s'], 2)} ms/s in the agent."]
    return [*lines, ""]


def _rotation_md(rot: dict[str, Any], rerun: str = "") -> list[str]:
    if not rot or "conn" not in rot:
        return []
    rot = {k: v for k, v in rot.items() if k == "scenario" or isinstance(v, dict)}
    lines = ["## Rotation under load", "", "![rotation](rotation.png)", ""]
    if rerun:
        lines += [f"Re-measured on {rerun} (UTC) with `python bench/run.py --only-rotation` "
                  "(the first run's keep-alive pass repeated an identical CA config, which "
                  "Consul treats as no rotation).", ""]
    lines += [
             f"Server: {rot['scenario']}; client: native Service('web') (conn+resume: "
             "resuming sessions per endpoint). During each timed run "
             "the agent renews both leaves, then the CA root is rotated (a new EC root, "
             "cross-signed; leaves re-issued at once, no jitter). Keep-alive connections "
             "stay open across both, so 'server certs seen' only applies to new "
             "connections.", "",
             "| mode | requests | failed | server certs seen | steady worst/100 ms | "
             "worst near events | client leaf rotations / roots changes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for mode in ("conn", "conn+resume", "keep"):
        if mode not in rot:
            continue
        r = rot[mode]
        b = r["latency_blip_ms"]
        lines.append(f"| {mode} | {r['requests']:,} | {r['failures']} | "
                     f"{r.get('distinct_server_certs') or DASH} | "
                     f"{_f(b['steady_worst_per_100ms_ms'])} ms | {_f(b['worst_near_events_ms'])} ms"
                     f" | {r.get('client_leaf_rotations', DASH)} / "
                     f"{r.get('client_roots_changes', DASH)} |")
    return [*lines, ""]


def _profile_md(prof: dict[str, Any]) -> list[str]:
    if not prof:
        return []
    lines = ["## Profile of the native server (pyinstrument)", ""]
    for key, p in prof.items():
        lines.append(f"- `{p['file']}`: {key}, {p['rps']:.0f} req/s under the profiler")
    return [*lines, ""]


def _where_md(where: dict[str, str]) -> list[str]:
    if not where:
        return []
    lines = ["## Where the native server's CPU goes (py-spy)", "",
             "`python bench/where.py`: the native server pinned to CPU 0, the C load generator "
             "on CPU 1, the serving thread sampled with `py-spy --native` (low overhead, sees "
             "OpenSSL under Python). pyinstrument, above, inflates short Python frames; these "
             "shares do not.", ""]
    for mode, text in where.items():
        lines += [f"`where_native_{mode}.txt`:", "", "```", text.rstrip(), "```", ""]
    return lines


# -------------------------------------------------------------------------------- main


def _judge(res: dict[str, Any]) -> None:
    """Targets of the main matrix, and of the two-host view (analysed per server core)."""
    res["targets"] = targets(res["analysis"], res["micro"], res["rotation"],
                             res["config"].get("rate", 1000.0))
    th = res.get("twohost", {})
    if "raw" in th:
        th["analysis"] = analyse(th["raw"], "per_server_cpu_s")
        th["analysis_rps"] = analyse(th["raw"])
        th["targets"] = targets(th["analysis"], {}, {}, fam_of=twohost.family,
                                natives=twohost.NATIVES)


def _start_micro(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _finish_micro(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait (bounded) for a micro-benchmark process started earlier; its JSON result."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        proc.communicate(timeout=10)
        raise
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"micro.py failed ({proc.returncode}): {err.decode()[-1500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a test, ~30 s)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="requests/s in total for the fixed-load latency runs")
    parser.add_argument("--rotation-duration", type=float, default=8.0)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="skip the uvloop scenarios even if uvloop is installed")
    parser.add_argument("--no-twohost", action="store_true",
                        help="skip the two-host view (server pinned to CPU 0, C client on CPU 1)")
    parser.add_argument("--reading", default="", help="a file whose text goes under 'Reading'")
    parser.add_argument("--only-rotation", action="store_true",
                        help="re-measure only the rotation into an existing results.json")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite RESULTS.md and plots from an existing results.json")
    args = parser.parse_args(argv)
    res: dict[str, Any]
    if args.only_rotation:
        out = Path(args.out)
        res = json.loads((out / "results.json").read_text())
        bench = Bench(args)
        try:
            bench.start_agent()
            bench.start_servers(False)
            res["rotation"] = bench.rotation()
        finally:
            bench.close()
        _judge(res)
        res["rotation_rerun"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        args.render_only = True
    if args.render_only:
        out = Path(args.out)
        res = json.loads((out / "results.json").read_text())
        if args.reading and Path(args.reading).exists():
            res["reading"] = Path(args.reading).read_text().strip()
        _judge(res)
        res["plots"] = plots(out, res["analysis"], res["rotation"])
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "RESULTS.md").write_text(markdown(res))
        if out.resolve() == (BENCH_DIR / "results").resolve() and not res["config"]["smoke"]:
            update_readme(res)
        return 0
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.conns = 1, 0.3, 0.1, 2
        args.rate = 200.0
        args.rotation_duration = 1.5
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    with_nginx = nginx_available() and not args.no_nginx
    if not with_nginx and not args.no_nginx:
        _log("nginx (with its stream module) is not installed: sidecar and ceiling skipped; "
             "run bench/setup.sh")
    bench = Bench(args)
    res = {"started": started.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                           "config": {k: v for k, v in vars(args).items()}}
    micro_args = python_script("../micro.py", *(["--smoke"] if args.smoke else []),
                               "--services", str(args.services))
    # The smoke run judges no number, so its micro-benchmarks run alongside the rest
    # (it must finish quickly); a full run measures them alone, afterwards.
    micro_early = _start_micro(micro_args) if args.smoke else None
    try:
        bench.start_agent()
        bench.start_servers(with_nginx)
        raw = bench.matrix()
        res["raw"] = raw
        res["analysis"] = analyse(raw)
        res["openssl"] = bench.openssl_reference()
        if not args.no_twohost:
            # Before the rotation: the plain mTLS server and nginx keep their first leaf.
            res["twohost"] = twohost.run(bench, _log)
        res["rotation"] = bench.rotation()
        if not args.smoke:
            try:
                res["profile"] = bench.profile()
            except Exception as exc:  # keep the measurements already taken
                res["profile"] = {}
                _log(f"profile failed: {exc}")
    finally:
        bench.close()
    out = Path(args.out)
    if not args.smoke:
        _log("where the native server's CPU goes (py-spy) ...")
        for old in out.glob("where_native_*.txt"):
            old.unlink()
        try:
            spied = subprocess.run(
                [sys.executable, str(BENCH_DIR / "where.py"), "--out", str(out)],
                capture_output=True, timeout=240, check=False)
            if spied.returncode != 0:
                raise RuntimeError(spied.stderr.decode()[-800:])
            res["where"] = {m: (out / f"where_native_{m}.txt").read_text()
                            for m in ("conn", "keep") if (out / f"where_native_{m}.txt").exists()}
        except Exception as exc:  # keep the measurements already taken
            _log(f"where.py failed: {exc}")
    _log("micro-benchmarks ...")
    try:
        res["micro"] = (_finish_micro(micro_early, 120) if micro_early is not None
                        else run_json(micro_args, 400))
    except Exception as exc:  # keep the rest of the run
        res["micro"] = {"error": str(exc)[-1500:]}
        _log(f"micro-benchmarks failed: {exc}")
    _judge(res)
    if args.reading and Path(args.reading).exists():
        res["reading"] = Path(args.reading).read_text().strip()
    res["elapsed_s"] = time.monotonic() - t0
    res["plots"] = plots(out, res["analysis"], res["rotation"])
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "RESULTS.md").write_text(markdown(res))
    if out.resolve() == (BENCH_DIR / "results").resolve() and not args.smoke:
        update_readme(res)
    _log(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'} in {res['elapsed_s']:.0f} s")
    for t in res["targets"]:
        _log(f"  {t['status']:12s} {t['target']} [{t['native']}]: {_f(t.get('value', DASH))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
