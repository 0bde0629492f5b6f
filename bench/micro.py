"""Library micro-benchmarks: decisions, identity extraction, snapshot swap, watches, scale.

``python bench/micro.py [--smoke] [--services 1000] [--out FILE]`` prints one JSON object.

* authorization decision (``IntentionSet.decide_l4`` and ``IntentionAuthorizer.decide``)
  with 10 / 1,000 / 10,000 intentions, for a caller that matches and one that does not;
* peer identity extraction (``tls.peer_identity``): cached (the same leaf again) and
  cold (a certificate never seen);
* snapshot swap: building a ``TLSMaterial`` (verify + two contexts) and publishing it;
  a handshake's lookup of the current context (``DynamicServerContext._pick``);
* blocking-watch overhead: an intention change until the authorizer decides with it,
  and the idle CPU of a process whose Service holds its watches;
* one process holding N Services against one agent: time to ready, roots watches,
  idle CPU, memory per Service.

Baselines from the same run: a dict lookup and ``ssl.SSLContext()`` creation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))
from common import Proc, python_script, rss_kib, run_json


def per_call_us(
    fn: Callable[[], object], *, min_time: float = 0.2, repeat: int = 5
) -> dict[str, float]:
    """Best and median of ``repeat`` timings of ``fn``, each loop at least ``min_time`` s."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 5:
            break
        n *= 4
    loops = max(1, int(n * (min_time / max(dt, 1e-9))))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - t0) / loops * 1e6)
    return {"median_us": statistics.median(samples), "min_us": min(samples), "loops": loops}


# --------------------------------------------------------------------------- authz


def authz(sizes: list[int], min_time: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    baseline_dict = {f"k{i}": i for i in range(10_000)}
    out["baseline_dict_lookup"] = per_call_us(lambda: baseline_dict.get("k5000"),
                                              min_time=min_time)
    for n in sizes:
        out[str(n)] = _authz_size(n, min_time)
    return out


def _authz_size(n: int, min_time: float) -> dict[str, Any]:
    from consul_connect.authz.authorizers import IntentionAuthorizer
    from consul_connect.authz.intentions import Intention, IntentionSet
    from consul_connect.identity import ServiceIdentity

    # n - 1 exact sources on "api" (every 3rd a deny) plus a wildcard-source deny: the
    # shapes a large mesh has.
    items = [
        Intention.from_json({
            "SourceName": f"svc-{i}", "DestinationName": "api",
            "Action": "deny" if i % 3 == 0 else "allow",
        })
        for i in range(n - 1)
    ]
    items.append(Intention.from_json(
        {"SourceName": "*", "DestinationName": "api", "Action": "deny"}))
    t0 = time.perf_counter()
    iset = IntentionSet(items, default_allow=False)
    build_ms = (time.perf_counter() - t0) * 1000
    match = f"svc-{n // 2 + 1}"
    authorizer = IntentionAuthorizer(None, "api")  # type: ignore[arg-type]
    authorizer._set = iset
    ident = ServiceIdentity("x.consul", "default", "dc1", match)
    nomatch = ServiceIdentity("x.consul", "default", "dc1", "not-there")
    return {
        "build_set_ms": build_ms,
        "decide_l4_match": per_call_us(lambda: iset.decide_l4("default", match),
                                       min_time=min_time),
        "decide_l4_wildcard": per_call_us(lambda: iset.decide_l4("default", "not-there"),
                                          min_time=min_time),
        "authorizer_decide": per_call_us(lambda: authorizer.decide(ident), min_time=min_time),
        "authorizer_decide_nomatch": per_call_us(lambda: authorizer.decide(nomatch),
                                                 min_time=min_time),
        "decide_l7_l4intention": per_call_us(
            lambda: iset.decide_l7("default", match, "GET", "/", [("host", "api")]),
            min_time=min_time),
    }


# ------------------------------------------------------------ identity and snapshots


class _FakeSSL:
    """What ``peer_identity`` reads from an ``SSLObject``: the peer's DER."""

    server_side = True

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


def tls_pieces(min_time: float) -> dict[str, Any]:
    from cryptography.hazmat.primitives.serialization import Encoding

    from consul_connect import tls
    from consul_connect.testing import TestCA

    ca = TestCA()
    leaf = ca.issue("web")
    roots = ca.roots()
    der = leaf.certificate.public_bytes(Encoding.DER) if hasattr(leaf, "certificate") else b""
    if not der:
        from cryptography import x509

        der = x509.load_pem_x509_certificate(leaf.cert_pem.encode()).public_bytes(Encoding.DER)
    fake = _FakeSSL(der)
    out: dict[str, Any] = {}
    out["peer_identity_cached"] = per_call_us(lambda: tls.peer_identity(fake), min_time=min_time)

    def cold() -> None:
        tls._classify_der.cache_clear()
        tls.peer_identity(fake)

    out["peer_identity_cold"] = per_call_us(cold, min_time=min_time, repeat=3)
    out["baseline_sslcontext_new"] = per_call_us(
        lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), min_time=min_time, repeat=3)
    out["tlsmaterial_build"] = per_call_us(lambda: tls.TLSMaterial.build(leaf, roots),
                                           min_time=min_time, repeat=3)
    holder: dict[str, tls.TLSMaterial] = {"m": tls.TLSMaterial.build(leaf, roots)}
    spare = tls.TLSMaterial.build(ca.issue("web"), roots)
    ctx = tls.DynamicServerContext(lambda: holder["m"])

    def swap() -> None:
        holder["m"], spare_ = spare, holder["m"]
        holder["s"] = spare_

    out["snapshot_publish"] = per_call_us(swap, min_time=min_time)
    out["context_pick_per_handshake"] = per_call_us(ctx._pick, min_time=min_time)

    # Client session cache, per connection: offer the cached session for the endpoint
    # and remember the new connection. Steady state: the last connection resumed, so
    # nothing is read from it; harvest: it did a full handshake, so its (new) session
    # is read and checked (the fake session is free to read; a real one costs CPython's
    # copy, "cpython_session_get" under "handshakes").
    material = holder["m"]
    for label, resumed in (("client_session_take_and_track", True),
                           ("client_session_harvest", False)):
        cache = tls._SessionCache(1024)
        conn = _FakeConnection(resumed)
        cache.track(material, ("127.0.0.1", 8443), _FakeConnection(False))

        def session_lookup(cache: tls._SessionCache = cache, conn: Any = conn) -> None:
            cache.take(material, ("127.0.0.1", 8443))
            cache.track(material, ("127.0.0.1", 8443), conn)

        out[label] = per_call_us(session_lookup, min_time=min_time)
    return out


