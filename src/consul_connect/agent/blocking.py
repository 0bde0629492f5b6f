"""The bookkeeping of one Consul blocking query, with no I/O.

The caller (see :mod:`consul_connect.agent.watch`) performs the requests, reads the
clock and draws random numbers; these classes only decide:

* which ``index``/``hash`` and ``wait`` the next request carries;
* whether a response is usable, moved backwards, or carries a payload that differs
  from the last one delivered (Consul wakes blocking queries without changes);
* how long to back off after a failure (exponential, full jitter, capped), and how
  long to hold back a request so that a misbehaving server cannot make the loop spin.

Rules follow Consul's ``features/blocking`` documentation: start at index 0; block on
the returned ``X-Consul-Index``; reset to 0 when it goes backwards; never block on 0
(a returned 0 counts as 1); do not assume that a return means a change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_INDEX",
    "Backoff",
    "BlockingState",
    "HashBlockingState",
    "Outcome",
    "RateLimiter",
    "format_wait",
    "parse_index",
]

MAX_INDEX = 2**64 - 1
_DIGITS = re.compile(r"[0-9]+")

# Anything that can be compared with ``==``: the decoded JSON itself or a digest of it.
Fingerprint = object


def parse_index(header: str | None) -> int | None:
    """Return the ``X-Consul-Index`` value as an int, or None if absent or not a uint64."""
    if header is None:
        return None
    text = header.strip()
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_INDEX else None


def format_wait(seconds: float) -> str | None:
    """Format a ``wait`` duration as the Go client does (``<ms>ms``).

    Returns None for ``seconds <= 0`` (send no ``wait`` at all: the server default
    applies). A positive wait that truncates to 0 ms is sent as ``1ms``, because the
    server would read ``0ms`` as "use the default".
    """
    if seconds <= 0:
        return None
    ms = int(seconds * 1000)
    return f"{max(ms, 1)}ms"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one response means for the watch loop.

    ``changed``: deliver this payload (it differs from the last delivered one).
    ``index``: the index (or 0) the next request will carry.
    ``reset``: the index went backwards and the loop restarted at 0.
    ``error``: the response is unusable (e.g. no valid ``X-Consul-Index``); nothing
    changed in the state, and the caller should back off via ``on_error``.
    """

    changed: bool
    index: int
    reset: bool = False
    error: str | None = None


