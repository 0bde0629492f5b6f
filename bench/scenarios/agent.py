"""The dev agent in its own process, with a control channel on stdin.

``python bench/scenarios/agent.py --port P`` prints ``ready <host:port>`` once the agent
answers, then executes one command per stdin line and answers ``ok`` (or ``error ...``):

* ``renew <service>``: make the agent's cached leaf for <service> due now, so its
  blocking leaf query returns a freshly signed leaf (what a TTL-driven renewal does);
* ``quit``: stop. End of stdin stops it too.

Leaves are re-issued without jitter after a root rotation (``leaf_root_change_jitter=0``)
so a rotation under load happens within the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from consul_connect.devagent import DevAgent


def _renew(agent: DevAgent, service: str) -> None:
    def go(ctx: Any) -> None:
        from consul_connect.devagent.ca import LEAF_TABLE

        entry = ctx.extensions["connect_ca"].leaves[service]
        entry.force_expire_after = time.time()
        ctx.store.touch(LEAF_TABLE)

    agent.call(go)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with DevAgent(port=args.port, leaf_root_change_jitter=0.0, log_level="warning") as agent:
        print(f"ready {agent.address}", flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            try:
                if words[0] == "renew" and len(words) == 2:
                    _renew(agent, words[1])
                else:
                    raise ValueError(f"unknown command {line.strip()!r}")
            except Exception as exc:
                print(f"error {exc!r}", flush=True)
                continue
            print("ok", flush=True)


if __name__ == "__main__":
    main()