class _FakeSession:
    has_ticket = True
    timeout = 7200

    def __init__(self) -> None:
        self.time = int(time.time())


class _FakeConnection:
    """What the session cache reads from a finished client connection."""

    def __init__(self, resumed: bool) -> None:
        self.session = _FakeSession()
        self.session_reused = resumed
        self._cert = {"notAfter": time.strftime("%b %d %H:%M:%S %Y GMT",
                                                time.gmtime(time.time() + 86400))}

    def version(self) -> str:
        return "TLSv1.3"

    def getpeercert(self) -> dict[str, str]:
        return self._cert


# ------------------------------------------------------------------------ dialing


def _pump(client: Any, server: Any, bios: list[ssl.MemoryBIO]) -> tuple[float, float]:
    """Run one in-memory handshake; (client seconds, server seconds) of OpenSSL work."""
    ci, co, si, so = bios
    tc = ts = 0.0
    cdone = sdone = False
    while not (cdone and sdone):
        if not cdone:
            t = time.perf_counter()
            try:
                client.do_handshake()
                cdone = True
            except ssl.SSLWantReadError:
                pass
            tc += time.perf_counter() - t
        if data := co.read():
            si.write(data)
        if not sdone:
            t = time.perf_counter()
            try:
                server.do_handshake()
                sdone = True
            except ssl.SSLWantReadError:
                pass
            ts += time.perf_counter() - t
        if data := so.read():
            ci.write(data)
    # Deliver the session tickets: the server's first write carries them.
    t = time.perf_counter()
    server.write(b"x")
    ts += time.perf_counter() - t
    ci.write(so.read())
    t = time.perf_counter()
    client.read()
    tc += time.perf_counter() - t
    return tc, ts


