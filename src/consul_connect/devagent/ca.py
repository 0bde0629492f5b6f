"""The dev agent's built-in Connect CA: roots, leaves, cross-signing, rotation, pruning.

This mirrors Consul's ``consul`` CA provider in the primary datacenter
(``consul-api.md`` §3.3-3.5): one self-signed root signs every leaf directly, a
configuration change that alters the key (type, size, or a supplied key/cert)
rotates to a new root cross-signed by the old one, and rotated-out roots are
pruned once they are older than twice the leaf TTL.

Everything durable (the CA configuration, the roots, the active private key and
the serial counter) lives in store tables as JSON-able records, so a dev agent
with a data directory restarts with the same trust domain and roots. The store
is the dev agent's raft log stand-in; no key is written anywhere else.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import secrets
import string
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consul_connect._goduration import format_duration, parse_duration
from consul_connect.certs import colon_hex, format_rfc3339, key_id, serial_to_colon_hex
from consul_connect.devagent.http import mapstructure_kind
from consul_connect.devagent.state import Store
from consul_connect.errors import ConfigError
from consul_connect.identity import ServiceIdentity

__all__ = [
    "CONFIG_TABLE",
    "LEAF_TABLE",
    "PROVIDER_TABLE",
    "ROOTS_TABLE",
    "CAStateReadOnlyError",
    "ConnectCA",
    "IssuedLeaf",
    "ProviderConfig",
    "cross_sign",
    "generate_ca_key",
    "make_root_certificate",
    "parse_provider_config",
    "sign_leaf_certificate",
]

ROOTS_TABLE = "connect-ca-roots"
CONFIG_TABLE = "connect-ca-config"
PROVIDER_TABLE = "connect-ca-provider"
LEAF_TABLE = "leaf"

HOUR = 3600.0
DEFAULT_LEAF_CERT_TTL = 72 * HOUR
DEFAULT_INTERMEDIATE_CERT_TTL = 8760 * HOUR
DEFAULT_ROOT_CERT_TTL = 87600 * HOUR
MIN_LEAF_CERT_TTL = HOUR
MAX_LEAF_CERT_TTL = 8760 * HOUR
INTERMEDIATE_RENEW_INTERVAL = HOUR
CROSS_SIGN_TTL = timedelta(days=7)
BACKDATE = timedelta(minutes=1)
PRUNE_INTERVAL = HOUR

ROOT_NAME = "Consul CA Primary Cert"
PROVIDER = "consul"

CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CURVES: dict[int, type[ec.EllipticCurve]] = {
    224: ec.SECP224R1,
    256: ec.SECP256R1,
    384: ec.SECP384R1,
    521: ec.SECP521R1,
}
_BASE36 = string.digits + string.ascii_lowercase


class CAStateReadOnlyError(Exception):
    """A CA configuration write tried to change the provider ``State``."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ProviderConfig:
    """The built-in provider's settings, decoded from a CA configuration's ``Config``."""

    leaf_cert_ttl: float = DEFAULT_LEAF_CERT_TTL
    intermediate_cert_ttl: float = DEFAULT_INTERMEDIATE_CERT_TTL
    root_cert_ttl: float = DEFAULT_ROOT_CERT_TTL
    private_key_type: str = "ec"
    private_key_bits: int = 256
    private_key: str = ""
    root_cert: str = ""
    csr_max_per_second: float = 50.0
    csr_max_concurrent: int = 0
    disable_cross_signing: bool = False

    @property
    def provider_id(self) -> str:
        """What the provider keys its root on: a change here means a new root."""
        raw = (
            f"{self.private_key},{self.root_cert},{self.private_key_type},"
            f"{self.private_key_bits},true"
        )
        return colon_hex(hashlib.sha256(raw.encode()).digest())


def _go_duration_error(text: str) -> str:
    # Go's time.ParseDuration wording; Go quotes with double quotes.
    if re.fullmatch(r"[+-]?[0-9.]+", text) and text.strip("+-") not in ("0", ""):
        return f'time: missing unit in duration "{text}"'
    return f'time: invalid duration "{text}"'


def _decode_duration(name: str, value: Any) -> float:
    # mapstructure with WeaklyTypedInput and Consul's duration hook: strings are Go
    # durations, numbers are nanoseconds, booleans are 1 or 0 nanoseconds.
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            raise ValueError(f"error decoding '{name}': {_go_duration_error(value)}") from None
    if isinstance(value, bool):
        return 1e-9 if value else 0.0
    if isinstance(value, int | float):
        return float(int(value)) / 1e9
    raise ValueError(
        f"'{name}' expected type 'time.Duration', got unconvertible type "
        f"'{mapstructure_kind(value)}', value: '{value}'"
    )


