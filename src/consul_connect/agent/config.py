"""Where the Consul agent is and how to authenticate to it.

:class:`AgentConfig` is a frozen value. :meth:`AgentConfig.from_env` reads the same
``CONSUL_*`` variables as Consul's Go API client and applies the same rules, so a
process configured for the ``consul`` CLI talks to the same agent, the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consul_connect.errors import ConfigError

__all__ = ["DEFAULT_ADDRESS", "AgentConfig", "parse_bool"]

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8500"

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_bool(text: str) -> bool:
    """Parse ``text`` exactly as Go's ``strconv.ParseBool`` does.

    Returns the boolean; raises :class:`ValueError` for anything outside
    ``1 t T TRUE true True 0 f F FALSE false False``.
    """
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r}")


@dataclass(frozen=True, slots=True)
class _Address:
    address: str
    scheme: str
    path_prefix: str
    unix_socket: str | None


def _split_address(raw: str, scheme: str) -> _Address:
    """Apply the Go client's address rules to ``raw`` given the scheme chosen so far."""
    head, sep, rest = raw.partition("://")
    if not sep:
        # A bare host:port keeps everything (Go does not look for a prefix here).
        return _Address(raw, scheme, "", None)
    if head == "unix":
        return _Address(rest, scheme, "", rest)
    if head == "https":
        scheme = "https"
    elif head != "http":
        raise ConfigError(f"Unknown protocol scheme: {head}")
    # "http://" never downgrades a scheme already forced to https by CONSUL_HTTP_SSL.
    host, slash, prefix = rest.partition("/")
    # A bare trailing slash would otherwise make every request path start with "//".
    path_prefix = ("/" + prefix).rstrip("/") if slash else ""
    return _Address(host, scheme, path_prefix, None)


def _strip_port(server_name: str) -> str:
    """Drop a ``:port`` suffix from a TLS server name, bracket-aware for IPv6."""
    if server_name.startswith("["):
        end = server_name.find("]")
        if end != -1:
            return server_name[1:end]
        return server_name
    if server_name.count(":") == 1:
        return server_name.split(":", 1)[0]
    # Several colons and no brackets: an IPv6 literal without a port.
    return server_name


def _nonempty(value: str | None) -> str | None:
    return value if value else None


