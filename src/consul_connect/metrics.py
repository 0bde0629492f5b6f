"""Prometheus metrics for Services, built on their event hooks (optional extra ``metrics``).

::

    from consul_connect.metrics import instrument
    handle = instrument(service)          # default prometheus_client registry
    ...
    handle.close()                        # stop counting this service

Exposed (every series carries a ``service`` label):

=================================================  ======================================
``consul_connect_handshakes_total{result}``        inbound connections: ``allowed``,
                                                   ``denied`` (authorizer refused; also
                                                   open connections closed after an
                                                   intention change), ``failed`` (TLS or
                                                   identity check)
``consul_connect_authz_decisions_total``           authorizer decisions about peers and
``{decision,reason}``                              (L7) single requests; ``decision`` is
                                                   ``allow``/``deny``, ``reason`` a short
                                                   class (see :func:`reason_label`)
``consul_connect_leaf_rotations_total``            new leaf certificates after the first
``consul_connect_roots_changes_total``             CA root set changes
``consul_connect_watch_errors_total{error}``       failed agent watches, by exception class
``consul_connect_leaf_expiry_timestamp_seconds``   the current leaf's NotAfter (Unix time)
``consul_connect_active_connections``              accepted connections still open
``consul_connect_ready``                           1 once the Service has certificates
=================================================  ======================================

Counters move when the Service emits an event; the three gauges are read from
:meth:`~consul_connect.service.Service.statistics` at scrape time. Label values are
bounded: free-text reasons (which name intentions and identities) are reduced to a
small fixed vocabulary.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "consul_connect.metrics needs prometheus_client: pip install 'consul-connect[metrics]'"
    ) from exc

if TYPE_CHECKING:
    from consul_connect.service import Service, ServiceEvent

__all__ = ["Instrumentation", "instrument", "reason_label"]

# (prefix of the reason text, label): first match wins. The prefixes are the reasons the
# library's authorizers and the Consul agent produce.
_REASON_PREFIXES: tuple[tuple[str, str], ...] = (
    ("Matched L4 intention", "l4_intention"),
    ("Matched L7 intention", "l7_intention"),
    ("Default behavior configured by ACLs", "default"),
    ("no intention data yet", "no_data"),
    ("authorization timed out", "agent_error"),
    ("agent refused the authorize call", "agent_error"),
    ("authorize call failed", "agent_error"),
    ("identity was never authorized", "agent_error"),
    ("any service allowed", "allow_any"),
    ("trust domain", "trust_domain"),
    ("handshake failed", "handshake"),
    ("no peer certificate", "no_certificate"),
    ("no client certificate", "no_certificate"),
)


def reason_label(reason: str) -> str:
    """Map a decision or refusal reason to a short, bounded label for metrics.

    Returns one of ``l4_intention``, ``l7_intention``, ``default``, ``no_data``,
    ``agent_error``, ``allow_any``, ``trust_domain``, ``allow_list``, ``handshake``,
    ``no_certificate``, ``identity`` or ``other``. Never raises.
    """
    # Combined authorizers join their members' reasons; the first one names the rule.
    text = reason.strip().split("; ", 1)[0]
    for prefix, label in _REASON_PREFIXES:
        if text.startswith(prefix):
            return label
    if text.endswith("in the allowed list"):
        return "allow_list"
    lowered = text.lower()
    if "spiffe" in lowered or "uri san" in lowered or "identity" in lowered:
        return "identity"
    return "other"


class _Metrics:
    """The metric objects of one registry (created once, shared by every Service)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handshakes = Counter(
            "consul_connect_handshakes",
            "Inbound Connect connections by outcome.",
            ["service", "result"],
            registry=registry,
        )
        self.decisions = Counter(
            "consul_connect_authz_decisions",
            "Authorization decisions about peers, by decision and reason class.",
            ["service", "decision", "reason"],
            registry=registry,
        )
        self.rotations = Counter(
            "consul_connect_leaf_rotations",
            "Leaf certificates replaced after the first one.",
            ["service"],
            registry=registry,
        )
        self.roots_changes = Counter(
            "consul_connect_roots_changes",
            "Changes of the trusted CA root set.",
            ["service"],
            registry=registry,
        )
        self.watch_errors = Counter(
            "consul_connect_watch_errors",
            "Failed agent watches (certificates, roots, intentions, registration).",
            ["service", "error"],
            registry=registry,
        )
        self.gauges = _ServiceGauges()
        registry.register(self.gauges)


