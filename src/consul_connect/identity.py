"""Consul's SPIFFE identities: parse, format and compare.

Every Connect certificate carries exactly one URI SAN naming *who* holds it. Consul
uses five shapes (``consul-api.md`` §3.2)::

    spiffe://<td>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>     ServiceIdentity
    spiffe://<td>[/ap/<partition>]/agent/client/dc/<dc>/id/<node>     AgentIdentity
    spiffe://<td>/agent/server/dc/<dc>                                ServerIdentity
    spiffe://<td>[/ap/<partition>]/gateway/mesh/dc/<dc>               MeshGatewayIdentity
    spiffe://<cluster-id>.consul                                      SigningIdentity

``<td>`` is the trust domain, ``<cluster-id>.consul``. The values here are frozen and
hashable; parsing is cached because the TLS hot path parses the same peer URIs over
and over. This module does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias
from urllib.parse import quote, unquote

from .errors import IdentityError

__all__ = [
    "AgentIdentity",
    "MeshGatewayIdentity",
    "ServerIdentity",
    "ServiceIdentity",
    "SigningIdentity",
    "SpiffeID",
    "parse_service_identity",
    "parse_spiffe_id",
    "trust_domain_from_cluster_id",
]

_DEFAULT = "default"

# Characters Go's net/url leaves unescaped in a path (besides letters, digits and
# "-._~"). "/" is deliberately *not* here: a slash inside one segment must be escaped
# or the result would parse as a different shape.
_SEGMENT_SAFE = "$&+,:;=@"

# The four path shapes, matched on the raw (still percent-encoded) path exactly as
# Consul's parser does (agent/connect/uri.go).
_SERVICE_RE = re.compile(r"^(?:/ap/([^/]+))?/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)$")
_AGENT_RE = re.compile(r"^(?:/ap/([^/]+))?/agent/client/dc/([^/]+)/id/([^/]+)$")
_SERVER_RE = re.compile(r"^/agent/server/dc/([^/]+)$")
_MESH_GATEWAY_RE = re.compile(r"^(?:/ap/([^/]+))?/gateway/mesh/dc/([^/]+)$")

# scheme "://" host path. Host: a DNS-ish trust domain (no userinfo, port, or escapes);
# a query or fragment is never part of a SPIFFE ID, so "?" and "#" make it invalid.
_URI_RE = re.compile(r"^spiffe://([A-Za-z0-9._-]*)(/[^?#]*)?$", re.IGNORECASE)
# A raw path may hold percent-escapes but no bare "%", whitespace or control characters.
_BAD_RAW_PATH_RE = re.compile(r"%(?![0-9A-Fa-f]{2})|[\x00-\x20\x7f]")


def _seg(value: str) -> str:
    return quote(value, safe=_SEGMENT_SAFE)


def _partition_prefix(partition: str) -> str:
    ap = partition.lower()
    if ap and ap != _DEFAULT:
        return f"/ap/{_seg(ap)}"
    return ""


def _norm_partition(partition: str) -> str:
    ap = partition.lower()
    return ap or _DEFAULT


@lru_cache(maxsize=4096)
def _service_uri(trust_domain: str, partition: str, namespace: str, dc: str, svc: str) -> str:
    # Cached: read once per connection and per request by the integrations.
    return (
        f"spiffe://{trust_domain}{_partition_prefix(partition)}"
        f"/ns/{_seg(namespace or _DEFAULT)}/dc/{_seg(dc)}/svc/{_seg(svc)}"
    )


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    """The identity of a service: ``spiffe://<td>[/ap/<p>]/ns/<ns>/dc/<dc>/svc/<svc>``.

    ``partition`` "" and "default" mean the same thing (no ``/ap/`` segment).
    An empty ``trust_domain`` is allowed for *expected* identities whose trust
    domain is not known yet (see :meth:`matches_expected`).
    """

    trust_domain: str
    namespace: str
    datacenter: str
    service: str
    partition: str = _DEFAULT

    @property
    def uri(self) -> str:
        """The URI SAN string, segments percent-encoded where needed."""
        return _service_uri(
            self.trust_domain, self.partition, self.namespace, self.datacenter, self.service
        )

    def __str__(self) -> str:
        return self.uri

    def matches_expected(self, expected: ServiceIdentity) -> bool:
        """Whether this (presented) identity is acceptable where ``expected`` was meant.

        Follows the Go client's server check: the comparison is case-insensitive and
        the trust-domain host is *tolerated* (the expected one is replaced by the
        presented one), because the certificate chain was already verified against
        the cluster's roots and the trust domain changes when the CA is replaced.
        Service, namespace, partition ("" = "default") and datacenter must match.
        """
        return (
            self.service.casefold() == expected.service.casefold()
            and (self.namespace or _DEFAULT).casefold()
            == (expected.namespace or _DEFAULT).casefold()
            and _norm_partition(self.partition) == _norm_partition(expected.partition)
            and self.datacenter.casefold() == expected.datacenter.casefold()
        )


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """A client agent: ``spiffe://<td>[/ap/<p>]/agent/client/dc/<dc>/id/<node>``."""

    trust_domain: str
    datacenter: str
    node: str
    partition: str = _DEFAULT

    @property
    def uri(self) -> str:
        """The URI SAN string."""
        return (
            f"spiffe://{self.trust_domain}{_partition_prefix(self.partition)}"
            f"/agent/client/dc/{_seg(self.datacenter)}/id/{_seg(self.node)}"
        )

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """A server agent: ``spiffe://<td>/agent/server/dc/<dc>``."""

    trust_domain: str
    datacenter: str

    @property
    def uri(self) -> str:
        """The URI SAN string."""
        return f"spiffe://{self.trust_domain}/agent/server/dc/{_seg(self.datacenter)}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class MeshGatewayIdentity:
    """A mesh gateway: ``spiffe://<td>[/ap/<p>]/gateway/mesh/dc/<dc>``."""

    trust_domain: str
    datacenter: str
    partition: str = _DEFAULT

    @property
    def uri(self) -> str:
        """The URI SAN string."""
        return (
            f"spiffe://{self.trust_domain}{_partition_prefix(self.partition)}"
            f"/gateway/mesh/dc/{_seg(self.datacenter)}"
        )

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class SigningIdentity:
    """The CA itself: ``spiffe://<cluster-id>.consul`` (no path).

    ``domain`` is the part of the host after the first dot; Consul always uses
    ``consul``, but a parsed ID keeps whatever it saw so it formats back the same.
    """

    cluster_id: str
    domain: str = "consul"

    @property
    def trust_domain(self) -> str:
        """``<cluster-id>.<domain>``."""
        return f"{self.cluster_id}.{self.domain}"

    @property
    def uri(self) -> str:
        """The URI SAN string."""
        return f"spiffe://{self.trust_domain}"

    def __str__(self) -> str:
        return self.uri


