"""Discovery: where a service's Connect-capable instances are, and who they must prove to be.

A :class:`Resolver` answers with :class:`Endpoint` values: an address to dial and the
:class:`~consul_connect.identity.ServiceIdentity` the server there must present. For a
sidecar proxy that identity is the *destination* service's, not the proxy's.

* :class:`StaticResolver` — one fixed address and identity (tests, dev mode).
* :class:`CatalogResolver` — ``/v1/health/connect/<service>`` (passing, stale reads), one
  request per :meth:`~CatalogResolver.resolve` or, after :meth:`~CatalogResolver.start`, a
  blocking watch whose last answer is served from memory.
* :class:`PreparedQueryResolver` — ``/v1/query/<name>/execute?connect=true``.
* :func:`resolver_for_name` — Consul DNS-style names (``web.service.consul``,
  ``web.connect.dc2.consul``, ``q.query.consul``) or a bare service name.

Results are shuffled on every call so callers that take the first endpoint spread load.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from consul_connect.agent.client import AgentClient, QueryMeta
from consul_connect.agent.watch import watch
from consul_connect.errors import (
    ConfigError,
    NoInstancesError,
)
from consul_connect.identity import ServiceIdentity, parse_service_identity

__all__ = [
    "CatalogResolver",
    "Endpoint",
    "PreparedQueryResolver",
    "Resolver",
    "StaticResolver",
    "endpoints_from_health",
    "resolver_for_name",
]

logger = logging.getLogger(__name__)

TrustDomain = Callable[[], str] | str
ErrorHook = Callable[[BaseException], None]
_JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance to dial: ``host``/``port`` and the identity its certificate must carry.

    ``node`` and ``service_id`` name the catalog entry (empty for static endpoints).
    """

    host: str
    port: int
    identity: ServiceIdentity
    node: str = ""
    service_id: str = ""

    @property
    def address(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@runtime_checkable
class Resolver(Protocol):
    """Anything that can list the endpoints of one service."""

    async def resolve(self) -> list[Endpoint]:
        """The endpoints to try, in the order to try them.

        Raises :class:`~consul_connect.errors.NoInstancesError` when there is none.
        """
        ...


def _trust_domain(td: TrustDomain) -> str:
    return td() if callable(td) else td


def _split_host_port(address: str) -> tuple[str, int]:
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"address {address!r} is not [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"address {address!r} is not host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address {address!r} has no numeric port") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"address {address!r} is not host:port")
    return host, port


class StaticResolver:
    """Always the same endpoint.

    ``address`` is ``"host:port"`` (``"[::1]:port"`` for IPv6) or a ``(host, port)`` pair;
    ``identity`` a :class:`ServiceIdentity` or its SPIFFE URI. Raises
    :class:`~consul_connect.errors.ConfigError` for a malformed address and
    :class:`~consul_connect.errors.IdentityError` for a URI that is not a service identity.
    """

    def __init__(self, address: str | tuple[str, int], identity: ServiceIdentity | str) -> None:
        host, port = _split_host_port(address) if isinstance(address, str) else address
        ident = parse_service_identity(identity) if isinstance(identity, str) else identity
        self.endpoint = Endpoint(host, int(port), ident)

    async def resolve(self) -> list[Endpoint]:
        """A one-element list with the configured endpoint."""
        return [self.endpoint]

    def __repr__(self) -> str:
        return f"StaticResolver({self.endpoint.address!r}, {self.endpoint.identity.uri!r})"


def _as_dict(value: object) -> _JSON:
    return value if isinstance(value, dict) else {}


def _endpoint_from_entry(
    entry: object,
    requested: str,
    trust_domain: str,
    *,
    namespace: str,
    partition: str,
    datacenter: str,
) -> Endpoint | None:
    """Map one ``{Node, Service, Checks}`` entry to an endpoint, or None if unusable."""
    node = _as_dict(_as_dict(entry).get("Node"))
    svc = _as_dict(_as_dict(entry).get("Service"))
    if not svc:
        return None
    kind = str(svc.get("Kind") or "")
    if _as_dict(svc.get("Connect")).get("Native") is True:
        target = str(svc.get("Service") or "")
    else:
        # A sidecar proxy answers with the certificate of the service behind it; a
        # terminating gateway presents the linked (requested) service's certificate.
        target = str(_as_dict(svc.get("Proxy")).get("DestinationServiceName") or "")
        if not target and kind == "terminating-gateway":
            target = requested
    if not target:
        logger.debug("skipping catalog entry that is not a Connect service: %r", svc.get("ID"))
        return None
    host = str(svc.get("Address") or node.get("Address") or "")
    port = svc.get("Port")
    if not host or not isinstance(port, int) or port <= 0:
        # A unix-socket-only instance (SocketPath) cannot be dialled over TCP.
        return None
    identity = ServiceIdentity(
        trust_domain=trust_domain,
        namespace=str(svc.get("Namespace") or namespace or "default"),
        datacenter=str(node.get("Datacenter") or datacenter),
        service=target,
        partition=str(svc.get("Partition") or partition or "default"),
    )
    return Endpoint(
        host, port, identity, node=str(node.get("Node") or ""), service_id=str(svc.get("ID") or "")
    )


def _carries_tags(entry: object, tags: Sequence[str]) -> bool:
    """Whether the entry's service has every tag, compared without regard to case."""
    have = _as_dict(_as_dict(entry).get("Service")).get("Tags") or []
    folded = {str(t).casefold() for t in have} if isinstance(have, list) else set()
    return all(t.casefold() in folded for t in tags)


def endpoints_from_health(
    entries: Sequence[object],
    requested: str,
    trust_domain: str,
    *,
    namespace: str = "",
    partition: str = "",
    datacenter: str = "",
) -> list[Endpoint]:
    """Endpoints for the health-style entries of ``/v1/health/connect`` or a prepared query.

    Native instances expect ``Service.Service``; proxies ``Proxy.DestinationServiceName``.
    Namespace and partition come from the entry (Enterprise) or the given defaults; the
    datacenter from ``Node.Datacenter``. Unusable entries are skipped.
    """
    out = []
    for entry in entries:
        ep = _endpoint_from_entry(
            entry,
            requested,
            trust_domain,
            namespace=namespace,
            partition=partition,
            datacenter=datacenter,
        )
        if ep is not None:
            out.append(ep)
    return out


class CatalogResolver:
    """Healthy Connect-capable instances of ``service`` from the agent's health API.

    Each :meth:`resolve` queries ``/v1/health/connect/<service>`` (``passing`` unless
    ``passing=False``, stale reads allowed, ``filter`` as a bexpr, ``tags`` that every
    instance must carry, matched without regard to case as Consul does, ``datacenter``), unless
    :meth:`start` was called: then a blocking watch keeps the answer in memory,
    :meth:`resolve` serves it without an agent call (the last answer stays in use while the
    agent is away) and falls back to one query only before the first answer.

    ``trust_domain`` (a string or a function returning the current one, e.g. from the CA
    roots) goes into the expected identities; the client side tolerates a different trust
    domain as Consul does. ``namespace``/``partition`` set the expected identity when the
    agent does not report them (CE); the query itself uses the client's configuration.
    ``rng`` shuffles the result per call.
    """

    def __init__(
        self,
        client: AgentClient,
        service: str,
        *,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        filter: str | None = None,
        tags: Sequence[str] = (),
        passing: bool = True,
        trust_domain: TrustDomain = "",
        rng: random.Random | None = None,
        wait: float = 300.0,
        on_error: ErrorHook | None = None,
    ) -> None:
        if not service:
            raise ConfigError("CatalogResolver needs a service name")
        if isinstance(tags, str):
            raise ConfigError("CatalogResolver tags must be a sequence of tags, not a string")
        self.client = client
        self.service = service
        self.datacenter = datacenter
        self.namespace = namespace or client.config.namespace or ""
        self.partition = partition or client.config.partition or ""
        self.filter = filter
        self.tags = tuple(tags)
        self.passing = passing
        self._trust_domain = trust_domain
        self._rng = rng or random.Random()
        self._wait = wait
        self._on_error = on_error
        self._cache: list[_JSON] | None = None
        # The watched answer parsed once: (entries it came from, trust domain, endpoints).
        self._parsed: tuple[list[_JSON], str, list[Endpoint]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._changed = asyncio.Event()

    @property
    def watching(self) -> bool:
        """Whether a background watch is running."""
        return self._task is not None and not self._task.done()

    async def _query(
        self, index: int = 0, wait: float | None = None
    ) -> tuple[list[_JSON], QueryMeta]:
        return await self.client.health_connect(
            self.service,
            passing=self.passing,
            dc=self.datacenter,
            filter=self.filter,
            tags=self.tags,
            index=index,
            wait=wait,
            stale=True,
        )

    def _tagged(self, entries: Sequence[object]) -> Sequence[object]:
        # Consul applies ?tag to /v1/health/connect only on the streaming path (blocking
        # reads); a plain read ignores it (agent/consul/health_endpoint.go ServiceNodes picks
        # serviceNodesConnect before serviceNodesTagFilter), so filter here as well.
        if not self.tags:
            return entries
        return [e for e in entries if _carries_tags(e, self.tags)]

    def _endpoints(self, entries: Sequence[object]) -> list[Endpoint]:
        eps = endpoints_from_health(
            self._tagged(entries),
            self.service,
            _trust_domain(self._trust_domain),
            namespace=self.namespace,
            partition=self.partition,
            datacenter=self.datacenter or "",
        )
        self._rng.shuffle(eps)
        return eps

    def cached(self) -> list[Endpoint] | None:
        """The watched answer, shuffled, without any I/O; None when there is none yet.

        Safe to call from any thread. Returns None before :meth:`start` has delivered a
        first answer, after :meth:`aclose`, and when the answer has no usable instance
        (:meth:`resolve` then says why).
        """
        entries = self._cache
        if entries is None or not self.watching:
            return None
        td = _trust_domain(self._trust_domain)
        parsed = self._parsed
        if parsed is None or parsed[0] is not entries or parsed[1] != td:
            eps = endpoints_from_health(
                self._tagged(entries),
                self.service,
                td,
                namespace=self.namespace,
                partition=self.partition,
                datacenter=self.datacenter or "",
            )
            parsed = self._parsed = (entries, td, eps)
        if not parsed[2]:
            return None
        out = list(parsed[2])
        self._rng.shuffle(out)
        return out

    async def resolve(self) -> list[Endpoint]:
        """The service's usable instances, shuffled.

        Raises :class:`~consul_connect.errors.NoInstancesError` when none is healthy (or
        the filter matches none), and the agent errors of
        :class:`~consul_connect.agent.client.AgentClient` when a query fails.
        """
        cached = self.cached()
        if cached is not None:
            return cached
        entries = self._cache
        if entries is None:
            entries, _ = await self._query()
        eps = self._endpoints(entries)
        if not eps:
            where = f" in datacenter {self.datacenter}" if self.datacenter else ""
            matching = f" matching filter {self.filter!r}" if self.filter else ""
            tagged = f" tagged {', '.join(self.tags)}" if self.tags else ""
            raise NoInstancesError(
                f"no healthy Connect-capable instance of {self.service!r}{tagged}{where}{matching}"
            )
        return eps

    async def start(self) -> None:
        """Start the background watch (returns at once). Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"consul-connect discovery {self.service}"
            )

    async def wait_changed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the watch to deliver a new answer."""
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop the watch; later calls to :meth:`resolve` query the agent again. Idempotent."""
        task, self._task = self._task, None
        self._cache = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        def on_error(exc: BaseException) -> None:
            logger.warning("discovery watch for %r failed: %s", self.service, exc)
            if self._on_error is not None:
                try:
                    self._on_error(exc)
                except Exception:
                    logger.exception("discovery on_error hook raised")

        stream = watch(lambda i, w: self._query(i, w), wait=self._wait, on_error=on_error)
        try:
            async with contextlib.aclosing(stream):
                async for entries in stream:
                    self._cache = entries
                    self._changed.set()
        except Exception as exc:
            # A permission error (or a bug) ends the watch; resolve() then queries directly.
            self._fatal = exc
            self._cache = None
            logger.error("discovery watch for %r stopped: %s", self.service, exc)
            on_error(exc)

    def __repr__(self) -> str:
        return f"CatalogResolver({self.service!r}, datacenter={self.datacenter!r})"


class PreparedQueryResolver:
    """Connect-capable instances from executing a prepared query (by name or id).

    Calls ``/v1/query/<name>/execute?connect=true`` on every :meth:`resolve`; the query
    decides health filtering and failover. Expected identities name the query's
    ``Service``.
    """

    def __init__(
        self,
        client: AgentClient,
        name: str,
        *,
        datacenter: str | None = None,
        trust_domain: TrustDomain = "",
        rng: random.Random | None = None,
    ) -> None:
        if not name:
            raise ConfigError("PreparedQueryResolver needs a query name or id")
        self.client = client
        self.name = name
        self.datacenter = datacenter
        self._trust_domain = trust_domain
        self._rng = rng or random.Random()

    async def resolve(self) -> list[Endpoint]:
        """The instances the query returns, shuffled.

        Raises :class:`~consul_connect.errors.AgentNotFoundError` for an unknown query,
        :class:`~consul_connect.errors.NoInstancesError` when it returns none.
        """
        data, _ = await self.client.prepared_query_execute(
            self.name, connect=True, dc=self.datacenter
        )
        nodes = data.get("Nodes") or []
        service = str(data.get("Service") or "")
        eps = endpoints_from_health(
            nodes if isinstance(nodes, list) else [],
            service,
            _trust_domain(self._trust_domain),
            namespace=str(data.get("Namespace") or self.client.config.namespace or ""),
            partition=str(self.client.config.partition or ""),
            datacenter=str(data.get("Datacenter") or self.datacenter or ""),
        )
        if not eps:
            raise NoInstancesError(
                f"prepared query {self.name!r} returned no Connect-capable instance"
            )
        self._rng.shuffle(eps)
        return eps

    def __repr__(self) -> str:
        return f"PreparedQueryResolver({self.name!r}, datacenter={self.datacenter!r})"


# A DNS label as Consul accepts it in names we parse (no empty labels).
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")
_TYPES = ("service", "connect", "query")


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def resolver_for_name(
    name: str, client: AgentClient, trust_domain: TrustDomain = "", *, domain: str = "consul"
) -> CatalogResolver | PreparedQueryResolver:
    """A resolver for a host name the way Consul DNS would answer it.

    Accepted (case-insensitive; a port and a trailing dot are ignored; ``domain`` is the
    agent's DNS ``domain``, ``consul`` unless configured otherwise):

    * ``<svc>.service.consul``, ``<svc>.service.<dc>.consul`` -> :class:`CatalogResolver`
    * ``<tag>.<svc>.service[.<dc>].consul`` and RFC 2782's ``_<svc>._<tag>.service[.<dc>].consul``
      -> :class:`CatalogResolver` for instances carrying ``tag`` (``_tcp`` means no tag)
    * ``<svc>.connect.consul``, ``<svc>.connect.<dc>.consul`` -> :class:`CatalogResolver`
    * ``<query>.query.consul``, ``<query>.query.<dc>.consul`` -> :class:`PreparedQueryResolver`
    * on ``.service`` and ``.connect``, ``<dc>.dc`` in place of ``<dc>`` as Consul 1.13+ allows
    * a bare service name (one label, e.g. ``web``) -> :class:`CatalogResolver`

    Health filtering is the resolvers' (passing instances only, as Consul's Go
    ``connect.ConsulResolver`` does), not DNS's default of also answering with warning ones.

    Raises :class:`~consul_connect.errors.ConfigError` for anything else: another domain,
    an IP address, a tag on a ``.connect`` or ``.query`` name (Consul DNS takes tags only on
    ``.service``), a ``.peer`` locality, or an unknown form.
    """
    host = _strip_port(name.strip()).rstrip(".").lower()
    if not host:
        raise ConfigError("empty service name")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise ConfigError(f"{name!r} is an IP address, not a Consul service name")
    labels = host.split(".")
    if any(not _LABEL.match(label) for label in labels):
        raise ConfigError(f"invalid Consul DNS name {name!r}")
    if len(labels) == 1:
        return CatalogResolver(client, labels[0], trust_domain=trust_domain)
    suffix = domain.strip(".").lower().split(".")
    if len(labels) <= len(suffix) or labels[-len(suffix) :] != suffix:
        raise ConfigError(
            f"invalid Consul DNS name {name!r}: it must end in .{'.'.join(suffix)} "
            f"(<service>.service[.<dc>].{'.'.join(suffix)} or "
            f"<query>.query[.<dc>].{'.'.join(suffix)})"
        )
    # From here on the domain is spelled "consul" whatever it is configured to be.
    labels = [*labels[: -len(suffix)], "consul"]
    # agent/dns_ce.go parseLocality: "<dc>.dc" (and "<peer>.peer") after the kind label;
    # .query takes only a bare datacenter (agent/dns.go dispatch, parseDatacenter).
    if len(labels) >= 4 and labels[-2] in ("dc", "peer") and labels[-4] in _TYPES:
        if labels[-2] == "peer" or labels[-4] == "query":
            raise ConfigError(
                f"unsupported Consul DNS name {name!r}: only <service>.service and "
                "<service>.connect take a <dc>.dc locality; peers are not supported"
            )
        labels = [*labels[:-3], labels[-3], "consul"]
    if len(labels) in (4, 5) and labels[2] in _TYPES and labels[1] not in _TYPES:
        if labels[2] != "service":
            raise ConfigError(
                f"unsupported Consul DNS name {name!r}: a tag filter is only accepted on "
                "<tag>.<service>.service[.<dc>].consul"
            )
        tag, svc = labels[0], labels[1]
        if tag.startswith("_") and svc.startswith("_"):  # RFC 2782: _<service>._<tag>
            svc, tag = tag[1:], svc[1:]
            tag = "" if tag == "tcp" else tag
        if not svc or svc.startswith("_") or tag.startswith("_"):
            raise ConfigError(f"invalid Consul DNS name {name!r}")
        dc = labels[3] if len(labels) == 5 else None
        return CatalogResolver(
            client, svc, datacenter=dc, tags=(tag,) if tag else (), trust_domain=trust_domain
        )
    if len(labels) not in (3, 4) or labels[1] not in _TYPES:
        raise ConfigError(
            f"unsupported Consul DNS name {name!r}: expected <service>.service[.<dc>].consul, "
            "<service>.connect[.<dc>].consul or <query>.query[.<dc>].consul"
        )
    target, kind = labels[0], labels[1]
    dc = labels[2] if len(labels) == 4 else None
    if kind == "query":
        return PreparedQueryResolver(client, target, datacenter=dc, trust_domain=trust_domain)
    return CatalogResolver(client, target, datacenter=dc, trust_domain=trust_domain)