def _decode_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        text = value or "0"
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError(
                f"cannot parse '{name}' as int: strconv.ParseInt: parsing "
                f'"{value}": invalid syntax'
            )
        return int(text)
    raise ValueError(
        f"'{name}' expected type 'int', got unconvertible type '{mapstructure_kind(value)}', "
        f"value: '{value}'"
    )


def _decode_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value or "0")
        except ValueError:
            raise ValueError(
                f"cannot parse '{name}' as float: strconv.ParseFloat: parsing "
                f'"{value}": invalid syntax'
            ) from None
    raise ValueError(
        f"'{name}' expected type 'float32', got unconvertible type '{mapstructure_kind(value)}', "
        f"value: '{value}'"
    )


def _decode_string(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value))
    raise ValueError(
        f"'{name}' expected type 'string', got unconvertible type '{mapstructure_kind(value)}', "
        f"value: '{value}'"
    )


def _decode_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        low = value.lower()
        if low in ("1", "t", "true"):
            return True
        if low in ("", "0", "f", "false"):
            return False
        raise ValueError(
            f"cannot parse '{name}' as bool: strconv.ParseBool: parsing \"{value}\": invalid syntax"
        )
    raise ValueError(
        f"'{name}' expected type 'bool', got unconvertible type '{mapstructure_kind(value)}', "
        f"value: '{value}'"
    )


_FIELDS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "leafcertttl": ("LeafCertTTL", _decode_duration),
    "intermediatecertttl": ("IntermediateCertTTL", _decode_duration),
    "rootcertttl": ("RootCertTTL", _decode_duration),
    "privatekeytype": ("PrivateKeyType", _decode_string),
    "privatekeybits": ("PrivateKeyBits", _decode_int),
    "privatekey": ("PrivateKey", _decode_string),
    "rootcert": ("RootCert", _decode_string),
    "csrmaxpersecond": ("CSRMaxPerSecond", _decode_float),
    "csrmaxconcurrent": ("CSRMaxConcurrent", _decode_int),
    "disablecrosssigning": ("DisableCrossSigning", _decode_bool),
    "skipvalidate": ("SkipValidate", _decode_bool),
}
_ATTRS = {
    "LeafCertTTL": "leaf_cert_ttl",
    "IntermediateCertTTL": "intermediate_cert_ttl",
    "RootCertTTL": "root_cert_ttl",
    "PrivateKeyType": "private_key_type",
    "PrivateKeyBits": "private_key_bits",
    "PrivateKey": "private_key",
    "RootCert": "root_cert",
    "CSRMaxPerSecond": "csr_max_per_second",
    "CSRMaxConcurrent": "csr_max_concurrent",
    "DisableCrossSigning": "disable_cross_signing",
}


def parse_provider_config(
    raw: Mapping[str, Any] | None, *, validate: bool = True
) -> ProviderConfig:
    """Decode and validate a built-in provider ``Config`` map as Consul does.

    Keys match case-insensitively, unknown keys are ignored, values are weakly
    typed (durations as Go strings or nanoseconds). Returns the settings with
    Consul's defaults filled in. Raises :class:`ConfigError` whose text is
    Consul's (``error decoding config: ...``, ``leaf cert TTL must be greater or
    equal than 1h0m0s``, ...); ``validate=False`` skips the limit checks (the dev
    agent's own bootstrap configuration may use a short leaf TTL).
    """
    values: dict[str, Any] = {}
    skip_validate = False
    errors: list[str] = []
    for key, value in (raw or {}).items():
        spec = _FIELDS.get(str(key).lower())
        if spec is None or value is None:
            continue
        name, decode = spec
        try:
            decoded = decode(name, value)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if name == "SkipValidate":
            skip_validate = bool(decoded)
        else:
            values[_ATTRS[name]] = decoded
    if errors:
        points = "\n".join(f"* {e}" for e in errors)
        raise ConfigError(f"error decoding config: {len(errors)} error(s) decoding:\n\n{points}")
    cfg = ProviderConfig(**values)
    if cfg.private_key == "" and cfg.root_cert != "":
        raise ConfigError("must provide a private key when providing a root cert")
    if validate and not skip_validate:
        _validate(cfg)
    return cfg