SpiffeID: TypeAlias = (
    ServiceIdentity | AgentIdentity | ServerIdentity | MeshGatewayIdentity | SigningIdentity
)


def trust_domain_from_cluster_id(cluster_id: str) -> str:
    """Return the trust domain for a cluster ID: ``<cluster-id>.consul``, lower-cased.

    Raises :class:`IdentityError` for an empty ID or one that could not be a URI host.
    """
    if not cluster_id or not re.fullmatch(r"[A-Za-z0-9_-]+", cluster_id):
        raise IdentityError(f"not a valid Consul cluster ID: {cluster_id!r}")
    return f"{cluster_id.lower()}.consul"


def _invalid(uri: str) -> IdentityError:
    return IdentityError(f"SPIFFE ID is not in the expected format: {uri}")


def _decode(segment: str | None, uri: str) -> str:
    if segment is None:
        return _DEFAULT
    if "%" not in segment:
        return segment
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError as exc:
        raise _invalid(uri) from exc


def parse_spiffe_id(uri: str) -> SpiffeID:
    """Parse a Consul SPIFFE ID of any kind.

    Returns a :class:`ServiceIdentity`, :class:`AgentIdentity`, :class:`ServerIdentity`,
    :class:`MeshGatewayIdentity` or :class:`SigningIdentity`. Segments are
    percent-decoded; a missing ``/ap/`` partition means ``"default"``. The host is kept
    as written (compare trust domains case-insensitively).

    Raises :class:`IdentityError` (``SPIFFE ID is not in the expected format: <uri>``)
    for anything else, including a query, fragment, port, userinfo, bad percent-escape
    or a segment that does not decode as UTF-8.
    """
    if not isinstance(uri, str):
        raise IdentityError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
    return _parse_cached(uri)


# Frozen results are safe to share, so a peer URI seen before costs one dict lookup.
@lru_cache(maxsize=4096)
def _parse_cached(uri: str) -> SpiffeID:
    m = _URI_RE.match(uri)
    if m is None:
        raise _invalid(uri)
    host, path = m.group(1), m.group(2) or ""
    if _BAD_RAW_PATH_RE.search(path):
        raise _invalid(uri)

    if (v := _SERVICE_RE.match(path)) is not None:
        return ServiceIdentity(
            trust_domain=host,
            partition=_decode(v.group(1), uri),
            namespace=_decode(v.group(2), uri),
            datacenter=_decode(v.group(3), uri),
            service=_decode(v.group(4), uri),
        )
    if (v := _AGENT_RE.match(path)) is not None:
        return AgentIdentity(
            trust_domain=host,
            partition=_decode(v.group(1), uri),
            datacenter=_decode(v.group(2), uri),
            node=_decode(v.group(3), uri),
        )
    if (v := _SERVER_RE.match(path)) is not None:
        return ServerIdentity(trust_domain=host, datacenter=_decode(v.group(1), uri))
    if (v := _MESH_GATEWAY_RE.match(path)) is not None:
        return MeshGatewayIdentity(
            trust_domain=host,
            partition=_decode(v.group(1), uri),
            datacenter=_decode(v.group(2), uri),
        )
    if path == "":
        # Signing ID: the cluster ID is everything before the first dot (which must
        # not be the first character).
        idx = host.find(".")
        if idx > 0:
            return SigningIdentity(cluster_id=host[:idx], domain=host[idx + 1 :])
    raise _invalid(uri)


def parse_service_identity(uri: str) -> ServiceIdentity:
    """Parse ``uri`` and require it to be a service identity.

    Raises :class:`IdentityError` if it is malformed, or valid but names an agent,
    server, gateway or the CA rather than a service.
    """
    ident = parse_spiffe_id(uri)
    if not isinstance(ident, ServiceIdentity):
        raise IdentityError(f"SPIFFE ID is a {type(ident).__name__}, not a service identity: {uri}")
    return ident
