"""Go ``time.Duration`` strings, as Consul reads and writes them."""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Return the seconds in a Go duration string (``"10s"``, ``"1m30s"``, ``"250ms"``, ``"0"``).

    Raises ``ValueError`` for anything Go's ``time.ParseDuration`` would refuse.
    """
    s = text.strip() if isinstance(text, str) else text
    if not isinstance(s, str) or s == "":
        raise ValueError(f"time: invalid duration {text!r}")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Format seconds as Go's ``Duration.String()`` does (``72h0m0s``, ``1.5s``, ``250ms``)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    neg = ns < 0
    ns = abs(ns)
    if ns < 1_000_000_000:
        if ns < 1_000:
            out = f"{ns}ns"
        elif ns < 1_000_000:
            out = _trim(ns / 1_000) + "µs"
        else:
            out = _trim(ns / 1_000_000) + "ms"
    else:
        h, rem = divmod(ns, 3_600_000_000_000)
        m, rem = divmod(rem, 60_000_000_000)
        sec = _trim(rem / 1e9)
        if h:
            out = f"{h}h{m}m{sec}s"
        elif m:
            out = f"{m}m{sec}s"
        else:
            out = f"{sec}s"
    return "-" + out if neg else out


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
