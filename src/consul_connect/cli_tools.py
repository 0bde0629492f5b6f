"""The operator tools of the ``consul-connect`` command: cert, intention, maint, call, dial,
doctor.

:func:`add_subcommands` adds them to the entry point's subparsers; every subcommand's
``func(args) -> int`` returns the process exit status. Output is for humans by default
and one JSON document with ``--json``. Failures print ``error: ...`` on stderr (and, with
``--json``, ``{"error": ..., "kind": ...}`` on stdout) and exit 1; ``intention check``
exits 2 for "denied", as Consul's own CLI does.

Each command talks to the agent named by ``--http-addr``/``--token`` or, when those are
absent, by the usual ``CONSUL_*`` variables.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import math
import os
import queue
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, TypeVar

from consul_connect import __version__
from consul_connect.agent.client import AgentClient
from consul_connect.agent.config import AgentConfig
from consul_connect.authz.intentions import Decision, Headers
from consul_connect.certs import Leaf, RootSet, renewal_window, verify_leaf
from consul_connect.errors import (
    AgentError,
    AgentNotFoundError,
    AgentPermissionError,
    AgentResponseError,
    AgentUnavailableError,
    CertificateError,
    ConfigError,
    ConsulConnectError,
    DialError,
    IdentityError,
    NoInstancesError,
    NotReadyError,
    ServerIdentityError,
)
from consul_connect.identity import ServiceIdentity

if TYPE_CHECKING:
    from consul_connect.service import Service

__all__ = [
    "add_subcommands",
    "run_call",
    "run_cert",
    "run_dial",
    "run_doctor",
    "run_intention",
    "run_maint",
]

T = TypeVar("T")

_DENIED = "connection closed by the server right after the handshake: likely denied by intentions"
_DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_ROOT_EXPIRY_WARNING = timedelta(days=30)


# ------------------------------------------------------------------------------ plumbing


class _CommandError(Exception):
    """A failure already explained for the user; ``kind`` is a stable word for scripts."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class _ClosedAfterHandshake(DialError):
    """The server ended the connection before sending anything (usually: not authorized)."""


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    """The environment's agent config with explicit flags applied on top."""
    config = AgentConfig.from_env()
    if args.http_addr:
        where = AgentConfig.from_address(args.http_addr, scheme=config.scheme)
        config = config.replace(
            address=where.address,
            scheme=where.scheme,
            path_prefix=where.path_prefix,
            unix_socket=where.unix_socket,
        )
    if args.token:
        config = config.replace(token=args.token)
    return config


def _classify(exc: BaseException, config: AgentConfig | None) -> _CommandError:
    """Turn a library error into one clear sentence and a kind."""
    if isinstance(exc, _CommandError):
        return exc
    if isinstance(exc, NotReadyError) and exc.cause is not None:
        inner = _classify(exc.cause, config)
        if inner.kind != "error":
            return inner
        return _CommandError(str(exc), "not_ready")
    if isinstance(exc, AgentUnavailableError):
        if exc.status is None:
            text = f"{exc} (is the agent running? check --http-addr / CONSUL_HTTP_ADDR)"
        else:
            text = f"the Consul agent is failing: {exc}"
        return _CommandError(text, "agent_unreachable")
    if isinstance(exc, AgentPermissionError):
        return _CommandError(
            f"{exc} (pass a token with the right via --token or CONSUL_HTTP_TOKEN)",
            "permission_denied",
        )
    if isinstance(exc, AgentNotFoundError):
        return _CommandError(str(exc), "not_found")
    if isinstance(exc, AgentError):
        return _CommandError(str(exc), "agent_error")
    if isinstance(exc, _ClosedAfterHandshake):
        return _CommandError(str(exc), "denied")
    if isinstance(exc, NoInstancesError):
        return _CommandError(
            f"{exc} (is it registered as Connect-native or with a sidecar, and passing "
            "its health checks?)",
            "no_instances",
        )
    if isinstance(exc, ServerIdentityError):
        return _CommandError(str(exc), "server_identity")
    if isinstance(exc, DialError):
        return _CommandError(str(exc), "dial_failed")
    if isinstance(exc, NotReadyError):
        return _CommandError(str(exc), "not_ready")
    if isinstance(exc, (ConfigError, IdentityError)):
        return _CommandError(str(exc), "config")
    if isinstance(exc, CertificateError):
        return _CommandError(str(exc), "certificate")
    return _CommandError(str(exc) or type(exc).__name__, "error")