@dataclass(frozen=True, repr=False)
class AgentConfig:
    """How to reach one Consul agent over HTTP(S) or a unix socket.

    ``address`` is ``host:port`` (or the socket path when ``unix_socket`` is set);
    ``scheme`` is ``http`` or ``https``; ``path_prefix`` is prepended to every request
    path (reverse proxies). ``token`` empty means no ``X-Consul-Token`` header.
    ``namespace``/``partition``/``datacenter`` are sent only when set (Consul CE
    rejects any ``ns``/``partition`` parameter). Construction raises
    :class:`~consul_connect.errors.ConfigError` for an unknown scheme or a client
    certificate without its key (or the reverse).
    """

    address: str = DEFAULT_ADDRESS
    scheme: str = "http"
    path_prefix: str = ""
    unix_socket: str | None = None
    token: str = ""
    http_auth: tuple[str, str] | None = None
    ca_file: str | None = None
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_server_name: str | None = None
    verify: bool = True
    namespace: str | None = None
    partition: str | None = None
    datacenter: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ConfigError(f"Unknown protocol scheme: {self.scheme}")
        if bool(self.client_cert) != bool(self.client_key):
            raise ConfigError("both client cert and client key must be provided")
        if self.path_prefix and not self.path_prefix.startswith("/"):
            raise ConfigError(f"path prefix must start with '/': {self.path_prefix!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AgentConfig:
        """Build a config from ``CONSUL_*`` variables (``os.environ`` when ``environ`` is None).

        Honoured: ``CONSUL_HTTP_ADDR`` (``host:port``, ``http://``, ``https://``,
        ``unix:///path``, with an optional path prefix), ``CONSUL_HTTP_SSL``,
        ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_TOKEN_FILE`` (read now, trimmed, wins over
        the token when non-empty), ``CONSUL_HTTP_AUTH``, ``CONSUL_HTTP_SSL_VERIFY``,
        ``CONSUL_CACERT``, ``CONSUL_CAPATH``, ``CONSUL_CLIENT_CERT``,
        ``CONSUL_CLIENT_KEY``, ``CONSUL_TLS_SERVER_NAME``, ``CONSUL_NAMESPACE``,
        ``CONSUL_PARTITION``. Empty variables count as unset.

        Raises :class:`~consul_connect.errors.ConfigError` for an unknown address
        scheme, an unreadable token file, or a client cert without a key (or reverse).
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "") or ""

        scheme = "http"
        ssl_text = get("CONSUL_HTTP_SSL")
        if ssl_text:
            try:
                if parse_bool(ssl_text):
                    scheme = "https"
            except ValueError:
                logger.warning("could not parse CONSUL_HTTP_SSL=%r; ignoring it", ssl_text)

        addr = _split_address(get("CONSUL_HTTP_ADDR") or DEFAULT_ADDRESS, scheme)

        token = get("CONSUL_HTTP_TOKEN")
        token_file = get("CONSUL_HTTP_TOKEN_FILE")
        if token_file:
            try:
                with open(token_file, encoding="utf-8") as fh:
                    from_file = fh.read().strip()
            except OSError as exc:
                raise ConfigError(f"Error loading token file: {exc}") from exc
            if from_file:
                token = from_file

        http_auth: tuple[str, str] | None = None
        auth = get("CONSUL_HTTP_AUTH")
        if auth:
            user, _, password = auth.partition(":")
            http_auth = (user, password)

        verify = True
        verify_text = get("CONSUL_HTTP_SSL_VERIFY")
        if verify_text:
            try:
                verify = parse_bool(verify_text)
            except ValueError:
                # Go would silently disable verification here; we refuse to weaken TLS
                # on a typo and keep verifying.
                logger.warning(
                    "could not parse CONSUL_HTTP_SSL_VERIFY=%r; keeping verification on",
                    verify_text,
                )

        server_name = get("CONSUL_TLS_SERVER_NAME")

        return cls(
            address=addr.address,
            scheme=addr.scheme,
            path_prefix=addr.path_prefix,
            unix_socket=addr.unix_socket,
            token=token,
            http_auth=http_auth,
            ca_file=_nonempty(get("CONSUL_CACERT")),
            ca_path=_nonempty(get("CONSUL_CAPATH")),
            client_cert=_nonempty(get("CONSUL_CLIENT_CERT")),
            client_key=_nonempty(get("CONSUL_CLIENT_KEY")),
            tls_server_name=_strip_port(server_name) if server_name else None,
            verify=verify,
            namespace=_nonempty(get("CONSUL_NAMESPACE")),
            partition=_nonempty(get("CONSUL_PARTITION")),
        )

    @classmethod
    def from_address(cls, address: str, **fields: Any) -> AgentConfig:
        """Build a config for ``address`` in any ``CONSUL_HTTP_ADDR`` form, plus ``fields``.

        ``fields`` are other :class:`AgentConfig` fields (``token=...``). An ``https://``
        address forces ``scheme="https"``. Raises :class:`ConfigError` as the
        constructor does.
        """
        addr = _split_address(address, str(fields.pop("scheme", "http")))
        return cls(
            address=addr.address,
            scheme=addr.scheme,
            path_prefix=addr.path_prefix,
            unix_socket=addr.unix_socket,
            **fields,
        )

    def replace(self, **changes: Any) -> AgentConfig:
        """Return a copy with ``changes`` applied (explicit settings over the environment)."""
        return dataclasses.replace(self, **changes)

    @property
    def base_url(self) -> str:
        """The URL every request path is appended to, path prefix included.

        For a unix socket the host part is a placeholder: the agent ignores ``Host``.
        """
        host = "localhost" if self.unix_socket is not None else self.address
        return f"{self.scheme}://{host}{self.path_prefix}"

    def __repr__(self) -> str:
        shown: list[str] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "token" and value:
                value = "<hidden>"
            elif field.name == "http_auth" and value is not None:
                value = (value[0], "<hidden>")
            shown.append(f"{field.name}={value!r}")
        return f"AgentConfig({', '.join(shown)})"
