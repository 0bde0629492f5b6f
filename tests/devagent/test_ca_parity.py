"""The dev agent's CA and the library during rotation, checked against Consul's source.

Each test names the Consul (or Go SDK) code whose behaviour it pins. Real HTTP to a
dev agent on 127.0.0.1 and real TLS handshakes; no private key touches the disk.
"""

from __future__ import annotations

import socket
import ssl
import time
import types
from collections.abc import Callable

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from consul_connect.certs import Leaf, RootSet
from consul_connect.devagent import DevAgent
from consul_connect.devagent.endpoints import connect_ca
from consul_connect.service import Service
from consul_connect.tls import TLSMaterial
from tests.conftest import client_for
from tests.core.support import EchoServer
from tests.core.support import cfg as _cfg
from tests.core.support import wait_for as _wait_for

ROOTS = "/v1/agent/connect/ca/roots"
CONFIG = "/v1/connect/ca/configuration"
HOUR = 3600.0


def _rotate(http: httpx.Client, bits: int) -> None:
    r = http.put(
        CONFIG,
        json={"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": bits}},
    )
    assert r.status_code == 200, r.text


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def test_roots_and_cross_signs_use_the_signature_hash_go_picks_for_the_key(
    http: httpx.Client,
) -> None:
    # agent/connect/ca/provider_consul.go generateCA: the template sets no
    # SignatureAlgorithm, so Go's x509.CreateCertificate signs a P-384 root with
    # ECDSA-SHA384. CrossSignCA: template.SignatureAlgorithm = rootCA.SignatureAlgorithm
    # (the *old* root's). Sign (leaves): connect.SigAlgoForKey = ECDSA-SHA256 always.
    _rotate(http, 384)
    _rotate(http, 256)
    p256_first, p384, p256_again = http.get(ROOTS).json()["Roots"]
    assert isinstance(_cert(p384["RootCert"]).signature_hash_algorithm, hashes.SHA384)
    # Cross-signed by the P-256 root: SHA-256; by the P-384 root: SHA-384.
    assert isinstance(
        _cert(p384["IntermediateCerts"][0]).signature_hash_algorithm, hashes.SHA256
    )
    assert isinstance(
        _cert(p256_again["IntermediateCerts"][0]).signature_hash_algorithm, hashes.SHA384
    )
    assert p256_first["PrivateKeyBits"] == 256


def _talks(material: TLSMaterial, host: str, port: int) -> bool:
    """Whether a client presenting ``material``'s leaf gets an echo from the server."""
    with socket.create_connection((host, port), timeout=5) as raw:
        try:
            with material.client_context.wrap_socket(raw) as conn:
                conn.settimeout(5)
                conn.sendall(b"x")
                return conn.recv(1) == b"x"
        except (ssl.SSLError, ConnectionError):
            # TLS 1.3: the server's refusal of our certificate arrives at the first read.
            return False


def test_a_pruned_root_is_not_trusted_even_before_the_leaf_is_renewed(
    start_agent: Callable[..., DevAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Go SDK connect/tls.go dynamicTLSConfig.SetRoots swaps the verification pool as
    # soon as the roots watch fires, independent of the leaf; pruning
    # (agent/consul/leader_connect.go pruneCARoots) drops a rotated-out root from
    # IndexedCARoots after 2 x LeafCertTTL. A root that is no longer in the list must
    # not be trusted, even while this service still holds a leaf from that root
    # (here: its re-issue is held back by the root-change jitter,
    # agent/leafcert/generate.go caChangeJitterWindow).
    agent = start_agent(leaf_root_change_jitter=10 * HOUR)
    # The jitter is uniform in [0, window]: take its far end so the leaf stays.
    monkeypatch.setattr(connect_ca, "random", types.SimpleNamespace(uniform=lambda a, b: b))
    with client_for(agent) as http:
        old_roots = RootSet.from_json(http.get(ROOTS).json())
        # A leaf of the old root, as a service that never renewed would still hold.
        stale = Leaf.from_json(http.get("/v1/agent/connect/ca/leaf/stale").json())
        stale_material = TLSMaterial.build(stale, old_roots)
        web = Service("web", agent=_cfg(agent))
        server = None
        try:
            web.wait_ready(15)
            first_serial = web.statistics().leaf_serial
            server = EchoServer(web)
            host, port = server.listener.address
            assert _talks(stale_material, host, port)

            _rotate(http, 384)
            _wait_for(lambda: web.statistics().roots == 2, what="the rotated roots")
            ca = "connect_ca"
            agent.call(lambda ctx: ctx.extensions[ca].set_clock(lambda: time.time() + 1000 * HOUR))
            agent.call(lambda ctx: ctx.extensions[ca].prune())
            assert len(http.get(ROOTS).json()["Roots"]) == 1
            _wait_for(lambda: web.statistics().roots_changes >= 2, what="the pruned roots")
            # The leaf was not re-issued yet: web's own leaf is from the pruned root.
            assert web.statistics().leaf_serial == first_serial

            assert web.statistics().roots == 1
            assert not _talks(stale_material, host, port)
        finally:
            if server is not None:
                server.close()
            web.close()