def handshakes(n: int) -> dict[str, Any]:
    """Handshake CPU per side in one process (no sockets, no event loop), TLS 1.3.

    Full vs resumed; a server sending OpenSSL's default two tickets, the one the
    library's server contexts send, or none (``Service(session_tickets=False)``); plus
    CPython's cost of getting and setting a session (both copy it through i2d/d2i).
    """
    from consul_connect import tls
    from consul_connect.testing import TestCA

    ca = TestCA()
    roots = ca.roots()
    api = tls.TLSMaterial.build(ca.issue("api"), roots)
    web = tls.TLSMaterial.build(ca.issue("web"), roots)
    cctx = web.client_context
    out: dict[str, Any] = {}

    def one(sctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[Any, float, float]:
        bios = [ssl.MemoryBIO() for _ in range(4)]
        c = cctx.wrap_bio(bios[0], bios[1], server_hostname=None, session=session)
        srv = sctx.wrap_bio(bios[2], bios[3], server_side=True)
        tc, ts = _pump(c, srv, bios)
        return c, tc, ts

    for tickets in (2, 1, 0):
        sctx = tls.TLSMaterial.build(api.leaf, roots, session_tickets=tickets > 0).server_context
        sctx.num_tickets = tickets
        got, _, _ = one(sctx, None)
        offered = got.session
        if tickets == 1:  # the library's default: the session the timings below use
            first, session = got, offered
        for kind in ("full", "resumed") if tickets else ("full",):
            cs: list[float] = []
            ss: list[float] = []
            reused = 0
            for _ in range(n):
                c, tc, ts = one(sctx, offered if kind == "resumed" else None)
                cs.append(tc * 1e6)
                ss.append(ts * 1e6)
                reused += bool(c.session_reused)
            out[f"{kind}_tickets{tickets}"] = {"client_us": statistics.median(cs),
                                               "server_us": statistics.median(ss),
                                               "resumed": reused, "n": n}
    out["cpython_session_get"] = per_call_us(lambda: first.session, min_time=0.05, repeat=3)
    out["wrap_bio_without_session"] = per_call_us(
        lambda: cctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=None),
        min_time=0.05, repeat=3)
    out["wrap_bio_with_session"] = per_call_us(
        lambda: cctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=None,
                              session=session), min_time=0.05, repeat=3)
    return out


def runtime_hop(n: int) -> dict[str, Any]:
    """What ``Service.open_connection`` pays per dial to resolve on the runtime loop."""
    import asyncio

    from consul_connect._runtime import Runtime

    runtime = Runtime.acquire()

    async def resolved() -> list[int]:
        return [1]

    async def measure() -> dict[str, Any]:
        res: dict[str, Any] = {}
        for label, make in (("inline", resolved),
                            ("hop", lambda: runtime.run_async(resolved(), 10))):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            for _ in range(n):
                await make()
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            res[label] = {"wall_us": wall / n * 1e6, "cpu_us": cpu / n * 1e6}
        return res

    try:
        return asyncio.run(measure())
    finally:
        runtime.release()


# ------------------------------------------------------------------ watches and scale


def _agent() -> tuple[Proc, str]:
    agent = Proc(python_script("agent.py"), name="agent", stdin=subprocess.PIPE)
    assert agent.popen.stdout is not None
    line = agent.popen.stdout.readline().decode().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"agent did not start: {agent.close()}")
    return agent, line[1]


def watches(addr: str, changes: int, idle_s: float) -> dict[str, Any]:
    import httpx

    from consul_connect.agent.config import AgentConfig
    from consul_connect.service import Service

    if True:
        svc = Service("api", agent=AgentConfig.from_address(addr))
        try:
            svc.wait_ready(30)
            authorizer: Any = svc.authorizer
            delays = []
            for i in range(changes):
                if i:
                    # The watch rate limit (burst 3, then 1/s) is a feature; measure
                    # propagation, not the limiter.
                    time.sleep(1.0)
                action = "deny" if i % 2 == 0 else "allow"
                before = authorizer.updates
                t0 = time.perf_counter()
                r = httpx.put(f"http://{addr}/v1/connect/intentions/exact",
                              params={"source": "web", "destination": "api"},
                              json={"Action": action}, timeout=10)
                r.raise_for_status()
                deadline = time.monotonic() + 10
                while authorizer.updates == before and time.monotonic() < deadline:
                    time.sleep(0.0005)
                delays.append((time.perf_counter() - t0) * 1000)
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(idle_s)  # measuring idle CPU: nothing to wait for but time
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            idle = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        finally:
            svc.close()
    return {
        "intention_change_to_decision_ms": {
            "median": statistics.median(delays), "min": min(delays), "max": max(delays),
            "n": len(delays),
        },
        "idle_cpu_ms_per_s": idle / idle_s * 1000,
        "idle_window_s": idle_s,
    }


