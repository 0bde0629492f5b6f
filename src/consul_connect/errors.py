"""The errors consul-connect raises, as one small tree.

::

    ConsulConnectError
    ├── ConfigError (ValueError)            bad configuration or environment
    ├── IdentityError (ValueError)          text that is not a valid Consul SPIFFE ID
    ├── CertificateError (ValueError)       bad PEM, or a leaf that does not verify
    ├── AgentError                          talking to the Consul agent failed
    │   ├── AgentUnavailableError (ConnectionError)   unreachable, timed out, 5xx
    │   ├── AgentResponseError              an answer we cannot use (bad JSON, 4xx)
    │   │   ├── AgentNotFoundError          404
    │   │   ├── AgentRateLimitedError       429
    │   │   └── AgentRequestError           the request can never succeed (a bad filter)
    │   └── AgentPermissionError (PermissionError)    403: the token lacks a right
    ├── NotReadyError (TimeoutError)        a Service did not become ready in time
    ├── PeerRejected                        *we* refused a peer (wrong identity, denied)
    └── DialError (ConnectionError)         *we* could not reach a service
        ├── NoInstancesError                discovery found no usable instance
        └── ServerIdentityError             the server was not the service we meant

Foreign exceptions (``httpx``, ``ssl``, ``json``) are translated once, where they
enter the library, with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AgentNotFoundError",
    "AgentPermissionError",
    "AgentRateLimitedError",
    "AgentRequestError",
    "AgentResponseError",
    "AgentUnavailableError",
    "CertificateError",
    "ConfigError",
    "ConsulConnectError",
    "DialError",
    "IdentityError",
    "NoInstancesError",
    "NotReadyError",
    "PeerRejected",
    "ServerIdentityError",
]


class ConsulConnectError(Exception):
    """Root of every error raised by consul-connect."""


class ConfigError(ConsulConnectError, ValueError):
    """Configuration (arguments or ``CONSUL_*`` environment) is invalid."""


class IdentityError(ConsulConnectError, ValueError):
    """A string is not a valid Consul SPIFFE identity of the expected kind."""


class CertificateError(ConsulConnectError, ValueError):
    """Certificate material is malformed, mismatched, or does not verify."""


class AgentError(ConsulConnectError):
    """A request to the Consul agent failed.

    ``status`` is the HTTP status when the agent answered, else ``None``;
    ``body`` is the agent's (plain-text) answer, trimmed.
    """

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class AgentUnavailableError(AgentError, ConnectionError):
    """The agent could not be reached, timed out, or answered with a 5xx error."""


class AgentResponseError(AgentError):
    """The agent answered, but not with something usable (4xx, or undecodable JSON)."""


class AgentNotFoundError(AgentResponseError):
    """The agent answered 404."""


class AgentRateLimitedError(AgentResponseError):
    """The agent answered 429 (for example CSR signing rate limit)."""


class AgentRequestError(AgentResponseError):
    """The agent refused the request itself, so repeating it cannot succeed.

    Raised for a ``filter`` expression the agent cannot compile (Consul answers it with
    a 500). Watches stop on it instead of retrying.
    """


class AgentPermissionError(AgentError, PermissionError):
    """The agent answered 403: the ACL token lacks a right (``body`` names it)."""


class NotReadyError(ConsulConnectError, TimeoutError):
    """A Service did not get its certificates in time; ``cause`` names the likely reason."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class PeerRejected(ConsulConnectError):
    """This process refused a peer: bad certificate, bad identity, or not authorized."""

    def __init__(self, reason: str, *, peer: str | None = None) -> None:
        super().__init__(reason if peer is None else f"{peer}: {reason}")
        self.reason = reason
        self.peer = peer


class DialError(ConsulConnectError, ConnectionError):
    """This process could not connect to a service.

    ``failures`` lists ``(address, reason)`` for every instance that was tried.
    """

    def __init__(self, message: str, *, failures: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class NoInstancesError(DialError):
    """Discovery returned no healthy Connect-capable instance."""


class ServerIdentityError(DialError):
    """The server presented a valid certificate for a different identity than expected."""
