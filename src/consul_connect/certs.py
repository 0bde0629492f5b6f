"""Certificates: PEM handling, Consul's CA roots and leaves, chain checks, renewal times.

The values here mirror Consul's JSON (``consul-api.md`` §2.1, §2.2): :class:`CARoot`
and :class:`RootSet` for ``/v1/agent/connect/ca/roots``, :class:`Leaf` for
``/v1/agent/connect/ca/leaf/<service>``. They are immutable, validated when built,
and never print private keys.

:func:`verify_leaf` answers "does this leaf chain to one of these roots right now",
including the rotation case where the only path to an old root goes through the
cross-signed copy of the new root. Everything is pure: time is an argument.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)

from .errors import CertificateError, IdentityError
from .identity import ServiceIdentity, parse_service_identity

__all__ = [
    "CARoot",
    "Leaf",
    "RootSet",
    "colon_hex",
    "format_rfc3339",
    "key_id",
    "load_certificates",
    "parse_rfc3339",
    "peer_identity_from_der",
    "pick_renewal_time",
    "renewal_window",
    "serial_to_colon_hex",
    "service_identity_of",
    "split_pem",
    "uri_sans",
    "verify_chain",
    "verify_leaf",
]

# Longest chain we will try to build (leaf + intermediates + anchor); Consul chains
# are 2-4 long, this only bounds work on hostile input.
_MAX_CHAIN_DEPTH = 8

_PEM_CERT_RE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)


# --------------------------------------------------------------------------- helpers


def colon_hex(data: bytes) -> str:
    """Lower-case hex pairs joined by ``:`` (``b"\\x0b\\x2c"`` -> ``"0b:2c"``)."""
    return data.hex(":")


def serial_to_colon_hex(n: int) -> str:
    """Consul's serial format: colon-hex of the minimal big-endian bytes.

    ``11`` -> ``"0b"``, ``300`` -> ``"01:2c"``, ``0`` -> ``"00"``. Raises ``ValueError``
    for a negative number.
    """
    if n < 0:
        raise ValueError("serial numbers are non-negative")
    return colon_hex(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))


def key_id(public_key: CertificatePublicKeyTypes) -> bytes:
    """SHA-256 of the key's PKIX DER SubjectPublicKeyInfo: Consul's SKI/AKI (32 bytes)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def split_pem(pem: str) -> list[str]:
    """Return each ``CERTIFICATE`` block of ``pem``, each ending in exactly one newline.

    Text outside the blocks and other PEM types are ignored; an input without any
    certificate block gives ``[]``.
    """
    return [m.group(0).replace("\r\n", "\n") + "\n" for m in _PEM_CERT_RE.finditer(pem)]


def load_certificates(pem: str) -> list[x509.Certificate]:
    """Parse every certificate in ``pem``, in order.

    Raises :class:`CertificateError` if ``pem`` is not a string, holds no certificate,
    or any block fails to parse.
    """
    if not isinstance(pem, str):
        raise CertificateError(f"PEM must be a string, not {type(pem).__name__}")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise CertificateError(f"not a valid PEM certificate: {exc}") from exc
    if not certs:  # pragma: no cover - cryptography raises instead
        raise CertificateError("no certificate found in PEM")
    return certs


