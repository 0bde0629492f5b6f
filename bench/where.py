"""Where a native server's CPU goes, sampled with py-spy (low overhead, native frames).

``python bench/where.py [--seconds 5] [--out DIR]`` starts a dev agent and the native
server (``Service("api")``, full handshakes: no tickets), pins it to CPU 0, drives it
from the C load generator on CPU 1 (new connection per request, then keep-alive) and
records the serving thread with ``py-spy record --native``. It writes
``where_native_<mode>.txt`` per mode: the share of the serving thread's busy samples
under each kind of work (OpenSSL's handshake, TLS records, asyncio's SSL protocol,
uvicorn and h11, the library's own frames) and the innermost Python frames. Needs
py-spy (``pip install py-spy``) and ptrace rights over child processes.

py-spy stops the process for each native stack, so the server runs slower while it is
sampled: read the shares, not the request rate.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))
import cgen
from common import (
    BENCH_DIR,
    Proc,
    fetch_pem,
    free_port,
    python_script,
    start_agent_allowing,
    wait_port,
)

# Inclusive shares: a sample counts under every kind one of whose frames is on its stack.
# The TLS kinds match CPython's C functions, under either TLS transport.
KINDS: dict[str, tuple[str, ...]] = {
    "OpenSSL handshake (do_handshake)": ("_ssl__SSLSocket_do_handshake",),
    "TLS record read (SSL_read)": ("_ssl__SSLSocket_read",),
    "TLS record write (SSL_write)": ("_ssl__SSLSocket_write",),
    "asyncio SSL protocol and below": ("asyncio/sslproto.py",),
    "direct TLS transport and below": ("_tlsserver.py",),
    "uvicorn (HTTP protocol, app cycle)": ("uvicorn/",),
    "h11 (HTTP parsing and writing)": ("h11/",),
    "httptools (HTTP parsing)": ("httptools/", "(parser.c:"),
    "the ASGI app task (run_asgi)": ("run_asgi",),
    "accepting sockets": ("_accept_connection", "TLSServer._accept"),
    "connection_lost / close": ("connection_lost",),
}


def summarise(raw: Path) -> dict[str, object]:
    """Shares of the event-loop thread's busy samples, from a py-spy raw file."""
    busy = idle = 0
    incl: collections.Counter[str] = collections.Counter()
    inner: collections.Counter[str] = collections.Counter()
    own = inner_lib = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        if "_run_once" not in stack:
            continue  # other threads: the Service's runtime thread, idle executors
        if "select (selectors.py" in stack:
            idle += n
            continue
        busy += n
        for kind, frames in KINDS.items():
            if any(frame in stack for frame in frames):
                incl[kind] += n
        py = [f for f in stack.split(";") if ".py:" in f]
        if py:
            inner[re.sub(r" \(.*?([^/]+\.py):\d+\)", r" (\1)", py[-1])] += n
            if "consul_connect/" in py[-1]:
                inner_lib += n
                if stack.rsplit(";", 1)[-1] == py[-1]:  # no native code below it
                    own += n
    return {
        "busy_samples": busy,
        "idle_samples": idle,
        "inclusive_pct": {k: 100 * incl[k] / max(busy, 1) for k in KINDS},
        "library_innermost_pct": 100 * inner_lib / max(busy, 1),
        "library_own_pct": 100 * own / max(busy, 1),
        "top_innermost_pct": {k: 100 * v / max(busy, 1) for k, v in inner.most_common(15)},
    }


def render(mode: str, s: dict[str, object], rps: float) -> str:
    lines = [f"Native server (asyncio), {mode}: py-spy --native, serving thread only.",
             f"Busy samples {s['busy_samples']}, idle (in epoll) {s['idle_samples']}; "
             f"{rps:.0f} req/s while sampled.", "",
             "Share of busy samples with this work on the stack (overlapping):"]
    for k, v in s["inclusive_pct"].items():  # type: ignore[attr-defined]
        lines.append(f"  {v:5.1f} %  {k}")
    own = s.get("library_own_pct", 0.0)
    lines += ["", f"  {s['library_innermost_pct']:5.1f} %  innermost Python frame in "
              "consul_connect (with native code below it, e.g. OpenSSL under the direct "
              "transport)",
              f"  {own:5.1f} %  of it in the library's Python code itself",
              "", "Innermost Python frames (their own time plus native code below them):"]
    for k, v in s["top_innermost_pct"].items():  # type: ignore[attr-defined]
        lines.append(f"  {v:5.1f} %  {k}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    parser.add_argument("--http", choices=["h11", "httptools"], default="h11")
    parser.add_argument("--keep-raw", action="store_true",
                        help="also write py-spy's raw stacks (where_native_<mode>.raw)")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    exe = cgen.build()
    if spy is None or isinstance(exe, str) or (os.cpu_count() or 1) < 2:
        print(f"skipped: needs py-spy, two CPUs and the C load generator ({exe})")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    agent, addr = start_agent_allowing("web", "api")
    keys = None
    server = None
    try:
        keys = cgen.KeyFds(fetch_pem(addr, "web"))
        port = free_port()
        server = Proc(python_script("server.py", "--kind", "native-intentions", "--port",
                                    str(port), "--agent", addr, "--no-tickets",
                                    "--http", args.http), name="api")
        wait_port(port, 60, server.popen)
        for tid in os.listdir(f"/proc/{server.pid}/task"):
            os.sched_setaffinity(int(tid), {0})
        for mode in ("conn", "keep"):
            gen = subprocess.Popen(
                [str(exe), "--port", str(port), "--mode", mode, "--warmup", "0.5",
                 "--duration", str(args.seconds + 2), *keys.args()],
                pass_fds=keys.fds, stdout=subprocess.PIPE,
                preexec_fn=lambda: os.sched_setaffinity(0, {1}))
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "raw.txt"
                time.sleep(1.0)
                subprocess.run([spy, "record", "--native", "--rate", "500", "--duration",
                                str(int(args.seconds)), "--pid", str(server.pid),
                                "--format", "raw", "--output", str(raw)],
                               capture_output=True, timeout=args.seconds + 60, check=True)
                stdout, _ = gen.communicate(timeout=args.seconds + 30)
                rps = json.loads(stdout.decode().splitlines()[-1])["rps"]
                text = render(mode, summarise(raw), rps)
                if args.keep_raw:
                    shutil.copyfile(raw, out / f"where_native_{mode}.raw")
            (out / f"where_native_{mode}.txt").write_text(text)
            print(text)
    finally:
        if server is not None:
            server.close()
        if keys is not None:
            keys.close()
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
