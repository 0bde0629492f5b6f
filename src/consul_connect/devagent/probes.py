"""HTTP and TCP health checks, run by the dev agent as a Consul agent runs them.

An HTTP check passes on a 2xx answer, warns on 429 and is critical otherwise or when
the request fails; its output is ``HTTP <method> <url>: <status> Output: <body>``
(the last ``OutputMaxSize`` bytes of the body). A TCP check passes when a connection
opens (``TCP connect <addr>: Success``). Both time out after ``Timeout`` (10 s when
unset). :class:`Thresholds` applies ``SuccessBeforePassing``, ``FailuresBeforeWarning``
and ``FailuresBeforeCritical`` to the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import ssl
from collections.abc import Mapping
from typing import Any

import httpx

DEFAULT_TIMEOUT = 10.0
USER_AGENT = "Consul Health Check"
ACCEPT = "text/plain, text/*, */*"
OUTPUT_MAX = 4096


def probed(definition: Mapping[str, Any]) -> bool:
    """True for a check the dev agent runs itself (HTTP or TCP, with an interval)."""
    return bool((definition.get("HTTP") or definition.get("TCP")) and definition.get("Interval"))


async def probe(definition: Mapping[str, Any]) -> tuple[str, str]:
    """Run one HTTP or TCP check; ``(status, output)``. Never raises."""
    timeout = float(definition.get("Timeout") or 0) or DEFAULT_TIMEOUT
    try:
        if definition.get("HTTP"):
            # httpx enforces the timeout; the outer bound only guards a stuck body.
            return await asyncio.wait_for(_http(definition, timeout), timeout + 1.0)
        return await asyncio.wait_for(_tcp(str(definition["TCP"]), timeout), timeout)
    except TimeoutError:
        if definition.get("HTTP"):
            return "critical", _http_timeout(definition)
        return "critical", f"dial tcp {definition.get('TCP')}: i/o timeout"
    except Exception as exc:  # a probe must never take the agent down
        return "critical", f"check failed: {exc}"


async def _tcp(addr: str, timeout: float) -> tuple[str, str]:
    host, port = _split(addr)
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return "critical", f"dial tcp {addr}: {_dial_error(exc)}"
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), min(1.0, timeout))
    return "passing", f"TCP connect {addr}: Success"


async def _http(d: Mapping[str, Any], timeout: float) -> tuple[str, str]:
    url = str(d["HTTP"])
    method = str(d.get("Method") or "GET")
    pairs = [(str(k), str(v)) for k, vs in (d.get("Header") or {}).items() for v in vs or []]
    names = {k.lower() for k, _ in pairs}
    if "user-agent" not in names:
        pairs.append(("User-Agent", USER_AGENT))
    if "accept" not in names:
        pairs.append(("Accept", ACCEPT))
    headers = httpx.Headers(pairs)
    verify: bool | ssl.SSLContext = False
    if url.lower().startswith("https:") and not d.get("TLSSkipVerify"):
        verify = _system_roots()  # built once: a new verifying context costs ~60 ms
    limit = int(d.get("OutputMaxSize") or 0) or OUTPUT_MAX
    async with httpx.AsyncClient(verify=verify, timeout=timeout, trust_env=False) as client:
        try:
            sni = d.get("TLSServerName")
            async with client.stream(
                method,
                url,
                headers=headers,
                content=d.get("Body") or None,
                extensions={"sni_hostname": sni} if sni else None,
            ) as resp:
                body = b""
                async for chunk in resp.aiter_bytes():
                    body = (body + chunk)[-limit:]
        except httpx.TimeoutException:
            return "critical", _http_timeout(d)
        except httpx.HTTPError as exc:
            return "critical", f'{method.capitalize()} "{url}": {_http_error(exc, url)}'
    status = f"{resp.status_code} {resp.reason_phrase}".strip()
    output = f"HTTP {method} {url}: {status} Output: {body.decode(errors='replace')}"
    if 200 <= resp.status_code <= 299:
        return "passing", output
    if resp.status_code == 429:
        return "warning", output
    return "critical", output


def _http_timeout(d: Mapping[str, Any]) -> str:
    method = str(d.get("Method") or "GET").capitalize()
    return (
        f'{method} "{d["HTTP"]}": context deadline exceeded '
        "(Client.Timeout exceeded while awaiting headers)"
    )


@functools.cache
def _system_roots() -> ssl.SSLContext:
    """A client context trusting the system's CA store, as Consul's checks do."""
    return ssl.create_default_context()


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _dial_error(exc: OSError) -> str:
    if exc.errno is not None:
        text = os.strerror(exc.errno).lower()
        if exc.errno == errno.ECONNREFUSED:
            return f"connect: {text}"
        return text
    return str(exc) or type(exc).__name__


def _http_error(exc: httpx.HTTPError, url: str) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"tls: failed to verify certificate: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"tls: {cause.reason or cause}"
        if isinstance(cause, OSError) and cause.errno is not None:
            u = httpx.URL(url)
            port = u.port or (443 if u.scheme == "https" else 80)
            return f"dial tcp {u.host}:{port}: {_dial_error(cause)}"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


class Thresholds:
    """Consul's status handler: how many results in a row change a check's status."""

    def __init__(
        self,
        failures_before_warning: int = 0,
        failures_before_critical: int = 0,
        success_before_passing: int = 0,
    ):
        self.before_critical = failures_before_critical
        self.before_warning = failures_before_warning or failures_before_critical
        self.before_passing = success_before_passing
        self.failures = 0
        self.successes = 0

    def apply(self, status: str, output: str) -> tuple[str, str] | None:
        """The status to record for one result, or None to leave the check as it is."""
        if status in ("passing", "warning"):
            self.failures = 0
            self.successes += 1
            if self.successes >= self.before_passing:
                return status, output
            return None
        self.successes = 0
        self.failures += 1
        if self.failures >= self.before_critical:
            return "critical", output
        if self.failures >= self.before_warning:
            return "warning", output
        return None
