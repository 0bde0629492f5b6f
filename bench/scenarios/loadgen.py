"""The load generator: N concurrent HTTP/1.1 clients on asyncio, bounded by time and count.

``python bench/scenarios/loadgen.py --mode conn|keep --tls none|mtls|native
--port P [--agent A] [--client raw|httpx] [--conns 8] [--warmup 0.5] [--duration 3]``

* ``conn``: every request on a new connection (connect, handshake, GET, response, close);
* ``keep``: each client keeps one connection and sends requests back to back.

``--tls none`` speaks plaintext (the plain server, or a client-side sidecar);
``mtls`` presents the Connect leaf of "web" with a plain ``SSLContext`` (CA check only);
``native`` dials as a ``consul_connect.Service("web")``: ``open_connection`` to an
:class:`Endpoint` whose identity must be "api" (raw client), or httpx with
``AsyncConnectTransport`` (``--client httpx``, resolving "api" from the catalog).

``--resume``: TLS clients offer the session of an earlier connection to the same
server (``mtls``: a plain context that resumes; ``native``: ``Service.open_connection``
as shipped, which resumes per instance). Without it every handshake is a full one
(``native``: ``Service("web", resume_sessions=False)``).

``--loop uvloop`` runs the load generator on uvloop (the uvloop scenario family runs
both sides on it). ``--rate R`` (keep-alive only) paces the clients to R requests/s in
total instead of sending flat out: latency at a fixed load every scenario can carry.

Prints ``start`` when the warm-up is over and, when the measured window ends, one JSON
line: requests, failures, req/s, latency percentiles (ms), own CPU seconds and RSS.
Every loop is bounded by the deadline and by ``--max-requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import ssl
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fetch_pem, percentile, plain_mtls_context, rss_kib

REQUEST = b"GET / HTTP/1.1\r\nHost: api\r\nUser-Agent: bench\r\n\r\n"
IO_TIMEOUT = 10.0

Open = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class Recorder:
    """Counts and latencies, kept only inside the measured window."""

    def __init__(self, start_at: float, end_at: float, max_requests: int) -> None:
        self.start_at = start_at
        self.end_at = end_at
        self.max_requests = max_requests
        self.latencies: list[float] = []
        self.failures = 0
        self.errors: dict[str, int] = {}
        self.error_samples: dict[str, str] = {}  # first message (and place) per type
        self.total = 0
        # (bucket index) -> [ok, failed, max latency s]; only filled with --timeline.
        self.timeline: dict[int, list[float]] | None = None
        self.bucket = 0.1
        self.server_certs: set[int] = set()

    def _mark(self, began: float, now: float, failed: bool) -> None:
        if self.timeline is None:
            return
        slot = self.timeline.setdefault(int((now - self.start_at) / self.bucket), [0, 0, 0.0])
        slot[1 if failed else 0] += 1
        slot[2] = max(slot[2], now - began)

    def more(self) -> bool:
        return time.monotonic() < self.end_at and self.total < self.max_requests

    def ok(self, began: float, ended: float | None = None) -> None:
        self.total += 1
        now = time.monotonic() if ended is None else ended
        if began >= self.start_at and now <= self.end_at:
            self.latencies.append(now - began)
            self._mark(began, now, False)

    def fail(self, began: float, exc: BaseException) -> None:
        self.total += 1
        if began >= self.start_at and time.monotonic() <= self.end_at:
            self.failures += 1
            self._mark(began, time.monotonic(), True)
            key = type(exc).__name__
            self.errors[key] = self.errors.get(key, 0) + 1
            if key not in self.error_samples:
                tb = traceback.extract_tb(exc.__traceback__)
                where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
                self.error_samples[key] = f"{exc!r}"[:300] + where


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected status: {head[:40]!r}")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()


async def raw_conn_worker(open_: Open, rec: Recorder) -> None:
    while rec.more():
        began = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(open_(), IO_TIMEOUT)
            if rec.timeline is not None:
                _note_cert(rec, writer)
            try:
                writer.write(REQUEST)
                await asyncio.wait_for(_read_response(reader), IO_TIMEOUT)
                ended = time.monotonic()
            finally:
                await _close(writer)
        except Exception as exc:
            rec.fail(began, exc)
            continue
        rec.ok(began, ended)


def _note_cert(rec: Recorder, writer: asyncio.StreamWriter) -> None:
    obj = writer.get_extra_info("ssl_object")
    if obj is not None:
        rec.server_certs.add(hash(obj.getpeercert(binary_form=True)))


async def raw_keep_worker(open_: Open, rec: Recorder) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        while rec.more():
            began = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(open_(), IO_TIMEOUT)
                assert reader is not None and writer is not None
                writer.write(REQUEST)
                await asyncio.wait_for(_read_response(reader), IO_TIMEOUT)
            except Exception as exc:
                rec.fail(began, exc)
                if writer is not None:
                    writer.transport.abort()
                writer = reader = None
                continue
            rec.ok(began)
    finally:
        if writer is not None:
            writer.transport.abort()


async def paced_keep_worker(open_: Open, rec: Recorder, interval: float, offset: float) -> None:
    """One keep-alive connection sending a request every ``interval`` s (open loop).

    A request that is due while the previous one is still waiting for its response
    counts its latency from when it was due (the wait is part of what a caller sees);
    otherwise from when it is written, so the timer's own lateness is not counted.
    """
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    due = time.monotonic() + offset
    last_done = 0.0
    try:
        while rec.more():
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            began = due if last_done > due else time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(open_(), IO_TIMEOUT)
                    began = time.monotonic()  # connecting is not a request's latency
                assert reader is not None and writer is not None
                writer.write(REQUEST)
                await asyncio.wait_for(_read_response(reader), IO_TIMEOUT)
            except Exception as exc:
                rec.fail(began, exc)
                if writer is not None:
                    writer.transport.abort()
                writer = reader = None
            else:
                rec.ok(began)
            last_done = time.monotonic()
            due += interval
    finally:
        if writer is not None:
            writer.transport.abort()


async def httpx_worker(client: Any, url: str, rec: Recorder) -> None:
    while rec.more():
        began = time.monotonic()
        try:
            r = await client.get(url)
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}")
        except Exception as exc:
            rec.fail(began, exc)
            continue
        rec.ok(began)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    svc: Any = None
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        if args.tls == "native":
            from consul_connect.agent.config import AgentConfig
            from consul_connect.service import Service

            svc = Service("web", agent=AgentConfig.from_address(args.agent),
                          resume_sessions=args.resume)
            await svc.wait_ready_async(30)
        if args.client == "httpx":
            import httpx

            keepalive = args.conns if args.mode == "keep" else 0
            if args.tls == "native":
                from consul_connect.integrations.httpx import AsyncConnectTransport

                limits = httpx.Limits(max_connections=args.conns,
                                      max_keepalive_connections=keepalive, keepalive_expiry=30)
                transport: Any = AsyncConnectTransport(svc, limits=limits)
                url = "http://api/"
            else:
                limits = httpx.Limits(max_connections=args.conns,
                                      max_keepalive_connections=keepalive, keepalive_expiry=30)
                transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
                url = f"http://127.0.0.1:{args.port}/"
            client = httpx.AsyncClient(transport=transport, timeout=IO_TIMEOUT)
            closers.append(client.aclose)

            def make(rec: Recorder) -> Awaitable[None]:
                return httpx_worker(client, url, rec)
        else:
            open_ = _opener(args, svc)
            worker = raw_conn_worker if args.mode == "conn" else raw_keep_worker
            if args.rate > 0:
                slots = iter(range(args.conns))
                interval = args.conns / args.rate

                def make(rec: Recorder) -> Awaitable[None]:
                    return paced_keep_worker(open_, rec, interval, next(slots) / args.rate)
            else:

                def make(rec: Recorder) -> Awaitable[None]:
                    return worker(open_, rec)

        now = time.monotonic()
        start_at = now + args.warmup
        rec = Recorder(start_at, start_at + args.duration, args.max_requests)
        if args.timeline:
            rec.timeline = {}
        tasks: list[asyncio.Task[None]] = [
            asyncio.create_task(make(rec)) for _ in range(args.conns)  # type: ignore[arg-type]
        ]
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        print("start", flush=True)
        window_start = time.monotonic()
        done, _ = await asyncio.wait(tasks, timeout=args.duration + IO_TIMEOUT + 5)
        window = min(time.monotonic(), rec.end_at) - window_start
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        for t in tasks:
            if not t.done():
                t.cancel()
        lat = sorted(rec.latencies)
        count = len(lat)
        return {
            "requests": count,
            "failures": rec.failures,
            "errors": rec.errors,
            "error_samples": rec.error_samples,
            "window_s": window,
            "rps": count / window if window > 0 else 0.0,
            "p50_ms": percentile(lat, 0.50) * 1000,
            "p90_ms": percentile(lat, 0.90) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "max_ms": (lat[-1] * 1000) if lat else float("nan"),
            "client_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "client_rss_kib": rss_kib_self(),
            "unfinished_workers": len(tasks) - len(done),
            "sessions_offered": _sessions_offered(svc),
            **(_extras(rec, svc) if args.timeline else {}),
        }
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), 5)
        if svc is not None:
            await svc.aclose()


def _extras(rec: Recorder, svc: Any) -> dict[str, Any]:
    timeline = rec.timeline or {}
    out: dict[str, Any] = {
        "bucket_s": rec.bucket,
        "timeline": [[k * rec.bucket, *timeline[k]] for k in sorted(timeline)],
        "distinct_server_certs": len(rec.server_certs),
    }
    if svc is not None:
        st = svc.statistics()
        out["client_leaf_rotations"] = st.leaf_rotations
        out["client_roots_changes"] = st.roots_changes
    return out


def _sessions_offered(svc: Any) -> int | None:
    """How many native handshakes offered a cached session (None: not a native client)."""
    ctx = getattr(svc, "client_context", None)
    offered = getattr(ctx, "sessions_offered", None)
    return offered if isinstance(offered, int) else None


def rss_kib_self() -> int:
    import os

    return rss_kib(os.getpid())


def _opener(args: argparse.Namespace, svc: Any) -> Open:
    port = args.port
    if args.tls == "none":
        return lambda: asyncio.open_connection("127.0.0.1", port)
    if args.tls == "mtls":
        ctx = plain_mtls_context(fetch_pem(args.agent, "web"), server=False, resume=args.resume)
        return lambda: asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    from consul_connect.discovery import Endpoint
    from consul_connect.identity import ServiceIdentity

    me = svc.identity
    target = Endpoint("127.0.0.1", port, ServiceIdentity(
        trust_domain=me.trust_domain, namespace=me.namespace, datacenter=me.datacenter,
        service="api", partition=me.partition))
    return lambda: svc.open_connection(target, timeout=IO_TIMEOUT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["conn", "keep"], required=True)
    parser.add_argument("--tls", choices=["none", "mtls", "native"], default="none")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--agent", default="")
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--max-requests", type=int, default=10_000_000)
    parser.add_argument("--resume", action="store_true",
                        help="TLS clients resume sessions of earlier connections")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="keep-alive only: R requests/s in total, paced (0: flat out)")
    parser.add_argument("--timeline", action="store_true",
                        help="per-100 ms counts and worst latency; server certs seen")
    parser.add_argument("--profile", default="",
                        help="sample this client with pyinstrument; text report to FILE")
    args = parser.parse_args()
    if args.rate > 0 and args.mode != "keep":
        parser.error("--rate needs --mode keep")
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    if not args.profile:
        result = asyncio.run(_run(args))
        print(json.dumps(result), flush=True)
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        result = asyncio.run(_run(args))
    finally:
        profiler.stop()
        Path(args.profile).write_text(
            profiler.output_text(unicode=False, color=False, show_all=False, timeline=False))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
