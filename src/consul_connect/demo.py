"""The demo: the project's main job on the embedded dev agent (filled in as features land)."""

from __future__ import annotations

__all__ = ["run_demo"]


def run_demo(json_output: bool = False) -> int:
    """Run the demo; returns the process exit status."""
    from consul_connect.devagent import DevAgent

    with DevAgent() as agent:
        print(f"dev agent on {agent.http_addr}")
    return 0
