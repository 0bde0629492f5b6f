"""Adapters that put HTTP frameworks on a :class:`~consul_connect.service.Service`.

Each submodule is imported on its own so that only the frameworks you use need to be
installed:

* :mod:`consul_connect.integrations.httpx`: ``ConnectTransport`` / ``AsyncConnectTransport``
  route ``https://<svc>.service.consul/...`` through discovery and Connect mTLS.
* :mod:`consul_connect.integrations.requests`: ``ConnectAdapter`` does the same for a
  ``requests.Session``.
* :mod:`consul_connect.integrations.asgi`: ``serve()`` / ``run()`` run any ASGI app on
  uvicorn as a Connect-native server, and ``IntentionsMiddleware`` enforces L7
  intentions per request.

The guide is ``docs/integrations/http.md``.
"""

from __future__ import annotations

__all__: list[str] = []