def _load_one(pem: str, what: str) -> x509.Certificate:
    certs = load_certificates(pem)
    if len(certs) != 1:
        raise CertificateError(f"{what} must hold exactly one certificate, found {len(certs)}")
    return certs[0]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp as Consul writes it (``Z``, optional nanoseconds).

    Returns an aware UTC datetime (sub-microsecond digits are dropped). Raises
    :class:`CertificateError` for anything else.
    """
    if not isinstance(text, str):
        raise CertificateError(f"timestamp must be a string, not {type(text).__name__}")
    m = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})", text
    )
    if m is None:
        raise CertificateError(f"not an RFC 3339 timestamp: {text!r}")
    base, frac, tz = m.groups()
    frac_part = f".{(frac + '000000')[:6]}" if frac else ""
    tz_part = "+00:00" if tz in ("Z", "z") else tz
    try:
        dt = datetime.fromisoformat(f"{base.replace('t', 'T')}{frac_part}{tz_part}")
    except ValueError as exc:
        raise CertificateError(f"not an RFC 3339 timestamp: {text!r}") from exc
    return dt.astimezone(UTC)


def format_rfc3339(dt: datetime) -> str:
    """Format as Consul does: UTC, ``Z`` suffix, fraction only when non-zero."""
    dt = _aware(dt).astimezone(UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0") + "Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _aware(dt: datetime) -> datetime:
    # Naive datetimes are taken to be UTC rather than local time: certificates are in UTC.
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# ------------------------------------------------------------------ identity of certs


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs in order (``[]`` when it has no SAN extension).

    Raises :class:`CertificateError` if the SAN extension is malformed or duplicated.
    """
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:  # DuplicateExtension and undecodable extensions
        raise CertificateError(f"bad subjectAltName extension: {exc}") from exc
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def service_identity_of(cert: x509.Certificate) -> ServiceIdentity:
    """The service identity named by ``cert``'s single URI SAN.

    Raises :class:`CertificateError` if there is no URI SAN, more than one, or the one
    there is not a Consul service SPIFFE ID (e.g. an agent or CA certificate).
    """
    uris = uri_sans(cert)
    if not uris:
        raise CertificateError("certificate has no URI SAN")
    if len(uris) > 1:
        raise CertificateError(f"certificate has {len(uris)} URI SANs, expected exactly one")
    try:
        return parse_service_identity(uris[0])
    except IdentityError as exc:
        raise CertificateError(f"certificate URI SAN is not a service identity: {exc}") from exc


def peer_identity_from_der(der: bytes) -> ServiceIdentity:
    """The service identity of a DER certificate (as ``SSLObject.getpeercert(True)`` gives).

    Cached by the DER bytes, since a peer reconnects with the same leaf many times.
    Raises :class:`CertificateError` like :func:`service_identity_of`, or when the
    bytes are not a certificate.
    """
    if not isinstance(der, bytes):
        raise CertificateError(f"DER must be bytes, not {type(der).__name__}")
    return _peer_identity_cached(der)


@lru_cache(maxsize=2048)
def _peer_identity_cached(der: bytes) -> ServiceIdentity:
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"not a valid DER certificate: {exc}") from exc
    return service_identity_of(cert)


# ------------------------------------------------------------------- JSON field access


