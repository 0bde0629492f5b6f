"""Library changes the benchmark proposes, applied by monkeypatching *this process only*.

The fixes the first run proposed (``nodelay``, ``l4-decision-cache``, ``agent-pool``)
are shipped in the library now, so they are gone from here; see
``results/before-fixes/`` for what each one measured.

* ``dial``: the proposed ``Service.open_connection`` change (the exact diff is in the
  benchmark report), in two parts:

  - per-endpoint TLS session resumption: ``tls.DynamicClientContext`` can resume
    sessions (``for_endpoint(key)``), but ``open_connection`` passes the context itself
    as ``ssl=``, which always makes full handshakes. Here the dialing code in
    ``consul_connect.service`` gets an ``asyncio.open_connection`` that passes
    ``ssl=ctx.for_endpoint((host, port))`` instead. The server identity check after
    the handshake is untouched;
  - no runtime-loop hop for an ``Endpoint`` target: ``open_connection`` resolves every
    target on the Service's runtime thread, a thread switch (~150 µs of CPU per dial,
    ``micro.py``'s ``runtime_hop``) even when the target is an ``Endpoint`` with
    nothing to look up. Here ``Runtime.run_async`` answers ``Service._resolve`` of an
    ``Endpoint`` in place, which is what ``endpoints = [target]`` in the proposal does.

  Used by the load generator's ``--resume`` for native clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any


class _AsyncioWithResumption:
    """``asyncio`` as ``consul_connect.service`` sees it, dialing with per-endpoint contexts."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def open_connection(host: Any = None, port: Any = None, **kwargs: Any) -> Any:
        from consul_connect.tls import DynamicClientContext

        ctx = kwargs.get("ssl")
        if isinstance(ctx, DynamicClientContext):
            kwargs["ssl"] = ctx.for_endpoint((host, port))
        return await asyncio.open_connection(host, port, **kwargs)


def _dial() -> None:
    from consul_connect import service
    from consul_connect._runtime import Runtime
    from consul_connect.discovery import Endpoint

    setattr(service, "asyncio", _AsyncioWithResumption())  # noqa: B010 - module global

    resolve_code = service.Service._resolve.__code__
    original = Runtime.run_async

    async def run_async(self: Runtime, coro: Coroutine[Any, Any, Any],
                        timeout: float | None = None) -> Any:
        frame = getattr(coro, "cr_frame", None)
        if getattr(coro, "cr_code", None) is resolve_code and frame is not None:
            target = frame.f_locals.get("target")
            if isinstance(target, Endpoint):
                coro.close()
                return [target]
        return await original(self, coro, timeout)

    Runtime.run_async = run_async  # type: ignore[method-assign]


AVAILABLE = {
    "dial": _dial,
}


def apply(names: Iterable[str]) -> None:
    """Apply the named patches (unknown names raise ``KeyError``)."""
    for name in names:
        if name:
            AVAILABLE[name]()