class Backoff:
    """Exponential back-off with full jitter and a cap.

    The n-th consecutive failure waits ``rand * min(cap, base * 2**(n-1))`` seconds,
    ``rand`` being a caller-supplied number in ``[0, 1)``.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.failures = 0

    def ceiling(self) -> float:
        """The upper bound of the delay the next failure would draw from."""
        # Cap the exponent too, so a long outage cannot overflow the float.
        exponent = min(self.failures, 62)
        return min(self.cap, self.base * (2.0**exponent))

    def failure(self, rand: float) -> float:
        """Record a failure; return the delay in seconds to wait before retrying."""
        ceiling = self.ceiling()
        self.failures += 1
        return min(max(rand, 0.0), 1.0) * ceiling

    def success(self) -> None:
        """Record a success: the next failure starts from ``base`` again."""
        self.failures = 0


class RateLimiter:
    """A token bucket that keeps a blocking loop from hammering the agent.

    A loop that keeps getting immediate answers (index moving on every call, a server
    that ignores ``index``) would otherwise spin. ``burst`` requests pass at once; after
    that one request per ``interval`` seconds. ``now`` comes from the caller's clock.
    """

    def __init__(self, burst: int = 3, interval: float = 1.0) -> None:
        if burst < 1 or interval < 0:
            raise ValueError("rate limiter needs burst >= 1 and interval >= 0")
        self.burst = burst
        self.interval = interval
        self._tokens = float(burst)
        self._last: float | None = None

    def acquire(self, now: float) -> float:
        """Take a token for a request at ``now``; return how long to wait before sending it."""
        if self.interval == 0:
            return 0.0
        if self._last is not None:
            elapsed = max(0.0, now - self._last)
            self._tokens = min(float(self.burst), self._tokens + elapsed / self.interval)
        self._last = now
        self._tokens -= 1.0
        # Going into debt means the token is taken now and paid back by waiting.
        return 0.0 if self._tokens >= 0 else -self._tokens * self.interval


class _StateBase:
    def __init__(self, backoff: Backoff | None, limiter: RateLimiter | None) -> None:
        self.backoff = backoff if backoff is not None else Backoff()
        self.limiter = limiter if limiter is not None else RateLimiter()
        self._delivered = False
        self._last: Fingerprint = None

    @property
    def has_delivered(self) -> bool:
        """True once some payload has been reported as changed."""
        return self._delivered

    def before_request(self, now: float) -> float:
        """Return the seconds to wait before sending the next request (rate limit)."""
        return self.limiter.acquire(now)

    def _note_payload(self, fingerprint: Fingerprint) -> bool:
        if self._delivered and fingerprint == self._last:
            return False
        self._delivered = True
        self._last = fingerprint
        return True


class BlockingState(_StateBase):
    """Index-based blocking (``X-Consul-Index``) for one query.

    Use: ``params = state.next_request_params(wait)``; send; then either
    ``state.on_response(headers.get("X-Consul-Index"), payload)`` or, on failure,
    ``delay = state.on_error(random())``.
    """

    def __init__(self, backoff: Backoff | None = None, limiter: RateLimiter | None = None) -> None:
        super().__init__(backoff, limiter)
        self.index = 0

    def next_request_params(self, wait: float) -> dict[str, str]:
        """Query parameters for the next request: ``index`` only when > 0, ``wait`` when > 0."""
        params: dict[str, str] = {}
        if self.index > 0:
            params["index"] = str(self.index)
        formatted = format_wait(wait)
        if formatted is not None:
            params["wait"] = formatted
        return params

    def on_response(self, index_header: str | None, payload_fingerprint: Fingerprint) -> Outcome:
        """Digest a successful response; say whether to deliver its payload.

        A missing or malformed index yields ``Outcome(error=...)`` and leaves the state
        unchanged (the caller should then call :meth:`on_error`).
        """
        parsed = parse_index(index_header)
        if parsed is None:
            what = "missing" if index_header is None else f"malformed ({index_header!r})"
            return Outcome(changed=False, index=self.index, error=f"X-Consul-Index {what}")
        return self.on_index(parsed, payload_fingerprint)

    def on_index(self, index: int, payload_fingerprint: Fingerprint) -> Outcome:
        """Like :meth:`on_response` for an already-parsed index (0 is treated as 1)."""
        if index < 0 or index > MAX_INDEX:
            return Outcome(changed=False, index=self.index, error=f"index {index} out of range")
        self.backoff.success()
        # Blocking on 0 would return at once, forever: the loop would spin.
        index = max(index, 1)
        reset = index < self.index
        # After a regression (snapshot restore, agent restart) restart with a
        # non-blocking read; blocking on the stale high index would hang for `wait`.
        self.index = 0 if reset else index
        changed = self._note_payload(payload_fingerprint)
        return Outcome(changed=changed, index=self.index, reset=reset)

    def on_error(self, rand: float) -> float:
        """Record a failed request; return the back-off delay in seconds.

        ``rand`` is a number in ``[0, 1)`` from the caller's random source. The next
        request is non-blocking: after a failure the agent may have restarted with a
        lower index, and blocking on the old one would stall for the whole ``wait``.
        """
        self.index = 0
        return self.backoff.failure(rand)


class HashBlockingState(_StateBase):
    """Hash-based blocking (``X-Consul-ContentHash``), for agent-local endpoints."""

    def __init__(self, backoff: Backoff | None = None, limiter: RateLimiter | None = None) -> None:
        super().__init__(backoff, limiter)
        self.hash: str | None = None

    def next_request_params(self, wait: float) -> dict[str, str]:
        """Query parameters for the next request: ``hash`` once known, ``wait`` when > 0."""
        params: dict[str, str] = {}
        if self.hash:
            params["hash"] = self.hash
        formatted = format_wait(wait)
        if formatted is not None:
            params["wait"] = formatted
        return params

    def on_response(self, hash_header: str | None, payload_fingerprint: Fingerprint) -> Outcome:
        """Digest a successful response; a missing/empty hash is an error outcome.

        ``Outcome.index`` is always 0 here (hashes cannot be ordered, so there is no
        regression either).
        """
        value = hash_header.strip() if hash_header is not None else ""
        if not value:
            return Outcome(changed=False, index=0, error="X-Consul-ContentHash missing")
        self.backoff.success()
        self.hash = value
        return Outcome(changed=self._note_payload(payload_fingerprint), index=0)

    def on_error(self, rand: float) -> float:
        """Record a failed request; return the back-off delay. The next request does not block."""
        self.hash = None
        return self.backoff.failure(rand)