def _tcp_conns_to(port: int) -> int:
    """Established TCP connections of this process's net namespace to 127.0.0.1:port."""
    count = 0
    needle = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[2].endswith(needle) and parts[3] == "01":
            count += 1
    return count


def many_services(agent: Proc, addr: str, n: int, idle_s: float,
                  budget_s: float) -> dict[str, Any]:
    """N Services in this process; stops adding when ``budget_s`` is spent (and says so)."""
    from consul_connect._hub import _hubs
    from consul_connect.agent.config import AgentConfig
    from consul_connect.service import Service

    services: list[Service] = []
    errors: dict[str, int] = {}
    try:
        cfg = AgentConfig.from_address(addr)
        rss0 = rss_kib(os.getpid())
        t0 = time.perf_counter()
        deadline = time.monotonic() + budget_s
        for i in range(n):
            if time.monotonic() > deadline:
                break
            try:
                services.append(Service(f"svc-{i}", agent=cfg))
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        ready = 0
        for s in services:
            try:
                s.wait_ready(max(0.01, deadline - time.monotonic()))
                ready += 1
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        ready_s = time.perf_counter() - t0
        time.sleep(min(1.0, idle_s))  # let the first blocking queries settle
        rss1 = rss_kib(os.getpid())
        conns = _tcp_conns_to(int(addr.rsplit(":", 1)[1]))
        hubs = len(_hubs)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        a0 = agent.cpu()
        time.sleep(idle_s)  # measuring idle CPU
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        idle = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        agent_idle = agent.cpu() - a0
        threads = len(os.listdir("/proc/self/task"))
    finally:
        # No close(): the child process exits right after (os._exit), and closing 1,000
        # Services one by one is not what this measures.
        pass
    return {
        "services": n,
        "created": len(services),
        "ready": ready,
        "errors": errors,
        "ready_s": ready_s,
        "roots_watch_hubs": hubs,
        "agent_connections": conns,
        "threads": threads,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "rss_per_service_kib": (rss1 - rss0) / max(1, ready),
        "idle_cpu_ms_per_s": idle / idle_s * 1000,
        "agent_idle_cpu_ms_per_s": agent_idle / idle_s * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--out", default="")
    parser.add_argument("--scale-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=40.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        agent, addr = _agent()
        try:
            out = many_services(agent, addr, args.scale_child, 0.5 if args.budget < 20 else 5.0,
                                args.budget)
        finally:
            agent.close()
        print(json.dumps(out), flush=True)
        os._exit(0)  # 1,000 Services' background shutdown is not what is measured
    smoke = args.smoke
    min_time = 0.005 if smoke else 0.2
    sizes = [10, 100] if smoke else [10, 1000, 10000]
    result: dict[str, Any] = {"authz": authz(sizes, min_time), "tls": tls_pieces(min_time),
                              "handshakes": handshakes(20 if smoke else 300),
                              "runtime_hop": runtime_hop(100 if smoke else 3000)}
    agent, addr = _agent()
    try:
        result["watch"] = watches(addr, 1 if smoke else 6, 0.3 if smoke else 3.0)
    finally:
        agent.close()
    # The agent-pool and l4-decision fixes the first run proposed are shipped now, so
    # one scale run of the library as it is.
    child = [sys.executable, __file__, "--scale-child", str(10 if smoke else args.services),
             "--budget", "10" if smoke else "60"]
    try:
        result["scale_shipped"] = run_json(child, 240)
    except Exception as exc:  # reported, not fatal: the other figures still count
        result["scale_shipped"] = {"error": str(exc)[-500:]}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