def _report_error(args: argparse.Namespace, err: _CommandError) -> int:
    print(f"error: {err}", file=sys.stderr)
    if getattr(args, "json", False):
        _print_json({"error": str(err), "kind": err.kind})
    return 1


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def _guarded(
    body: Callable[[argparse.Namespace, AgentConfig], int],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so every expected failure becomes a message and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        config: AgentConfig | None = None
        try:
            config = _agent_config(args)
            return body(args, config)
        except (ConsulConnectError, _CommandError, OSError, ssl.SSLError, ValueError) as exc:
            return _report_error(args, _classify(exc, config))
        except KeyboardInterrupt:
            return 130

    run.__name__ = getattr(body, "__name__", "run")
    run.__doc__ = body.__doc__
    return run


async def _with_client(
    config: AgentConfig, timeout: float, fn: Callable[[AgentClient], Awaitable[T]]
) -> T:
    async with AgentClient(config, timeout=timeout) as client:
        return await fn(client)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _human_delta(seconds: float) -> str:
    """``3d 4h``, ``5h 12m``, ``42s``; negative values read ``... ago``."""
    past = seconds < 0
    s = int(abs(seconds))
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        text = f"{days}d {hours}h"
    elif hours:
        text = f"{hours}h {minutes}m"
    elif minutes:
        text = f"{minutes}m {secs}s"
    else:
        text = f"{secs}s"
    return f"{text} ago" if past else f"in {text}"


def _short(root_id: str, n: int = 23) -> str:
    return root_id if len(root_id) <= n else root_id[:n] + "…"


# ---------------------------------------------------------------------------------- cert


def _leaf_json(leaf: Leaf, now: datetime) -> dict[str, Any]:
    soft, hard = renewal_window(leaf.valid_after, leaf.valid_before)
    return {
        "service": leaf.service,
        "identity": leaf.service_uri,
        "serial": leaf.serial_number,
        "valid_after": _rfc3339(leaf.valid_after),
        "valid_before": _rfc3339(leaf.valid_before),
        "expires_in_seconds": math.floor((leaf.valid_before - now).total_seconds()),
        "renewal_window": {"start": _rfc3339(soft), "end": _rfc3339(hard)},
        "chain_length": len(leaf.chain_pems),
        "modify_index": leaf.modify_index,
    }


def _roots_json(roots: RootSet, now: datetime) -> dict[str, Any]:
    return {
        "trust_domain": roots.trust_domain,
        "active_root_id": roots.active_root_id,
        "roots": [
            {
                "id": r.id,
                "name": r.name,
                "serial": r.serial_number,
                "active": r.id == roots.active_root_id or r.active,
                "not_before": _rfc3339(r.not_before),
                "not_after": _rfc3339(r.not_after),
                "expires_in_seconds": math.floor((r.not_after - now).total_seconds()),
                "intermediates": len(r.intermediate_cert_pems),
                "key": f"{r.private_key_type} {r.private_key_bits}".strip(),
            }
            for r in roots.roots
        ],
    }


def _cert(args: argparse.Namespace, config: AgentConfig) -> int:
    """Show a service's leaf certificate and the CA roots (never the private key)."""

    async def fetch(client: AgentClient) -> tuple[Leaf, RootSet]:
        leaf_data, _ = await client.leaf_cert(args.service)
        roots_data, meta = await client.ca_roots()
        return Leaf.from_json(leaf_data), RootSet.from_json(roots_data, meta.index)

    leaf, roots = _run(_with_client(config, args.timeout, fetch))
    now = datetime.now(UTC)
    try:
        verify_leaf(leaf, roots, now)
        verifies, why = True, ""
    except CertificateError as exc:
        verifies, why = False, str(exc)
    if args.json:
        out = {"leaf": _leaf_json(leaf, now), "roots": _roots_json(roots, now)}
        out["leaf"]["verifies"] = verifies
        if why:
            out["leaf"]["verify_error"] = why
        _print_json(out)
        return 0
    soft, hard = renewal_window(leaf.valid_after, leaf.valid_before)
    lines = [
        f"service     {leaf.service}",
        f"identity    {leaf.service_uri}",
        f"serial      {leaf.serial_number}",
        f"valid       {_rfc3339(leaf.valid_after)} .. {_rfc3339(leaf.valid_before)} "
        f"(expires {_human_delta((leaf.valid_before - now).total_seconds())})",
        f"renewal     between {_rfc3339(soft)} and {_rfc3339(hard)} "
        f"({_human_delta((soft - now).total_seconds())}; 60-90% of the lifetime)",
        f"chain       {len(leaf.chain_pems)} intermediate certificate(s)",
        "verifies    " + ("yes, against the current roots" if verifies else f"NO: {why}"),
        "",
        f"trust domain {roots.trust_domain}",
        f"roots        {len(roots.roots)}",
    ]
    for r in roots.roots:
        mark = "*" if (r.id == roots.active_root_id or r.active) else " "
        lines.append(
            f"  {mark} {r.id}\n"
            f"      {r.name or 'CA root'}, serial {r.serial_number}, "
            f"valid until {_rfc3339(r.not_after)} "
            f"(expires {_human_delta((r.not_after - now).total_seconds())})"
            + (
                f", {len(r.intermediate_cert_pems)} intermediate(s)"
                if r.intermediate_cert_pems
                else ""
            )
        )
    lines.append("  (* = active)")
    print("\n".join(lines))
    return 0 if verifies else 1


# ----------------------------------------------------------------------------- intention


def _action_of(ixn: dict[str, Any]) -> str:
    action = ixn.get("Action")
    if action:
        return str(action)
    perms = ixn.get("Permissions") or []
    return f"L7 ({len(perms)} permission(s))"


def _ixn_summary(ixn: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": ixn.get("SourceName", ""),
        "destination": ixn.get("DestinationName", ""),
        "action": ixn.get("Action") or None,
        "permissions": ixn.get("Permissions") or [],
        "precedence": ixn.get("Precedence"),
        "description": ixn.get("Description", ""),
    }


def _intention(args: argparse.Namespace, config: AgentConfig) -> int:
    """Create, list, get, delete or check intentions through the agent."""
    op: str = args.intention_command
    if op == "list":

        async def do_list(c: AgentClient) -> list[dict[str, Any]]:
            return (await c.list_intentions(filter=args.filter))[0]

        items = _run(_with_client(config, args.timeout, do_list))
        if args.json:
            _print_json([_ixn_summary(i) for i in items])
            return 0
        if not items:
            print("no intentions")
            return 0
        rows = [
            (
                str(i.get("SourceName", "")),
                _action_of(i),
                str(i.get("DestinationName", "")),
                str(i.get("Precedence", "")),
                str(i.get("Description", "")),
            )
            for i in items
        ]
        header = ("SOURCE", "ACTION", "DESTINATION", "PRECEDENCE", "DESCRIPTION")
        widths = [max(len(r[k]) for r in [header, *rows]) for k in range(4)]
        for r in [header, *rows]:
            print("  ".join(r[k].ljust(widths[k]) for k in range(4)) + "  " + r[4])
        return 0

    src, dst = args.source, args.destination
    pair = f"{src} => {dst}"

    async def get(c: AgentClient) -> dict[str, Any] | None:
        try:
            return (await c.get_intention_exact(src, dst))[0]
        except AgentNotFoundError:
            return None

    if op == "get":
        found = _run(_with_client(config, args.timeout, get))
        if found is None:
            raise _CommandError(f"no intention {pair}", "not_found")
        if args.json:
            _print_json(_ixn_summary(found))
        else:
            print(f"{pair} ({_action_of(found)})")
            for key in ("Precedence", "Description", "CreateIndex", "ModifyIndex"):
                if found.get(key) not in (None, ""):
                    print(f"  {key}: {found[key]}")
        return 0

    if op == "create":
        action = "deny" if args.deny else "allow"
        body: dict[str, Any] = {"SourceType": "consul", "Action": action}
        if args.description:
            body["Description"] = args.description

        async def create(c: AgentClient) -> bool:
            if not args.replace and await get(c) is not None:
                raise _CommandError(
                    f"intention {pair} already exists (use --replace to overwrite it)", "exists"
                )
            return await c.upsert_intention_exact(src, dst, body)

        _run(_with_client(config, args.timeout, create))
        if args.json:
            _print_json({"source": src, "destination": dst, "action": action, "created": True})
        else:
            print(f"Created: {pair} ({action})")
        return 0

    if op == "delete":

        async def delete(c: AgentClient) -> None:
            # The exact DELETE answers true even when nothing matched; look first so the
            # user learns about a typo instead of a silent no-op.
            if await get(c) is None:
                raise _CommandError(f"no intention {pair}", "not_found")
            await c.delete_intention_exact(src, dst)

        _run(_with_client(config, args.timeout, delete))
        if args.json:
            _print_json({"source": src, "destination": dst, "deleted": True})
        else:
            print(f"Deleted: {pair}")
        return 0

    # check
    async def check(c: AgentClient) -> bool:
        return await c.intention_check(src, dst)

    allowed = _run(_with_client(config, args.timeout, check))
    if args.json:
        _print_json({"source": src, "destination": dst, "allowed": allowed})
    else:
        print("Allowed" if allowed else "Denied")
    return 0 if allowed else 2


# ------------------------------------------------------------------------------ call/dial


class _DialOnly:
    """Authorizer of the throw-away client Service: it never accepts anyone.

    The client side never asks it, and using it instead of the intention watch means the
    caller's token needs no ``intentions:read`` just to dial.
    """

    name = "dial-only"
    ready = True

    def decide(self, identity: ServiceIdentity) -> Decision:
        return Decision(False, "this command only dials out")

    async def authorize(self, identity: ServiceIdentity, serial: str = "") -> Decision:
        return self.decide(identity)

    def decide_request(
        self, identity: ServiceIdentity, method: str, path: str, headers: Headers
    ) -> Decision:
        return self.decide(identity)

    def add_listener(self, cb: Callable[[], None]) -> None:
        pass

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _probe_agent(config: AgentConfig, timeout: float) -> None:
    """Fail fast (AgentUnavailableError) when the agent is not there at all."""

    async def probe(c: AgentClient) -> str:
        return (await c.status_leader())[0]

    _run(_with_client(config, min(timeout, 5.0), probe))


@contextlib.contextmanager
def _connected(
    args: argparse.Namespace, config: AgentConfig
) -> Iterator[tuple[Service, ssl.SSLSocket]]:
    """Yield ``(service, ssl_socket)`` connected to ``args.target`` as ``args.as_service``."""
    from consul_connect.service import Service

    _probe_agent(config, args.timeout)
    svc = Service(args.as_service, agent=config, authorizer=_DialOnly())
    try:
        svc.wait_ready(args.timeout)
        sock = svc.connect(args.target, timeout=args.timeout)
        try:
            yield svc, sock
        finally:
            with contextlib.suppress(OSError):
                sock.close()
    finally:
        svc.close()


def _denied_error(
    args: argparse.Namespace, config: AgentConfig, sock: ssl.SSLSocket, detail: str
) -> _ClosedAfterHandshake:
    """Explain a server that hung up without a byte, asking the agent's intentions as a hint."""
    from consul_connect.service import get_peer_identity

    message = _DENIED
    peer = get_peer_identity(sock)
    if peer is not None:
        dest = peer.service

        async def check(c: AgentClient) -> bool:
            return await c.intention_check(args.as_service, dest)

        try:
            allowed = _run(_with_client(config, min(args.timeout, 5.0), check))
        except (AgentError, OSError):
            pass
        else:
            verdict = "allowed" if allowed else "denied"
            message += f" (the agent's intention check says {args.as_service} => {dest}: {verdict})"
    if detail:
        message += f"; {detail}"
    return _ClosedAfterHandshake(message)


def _read_body_arg(data: str | None) -> bytes | None:
    if data is None:
        return None
    if data == "@-":
        return sys.stdin.buffer.read(_DEFAULT_MAX_BYTES + 1)[:_DEFAULT_MAX_BYTES]
    if data.startswith("@"):
        with open(data[1:], "rb") as fh:
            return fh.read()
    return data.encode()


def _host_header(target: str) -> str:
    return target.strip().rstrip(".") or "localhost"


@dataclass
class _HTTPResult:
    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def _http_exchange(
    sock: ssl.SSLSocket,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    timeout: float,
    max_bytes: int,
) -> tuple[_HTTPResult | None, str]:
    """One HTTP/1.1 request/response over ``sock``.

    Returns ``(result, "")``, or ``(None, detail)`` when the server closed the connection
    before sending a single byte (the tell-tale of an authorization refusal).
    """
    import h11

    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    received = 0
    sock.settimeout(timeout)
    try:
        out = conn.send(h11.Request(method=method, target=path, headers=headers))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        sock.sendall(out)
    except (OSError, ssl.SSLError) as exc:
        # A refused peer may be torn down while we are still writing.
        return None, f"sending failed: {exc}"
    result: _HTTPResult | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if received == 0:
                return None, ""
            raise _CommandError(f"the server sent invalid HTTP: {exc}", "protocol") from exc
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except TimeoutError as exc:
                raise _CommandError(f"no complete response within {timeout:g}s", "timeout") from exc
            except (OSError, ssl.SSLError) as exc:
                if received == 0:
                    return None, str(exc)
                raise _CommandError(
                    f"connection failed mid-response: {exc}", "dial_failed"
                ) from exc
            if not data and received == 0:
                return None, ""
            received += len(data)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            result = _HTTPResult(
                status=event.status_code,
                reason=event.reason.decode("latin-1"),
                http_version=event.http_version.decode("ascii"),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            )
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_bytes:
                raise _CommandError(
                    f"the response body exceeds --max-bytes ({max_bytes})", "too_large"
                )
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if result is None:
        return None, ""
    result.body = b"".join(chunks)
    return result, ""


def _call(args: argparse.Namespace, config: AgentConfig) -> int:
    """Send one HTTP request to a service over Connect and print the answer."""
    body = _read_body_arg(args.data)
    method = (args.request or ("POST" if body is not None else "GET")).upper()
    path = args.path if args.path.startswith("/") else "/" + args.path
    headers: list[tuple[str, str]] = []
    for raw in args.header or []:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise _CommandError(f"bad header {raw!r}: expected 'Name: value'", "config")
        headers.append((name.strip(), value.strip()))
    names = {n.lower() for n, _ in headers}
    if "host" not in names:
        headers.insert(0, ("Host", _host_header(args.target)))
    if "user-agent" not in names:
        headers.append(("User-Agent", f"consul-connect/{__version__}"))
    if "accept" not in names:
        headers.append(("Accept", "*/*"))
    if body is not None and "content-length" not in names:
        headers.append(("Content-Length", str(len(body))))
    headers.append(("Connection", "close"))
    import h11

    try:
        # Refuse a request h11 cannot send before dialing anyone.
        h11.Request(method=method, target=path, headers=headers)
    except h11.LocalProtocolError as exc:
        raise _CommandError(f"cannot send this request: {exc}", "config") from None

    started = time.monotonic()
    with _connected(args, config) as (_svc, sock):
        from consul_connect.service import get_peer_identity

        peer = get_peer_identity(sock)
        result, detail = _http_exchange(
            sock, method, path, headers, body, args.timeout, args.max_bytes
        )
        if result is None:
            raise _denied_error(args, config, sock, detail)
    elapsed = time.monotonic() - started

    if args.json:
        out: dict[str, Any] = {
            "status": result.status,
            "reason": result.reason,
            "http_version": result.http_version,
            "headers": _header_dict(result.headers),
            "server_identity": peer.uri if peer is not None else None,
            "elapsed_ms": round(elapsed * 1000, 3),
        }
        try:
            out["body"] = result.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(result.body).decode("ascii")
        _print_json(out)
    else:
        lines = [f"HTTP/{result.http_version} {result.status} {result.reason}".rstrip()]
        if args.include:
            lines.extend(f"{k}: {v}" for k, v in result.headers)
        sys.stdout.write("\n".join(lines) + "\n\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(result.body)
        if result.body and not result.body.endswith(b"\n") and sys.stdout.isatty():
            sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
    if args.fail and result.status >= 400:
        print(f"error: the server answered {result.status} {result.reason}", file=sys.stderr)
        return 1
    return 0


def _header_dict(headers: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        key = k.lower()
        out[key] = f"{out[key]}, {v}" if key in out else v
    return out


def _stdin_pump(source: IO[bytes], q: queue.Queue[bytes | None]) -> None:
    """Copy ``source`` into ``q`` chunk by chunk; ``None`` marks the end."""
    try:
        reader: Callable[[int], bytes]
        try:
            fd = source.fileno()
        except (OSError, ValueError):
            reader = getattr(source, "read1", source.read)
        else:
            # Not through the buffered reader: this daemon thread would hold its lock while
            # blocked, and interpreter shutdown after Ctrl-C then aborts with "Fatal Python
            # error: could not acquire lock for <stdin>".
            reader = functools.partial(os.read, fd)
        while True:
            chunk = reader(65536)
            if not chunk:
                break
            q.put(chunk)
    except (OSError, ValueError):
        pass
    finally:
        q.put(None)


def _dial(args: argparse.Namespace, config: AgentConfig) -> int:
    """Pipe stdin to a service over Connect and its answer to stdout, like ``nc``."""
    stdin: IO[bytes] = sys.stdin.buffer
    stdout: IO[bytes] = sys.stdout.buffer
    sent = received = 0
    with _connected(args, config) as (_svc, sock):
        from consul_connect.service import get_peer_identity

        peer = get_peer_identity(sock)
        if args.verbose:
            who = peer.uri if peer is not None else args.target
            print(f"connected to {who} as {args.as_service}", file=sys.stderr)
        q: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        # One thread only reads stdin; every SSL call stays on this thread, because an
        # OpenSSL connection must not be read and written from two threads at once.
        pump = threading.Thread(target=_stdin_pump, args=(stdin, q), daemon=True)
        pump.start()
        stdin_done_at: float | None = None
        closed_detail: str | None = None
        while True:
            while stdin_done_at is None:
                try:
                    chunk = q.get_nowait()
                except queue.Empty:
                    break
                if chunk is None:
                    stdin_done_at = time.monotonic()
                    break
                sock.settimeout(args.timeout)
                try:
                    sock.sendall(chunk)
                except (OSError, ssl.SSLError) as exc:
                    closed_detail = f"sending failed: {exc}"
                    break
                sent += len(chunk)
            if closed_detail is not None:
                break
            if stdin_done_at is not None and time.monotonic() - stdin_done_at >= args.wait:
                break
            sock.settimeout(0.05)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError) as exc:
                closed_detail = str(exc)
                break
            if not data:
                closed_detail = ""
                break
            received += len(data)
            if received > args.max_bytes:
                raise _CommandError(
                    f"the server sent more than --max-bytes ({args.max_bytes})", "too_large"
                )
            stdout.write(data)
            stdout.flush()
        if closed_detail is not None and received == 0:
            raise _denied_error(args, config, sock, closed_detail)
    if args.verbose:
        print(f"sent {sent} bytes, received {received} bytes", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------- doctor


@dataclass
class _Check:
    name: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str


async def _doctor_checks(args: argparse.Namespace, config: AgentConfig) -> list[_Check]:
    checks: list[_Check] = []
    now = datetime.now(UTC)

    def add(name: str, status: str, detail: str) -> None:
        checks.append(_Check(name, status, detail))

    async with AgentClient(config, timeout=args.timeout) as c:
        try:
            leader, _ = await c.status_leader()
        except AgentError as exc:
            add("agent", "fail", str(exc))
            return checks
        if leader:
            add("agent", "ok", f"reachable at {config.base_url} (cluster leader {leader})")
        else:
            add("agent", "warn", f"reachable at {config.base_url}, but the cluster has no leader")

        try:
            info, _ = await c.agent_self()
            cfg = info.get("Config") or {}
            add(
                "agent-info",
                "ok",
                f"datacenter {cfg.get('Datacenter', '?')}, node {cfg.get('NodeName', '?')}, "
                f"Consul {cfg.get('Version', '?')}",
            )
        except AgentPermissionError:
            add("agent-info", "warn", "the token lacks agent:read (services do not need it)")
        except AgentError as exc:
            add("agent-info", "warn", str(exc))

        try:
            token, _ = await c.acl_token_self()
            policies = [p.get("Name", "?") for p in token.get("Policies") or []]
            idents = [s.get("ServiceName", "?") for s in token.get("ServiceIdentities") or []]
            parts = [f"token {str(token.get('AccessorID', '?'))[:8]}…"]
            if token.get("Description"):
                parts.append(repr(token["Description"]))
            if policies:
                parts.append("policies " + ", ".join(policies))
            if idents:
                parts.append("service identities " + ", ".join(idents))
            add("token", "ok", "; ".join(parts))
        except (AgentPermissionError, AgentNotFoundError) as exc:
            # Unknown tokens come back as 403 "ACL not found" or 404, depending on version.
            if not config.token:
                add(
                    "token",
                    "warn",
                    "no token set (--token / CONSUL_HTTP_TOKEN): requests use the agent's "
                    f"default or anonymous token ({exc})",
                )
            else:
                add(
                    "token",
                    "fail",
                    f"the token is not known to the agent (unknown, expired or deleted): {exc}",
                )
        except AgentResponseError as exc:
            if exc.status == 401 or "ACL support disabled" in exc.body:
                add("token", "ok", "ACLs are disabled on this agent: no token needed")
            else:
                add("token", "warn", str(exc))
        except AgentError as exc:
            add("token", "warn", str(exc))

        roots: RootSet | None = None
        try:
            data, meta = await c.ca_roots()
            roots = RootSet.from_json(data, meta.index)
        except (AgentError, CertificateError) as exc:
            add("ca-roots", "fail", f"cannot read the CA roots: {exc}")
        if roots is not None:
            active = roots.active
            if not roots.roots or active is None or not roots.trust_domain:
                add("ca-roots", "fail", "the CA is not bootstrapped (no active root)")
                roots = None
            else:
                left = active.not_after - now
                detail = (
                    f"trust domain {roots.trust_domain}, {len(roots.roots)} root(s), active "
                    f"{_short(active.id)} valid until {_rfc3339(active.not_after)}"
                )
                if left <= timedelta(0):
                    add("ca-roots", "fail", detail + " (EXPIRED)")
                elif left < _ROOT_EXPIRY_WARNING:
                    add(
                        "ca-roots",
                        "warn",
                        detail + f" (expires {_human_delta(left.total_seconds())})",
                    )
                else:
                    add("ca-roots", "ok", detail)

        try:
            ca_cfg, _ = await c.connect_ca_config()
            inner = ca_cfg.get("Config") or {}
            add(
                "ca-config",
                "ok",
                f"provider {ca_cfg.get('Provider', '?')}, leaf TTL {inner.get('LeafCertTTL', '?')}",
            )
        except AgentPermissionError:
            add(
                "ca-config", "warn", "the token lacks operator:write (needed only to change the CA)"
            )
        except AgentError as exc:
            add("ca-config", "warn", str(exc))

        leaf: Leaf | None = None
        if args.service:
            name = args.service
            try:
                data, _ = await c.leaf_cert(name)
                leaf = Leaf.from_json(data)
            except AgentPermissionError as exc:
                add(
                    "leaf",
                    "fail",
                    f"{exc}: a Connect-native {name!r} needs service:write on {name!r} "
                    "to get its certificate",
                )
            except (AgentError, CertificateError) as exc:
                add("leaf", "fail", f"cannot get a leaf certificate for {name!r}: {exc}")
            if leaf is not None:
                detail = (
                    f"{leaf.service_uri}, serial {leaf.serial_number}, valid until "
                    f"{_rfc3339(leaf.valid_before)}"
                )
                try:
                    if roots is not None:
                        verify_leaf(leaf, roots, max(now, leaf.valid_after))
                    add("leaf", "ok", detail)
                except CertificateError as exc:
                    add("leaf", "fail", f"{detail}; does not verify against the roots: {exc}")
            try:
                ixns, _ = await c.intention_match_destination(name)
                add(
                    "intentions",
                    "ok",
                    f"token can read intentions for {name!r} ({len(ixns)} apply)",
                )
            except AgentPermissionError as exc:
                add(
                    "intentions",
                    "fail",
                    f"{exc}: the default authorizer watches intentions (intentions:read on "
                    f"{name!r}); or use authorizer='agent'",
                )
            except AgentError as exc:
                add("intentions", "warn", str(exc))
            try:
                nodes, _ = await c.health_connect(name)
                if nodes:
                    add("discovery", "ok", f"{len(nodes)} healthy Connect-capable instance(s)")
                else:
                    add(
                        "discovery",
                        "warn",
                        f"no healthy Connect-capable instance of {name!r} is registered "
                        "(callers cannot reach it yet)",
                    )
            except AgentError as exc:
                add("discovery", "warn", str(exc))

        add(*_clock_check(now, leaf, roots))
    return checks


def _clock_check(now: datetime, leaf: Leaf | None, roots: RootSet | None) -> tuple[str, str, str]:
    """Compare this machine's clock with the validity of certificates the CA just issued."""
    if leaf is None and roots is None:
        return "clock", "skip", "no certificate to compare with"
    active = roots.active if roots is not None else None
    if leaf is not None:
        if now < leaf.valid_after:
            ahead = (leaf.valid_after - now).total_seconds()
            return (
                "clock",
                "fail",
                f"this clock is behind the CA: the leaf is valid only from "
                f"{_rfc3339(leaf.valid_after)} ({ahead:.0f}s from now, beyond Consul's 1-minute "
                "backdating); peers will reject it",
            )
        if now >= leaf.valid_before:
            return (
                "clock",
                "fail",
                f"the leaf expired at {_rfc3339(leaf.valid_before)}: this clock is ahead of the "
                "CA's, or the agent is not renewing",
            )
    if active is not None and not active.not_before <= now < active.not_after:
        return (
            "clock",
            "fail",
            f"this clock ({_rfc3339(now)}) is outside the active root's validity "
            f"{_rfc3339(active.not_before)} .. {_rfc3339(active.not_after)}",
        )
    what = "the leaf and the active root" if leaf is not None else "the active root"
    return "clock", "ok", f"{_rfc3339(now)} is within the validity of {what}"


def _doctor(args: argparse.Namespace, config: AgentConfig) -> int:
    """Check the agent, the token's rights, the CA and the clock; exit 1 if any check fails."""
    checks = _run(_doctor_checks(args, config))
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        _print_json(
            {
                "ok": not failed,
                "checks": [
                    {"name": c.name, "status": c.status, "detail": c.detail} for c in checks
                ],
            }
        )
    else:
        marks = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}
        for c in checks:
            print(f"{marks.get(c.status, c.status)} {c.name}: {c.detail}")
        if not args.service:
            print("(pass --service NAME to also check a service's certificate and rights)")
        print("some checks failed" if failed else "all checks passed")
    return 1 if failed else 0


# --------------------------------------------------------------------------- public API


def _maint(args: argparse.Namespace, config: AgentConfig) -> int:
    """Show, enable or disable maintenance mode of the agent's node or one service instance."""
    usage = None
    if args.reason and not args.enable:
        usage = "--reason only goes with --enable"
    elif args.service and not (args.enable or args.disable):
        usage = "--service needs --enable or --disable"
    if usage is not None:
        print(f"error: {usage}", file=sys.stderr)
        return 2
    if args.enable or args.disable:

        async def switch(c: AgentClient) -> None:
            if args.service:
                await c.service_maintenance(args.service, bool(args.enable), args.reason)
            else:
                await c.node_maintenance(bool(args.enable), args.reason)

        _run(_with_client(config, args.timeout, switch))
        what = f"service {args.service!r}" if args.service else "the node"
        state = "entered" if args.enable else "left"
        if args.json:
            _print_json({"target": args.service or "node", "maintenance": bool(args.enable)})
        else:
            print(f"{what} {state} maintenance mode")
        return 0

    async def listing(c: AgentClient) -> dict[str, Any]:
        return (await c.agent_checks(filter='Type == "maintenance"'))[0]

    checks = sorted(
        _run(_with_client(config, args.timeout, listing)).values(),
        key=lambda ck: (bool(ck.get("ServiceID")), str(ck.get("ServiceID"))),
    )
    entries = [
        {
            "service_id": ck.get("ServiceID") or None,
            "node": ck.get("Node"),
            "reason": ck.get("Notes", ""),
        }
        for ck in checks
    ]
    if args.json:
        _print_json({"maintenance": entries})
        return 0
    if not entries:
        print("nothing is in maintenance mode")
    for e in entries:
        target = f"service {e['service_id']}" if e["service_id"] else f"node {e['node']}"
        print(f"{target}: {e['reason']}")
    return 0


run_cert = _guarded(_cert)
run_intention = _guarded(_intention)
run_maint = _guarded(_maint)
run_call = _guarded(_call)
run_dial = _guarded(_dial)
run_doctor = _guarded(_doctor)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _service_name(text: str) -> str:
    """A service name or Consul DNS name: refused here when empty or with a ``/``, which
    the agent would answer with an error that looks like its own failure."""
    if not text.strip() or "/" in text:
        raise argparse.ArgumentTypeError(f"not a service name: {text!r}")
    return text


def _byte_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument(
        "--http-addr",
        default=None,
        help="agent address (default: $CONSUL_HTTP_ADDR, else 127.0.0.1:8500)",
    )
    p.add_argument("--token", default=None, help="ACL token (default: $CONSUL_HTTP_TOKEN)")
    p.add_argument(
        "--timeout", type=_positive, default=10.0, help="seconds for each step (default 10)"
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON document")


def add_subcommands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``cert``, ``intention``, ``maint``, ``call``, ``dial`` and ``doctor`` to ``sub``.

    Each parser gets ``set_defaults(func=...)``, a callable ``(args) -> int`` returning
    the exit status (it prints its own errors and never raises for expected failures).
    """
    cert = sub.add_parser(
        "cert",
        help="show a service's leaf certificate and the CA roots",
        description="Show a service's leaf certificate (identity, serial, validity, renewal "
        "window) and the CA roots. Needs service:write on SERVICE. Never prints the key.",
    )
    cert.add_argument("service", type=_service_name, help="service name")
    _common(cert)
    cert.set_defaults(func=run_cert)

    ixn = sub.add_parser("intention", help="create, list, get, delete or check intentions")
    ixn_sub = ixn.add_subparsers(dest="intention_command", required=True)
    create = ixn_sub.add_parser("create", help="create an intention SOURCE => DESTINATION")
    create.add_argument("source", type=_service_name)
    create.add_argument("destination", type=_service_name)
    action = create.add_mutually_exclusive_group()
    action.add_argument("--allow", action="store_true", help="allow (the default)")
    action.add_argument("--deny", action="store_true", help="deny instead of allow")
    create.add_argument("--description", default="", help="free-text description")
    create.add_argument("--replace", action="store_true", help="overwrite an existing one")
    lst = ixn_sub.add_parser("list", help="list every intention the token can read")
    lst.add_argument("--filter", default=None, help="Consul filter expression")
    get = ixn_sub.add_parser("get", help="show one intention")
    delete = ixn_sub.add_parser("delete", help="delete one intention")
    check = ixn_sub.add_parser(
        "check", help="would SOURCE be allowed to connect to DESTINATION (exit 0 yes, 2 no)"
    )
    for p in (get, delete, check):
        p.add_argument("source", type=_service_name)
        p.add_argument("destination", type=_service_name)
    for p in (create, lst, get, delete, check):
        _common(p)
        p.set_defaults(func=run_intention)

    maint = sub.add_parser(
        "maint",
        help="show or switch maintenance mode (the node, or one service instance)",
        description="Without --enable/--disable, list what is in maintenance mode. An "
        "instance in maintenance mode leaves every health-filtered query (discovery).",
    )
    switch = maint.add_mutually_exclusive_group()
    switch.add_argument("--enable", action="store_true", help="enter maintenance mode")
    switch.add_argument("--disable", action="store_true", help="leave maintenance mode")
    maint.add_argument("--service", default=None, help="a service instance ID (default: node)")
    maint.add_argument("--reason", default="", help="why (shown with the check; --enable)")
    _common(maint)
    maint.set_defaults(func=run_maint)

    call = sub.add_parser(
        "call",
        help="send one HTTP request to a service over Connect (the mesh's curl)",
        description="Connect to TARGET as the identity --as and send one HTTP/1.1 request.",
    )
    call.add_argument(
        "--as",
        dest="as_service",
        type=_service_name,
        required=True,
        help="identity to call as",
    )
    call.add_argument(
        "target",
        type=_service_name,
        help="service name or Consul DNS name (api.service.consul)",
    )
    call.add_argument("path", nargs="?", default="/", help="request path (default /)")
    call.add_argument("-X", "--request", default=None, help="method (default GET, POST with -d)")
    call.add_argument(
        "-d", "--data", default=None, help="request body; @file reads a file, @- stdin"
    )
    call.add_argument(
        "-H", "--header", action="append", default=None, help="extra header 'Name: value'"
    )
    call.add_argument("-i", "--include", action="store_true", help="print response headers")
    call.add_argument("-f", "--fail", action="store_true", help="exit 1 on HTTP status >= 400")
    call.add_argument(
        "--max-bytes", type=_byte_count, default=_DEFAULT_MAX_BYTES, help="largest body accepted"
    )
    _common(call)
    call.set_defaults(func=run_call)

    dial = sub.add_parser(
        "dial",
        help="pipe stdin/stdout to a service over Connect (the mesh's nc)",
        description="Connect to TARGET as the identity --as, send stdin, print what comes "
        "back. After stdin ends, waits up to --wait seconds for the server to finish.",
    )
    dial.add_argument(
        "--as",
        dest="as_service",
        type=_service_name,
        required=True,
        help="identity to dial as",
    )
    dial.add_argument(
        "target",
        type=_service_name,
        help="service name or Consul DNS name (api.service.consul)",
    )
    dial.add_argument(
        "--wait",
        type=_positive,
        default=5.0,
        help="seconds to keep reading after stdin ends (default 5)",
    )
    dial.add_argument(
        "--max-bytes", type=_byte_count, default=_DEFAULT_MAX_BYTES, help="most bytes to receive"
    )
    dial.add_argument("-v", "--verbose", action="store_true", help="report on stderr")
    _common(dial, json_flag=False)
    dial.set_defaults(func=run_dial)

    doctor = sub.add_parser(
        "doctor",
        help="check agent reachability, token rights, CA state and clock skew",
    )
    doctor.add_argument(
        "--service", default=None, help="also check this service's certificate and rights"
    )
    _common(doctor)
    doctor.set_defaults(func=run_doctor)