def _field(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...], default: Any) -> Any:
    """obj[key] checked against typ; ``default`` when absent or null (``...`` = required)."""
    value = obj.get(key)
    if value is None:
        if default is ...:
            raise CertificateError(f"missing field {key!r}")
        return default
    # bool is an int in Python; JSON true must not pass for a number.
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise CertificateError(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _mapping(obj: object, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise CertificateError(f"{what} must be a JSON object, not {type(obj).__name__}")
    return obj


def _time_field(obj: Mapping[str, Any], key: str, fallback: datetime) -> datetime:
    value = obj.get(key)
    return fallback if value is None else parse_rfc3339(value)


# ---------------------------------------------------------------------------- CARoot


@dataclass(frozen=True, slots=True)
class CARoot:
    """One trusted CA root, as in Consul's ``IndexedCARoots.Roots`` (§2.1).

    ``root_cert`` and ``intermediate_certs`` are the parsed forms of the PEM fields;
    when built directly from PEM they are parsed here, raising :class:`CertificateError`
    if a PEM field does not hold exactly one certificate.
    """

    id: str
    name: str
    serial_number: int
    signing_key_id: str
    external_trust_domain: str
    not_before: datetime
    not_after: datetime
    root_cert_pem: str
    intermediate_cert_pems: tuple[str, ...] = ()
    active: bool = False
    private_key_type: str = ""
    private_key_bits: int = 0
    create_index: int = 0
    modify_index: int = 0
    root_cert: x509.Certificate = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    intermediate_certs: tuple[x509.Certificate, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.root_cert is None:
            cert = _load_one(self.root_cert_pem, "RootCert")
            object.__setattr__(self, "root_cert", cert)
            object.__setattr__(self, "root_cert_pem", _pem(cert))
        if len(self.intermediate_certs) != len(self.intermediate_cert_pems):
            certs = tuple(
                _load_one(p, "IntermediateCerts entry") for p in self.intermediate_cert_pems
            )
            object.__setattr__(self, "intermediate_certs", certs)
            object.__setattr__(self, "intermediate_cert_pems", tuple(_pem(c) for c in certs))

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CARoot:
        """Build from one entry of Consul's ``Roots`` array.

        ``ID`` and ``RootCert`` are required; absent/null optional fields take neutral
        defaults (``NotBefore``/``NotAfter`` default to the certificate's). Raises
        :class:`CertificateError` for a wrong shape or an unparsable certificate.
        """
        obj = _mapping(obj, "CA root")
        cert = _load_one(_field(obj, "RootCert", str, ...), "RootCert")
        inters_raw = _field(obj, "IntermediateCerts", list, [])
        for p in inters_raw:
            if not isinstance(p, str):
                raise CertificateError("field 'IntermediateCerts' must hold PEM strings")
        inters = tuple(_load_one(p, "IntermediateCerts entry") for p in inters_raw)
        return cls(
            id=_field(obj, "ID", str, ...),
            name=_field(obj, "Name", str, ""),
            serial_number=_field(obj, "SerialNumber", int, cert.serial_number),
            signing_key_id=_field(obj, "SigningKeyID", str, ""),
            external_trust_domain=_field(obj, "ExternalTrustDomain", str, ""),
            not_before=_time_field(obj, "NotBefore", cert.not_valid_before_utc),
            not_after=_time_field(obj, "NotAfter", cert.not_valid_after_utc),
            root_cert_pem=_pem(cert),
            intermediate_cert_pems=tuple(_pem(c) for c in inters),
            active=_field(obj, "Active", bool, False),
            private_key_type=_field(obj, "PrivateKeyType", str, ""),
            private_key_bits=_field(obj, "PrivateKeyBits", int, 0),
            create_index=_field(obj, "CreateIndex", int, 0),
            modify_index=_field(obj, "ModifyIndex", int, 0),
            root_cert=cert,
            intermediate_certs=inters,
        )

    @classmethod
    def from_certificate(
        cls,
        cert: x509.Certificate,
        *,
        name: str = "Consul CA Primary Cert",
        intermediate_cert_pems: Sequence[str] = (),
        signing_key_id: bytes | None = None,
        external_trust_domain: str = "",
        active: bool = True,
        create_index: int = 0,
        modify_index: int = 0,
    ) -> CARoot:
        """Build the record Consul would store for ``cert``.

        ``ID`` is the SHA-1 fingerprint, ``SigningKeyID`` the colon-hex of
        ``signing_key_id`` (default: the root's own key id, as in a primary DC), key
        type/bits come from the public key. Raises :class:`CertificateError` for an
        intermediate PEM that does not parse.
        """
        pub = cert.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            ktype, kbits = "ec", pub.curve.key_size
        elif isinstance(pub, rsa.RSAPublicKey):
            ktype, kbits = "rsa", pub.key_size
        else:
            ktype, kbits = "", 0
        inters = tuple(_load_one(p, "intermediate") for p in intermediate_cert_pems)
        return cls(
            id=colon_hex(cert.fingerprint(hashes.SHA1())),  # Consul's root ID format
            name=name,
            serial_number=cert.serial_number,
            signing_key_id=colon_hex(signing_key_id if signing_key_id is not None else key_id(pub)),
            external_trust_domain=external_trust_domain,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            root_cert_pem=_pem(cert),
            intermediate_cert_pems=tuple(_pem(c) for c in inters),
            active=active,
            private_key_type=ktype,
            private_key_bits=kbits,
            create_index=create_index,
            modify_index=modify_index,
            root_cert=cert,
            intermediate_certs=inters,
        )

    def to_json(self) -> dict[str, Any]:
        """The Consul JSON for this root (``IntermediateCerts`` is null when empty)."""
        return {
            "ID": self.id,
            "Name": self.name,
            "SerialNumber": self.serial_number,
            "SigningKeyID": self.signing_key_id,
            "ExternalTrustDomain": self.external_trust_domain,
            "NotBefore": format_rfc3339(self.not_before),
            "NotAfter": format_rfc3339(self.not_after),
            "RootCert": self.root_cert_pem,
            "IntermediateCerts": list(self.intermediate_cert_pems) or None,
            "Active": self.active,
            "PrivateKeyType": self.private_key_type,
            "PrivateKeyBits": self.private_key_bits,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


# --------------------------------------------------------------------------- RootSet


@dataclass(frozen=True, slots=True)
class RootSet:
    """All roots a Connect participant must trust (Consul's ``IndexedCARoots``).

    ``index`` is the blocking-query index the set was read at (``X-Consul-Index``).
    """

    trust_domain: str
    active_root_id: str
    roots: tuple[CARoot, ...]
    index: int = 0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], index: int = 0) -> RootSet:
        """Build from the JSON of ``/v1/agent/connect/ca/roots``.

        Raises :class:`CertificateError` for a wrong shape or any bad root.
        """
        obj = _mapping(obj, "CA roots")
        roots_raw = _field(obj, "Roots", list, [])
        return cls(
            trust_domain=_field(obj, "TrustDomain", str, ""),
            active_root_id=_field(obj, "ActiveRootID", str, ""),
            roots=tuple(CARoot.from_json(_mapping(r, "CA root")) for r in roots_raw),
            index=index,
        )

    def to_json(self) -> dict[str, Any]:
        """The Consul JSON for this set."""
        return {
            "ActiveRootID": self.active_root_id,
            "TrustDomain": self.trust_domain,
            "Roots": [r.to_json() for r in self.roots],
        }

    @property
    def active(self) -> CARoot | None:
        """The active root (``Active`` true, else the one named by ``ActiveRootID``)."""
        for r in self.roots:
            if r.active:
                return r
        for r in self.roots:
            if r.id == self.active_root_id:
                return r
        return None

    @property
    def cadata(self) -> str:
        """Every root's PEM concatenated, for ``SSLContext.load_verify_locations(cadata=)``."""
        return "".join(r.root_cert_pem for r in self.roots)

    @property
    def intermediates_pem(self) -> str:
        """Every root's ``IntermediateCerts`` concatenated (possible chain links)."""
        return "".join(p for r in self.roots for p in r.intermediate_cert_pems)

    @property
    def root_certificates(self) -> tuple[x509.Certificate, ...]:
        """The parsed root certificates, in ``roots`` order."""
        return tuple(r.root_cert for r in self.roots)

    @property
    def intermediate_certificates(self) -> tuple[x509.Certificate, ...]:
        """The parsed ``IntermediateCerts`` of every root."""
        return tuple(c for r in self.roots for c in r.intermediate_certs)


# ------------------------------------------------------------------------------ Leaf


@dataclass(frozen=True, slots=True, repr=False)
class Leaf:
    """A service leaf certificate with its key, as Consul's ``IssuedCert`` (§2.2).

    ``cert_pem`` is the leaf alone; ``chain_pems`` the certificates Consul appended
    after it (the active root's ``IntermediateCerts``). Build with :meth:`from_json`
    or :meth:`from_pem`, which validate the material; ``repr()`` never shows the key.
    """

    service: str
    service_uri: str
    identity: ServiceIdentity
    serial_number: str
    cert_pem: str
    chain_pems: tuple[str, ...]
    private_key_pem: str
    valid_after: datetime
    valid_before: datetime
    create_index: int = 0
    modify_index: int = 0
    certificate: x509.Certificate = field(default=None, compare=False)  # type: ignore[assignment]
    chain: tuple[x509.Certificate, ...] = field(default=(), compare=False)

    def __repr__(self) -> str:
        return (
            f"Leaf(service={self.service!r}, service_uri={self.service_uri!r}, "
            f"serial_number={self.serial_number!r}, valid_after={self.valid_after.isoformat()}, "
            f"valid_before={self.valid_before.isoformat()}, chain={len(self.chain_pems)}, "
            f"modify_index={self.modify_index})"
        )

    @property
    def full_chain_pem(self) -> str:
        """Leaf followed by its chain: what to present in a TLS handshake."""
        return self.cert_pem + "".join(self.chain_pems)

    @classmethod
    def from_pem(
        cls,
        cert_pem: str,
        private_key_pem: str,
        *,
        service: str | None = None,
        service_uri: str | None = None,
        create_index: int = 0,
        modify_index: int = 0,
    ) -> Leaf:
        """Build and validate a leaf from PEM text.

        ``cert_pem`` holds the leaf first, then any chain certificates. The leaf must
        carry exactly one URI SAN that is a service identity (equal to ``service_uri``
        and naming ``service`` when those are given), and the key must match the
        leaf's public key. Validity dates come from the certificate.
        Raises :class:`CertificateError` otherwise.
        """
        if not isinstance(private_key_pem, str):
            raise CertificateError("private key PEM must be a string")
        certs = load_certificates(cert_pem)
        leaf_cert, chain = certs[0], tuple(certs[1:])
        identity = service_identity_of(leaf_cert)
        uri = uri_sans(leaf_cert)[0]
        if service_uri is not None and service_uri != uri:
            raise CertificateError(
                f"ServiceURI {service_uri!r} does not match the certificate's URI SAN {uri!r}"
            )
        if service is not None and service.casefold() != identity.service.casefold():
            raise CertificateError(
                f"Service {service!r} does not match the certificate's service {identity.service!r}"
            )
        try:
            key: PrivateKeyTypes = serialization.load_pem_private_key(
                private_key_pem.encode("ascii"), password=None
            )
        except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
            # The exception text never contains key material.
            raise CertificateError(f"private key does not parse: {exc}") from exc
        if _spki(key.public_key()) != _spki(leaf_cert.public_key()):  # type: ignore[arg-type]
            raise CertificateError("private key does not match the leaf certificate")
        return cls(
            service=service if service is not None else identity.service,
            service_uri=uri,
            identity=identity,
            serial_number=serial_to_colon_hex(leaf_cert.serial_number),
            cert_pem=_pem(leaf_cert),
            chain_pems=tuple(_pem(c) for c in chain),
            private_key_pem=private_key_pem,
            valid_after=leaf_cert.not_valid_before_utc,
            valid_before=leaf_cert.not_valid_after_utc,
            create_index=create_index,
            modify_index=modify_index,
            certificate=leaf_cert,
            chain=chain,
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Leaf:
        """Build and validate a leaf from Consul's ``IssuedCert`` JSON.

        Requires ``CertPEM``, ``PrivateKeyPEM``, ``Service`` and ``ServiceURI``; checks
        everything :meth:`from_pem` checks, and that ``SerialNumber`` (if present)
        names the certificate's serial. Raises :class:`CertificateError` for any
        wrong shape, type or mismatch (never ``KeyError``/``TypeError``).
        """
        obj = _mapping(obj, "leaf certificate")
        leaf = cls.from_pem(
            _field(obj, "CertPEM", str, ...),
            _field(obj, "PrivateKeyPEM", str, ...),
            service=_field(obj, "Service", str, ...),
            service_uri=_field(obj, "ServiceURI", str, ...),
            create_index=_field(obj, "CreateIndex", int, 0),
            modify_index=_field(obj, "ModifyIndex", int, 0),
        )
        serial = _field(obj, "SerialNumber", str, None)
        if serial is not None and serial.lower() != leaf.serial_number:
            raise CertificateError(
                f"SerialNumber {serial!r} does not match the certificate ({leaf.serial_number})"
            )
        # ValidAfter/ValidBefore must be well-formed, but the certificate is authoritative.
        _time_field(obj, "ValidAfter", leaf.valid_after)
        _time_field(obj, "ValidBefore", leaf.valid_before)
        return leaf

    def to_json(self) -> dict[str, Any]:
        """The ``IssuedCert`` JSON Consul would return for this leaf (includes the key)."""
        return {
            "SerialNumber": self.serial_number,
            "CertPEM": self.full_chain_pem,
            "PrivateKeyPEM": self.private_key_pem,
            "Service": self.service,
            "ServiceURI": self.service_uri,
            "ValidAfter": format_rfc3339(self.valid_after),
            "ValidBefore": format_rfc3339(self.valid_before),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


# ---------------------------------------------------------------------- verification


def _verify_signature(cert: x509.Certificate, issuer_key: CertificatePublicKeyTypes) -> bool:
    """Whether ``issuer_key`` made ``cert``'s signature."""
    sig, tbs = cert.signature, cert.tbs_certificate_bytes
    try:
        if isinstance(issuer_key, ec.EllipticCurvePublicKey):
            algo = cert.signature_hash_algorithm
            if algo is None:
                return False
            issuer_key.verify(sig, tbs, ec.ECDSA(algo))
        elif isinstance(issuer_key, rsa.RSAPublicKey):
            algo = cert.signature_hash_algorithm
            pad = cert.signature_algorithm_parameters
            if algo is None or not isinstance(pad, padding.PSS | padding.PKCS1v15):
                return False
            issuer_key.verify(sig, tbs, pad, algo)
        elif isinstance(issuer_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            issuer_key.verify(sig, tbs)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = _ext(cert, x509.BasicConstraints)
        ku = _ext(cert, x509.KeyUsage)
    except ValueError:
        return False
    if bc is None or not bc.ca:
        return False
    return ku is None or bool(ku.key_cert_sign)


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _key_ids_compatible(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """AKI of child vs SKI of issuer, when both are present (a fast pre-filter)."""
    try:
        aki = _ext(child, x509.AuthorityKeyIdentifier)
        ski = _ext(issuer, x509.SubjectKeyIdentifier)
    except ValueError:
        return False
    if aki is None or ski is None or aki.key_identifier is None:
        return True
    return bool(aki.key_identifier == ski.digest)


def _same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    return _der(a) == _der(b)


def verify_chain(
    cert: x509.Certificate,
    intermediates: Iterable[x509.Certificate],
    trust_anchors: Iterable[x509.Certificate],
    now: datetime,
) -> list[x509.Certificate]:
    """Find a path from ``cert`` to one of ``trust_anchors`` and return it.

    The path is ``[cert, intermediate..., anchor]``. Each link needs: issuer name ==
    subject name, compatible AKI/SKI, a signature that verifies under the issuer's
    key, an issuer that is a CA (basicConstraints CA, keyCertSign if key usage is
    present), and every certificate valid at ``now`` (naive = UTC). All candidate
    paths are tried, so an expired or unrelated intermediate does not hide a good one.
    ``cert`` itself may be an anchor. Raises :class:`CertificateError` when no path
    exists, with the reason found for the first candidate.
    """
    now = _aware(now)
    anchors = list(trust_anchors)
    inters = list(intermediates)
    if not anchors:
        raise CertificateError("no trust anchors to verify against")
    if not _valid_at(cert, now):
        if now < cert.not_valid_before_utc:
            raise CertificateError(
                f"certificate is not yet valid (NotBefore {cert.not_valid_before_utc.isoformat()})"
            )
        raise CertificateError(
            f"certificate has expired (NotAfter {cert.not_valid_after_utc.isoformat()})"
        )
    reasons: list[str] = []

    def extend(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        current = path[-1]
        if any(_same_cert(current, a) for a in anchors):
            return path
        if len(path) >= _MAX_CHAIN_DEPTH:
            reasons.append("chain too long")
            return None
        issuer_name = current.issuer
        for is_anchor, candidate in [(True, a) for a in anchors] + [(False, i) for i in inters]:
            if candidate.subject != issuer_name or not _key_ids_compatible(current, candidate):
                continue
            if any(_same_cert(candidate, p) for p in path):
                continue  # a loop, e.g. a self-signed intermediate
            who = candidate.subject.rfc4514_string()
            if not _verify_signature(current, candidate.public_key()):
                reasons.append(f"signature does not verify under {who!r}")
                continue
            if not _is_ca(candidate):
                reasons.append(f"issuer {who!r} is not a CA")
                continue
            if not _valid_at(candidate, now):
                reasons.append(f"issuer {who!r} is not valid at {now.isoformat()}")
                continue
            if is_anchor:
                return [*path, candidate]
            found = extend([*path, candidate])
            if found is not None:
                return found
        return None

    found = extend([cert])
    if found is None:
        detail = reasons[0] if reasons else "no issuer among the trusted roots and intermediates"
        raise CertificateError(f"certificate does not chain to a trusted root: {detail}")
    return found


def verify_leaf(leaf: Leaf, roots: RootSet, now: datetime) -> list[x509.Certificate]:
    """Check that ``leaf`` is usable with ``roots`` at ``now``; return the path found.

    The leaf must not be a CA, and must chain to ANY root of the set, using the leaf's
    own chain and every root's ``IntermediateCerts`` as candidate intermediates (so a
    leaf of a freshly rotated-in root verifies against a peer's old root through the
    cross-signed certificate). The path is ``[leaf, intermediate..., root]``, a root
    of the set preferred over a longer path. Raises :class:`CertificateError` if there
    is none.
    """
    cert = leaf.certificate
    try:
        bc = _ext(cert, x509.BasicConstraints)
    except ValueError as exc:
        raise CertificateError(f"bad basicConstraints: {exc}") from exc
    if bc is not None and bc.ca:
        raise CertificateError("leaf certificate is a CA certificate")
    if not roots.roots:
        raise CertificateError("the root set is empty")
    return verify_chain(
        cert,
        [*leaf.chain, *roots.intermediate_certificates],
        roots.root_certificates,
        now,
    )


# --------------------------------------------------------------------------- renewal


def renewal_window(valid_after: datetime, valid_before: datetime) -> tuple[datetime, datetime]:
    """The soft (60 % of lifetime) and hard (90 %) renewal instants of a leaf."""
    lifetime = valid_before - valid_after
    return valid_after + lifetime * 0.6, valid_after + lifetime * 0.9


def pick_renewal_time(
    valid_after: datetime, valid_before: datetime, now: datetime, rand: float
) -> datetime:
    """When to renew a leaf, as Consul's agent chooses (§3.6).

    Uniform in ``[soft, hard]`` (``rand`` in [0, 1] picks the point), or in
    ``[now, hard]`` if ``now`` is already past ``soft``; ``now`` itself when past
    ``hard`` or when the lifetime is under 10 minutes. Raises ``ValueError`` if
    ``rand`` is outside [0, 1].
    """
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1], got {rand}")
    if valid_before - valid_after < timedelta(minutes=10):
        return now
    soft, hard = renewal_window(valid_after, valid_before)
    if now >= hard:
        return now
    start = max(soft, now)
    return start + (hard - start) * rand
