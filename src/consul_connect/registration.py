"""Registering a Connect-native service with the local agent and keeping its TTL check alive.

Consul's HTTPS checks present no client certificate, so they cannot probe an mTLS-only
port; a TTL check heartbeated from inside the process is the reliable alternative.
:class:`Registration` registers ``Connect: {"Native": true}`` with one TTL check, passes it
every ``ttl/3`` seconds while the process is healthy (``warning`` with a note when the
``healthy`` callback says otherwise, e.g. a leaf close to expiry), re-registers when the agent
has forgotten the service (agent restart, manual deregistration), and deregisters on close.
An instance an operator put into maintenance mode stays in it when it registers again
(deregistering, as ``aclose`` does, ends maintenance mode, as in Consul).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from consul_connect._goduration import format_duration
from consul_connect.agent.client import AgentClient
from consul_connect.errors import (
    AgentError,
    AgentNotFoundError,
    AgentPermissionError,
    AgentResponseError,
    ConfigError,
)

__all__ = ["Registration"]

logger = logging.getLogger(__name__)

Health = Callable[[], tuple[bool, str]]
ErrorHook = Callable[[BaseException], None]
T = TypeVar("T")

MAINTENANCE_PREFIX = "_service_maintenance:"
"""Consul's check ID prefix for an instance in maintenance mode (the service ID follows)."""

_NO_TTL = "does not have associated TTL"
"""Consul's 500 text for a check ID without a TTL timer. Agents before the 404 for unknown
check IDs (``vetCheckUpdate`` returned early with ACLs off) answer it when they forgot the
check altogether, e.g. after a restart without a data directory."""


def _check_lost(exc: AgentError) -> bool:
    """Whether ``exc`` says the agent no longer holds our TTL check."""
    if isinstance(exc, AgentNotFoundError):
        return True
    return exc.status == 500 and _NO_TTL in f"{exc.body} {exc}"


def _always_healthy() -> tuple[bool, str]:
    return True, ""