def _validate(c: ProviderConfig) -> None:
    if c.root_cert_ttl < c.intermediate_cert_ttl:
        raise ConfigError(
            "root cert TTL is set and is not greater than intermediate cert ttl. "
            f"root cert ttl: {format_duration(c.root_cert_ttl)}, "
            f"intermediate cert ttl: {format_duration(c.intermediate_cert_ttl)}"
        )
    if c.leaf_cert_ttl < MIN_LEAF_CERT_TTL:
        raise ConfigError(
            f"leaf cert TTL must be greater or equal than {format_duration(MIN_LEAF_CERT_TTL)}"
        )
    if c.leaf_cert_ttl > MAX_LEAF_CERT_TTL:
        raise ConfigError(f"leaf cert TTL must be less than {format_duration(MAX_LEAF_CERT_TTL)}")
    if c.intermediate_cert_ttl < 3 * INTERMEDIATE_RENEW_INTERVAL:
        raise ConfigError(
            "Intermediate Cert TTL must be greater or equal than "
            f"{int(3 * INTERMEDIATE_RENEW_INTERVAL // HOUR)}h"
        )
    if c.intermediate_cert_ttl < 3 * c.leaf_cert_ttl:
        raise ConfigError(
            "Intermediate Cert TTL must be greater or equal than 3 * LeafCertTTL "
            f"(>={format_duration(3 * c.leaf_cert_ttl)})."
        )
    if c.private_key_type == "ec":
        if c.private_key_bits not in _CURVES:
            raise ConfigError("EC key length must be one of (224, 256, 384, 521) bits")
    elif c.private_key_type == "rsa":
        if c.private_key_bits not in (2048, 4096):
            raise ConfigError("RSA key length must be 2048 or 4096 bits")
    else:
        raise ConfigError("private key type must be either 'ec' or 'rsa'")


# ---------------------------------------------------------------------- certificates


def generate_ca_key(key_type: str = "ec", bits: int = 256) -> CAPrivateKey:
    """A new CA private key: EC on the NIST curve of ``bits`` bits, or RSA of ``bits``.

    Raises :class:`ConfigError` for an unsupported type or size.
    """
    if key_type == "ec" and bits in _CURVES:
        return ec.generate_private_key(_CURVES[bits]())
    if key_type == "rsa" and bits in (2048, 4096):
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise ConfigError(f"unsupported key type/size {key_type}/{bits}")


def key_to_pem(key: CAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    """PEM as Consul writes keys: ``EC PRIVATE KEY`` (SEC 1) or ``RSA PRIVATE KEY`` (PKCS#1)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")


def load_ca_key(pem: str) -> CAPrivateKey:
    """Parse a PEM CA key (SEC 1, PKCS#1 or PKCS#8; EC or RSA).

    Raises :class:`ConfigError` (without key material in the text) otherwise.
    """
    if "-----BEGIN" not in pem:
        raise ConfigError("no PEM-encoded data found")
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"error parsing private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError("private key is neither an EC nor an RSA key")
    return key


def key_info(public_key: Any) -> tuple[str, int]:
    """``(PrivateKeyType, PrivateKeyBits)`` of a certificate's public key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ec", public_key.curve.key_size
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa", public_key.key_size
    raise ConfigError("only EC and RSA keys are supported")


def _whole_seconds(dt: datetime) -> datetime:
    # X.509 times carry whole seconds; truncating keeps NotAfter - NotBefore == TTL.
    return dt.astimezone(UTC).replace(microsecond=0)


def _compact_uid() -> str:
    return "".join(secrets.choice(_BASE36) for _ in range(8))


def signing_uri(cluster_id: str) -> str:
    """The CA's own SPIFFE ID: ``spiffe://<cluster-id>.consul`` (no path)."""
    return f"spiffe://{cluster_id.lower()}.consul"


def make_root_certificate(
    key: CAPrivateKey, cluster_id: str, serial: int, ttl: float, now: datetime
) -> x509.Certificate:
    """A self-signed Consul root: ``pri-<uid>.consul.ca.<id8>.consul``, URI SAN, CA=true.

    Valid from ``now`` (not back-dated) for ``ttl`` seconds; SKI = AKI = SHA-256 of
    the public key; signed with SHA-256.
    """
    start = _whole_seconds(now)
    kid = key_id(key.public_key())
    cn = f"pri-{_compact_uid()}.consul.ca.{cluster_id[:8]}.consul"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(seconds=round(ttl)))
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(kid), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(kid, None, None), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(signing_uri(cluster_id))]),
            critical=False,
        )
    )
    return builder.sign(key, _hash_for(key))


_SignHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def _hash_for(key: CAPrivateKey) -> _SignHash:
    """The hash Go's x509 picks for a certificate signed by ``key`` when the template
    names no algorithm, as Consul's roots do: SHA-384 for P-384, SHA-512 for P-521,
    else SHA-256."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size == 384:
            return hashes.SHA384()
        if key.curve.key_size == 521:
            return hashes.SHA512()
    return hashes.SHA256()


def cross_sign(
    new_root: x509.Certificate,
    old_root: x509.Certificate,
    old_key: CAPrivateKey,
    serial: int,
    now: datetime,
) -> x509.Certificate:
    """The new root re-issued by the old root (Consul's ``CrossSignCA``).

    Same subject, key, SKI and extensions as ``new_root``; issuer = the old root,
    AKI = the old key's id, a new serial, valid from ``now`` - 1 min for 7 days.
    """
    start = _whole_seconds(now) - BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(new_root.subject)
        .issuer_name(old_root.subject)
        .public_key(new_root.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + CROSS_SIGN_TTL)
    )
    for ext in new_root.extensions:
        if isinstance(ext.value, x509.AuthorityKeyIdentifier):
            continue
        builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier(key_id(old_key.public_key()), None, None), critical=False
    )
    # CrossSignCA signs with the old root's own signature algorithm.
    algorithm = old_root.signature_hash_algorithm
    if not isinstance(algorithm, (hashes.SHA256, hashes.SHA384, hashes.SHA512)):
        algorithm = _hash_for(old_key)
    return builder.sign(old_key, algorithm)


def leaf_backdate(ttl: float) -> timedelta:
    """How far a leaf's NotBefore is set back: 1 minute, as Consul does.

    Consul never issues leaves shorter than an hour; for the dev agent's short test
    TTLs a full minute would hand out certificates that are already expired, so
    below 10 minutes the back-dating shrinks to a tenth of the TTL.
    """
    if ttl >= 600:
        return BACKDATE
    return timedelta(seconds=math.floor(ttl / 10))


def sign_leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: CAPrivateKey,
    leaf_public_key: ec.EllipticCurvePublicKey,
    uri: str,
    serial: int,
    ttl: float,
    now: datetime,
) -> x509.Certificate:
    """A service leaf as the built-in provider signs it (``consul-api.md`` §3.3).

    Empty subject, one critical URI SAN, CA=false, key usages digitalSignature,
    keyEncipherment, dataEncipherment, keyAgreement, EKU client+server auth,
    SKI of the leaf key, AKI of the CA key; NotBefore = ``now`` - 1 min and
    NotAfter = NotBefore + ``ttl``; signed with SHA-256.
    """
    lifetime = timedelta(seconds=max(1, round(ttl)))
    start = _whole_seconds(now) - leaf_backdate(ttl)
    return build_leaf_certificate(
        ca_cert,
        ca_key,
        leaf_public_key,
        [x509.UniformResourceIdentifier(uri)],
        serial,
        start,
        start + lifetime,
    )


def build_leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: CAPrivateKey,
    public_key: CertificatePublicKeyTypes,
    sans: Sequence[x509.GeneralName],
    serial: int,
    not_before: datetime,
    not_after: datetime,
    *,
    ca: bool = False,
) -> x509.Certificate:
    """A leaf with the built-in provider's extensions and any ``sans`` and validity.

    :func:`sign_leaf_certificate` uses it for real leaves; the test CA uses it for
    deliberately wrong ones (``ca=True``, no or several URI SANs, odd validity).
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=True,
                key_cert_sign=ca,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(key_id(public_key)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier(key_id(ca_key.public_key()), None, None), critical=False
        )
        # An empty subject makes the SAN extension critical (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    )
    return builder.sign(ca_key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> str:
    """PEM text of ``cert`` (ends with a newline)."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def fingerprint(cert: x509.Certificate) -> str:
    """Consul's root ``ID``: SHA-1 of the DER, colon-hex."""
    return colon_hex(cert.fingerprint(hashes.SHA1()))  # an identifier, not a security check


def root_record(
    cert: x509.Certificate,
    *,
    cluster_id: str,
    intermediates: list[str] | None,
    index: int,
) -> dict[str, Any]:
    """The stored ``CARoot`` for ``cert`` (public fields plus internal ``RotatedOutAt``)."""
    ktype, kbits = key_info(cert.public_key())
    return {
        "ID": fingerprint(cert),
        "Name": ROOT_NAME,
        "SerialNumber": cert.serial_number,
        "SigningKeyID": colon_hex(key_id(cert.public_key())),
        "ExternalTrustDomain": cluster_id,
        "NotBefore": format_rfc3339(cert.not_valid_before_utc),
        "NotAfter": format_rfc3339(cert.not_valid_after_utc),
        "RootCert": cert_pem(cert),
        "IntermediateCerts": intermediates,
        "Active": True,
        "PrivateKeyType": ktype,
        "PrivateKeyBits": kbits,
        "CreateIndex": index,
        "ModifyIndex": index,
        "RotatedOutAt": None,
    }


_PUBLIC_ROOT_FIELDS = (
    "ID",
    "Name",
    "SerialNumber",
    "SigningKeyID",
    "ExternalTrustDomain",
    "NotBefore",
    "NotAfter",
    "RootCert",
    "IntermediateCerts",
    "Active",
    "PrivateKeyType",
    "PrivateKeyBits",
    "CreateIndex",
    "ModifyIndex",
)


# ------------------------------------------------------------------------- the CA


@dataclass(frozen=True)
class IssuedLeaf:
    """A freshly signed leaf: the ``IssuedCert`` JSON plus what the leaf cache needs."""

    body: dict[str, Any]
    authority_key_id: str
    index: int
    valid_after: float
    valid_before: float


class ConnectCA:
    """The built-in CA of one dev agent, backed by the agent's store.

    ``clock`` (epoch seconds) stamps ``RotatedOutAt`` and drives pruning; tests may
    replace it, and the :attr:`prune_interval` attribute (seconds, hourly by
    default) to make pruning observable quickly. Certificate validity always uses
    the real time. Raises nothing at construction; call :meth:`bootstrap` once.
    """

    def __init__(
        self,
        store: Store,
        *,
        datacenter: str,
        cluster_id: str | None = None,
        leaf_cert_ttl: float = DEFAULT_LEAF_CERT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.datacenter = datacenter
        self._wanted_cluster_id = cluster_id
        self._leaf_cert_ttl = leaf_cert_ttl
        self.clock = clock
        self.prune_interval = PRUNE_INTERVAL
        # Monotonic time of the last roots change (the agent roots cache re-fetch).
        self.roots_changed_at = time.monotonic()
        # CA private keys never reach the data directory (see :meth:`bootstrap`).
        store.keep_in_memory(PROVIDER_TABLE, "provider", "private_key")
        store.keep_in_memory(CONFIG_TABLE, "config", "Config", "PrivateKey")

    # -- records --------------------------------------------------------------

    @property
    def _config(self) -> dict[str, Any]:
        rec: dict[str, Any] = self.store.table(CONFIG_TABLE)["config"]
        return rec

    @property
    def _provider(self) -> dict[str, Any]:
        rec: dict[str, Any] = self.store.table(PROVIDER_TABLE)["provider"]
        return rec

    @property
    def _roots(self) -> list[dict[str, Any]]:
        roots: list[dict[str, Any]] = self.store.table(ROOTS_TABLE)["roots"]
        return roots

    @property
    def bootstrapped(self) -> bool:
        """True once the CA has a configuration and an active root."""
        return "roots" in self.store.table(ROOTS_TABLE)

    @property
    def cluster_id(self) -> str:
        """The cluster ID (a UUID) the trust domain is built from."""
        cid: str = self._config["ClusterID"]
        return cid

    @property
    def trust_domain(self) -> str:
        """``<cluster-id>.consul``."""
        return f"{self.cluster_id.lower()}.consul"

    def provider_config(self) -> ProviderConfig:
        """The decoded settings of the stored configuration (not re-validated)."""
        return parse_provider_config(self._config["Config"], validate=False)

    def _next_serial(self) -> int:
        serial = int(self._provider["serial"]) + 1
        self._provider["serial"] = serial
        return serial

    # -- bootstrap ------------------------------------------------------------

    def bootstrap(self) -> None:
        """Create the configuration and the first root unless the store already has them.

        A store loaded from a data directory has no CA private key (it is never
        written there): the CA then starts on a fresh root, as a rotation that is
        not cross-signed. The old roots stay in the set until pruned, so leaves
        issued before the restart keep verifying.
        """
        if self.bootstrapped:
            if not self._provider.get("private_key"):
                self._restart_on_fresh_root()
            return
        cluster_id = (self._wanted_cluster_id or str(uuid.uuid4())).lower()
        ttl = self._leaf_cert_ttl
        leaf_ttl = "72h" if ttl == DEFAULT_LEAF_CERT_TTL else format_duration(ttl)
        raw = {"LeafCertTTL": leaf_ttl, "IntermediateCertTTL": "8760h", "RootCertTTL": "87600h"}
        cfg = parse_provider_config(raw, validate=False)
        key = generate_ca_key(cfg.private_key_type, cfg.private_key_bits)
        index = self.store.next_index()
        self.store.table(PROVIDER_TABLE)["provider"] = {"serial": 0}
        cert = make_root_certificate(
            key, cluster_id, self._next_serial(), cfg.root_cert_ttl, datetime.now(UTC)
        )
        self._provider.update(
            {"id": cfg.provider_id, "private_key": key_to_pem(key), "root_cert": cert_pem(cert)}
        )
        self.store.table(CONFIG_TABLE)["config"] = {
            "ClusterID": cluster_id,
            "Provider": PROVIDER,
            "Config": raw,
            "State": None,
            "ForceWithoutCrossSigning": False,
            "CreateIndex": index,
            "ModifyIndex": index,
        }
        self.store.table(ROOTS_TABLE)["roots"] = [
            root_record(cert, cluster_id=cluster_id, intermediates=None, index=index)
        ]
        self.store.commit(CONFIG_TABLE, ROOTS_TABLE, PROVIDER_TABLE)
        self.roots_changed_at = time.monotonic()

    # -- reads ----------------------------------------------------------------

    def roots_index(self) -> int:
        """The index of the roots table (``X-Consul-Index`` of the roots endpoints)."""
        return self.store.max_index(ROOTS_TABLE)

    def active_root(self) -> dict[str, Any]:
        """The stored record of the active root."""
        for r in self._roots:
            if r["Active"]:
                return r
        raise RuntimeError("the CA has no active root")

    def roots_json(self) -> dict[str, Any]:
        """``IndexedCARoots`` as the roots endpoints answer it (no secrets)."""
        roots = [{k: r[k] for k in _PUBLIC_ROOT_FIELDS} for r in self._roots]
        active = next((r["ID"] for r in roots if r["Active"]), "")
        return {"ActiveRootID": active, "TrustDomain": self.trust_domain, "Roots": roots}

    def roots_pem(self) -> str:
        """Every root followed by its intermediates, as ``?pem=true`` answers."""
        out = []
        for r in self._roots:
            out.append(r["RootCert"])
            out.extend(r["IntermediateCerts"] or [])
        return "".join(out)

    def config_json(self) -> dict[str, Any]:
        """``CAConfiguration`` as ``GET /v1/connect/ca/configuration`` answers it."""
        c = self._config
        return {
            "Provider": c["Provider"],
            "Config": c["Config"],
            "State": c["State"],
            "ForceWithoutCrossSigning": c["ForceWithoutCrossSigning"],
            "CreateIndex": c["CreateIndex"],
            "ModifyIndex": c["ModifyIndex"],
        }

    # -- configuration and rotation ---------------------------------------------

    def set_config(
        self,
        provider: str,
        config: Mapping[str, Any] | None,
        *,
        state: Mapping[str, Any] | None = None,
        force_without_cross_signing: bool = False,
    ) -> bool:
        """Apply a CA configuration write (``PUT /v1/connect/ca/configuration``).

        A write deep-equal to the stored one does nothing. A new TTL keeps the
        root; a new key type/size or a supplied key/root starts a rotation. Returns
        True when the roots changed. Raises :class:`CAStateReadOnlyError` for a
        non-empty ``State``, :class:`ConfigError` (Consul's text) for anything the
        provider refuses; nothing is changed then.
        """
        stored = self._config
        if state and dict(state) != (stored["State"] or {}):
            raise CAStateReadOnlyError(
                "Provider State is read-only. It must be omitted or identical to the current value"
            )
        new_config = dict(config) if config is not None else None
        if provider == stored["Provider"] and new_config == stored["Config"]:
            return False
        if provider != PROVIDER:
            if provider in ("vault", "aws-pca"):
                raise ConfigError(
                    f"error configuring provider: the dev agent has no {provider!r} CA backend"
                )
            raise ConfigError(f'could not initialize provider: unknown CA provider "{provider}"')
        try:
            cfg = parse_provider_config(new_config)
        except ConfigError as exc:
            raise ConfigError(f"error configuring provider: {exc}") from None
        current = self.provider_config()
        if cfg.provider_id == self._provider.get("id"):
            self._write_config(provider, new_config, force_without_cross_signing)
            self.store.commit(CONFIG_TABLE)
            return False
        if current.disable_cross_signing and not force_without_cross_signing:
            raise ConfigError(
                "The current CA Provider does not support cross-signing. You can try again "
                "with ForceWithoutCrossSigningSet but this may cause disruption - see "
                "documentation for more."
            )
        key, cert = self._new_root_material(cfg)
        cross_signed: str | None = None
        if not force_without_cross_signing:
            old_cert = x509.load_pem_x509_certificate(self._provider["root_cert"].encode())
            old_key = load_ca_key(self._provider["private_key"])
            xc = cross_sign(cert, old_cert, old_key, self._next_serial(), datetime.now(UTC))
            cross_signed = cert_pem(xc)
        self._install_root(key, cert, cross_signed, provider_id=cfg.provider_id)
        self._write_config(provider, new_config, force_without_cross_signing)
        self.store.commit(CONFIG_TABLE, ROOTS_TABLE, PROVIDER_TABLE)
        self.roots_changed_at = time.monotonic()
        return True

    def rotate(self, *, key_type: str | None = None, key_bits: int | None = None) -> str:
        """Force a rotation to a freshly generated root (a test/demo hook).

        The configuration is left as it is; the new root is cross-signed by the
        old one exactly as a configuration change would do. Returns the new
        root's ID.
        """
        current = self.provider_config()
        ktype = key_type or current.private_key_type
        bits = key_bits or (current.private_key_bits if key_type is None else _default_bits(ktype))
        key = generate_ca_key(ktype, bits)
        serial = self._next_serial()
        cert = make_root_certificate(
            key, self.cluster_id, serial, current.root_cert_ttl, datetime.now(UTC)
        )
        old_cert = x509.load_pem_x509_certificate(self._provider["root_cert"].encode())
        old_key = load_ca_key(self._provider["private_key"])
        xc = cross_sign(cert, old_cert, old_key, self._next_serial(), datetime.now(UTC))
        self._install_root(key, cert, cert_pem(xc), provider_id=self._provider.get("id", ""))
        self.store.commit(ROOTS_TABLE, PROVIDER_TABLE)
        self.roots_changed_at = time.monotonic()
        return fingerprint(cert)

    def _restart_on_fresh_root(self) -> None:
        config = self._config
        if isinstance(config.get("Config"), dict) and config["Config"].get("RootCert"):
            # A root supplied with its key cannot be used without that key.
            config["Config"] = {k: v for k, v in config["Config"].items() if k != "RootCert"}
            config["ModifyIndex"] = self.store.next_index()
        current = self.provider_config()
        key = generate_ca_key(current.private_key_type, current.private_key_bits)
        cert = make_root_certificate(
            key, self.cluster_id, self._next_serial(), current.root_cert_ttl, datetime.now(UTC)
        )
        self._install_root(key, cert, None, provider_id=self._provider.get("id", ""))
        self.store.commit(CONFIG_TABLE, ROOTS_TABLE, PROVIDER_TABLE)
        self.roots_changed_at = time.monotonic()

    def _new_root_material(self, cfg: ProviderConfig) -> tuple[CAPrivateKey, x509.Certificate]:
        if cfg.private_key:
            try:
                key = load_ca_key(cfg.private_key)
            except ConfigError as exc:
                raise ConfigError(
                    f"error generating CA root certificate: error generating CA: {exc}"
                ) from None
        else:
            key = generate_ca_key(cfg.private_key_type, cfg.private_key_bits)
        if cfg.root_cert:
            try:
                cert = x509.load_pem_x509_certificate(cfg.root_cert.encode("ascii"))
            except (ValueError, UnicodeEncodeError) as exc:
                raise ConfigError(f"error parsing root cert: {exc}") from None
            if key_id(cert.public_key()) != key_id(key.public_key()):
                raise ConfigError("error parsing root cert: the root cert is not for PrivateKey")
            key_info(cert.public_key())
            return key, cert
        serial = self._next_serial()
        now = datetime.now(UTC)
        return key, make_root_certificate(key, self.cluster_id, serial, cfg.root_cert_ttl, now)

    def _install_root(
        self,
        key: CAPrivateKey,
        cert: x509.Certificate,
        cross_signed: str | None,
        *,
        provider_id: str,
    ) -> None:
        index = self.store.next_index()
        rotated_at = self.clock()
        roots = self._roots
        for r in roots:
            if r["Active"]:
                r["Active"] = False
                r["RotatedOutAt"] = rotated_at
            r["ModifyIndex"] = index
        new = root_record(
            cert,
            cluster_id=self.cluster_id,
            intermediates=[cross_signed] if cross_signed else None,
            index=index,
        )
        # A supplied root that is already in the set just becomes active again.
        roots[:] = [r for r in roots if r["ID"] != new["ID"]]
        roots.append(new)
        self._provider.update(
            {"id": provider_id, "private_key": key_to_pem(key), "root_cert": cert_pem(cert)}
        )

    def _write_config(self, provider: str, config: dict[str, Any] | None, force: bool) -> None:
        c = self._config
        c["Provider"] = provider
        c["Config"] = config
        c["ForceWithoutCrossSigning"] = force
        c["ModifyIndex"] = self.store.next_index()

    # -- pruning --------------------------------------------------------------

    def prune(self) -> list[str]:
        """Drop inactive roots rotated out more than 2 x LeafCertTTL ago (by :attr:`clock`).

        Returns the IDs removed (and commits only when there were any).
        """
        limit = 2 * self.provider_config().leaf_cert_ttl
        now = self.clock()
        roots = self._roots
        keep = [
            r
            for r in roots
            if r["Active"] or r.get("RotatedOutAt") is None or now - r["RotatedOutAt"] <= limit
        ]
        if len(keep) == len(roots):
            return []
        removed = [r["ID"] for r in roots if r not in keep]
        index = self.store.next_index()
        for r in keep:
            r["ModifyIndex"] = index
        roots[:] = keep
        self.store.commit(ROOTS_TABLE)
        self.roots_changed_at = time.monotonic()
        return removed

    # -- leaves ---------------------------------------------------------------

    def sign_leaf(self, service: str) -> IssuedLeaf:
        """Generate a P-256 key and sign a leaf for ``service`` with the active root.

        The body carries the private key PEM (``EC PRIVATE KEY``). Each issuance
        commits the leaf table, so ``CreateIndex == ModifyIndex`` strictly
        increases. Raises :class:`ConfigError` with Consul's text for a name that
        cannot form a SPIFFE ID.
        """
        if not service:
            raise ConfigError("URI must be either service, agent, server, or kind")
        if "/" in service:
            raw = f"spiffe://{self.trust_domain}/ns/default/dc/{self.datacenter}/svc/{service}"
            raise ConfigError(f"SPIFFE ID is not in the expected format: {raw}")
        uri = ServiceIdentity(
            trust_domain=self.trust_domain,
            namespace="default",
            datacenter=self.datacenter,
            service=service,
        ).uri
        active = self.active_root()
        ca_cert = x509.load_pem_x509_certificate(self._provider["root_cert"].encode())
        ca_key = load_ca_key(self._provider["private_key"])
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        ttl = self.provider_config().leaf_cert_ttl
        cert = sign_leaf_certificate(
            ca_cert, ca_key, leaf_key.public_key(), uri, self._next_serial(), ttl, datetime.now(UTC)
        )
        index = self.store.commit(PROVIDER_TABLE, LEAF_TABLE)
        pem = cert_pem(cert).strip() + "\n"
        for p in active["IntermediateCerts"] or []:
            pem = pem.strip() + "\n" + p
        body = {
            "SerialNumber": serial_to_colon_hex(cert.serial_number),
            "CertPEM": pem,
            "PrivateKeyPEM": key_to_pem(leaf_key),
            "Service": service,
            "ServiceURI": uri,
            "ValidAfter": format_rfc3339(cert.not_valid_before_utc),
            "ValidBefore": format_rfc3339(cert.not_valid_after_utc),
            "CreateIndex": index,
            "ModifyIndex": index,
        }
        return IssuedLeaf(
            body=body,
            authority_key_id=colon_hex(key_id(ca_key.public_key())),
            index=index,
            valid_after=cert.not_valid_before_utc.timestamp(),
            valid_before=cert.not_valid_after_utc.timestamp(),
        )


def _default_bits(key_type: str) -> int:
    return 2048 if key_type == "rsa" else 256


def renewal_time(valid_after: float, valid_before: float, rand: float | None = None) -> float:
    """When an agent renews a leaf: uniformly in [60 %, 90 %] of its lifetime (epoch s)."""
    r = random.random() if rand is None else rand
    life = valid_before - valid_after
    return valid_after + life * (0.6 + 0.3 * r)
