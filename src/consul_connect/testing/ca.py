"""An in-memory Consul CA for tests: roots, leaves, rotation, and wrong certificates.

``TestCA`` builds certificates the way Consul's built-in CA provider does
(``consul-api.md`` §3.3-3.5), so code tested against it sees what a real agent hands
out, without running one::

    ca = TestCA()
    roots = ca.roots()                 # RootSet, like /v1/agent/connect/ca/roots
    leaf = ca.issue("web")             # Leaf, like /v1/agent/connect/ca/leaf/web
    ca.rotate()                        # new active root, cross-signed by the old one
    stranger = TestCA()                # a different CA: its leaves are untrusted

Every PEM lives in memory; nothing is written to disk.
"""

from __future__ import annotations

import itertools
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..certs import CARoot, Leaf, RootSet, load_certificates
from ..devagent.ca import build_leaf_certificate, cross_sign, make_root_certificate
from ..identity import (
    AgentIdentity,
    ServiceIdentity,
    SigningIdentity,
    trust_domain_from_cluster_id,
)

__all__ = ["BadCert", "TestCA"]

_ROOT_TTL = timedelta(hours=87600)
_BACKDATE = timedelta(minutes=1)
_DEFAULT_LEAF_TTL = timedelta(hours=72)
_BASE36 = string.digits + string.ascii_lowercase

_CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True, repr=False)
class BadCert:
    """Certificate material that is deliberately wrong in one way.

    Shaped like a :class:`~consul_connect.certs.Leaf` (PEM strings) so it can be fed to
    a TLS context or an agent double even though it is not a valid service leaf.
    ``repr()`` omits the key.
    """

    cert_pem: str
    chain_pems: tuple[str, ...]
    private_key_pem: str
    reason: str = ""

    def __repr__(self) -> str:
        return f"BadCert(reason={self.reason!r}, chain={len(self.chain_pems)})"

    @property
    def full_chain_pem(self) -> str:
        """The certificate followed by its chain."""
        return self.cert_pem + "".join(self.chain_pems)

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate."""
        return load_certificates(self.cert_pem)[0]


@dataclass(slots=True)
class _Root:
    key: _CAPrivateKey
    cert: x509.Certificate
    intermediates: list[x509.Certificate] = field(default_factory=list)
    active: bool = True
    create_index: int = 0
    modify_index: int = 0


def _now(now: datetime | None) -> datetime:
    dt = datetime.now(UTC) if now is None else now
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # X.509 times have whole seconds; truncating here keeps ValidBefore-ValidAfter == TTL.
    return dt.astimezone(UTC).replace(microsecond=0)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _leaf_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    # Consul hands out "EC PRIVATE KEY" (SEC 1) PEM.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")


class TestCA:
    """A Consul built-in-provider look-alike CA, entirely in memory.

    ``cluster_id`` defaults to a random UUID; the trust domain is
    ``<cluster-id>.consul``. ``key_type``/``key_bits`` choose the root key (default EC
    P-256, like Consul); leaf keys are always EC P-256. ``now`` pins the root's
    NotBefore (default: the current time). A second ``TestCA`` is a CA nobody
    trusts; :meth:`untrusted` makes one with the same trust domain (an impostor).

    Not thread-safe for :meth:`rotate`; issuing is safe to call from several threads.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        cluster_id: str | None = None,
        datacenter: str = "dc1",
        *,
        key_type: Literal["ec", "rsa"] = "ec",
        key_bits: int | None = None,
        now: datetime | None = None,
    ) -> None:
        self.cluster_id = cluster_id if cluster_id is not None else str(uuid.uuid4())
        self.trust_domain = trust_domain_from_cluster_id(self.cluster_id)
        self.datacenter = datacenter
        self.key_type: Literal["ec", "rsa"] = key_type
        self.key_bits = key_bits
        self._serials = itertools.count(1)
        self._raft_index = itertools.count(1)
        self._roots: list[_Root] = [self._new_root(_now(now))]

    # ------------------------------------------------------------------ roots

    @property
    def signing_identity(self) -> SigningIdentity:
        """The CA's own SPIFFE ID (``spiffe://<cluster-id>.consul``)."""
        return SigningIdentity(self.cluster_id.lower())

    @property
    def root_cert_pem(self) -> str:
        """PEM of the active root."""
        return _pem(self._active.cert)

    @property
    def cadata(self) -> str:
        """PEM of every root (active and rotated-out), for ``cadata=``."""
        return "".join(_pem(r.cert) for r in self._roots)

    def roots(self, index: int = 1) -> RootSet:
        """The root set as ``/v1/agent/connect/ca/roots`` would return it at ``index``."""
        records = tuple(
            CARoot.from_certificate(
                r.cert,
                intermediate_cert_pems=[_pem(c) for c in r.intermediates],
                external_trust_domain=self.cluster_id,
                active=r.active,
                create_index=r.create_index,
                modify_index=r.modify_index,
            )
            for r in self._roots
        )
        active = next(r for r in records if r.active)
        return RootSet(
            trust_domain=self.trust_domain,
            active_root_id=active.id,
            roots=records,
            index=index,
        )

    def rotate(self, *, now: datetime | None = None) -> None:
        """Replace the active root, as a CA-config change does (§3.5).

        The new root becomes active with a cross-signed copy of itself (same subject,
        key and SKI; issued by the old root, valid 7 days) as its only intermediate;
        the old root stays in the set, inactive. Leaves issued afterwards carry the
        cross-signed certificate in their chain.
        """
        at = _now(now)
        old = self._active
        new = self._new_root(at)
        cross = cross_sign(new.cert, old.cert, old.key, next(self._serials), at)
        new.intermediates.append(cross)
        old.active = False
        old.modify_index = new.create_index
        self._roots.append(new)

    def untrusted(self) -> TestCA:
        """A different CA with the same cluster ID and datacenter: same-looking URIs,
        different keys, so its leaves must be rejected by anyone trusting this one."""
        return TestCA(
            self.cluster_id, self.datacenter, key_type=self.key_type, key_bits=self.key_bits
        )

    # ----------------------------------------------------------------- leaves

    def issue(
        self,
        service: str,
        *,
        namespace: str = "default",
        partition: str = "default",
        datacenter: str | None = None,
        ttl: timedelta = _DEFAULT_LEAF_TTL,
        now: datetime | None = None,
    ) -> Leaf:
        """Issue a valid service leaf like ``/v1/agent/connect/ca/leaf/<service>`` does.

        Empty subject, one critical URI SAN, CA=false, Consul's key usages, EKU
        client+server auth, next serial, NotBefore = now - 1 min, NotAfter =
        NotBefore + ``ttl``; the chain is the active root's intermediates.
        """
        identity = ServiceIdentity(
            trust_domain=self.trust_domain,
            namespace=namespace,
            datacenter=datacenter if datacenter is not None else self.datacenter,
            service=service,
            partition=partition,
        )
        nb = _now(now) - _BACKDATE
        cert, key = self._leaf([x509.UniformResourceIdentifier(identity.uri)], nb, nb + ttl)
        index = next(self._raft_index)
        return Leaf.from_pem(
            _pem(cert) + "".join(_pem(c) for c in self._active.intermediates),
            _leaf_key_pem(key),
            service=service,
            service_uri=identity.uri,
            create_index=index,
            modify_index=index,
        )

    def issue_for_uri(
        self,
        uris: Sequence[str],
        *,
        ttl: timedelta = _DEFAULT_LEAF_TTL,
        now: datetime | None = None,
        reason: str = "custom URI SANs",
    ) -> BadCert:
        """A leaf signed by the active root carrying exactly the given URI SANs."""
        nb = _now(now) - _BACKDATE
        return self._bad([x509.UniformResourceIdentifier(u) for u in uris], nb, nb + ttl, reason)

    def issue_expired(self, service: str, *, now: datetime | None = None) -> BadCert:
        """A correct leaf for ``service`` whose validity ended an hour before ``now``."""
        at = _now(now)
        return self._bad(
            [self._uri(service)],
            at - _DEFAULT_LEAF_TTL - timedelta(hours=1),
            at - timedelta(hours=1),
            "expired",
        )

    def issue_not_yet_valid(self, service: str, *, now: datetime | None = None) -> BadCert:
        """A correct leaf for ``service`` whose validity starts an hour after ``now``."""
        at = _now(now)
        return self._bad(
            [self._uri(service)],
            at + timedelta(hours=1),
            at + timedelta(hours=1) + _DEFAULT_LEAF_TTL,
            "not yet valid",
        )

    def issue_with_ca_flag(self, service: str, *, now: datetime | None = None) -> BadCert:
        """A leaf for ``service`` whose basicConstraints say CA=true."""
        nb = _now(now) - _BACKDATE
        return self._bad([self._uri(service)], nb, nb + _DEFAULT_LEAF_TTL, "CA flag set", ca=True)

    def issue_without_uri_san(self, service: str, *, now: datetime | None = None) -> BadCert:
        """A leaf with only a DNS SAN (``<service>.service.consul``), no URI SAN."""
        nb = _now(now) - _BACKDATE
        return self._bad(
            [x509.DNSName(f"{service}.service.consul")],
            nb,
            nb + _DEFAULT_LEAF_TTL,
            "no URI SAN",
        )

    def issue_with_two_uri_sans(self, service: str, *, now: datetime | None = None) -> BadCert:
        """A leaf naming ``service`` and ``<service>-other``: two URI SANs."""
        nb = _now(now) - _BACKDATE
        return self._bad(
            [self._uri(service), self._uri(f"{service}-other")],
            nb,
            nb + _DEFAULT_LEAF_TTL,
            "two URI SANs",
        )

    def issue_with_non_spiffe_uri(self, service: str, *, now: datetime | None = None) -> BadCert:
        """A leaf whose single URI SAN has the service path but an ``https`` scheme."""
        nb = _now(now) - _BACKDATE
        uri = self._uri(service).value.replace("spiffe://", "https://", 1)
        return self._bad(
            [x509.UniformResourceIdentifier(uri)],
            nb,
            nb + _DEFAULT_LEAF_TTL,
            "non-SPIFFE URI SAN",
        )

    def issue_agent_cert(self, node: str, *, now: datetime | None = None) -> BadCert:
        """A valid *agent* leaf (``/agent/client/dc/<dc>/id/<node>``): not a service."""
        nb = _now(now) - _BACKDATE
        uri = AgentIdentity(self.trust_domain, self.datacenter, node).uri
        return self._bad(
            [x509.UniformResourceIdentifier(uri)], nb, nb + _DEFAULT_LEAF_TTL, "agent identity"
        )

    # -------------------------------------------------------------- internals

    @property
    def _active(self) -> _Root:
        return next(r for r in self._roots if r.active)

    def _uri(self, service: str) -> x509.UniformResourceIdentifier:
        ident = ServiceIdentity(self.trust_domain, "default", self.datacenter, service)
        return x509.UniformResourceIdentifier(ident.uri)

    def _new_ca_key(self) -> _CAPrivateKey:
        if self.key_type == "rsa":
            return rsa.generate_private_key(public_exponent=65537, key_size=self.key_bits or 2048)
        curve: ec.EllipticCurve = {
            224: ec.SECP224R1(),
            256: ec.SECP256R1(),
            384: ec.SECP384R1(),
            521: ec.SECP521R1(),
        }[self.key_bits or 256]
        return ec.generate_private_key(curve)

    def _new_root(self, at: datetime) -> _Root:
        key = self._new_ca_key()
        cert = make_root_certificate(
            key, self.cluster_id, next(self._serials), _ROOT_TTL.total_seconds(), at
        )
        index = next(self._raft_index)
        return _Root(key=key, cert=cert, create_index=index, modify_index=index)

    def _leaf(
        self,
        sans: Sequence[x509.GeneralName],
        not_before: datetime,
        not_after: datetime,
        *,
        ca: bool = False,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        root = self._active
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_leaf_certificate(
            root.cert,
            root.key,
            key.public_key(),
            sans,
            next(self._serials),
            not_before,
            not_after,
            ca=ca,
        )
        return cert, key

    def _bad(
        self,
        sans: Sequence[x509.GeneralName],
        not_before: datetime,
        not_after: datetime,
        reason: str,
        *,
        ca: bool = False,
    ) -> BadCert:
        cert, key = self._leaf(sans, not_before, not_after, ca=ca)
        return BadCert(
            cert_pem=_pem(cert),
            chain_pems=tuple(_pem(c) for c in self._active.intermediates),
            private_key_pem=_leaf_key_pem(key),
            reason=reason,
        )