class Registration:
    """One service instance registered with the agent, with a heartbeated TTL check.

    ``service_id`` defaults to ``<name>-<port>`` (unique per node for one listening port);
    ``check_id`` to ``service:<service_id>``. ``address`` "" lets the agent use the node's
    address. ``deregister_critical_after`` (seconds) asks the agent to remove the service
    after that long in ``critical`` (Consul enforces at least one minute).

    ``healthy()`` returns ``(ok, note)``: ok → the check passes (note as output), not ok →
    ``warning`` with the note. Agent calls are bounded by ``timeout`` seconds. Errors
    during the heartbeat go to ``on_error`` (and the log); an
    :class:`~consul_connect.errors.AgentPermissionError` is logged as an error every time
    it happens rather than retried quietly.
    """

    def __init__(
        self,
        client: AgentClient,
        *,
        name: str,
        port: int,
        address: str = "",
        service_id: str | None = None,
        tags: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        ttl: float = 15.0,
        check_id: str | None = None,
        deregister_critical_after: float | None = None,
        healthy: Health | None = None,
        on_error: ErrorHook | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not name:
            raise ConfigError("a registration needs a service name")
        if not 0 < port < 65536:
            raise ConfigError(f"a Connect-native service needs a TCP port, got {port}")
        if address in ("0.0.0.0", "::", "[::]"):
            raise ConfigError(
                f"cannot register the wildcard address {address!r}: give a routable address "
                "or '' for the node's address"
            )
        if ttl <= 0:
            raise ConfigError(f"ttl must be positive, got {ttl}")
        self.client = client
        self.name = name
        self.port = port
        self.address = address
        self.service_id = service_id or f"{name}-{port}"
        self.check_id = check_id or f"service:{self.service_id}"
        self.tags = tuple(tags)
        self.meta = dict(meta or {})
        self.ttl = ttl
        self.interval = ttl / 3
        self.deregister_critical_after = deregister_critical_after
        self._healthy = healthy or _always_healthy
        self._on_error = on_error
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.registered = False
        self.registrations = 0
        self.heartbeats = 0
        self.last_status: str | None = None

    # -- what we send -------------------------------------------------------------------

    def _health(self) -> tuple[bool, str]:
        try:
            return self._healthy()
        except Exception as exc:
            logger.exception("registration health callback raised")
            return False, f"health callback failed: {exc}"

    def definition(self, status: str = "passing") -> dict[str, Any]:
        """The ``ServiceDefinition`` body sent to ``/v1/agent/service/register``."""
        check: dict[str, Any] = {
            "CheckID": self.check_id,
            "Name": f"{self.name} heartbeat (consul-connect TTL)",
            "TTL": format_duration(self.ttl),
            "Status": status,
        }
        if self.deregister_critical_after is not None:
            check["DeregisterCriticalServiceAfter"] = format_duration(
                self.deregister_critical_after
            )
        return {
            "ID": self.service_id,
            "Name": self.name,
            "Port": self.port,
            "Address": self.address,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Connect": {"Native": True},
            "Check": check,
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def _bounded(self, call: Awaitable[T]) -> T:
        async with asyncio.timeout(self.timeout):
            return await call

    async def _in_maintenance(self) -> bool:
        """Whether an operator put this instance into maintenance mode (best effort)."""
        try:
            # Unfiltered: a service ID needs no quoting that way, and an agent's local
            # checks are few.
            checks, _ = await self._bounded(self.client.agent_checks())
        except (AgentError, TimeoutError) as exc:
            logger.debug("cannot read %r's maintenance mode: %s", self.service_id, exc)
            return False
        return MAINTENANCE_PREFIX + self.service_id in checks

    async def _register(self) -> None:
        ok, note = self._health()
        # Not ready at registration: critical keeps clients away until the first pass.
        status = "passing" if ok else "critical"
        # Replacing the checks drops those of an older definition, but would also end an
        # operator's maintenance mode: a restarted instance must stay out of queries.
        keep = await self._in_maintenance()
        if keep:
            logger.info(
                "%r is in maintenance mode; registering without replacing checks", self.service_id
            )
        # From here on the agent may hold the service (a timed-out request may still have
        # landed): aclose must deregister it.
        was_registered, self.registered = self.registered, True
        try:
            await self._bounded(
                self.client.register_service(
                    self.definition(status), replace_existing_checks=not keep
                )
            )
        except (AgentResponseError, AgentPermissionError):
            self.registered = was_registered  # refused: the agent stored nothing new
            raise
        # An update, not the definition, sets the status: Consul keeps the status and output
        # of a check it already holds (addServiceInternal restores them from its snapshot),
        # e.g. one a previous instance let expire. It also carries the note as output.
        await self._bounded(self.client.update_ttl_check(self.check_id, status, note))
        self.registrations += 1
        self.last_status = status

    async def start(self) -> None:
        """Register the service, then start the heartbeat. Idempotent.

        Raises :class:`~consul_connect.errors.AgentPermissionError` when the token lacks
        ``service:write``, other :class:`~consul_connect.errors.AgentError` subclasses when
        the agent refuses or cannot be reached, and ``TimeoutError`` after ``timeout``.
        """
        if self._task is not None:
            return
        try:
            await self._register()
        except BaseException:
            # Half a registration (service stored, note update failed) would outlive us
            # with a TTL check nobody heartbeats.
            await self._deregister()
            raise
        self._task = asyncio.get_running_loop().create_task(
            self._heartbeat(), name=f"consul-connect heartbeat {self.service_id}"
        )

    def beat_now(self) -> None:
        """Ask for a heartbeat now (e.g. after the health state changed). Call on the loop."""
        self._wake.set()

    async def _sleep_until(self, when: float) -> None:
        delay = when - asyncio.get_running_loop().time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
        self._wake.clear()

    def _report(self, exc: BaseException, what: str) -> None:
        if isinstance(exc, AgentPermissionError):
            logger.error("%s for %r: %s", what, self.service_id, exc)
        else:
            logger.warning("%s for %r: %s", what, self.service_id, exc)
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception:
                logger.exception("registration on_error hook raised")

    async def _beat(self) -> None:
        ok, note = self._health()
        status = "passing" if ok else "warning"
        try:
            await self._bounded(self.client.update_ttl_check(self.check_id, status, note))
        except AgentError as exc:
            if not _check_lost(exc):
                raise
            # The agent no longer knows the check: it restarted or the service was removed.
            logger.info("agent forgot %r; registering it again", self.service_id)
            await self._register()
            if status != self.last_status:
                await self._bounded(self.client.update_ttl_check(self.check_id, status, note))
        self.heartbeats += 1
        self.last_status = status

    async def _heartbeat(self) -> None:
        # Beats are due one interval after the last successful one was sent, not after the
        # last attempt ended: a failed or slow attempt (up to ``timeout``) followed by a full
        # interval of sleep would let the TTL run out. Failures are retried soon, backing
        # off up to one interval.
        loop = asyncio.get_running_loop()
        failures = 0
        due = loop.time() + self.interval
        while True:
            await self._sleep_until(due)
            sent = loop.time()
            try:
                await self._beat()
            except (AgentError, TimeoutError) as exc:
                failures += 1
                self._report(exc, "TTL heartbeat failed")
            except Exception as exc:
                # Not the agent's fault (e.g. a bug): report it, keep the beat going.
                failures += 1
                logger.exception("TTL heartbeat for %r raised", self.service_id)
                self._report(exc, "TTL heartbeat failed")
            else:
                failures = 0
            if failures:
                retry = self.interval / 8 * 2 ** min(failures - 1, 3)
                due = loop.time() + min(retry, self.interval)
            else:
                due = sent + self.interval

    async def aclose(self) -> None:
        """Stop the heartbeat and deregister (bounded by ``timeout``). Idempotent.

        Failures to deregister are reported to ``on_error`` and the log, not raised: the
        TTL check turns critical on its own once heartbeats stop.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._deregister()

    async def _deregister(self) -> None:
        if not self.registered:
            return
        self.registered = False
        try:
            await self._bounded(self.client.deregister_service(self.service_id))
        except AgentNotFoundError:
            pass
        except (AgentError, TimeoutError) as exc:
            self._report(exc, "deregistration failed")
