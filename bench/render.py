"""Rendering of a benchmark run: RESULTS.md, the plots and the README block.

Everything here reads the ``results.json`` structure that ``bench/run.py`` writes, so
``python bench/run.py --render-only`` can redo it without measuring again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))
import twohost
from common import BENCH_DIR

DASH = "\u2013"

# Display order and meaning of the scenarios. Families: the event loop of both the
# Python server and the load generator (asyncio's default, or uvloop) and whether TLS
# clients resume sessions ("+resume").
DESCRIPTIONS = {
    "plain": "plaintext HTTP, Python client -> uvicorn serving the app (upper bound)",
    "mtls": "plain mTLS in Python: same server with an SSLContext, CA check only, no authz; "
    "sends no session tickets (num_tickets = 0)",
    "native-intentions": "consul-connect ASGI serve(), intention authorizer (complete), "
    "Service('api', session_tickets=False); client Service('web', resume_sessions=False)"
    ".open_connection (full handshakes)",
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
    "mtls+resume": "mtls, its own server sending OpenSSL's two tickets; the client resumes "
    "TLS sessions (plain SSLContext + session=)",
    "native-intentions+resume": "native-intentions as shipped: its own server sending one "
    "ticket; Service('web').open_connection resumes sessions per instance",
    "sidecar+resume": "sidecar with tickets on the server side and proxy_ssl_session_reuse on",
    "ceiling+resume": "ceiling with tickets on, the client resumes sessions",
    "mtls-uvloop+resume": "mtls-uvloop, the client resumes sessions",
    "native-intentions-uvloop+resume": "native-intentions-uvloop, the client resumes sessions",
    "sidecar-uvloop+resume": "sidecar-uvloop, client-side nginx reuses sessions",
    "ceiling-uvloop+resume": "ceiling+resume, load generator on uvloop",
    "httpx-plain": "httpx.AsyncClient plaintext -> plain server",
    "httpx-native": "httpx AsyncConnectTransport(Service) -> native-intentions",
}

def family(name: str) -> dict[str, str]:
    """The baselines a scenario is compared with: same event loops, same resumption."""
    uv = "-uvloop" if "-uvloop" in name else ""
    rs = "+resume" if name.endswith("+resume") else ""
    return {"mtls": f"mtls{uv}{rs}", "sidecar": f"sidecar{uv}{rs}", "sidecar_l7": f"sidecar-l7{uv}",
            "ceiling": f"ceiling{uv}{rs}", "plain": f"plain{uv}",
            "label": ("uvloop" if uv else "asyncio") + rs}


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


_TLS_TRANSPORTS = {
    "direct": "with OpenSSL on the socket itself (the library's default)",
    "asyncio": "with the event loop's own TLS (memory BIO), as the plain mTLS server",
    "asyncio (before the direct transport existed)": "with the event loop's own TLS "
    "(memory BIO): the library had no other transport then",
}


def _tls_transport(cfg: dict[str, Any]) -> str:
    # Runs from before the option always used the event loop's TLS.
    return str(cfg.get("tls_transport", "asyncio (before the direct transport existed)"))


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
        f"`python bench/run.py{' --smoke' if cfg['smoke'] else ''}"
        f"{' --http ' + cfg['http'] if cfg.get('http', 'h11') != 'h11' else ''}"
        f"{' --tls-transport asyncio' if cfg.get('tls_transport') == 'asyncio' else ''}`.",
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
        "over rounds. TLS 1.3. Every Python server parses HTTP/1.1 with uvicorn's "
        f"{cfg.get('http', 'h11')} protocol (`--http`). "
        f"Native servers run TLS {_TLS_TRANSPORTS[_tls_transport(cfg)]} (`--tls-transport`). "
        "Scenario families: the event loop of the Python processes, "
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
    lines += _micro_md(res.get("micro", {}), res.get("micro_rerun", ""))
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


def _micro_md(micro: dict[str, Any], rerun: str = "") -> list[str]:
    if not micro:
        return []
    lines = ["## Library micro-benchmarks", ""]
    if rerun:
        lines += [f"Measured again on {rerun} UTC (`bench/run.py --only-micro`), after the "
                  "rest of this run.", ""]
    if micro.get("error"):
        lines += [f"Not measured: `{micro['error'].strip().splitlines()[-1][:300]}`", ""]
    lines += ["| measurement | median | best |", "| --- | ---: | ---: |"]
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
