"""Helpers shared by the dev agent's acceptance tests."""

from __future__ import annotations

import json

import httpx

from consul_connect.devagent import DevAgent

MGMT = "root-secret"


def ok(r: httpx.Response) -> httpx.Response:
    """Assert a 200 answer (showing the body otherwise) and return it."""
    assert r.status_code == 200, r.text
    return r


def snapshot(agent: DevAgent) -> str:
    """Every durable thing of the agent: the store index, table indexes and tables."""
    return str(
        agent.call(
            lambda ctx: json.dumps(
                [ctx.store.index, ctx.store.table_index, ctx.store.tables],
                sort_keys=True,
                default=str,
            )
        )
    )