class _ServiceGauges(Collector):
    """Scrape-time gauges read from each instrumented Service's ``statistics()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[int, weakref.ref[Service]] = {}

    def add(self, service: Service) -> None:
        with self._lock:
            self._services[id(service)] = weakref.ref(service)

    def remove(self, service: Service) -> None:
        with self._lock:
            self._services.pop(id(service), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        expiry = GaugeMetricFamily(
            "consul_connect_leaf_expiry_timestamp_seconds",
            "NotAfter of the current leaf certificate, as a Unix timestamp.",
            labels=["service"],
        )
        active = GaugeMetricFamily(
            "consul_connect_active_connections",
            "Accepted Connect connections still open.",
            labels=["service"],
        )
        ready = GaugeMetricFamily(
            "consul_connect_ready",
            "1 when the Service holds a leaf that verifies against the roots.",
            labels=["service"],
        )
        with self._lock:
            refs = list(self._services.values())
        for ref in refs:
            svc = ref()
            if svc is None:
                continue
            stats = svc.statistics()
            if stats.leaf_valid_before is not None:
                expiry.add_metric([stats.name], stats.leaf_valid_before.timestamp())
            active.add_metric([stats.name], float(stats.active_connections))
            ready.add_metric([stats.name], 1.0 if stats.ready else 0.0)
        yield expiry
        yield active
        yield ready

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Describing (rather than collecting) at registration avoids reading statistics()
        # of services that are not instrumented yet.
        yield GaugeMetricFamily("consul_connect_leaf_expiry_timestamp_seconds", "", labels=[])
        yield GaugeMetricFamily("consul_connect_active_connections", "", labels=[])
        yield GaugeMetricFamily("consul_connect_ready", "", labels=[])


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _Metrics(registry)
            _by_registry[registry] = found
        return found


class Instrumentation:
    """The link between one Service and one registry; :meth:`close` ends it.

    Counters already exported stay in the registry (Prometheus expects counters not to
    vanish); the scrape-time gauges stop reporting the service.
    """

    def __init__(self, service: Service, metrics: _Metrics) -> None:
        self._service = service
        self._metrics = metrics
        self._name = service.name
        self._unsubscribe: Callable[[], None] | None = service.on_event(self._on_event)
        metrics.gauges.add(service)
        # Create the fixed-label series now so dashboards show zeros instead of gaps.
        for result in ("allowed", "denied", "failed"):
            metrics.handshakes.labels(self._name, result)
        metrics.rotations.labels(self._name)
        metrics.roots_changes.labels(self._name)

    def _on_event(self, event: ServiceEvent) -> None:
        m = self._metrics
        name = event.service or self._name
        if event.kind == "peer_allowed":
            m.handshakes.labels(name, "allowed").inc()
            m.decisions.labels(name, "allow", reason_label(event.reason)).inc()
        elif event.kind == "peer_denied":
            if event.peer is None:
                # No identity: the TLS handshake or the certificate's identity failed,
                # so no authorizer was asked.
                m.handshakes.labels(name, "failed").inc()
            else:
                m.handshakes.labels(name, "denied").inc()
                m.decisions.labels(name, "deny", reason_label(event.reason)).inc()
        elif event.kind == "request_denied":
            # One request refused by L7 intentions; its connection stays open, so this is
            # a decision but not a refused handshake. (str(): services that predate the
            # event kind never emit it.)
            m.decisions.labels(name, "deny", reason_label(event.reason)).inc()
        elif event.kind == "leaf_rotated":
            m.rotations.labels(name).inc()
        elif event.kind == "roots_changed":
            m.roots_changes.labels(name).inc()
        elif event.kind == "watch_error":
            error = type(event.error).__name__ if event.error is not None else "unknown"
            m.watch_errors.labels(name, error).inc()

    def close(self) -> None:
        """Stop counting this Service's events and drop it from the gauges. Idempotent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._metrics.gauges.remove(self._service)


def instrument(service: Service, registry: CollectorRegistry | None = None) -> Instrumentation:
    """Export ``service``'s events and state as Prometheus metrics in ``registry``.

    ``registry`` defaults to ``prometheus_client.REGISTRY``. Several Services may share a
    registry; the metric objects are created once per registry. Returns an
    :class:`Instrumentation` whose ``close()`` unsubscribes. Raises ``ImportError`` at
    import time of this module when ``prometheus_client`` is missing.
    """
    return Instrumentation(service, _metrics_for(registry if registry is not None else REGISTRY))
