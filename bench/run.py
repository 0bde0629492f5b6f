"""The whole benchmark in one command: ``python bench/run.py`` (``--smoke`` for a quick check).

Starts a dev agent, the Python servers, the nginx sidecars and the nginx ceiling (each
its own process, all on 127.0.0.1), then measures every scenario for (a) a new
connection per request and (b) keep-alive, in interleaved rounds so that each ratio is
taken against a baseline measured seconds earlier on the same (shared, noisy) machine.
Then: the OpenSSL ``s_time`` reference, library micro-benchmarks, leaf renewal and root
rotation under load, the two-host view (``twohost.py``), and profiles of the native
server (pyinstrument, and py-spy through ``where.py``). Writes ``results.json``, PNG plots
and ``RESULTS.md`` (``render.py``) into ``--out`` (default bench/results).

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
from render import DASH, DESCRIPTIONS, _f, family, markdown, plots, update_readme
from sidecar import NginxSet, nginx_available

# The native variants judged against the targets, each with its like-for-like family.
NATIVES = ["native-intentions", "native-agent", "native-intentions+resume",
           "native-intentions-uvloop", "native-intentions-uvloop+resume"]


# Keep-alive at a fixed request rate (--rate): latency where no scenario is saturated.
RATE_SCENARIOS = ["plain", "mtls", "native-intentions", "native-agent", "sidecar", "sidecar-l7",
                  "ceiling", "plain-uvloop", "mtls-uvloop", "native-intentions-uvloop",
                  "sidecar-uvloop", "sidecar-l7-uvloop"]


def _put(url: str, **kwargs: Any) -> Any:
    """PUT to the dev agent (httpx is imported late: setup may be what installs it)."""
    import httpx

    return httpx.put(url, **kwargs)


def setup() -> None:
    """Install what a full run needs and is missing (``bench/setup.sh``, idempotent)."""
    _log("setup: bench/setup.sh (installs only what is missing) ...")
    done = subprocess.run(["sh", str(BENCH_DIR / "setup.sh")],
                          env={**os.environ, "PYTHON": sys.executable}, timeout=1800,
                          check=False)
    if done.returncode != 0:
        _log(f"setup failed (exit {done.returncode}): the run goes on with what is installed")


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
        r = _put(f"http://{self.addr}/v1/connect/intentions/exact",
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
                                  "--agent", self.addr, "--http", self.args.http,
                                  *self._native_options(kind), *extra),
                    name=kind)
        self.procs.append(proc)
        return proc, port

    def _native_options(self, kind: str) -> list[str]:
        if not kind.startswith("native"):
            return []
        return ["--tls-transport", getattr(self.args, "tls_transport", "direct")]

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
            r = _put(f"http://{self.addr}/v1/agent/service/register", json={
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
                r = _put(f"http://{self.addr}/v1/connect/ca/configuration", json={
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
    parser.add_argument("--no-setup", action="store_true",
                        help="do not run bench/setup.sh before a full run")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="skip the uvloop scenarios even if uvloop is installed")
    parser.add_argument("--no-twohost", action="store_true",
                        help="skip the two-host view (server pinned to CPU 0, C client on CPU 1)")
    parser.add_argument("--http", choices=["h11", "httptools"], default="h11",
                        help="uvicorn's HTTP/1.1 parser in every Python server (plaintext, "
                             "plain mTLS, native, the sidecars' backend)")
    parser.add_argument("--tls-transport", choices=["direct", "asyncio"], default="direct",
                        help="who runs TLS in the native servers: OpenSSL on the socket "
                             "(the library's default) or the event loop's TLS")
    parser.add_argument("--reading", default="", help="a file whose text goes under 'Reading'")
    parser.add_argument("--only-rotation", action="store_true",
                        help="re-measure only the rotation into an existing results.json")
    parser.add_argument("--only-micro", action="store_true",
                        help="re-measure only the library micro-benchmarks into an existing "
                             "results.json")
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
    if args.only_micro:
        out = Path(args.out)
        res = json.loads((out / "results.json").read_text())
        res["micro"] = run_json(python_script("../micro.py", "--services", str(args.services)),
                                400)
        res["micro_rerun"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
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
    if not args.smoke and not args.no_setup:
        setup()
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
                [sys.executable, str(BENCH_DIR / "where.py"), "--out", str(out),
                 "--http", args.http],
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
