"""Dev agent endpoints: ``/v1/status/*`` and ``/v1/agent/self``."""

from __future__ import annotations

from consul_connect.devagent.context import CONSUL_VERSION, AgentContext
from consul_connect.devagent.http import Request, Response, Router, json_response

__all__ = ["register"]

_SERVER_PORT = 8300


def register(router: Router, ctx: AgentContext) -> None:
    """Register the status and agent-self routes."""

    def leader_addr() -> str:
        return f"{ctx.config.bind}:{_SERVER_PORT}"

    @router.route("/v1/status/leader", "GET")
    async def leader(req: Request) -> Response:
        return json_response(leader_addr())

    @router.route("/v1/status/peers", "GET")
    async def peers(req: Request) -> Response:
        return json_response([leader_addr()])

    @router.route("/v1/agent/self", "GET")
    async def agent_self(req: Request) -> Response:
        req.authz.require("agent", "read", ctx.node_name)
        cfg = ctx.config
        return json_response(
            {
                "Config": {
                    "Datacenter": cfg.datacenter,
                    "PrimaryDatacenter": cfg.datacenter,
                    "NodeName": cfg.node_name,
                    "NodeID": ctx.node_id,
                    "Revision": "dev",
                    "Server": True,
                    "Version": CONSUL_VERSION,
                    "BuildDate": "2024-11-01T00:00:00Z",
                },
                "DebugConfig": {
                    "ConnectEnabled": True,
                    "ACLsEnabled": ctx.acl.enabled,
                    "ACLDefaultPolicy": ctx.acl.default_policy,
                    "Datacenter": cfg.datacenter,
                    "NodeName": cfg.node_name,
                },
                "Coord": {
                    "Vec": [0, 0, 0, 0, 0, 0, 0, 0],
                    "Error": 1.5,
                    "Adjustment": 0,
                    "Height": 1e-05,
                },
                "Member": {
                    "Name": cfg.node_name,
                    "Addr": cfg.bind,
                    "Port": 8301,
                    "Tags": {
                        "dc": cfg.datacenter,
                        "role": "consul",
                        "build": CONSUL_VERSION,
                        "id": ctx.node_id,
                        "bootstrap": "1",
                    },
                    "Status": 1,
                    "ProtocolMin": 1,
                    "ProtocolMax": 5,
                    "ProtocolCur": 2,
                    "DelegateMin": 2,
                    "DelegateMax": 5,
                    "DelegateCur": 4,
                },
                "Stats": {
                    "agent": {
                        "check_monitors": "0",
                        "check_ttls": "0",
                        "checks": "0",
                        "services": "0",
                    },
                    "consul": {"server": "true", "leader": "true", "known_datacenters": "1"},
                },
                "Meta": {"consul-network-segment": "", "consul-version": CONSUL_VERSION},
            }
        )
