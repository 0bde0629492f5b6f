"""Helpers shared by the benchmark scripts: processes, CPU/RSS accounting, PKI, stats.

Every process the benchmark starts goes through :class:`Proc`, which kills its whole
process group at the end; nothing here touches processes it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent
SCENARIOS = BENCH_DIR / "scenarios"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# The response body every server returns: 100 bytes, as in the measured baseline.
BODY = b"x" * 99 + b"\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Return once something accepts TCP on 127.0.0.1:port, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size of one process in KiB; 0 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    except OSError:
        return 0


def children_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx workers under their master)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


class Proc:
    """A child process in its own process group, killed (group and all) on close."""

    def __init__(self, args: Sequence[str], *, name: str, env: dict[str, str] | None = None,
                 stdin: int | None = None) -> None:
        self.name = name
        self.popen: subprocess.Popen[bytes] = subprocess.Popen(
            list(args),
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """This process and its direct children (for nginx: master + worker)."""
        return [self.pid, *children_pids(self.pid)]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def rss(self) -> int:
        return sum(rss_kib(p) for p in self.pids())

    def close(self) -> str:
        """Kill the process group; return what it wrote on stderr (for diagnostics)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        err = b""
        if self.popen.stderr is not None:
            with contextlib.suppress(Exception):
                err = self.popen.stderr.read()
        for stream in (self.popen.stdout, self.popen.stderr, self.popen.stdin):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        return err.decode(errors="replace")[-2000:]


def python_script(script: str, *args: str) -> list[str]:
    return [sys.executable, str(SCENARIOS / script), *args]


def run_json(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a helper script to completion and parse the JSON it prints last."""
    done = subprocess.run(list(args), capture_output=True, timeout=timeout, check=False)
    lines = [ln for ln in done.stdout.decode().splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(args[:4])}... failed ({done.returncode}): {done.stderr.decode()[-1500:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pem:
    """A leaf (with its chain), its key and the CA roots, as Connect issued them."""

    cert: str
    key: str
    roots: str
    uri: str


def start_agent_allowing(source: str = "web", destination: str = "api") -> tuple[Proc, str]:
    """A dev agent (``agent.py``) with an allow intention ``source`` -> ``destination``.

    Returns the process and its HTTP address; the caller closes the process.
    """
    import urllib.request

    agent = Proc(python_script("agent.py"), name="agent", stdin=subprocess.PIPE)
    try:
        assert agent.popen.stdout is not None
        addr = agent.popen.stdout.readline().decode().split()[1]
        request = urllib.request.Request(
            f"http://{addr}/v1/connect/intentions/exact?source={source}"
            f"&destination={destination}",
            data=b'{"Action": "allow"}', method="PUT")
        with urllib.request.urlopen(request, timeout=10) as r:
            r.read()
    except BaseException:
        agent.close()
        raise
    return agent, addr


def fetch_pem(agent_addr: str, service: str) -> Pem:
    """Ask the agent for ``service``'s leaf and the current roots (PEM text)."""
    # urllib, not httpx: the load generator starts once per measurement and httpx
    # alone takes a quarter of a second to import.
    import urllib.request

    base = f"http://{agent_addr}/v1/agent/connect/ca"
    with urllib.request.urlopen(f"{base}/leaf/{service}", timeout=30) as r:
        leaf = json.loads(r.read())
    with urllib.request.urlopen(f"{base}/roots", timeout=30) as r:
        roots = json.loads(r.read())
    roots_pem = "".join(r["RootCert"].strip() + "\n" for r in roots["Roots"])
    return Pem(leaf["CertPEM"], leaf["PrivateKeyPEM"], roots_pem, leaf["ServiceURI"])


class ResumingClientContext(ssl.SSLContext):
    """A plain client context that offers the newest session ticket it has seen.

    The "plain Python mTLS" baseline with session resumption, for a like-for-like
    comparison with a resuming native client: asyncio's ``open_connection`` takes no
    ``session=``, so ``wrap_bio`` supplies it. One server per context (the benchmark's
    load generator dials one port). TLS 1.3 tickets arrive after the handshake, so the
    last few connections are kept and the newest one holding a ticket wins.
    """

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        self._recent: list[Any] = []
        self._session: ssl.SSLSession | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        # Reading a session costs ~0.25 ms in CPython (it is copied through i2d/d2i):
        # only when there is none yet or a finished connection did not resume.
        for obj in reversed(self._recent):
            if obj.version() is None:
                continue  # still handshaking
            if obj.session_reused and self._session is not None:
                break
            try:
                got = obj.session
            except ValueError:
                continue
            if got is not None and got.has_ticket:
                self._session = got
                self._recent = []
                break
        obj = super().wrap_bio(incoming, outgoing, server_side=server_side,
                               server_hostname=server_hostname,
                               session=session or self._session)
        self._recent = [*self._recent[-7:], obj]
        return obj


def plain_mtls_context(pem: Pem, *, server: bool, resume: bool = False,
                       tickets: bool = True) -> ssl.SSLContext:
    """An mTLS context with Connect's settings and no identity/intention check at all.

    ``resume`` (client only): offer earlier sessions (:class:`ResumingClientContext`).
    ``tickets=False`` (server only): send no session tickets, as nginx's
    ``ssl_session_tickets off`` (OpenSSL's default is two per handshake).
    """
    from consul_connect.tls import load_cert_chain_from_memory

    ctx: ssl.SSLContext
    if server:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    elif resume:
        ctx = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not server:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=pem.roots)
    load_cert_chain_from_memory(ctx, pem.cert, pem.key)
    if server and not tickets:
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


# -------------------------------------------------------------------------- stats


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of several runs (NaN-free input expected)."""
    vals = [v for v in values if v == v]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    nginx = ""
    with contextlib.suppress(OSError):
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, check=False,
                               timeout=5).stderr.decode().strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "nginx": nginx,
        "loadavg_at_start": os.getloadavg(),
    }
