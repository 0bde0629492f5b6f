"""The ``consul-connect`` command line: ``dev`` (the embedded agent) and ``demo`` (the main job)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from consul_connect._goduration import parse_duration

__all__ = ["main"]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535: {text!r}")
    return port


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consul-connect",
        description="Connect-native Consul service mesh for Python services.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run the embedded Consul-compatible dev agent")
    dev.add_argument("--http-port", type=_port, default=8500, help="HTTP API port (default 8500)")
    dev.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dev.add_argument("--datacenter", default="dc1", help="datacenter name (default dc1)")
    dev.add_argument("--node-name", default=None, help="node name (default: the hostname)")
    dev.add_argument(
        "--acl-enabled", action="store_true", help="enforce ACLs (implied by the two flags below)"
    )
    dev.add_argument(
        "--acl-default-policy", choices=("allow", "deny"), default=None, help="ACL default policy"
    )
    dev.add_argument(
        "--acl-initial-management-token", default=None, help="secret of the management token"
    )
    dev.add_argument("--data-dir", default=None, help="persist state here (default: in memory)")
    dev.add_argument(
        "--leaf-cert-ttl", type=_duration, default=72 * 3600.0, help="leaf TTL, e.g. 72h"
    )
    dev.add_argument(
        "--json", action="store_true", help="announce the agent as one JSON line (for scripts)"
    )
    dev.add_argument(
        "--log-level",
        default="info",
        choices=("trace", "debug", "info", "warning", "error", "critical"),
    )

    demo = sub.add_parser("demo", help="run the demo on the embedded dev agent")
    demo.add_argument("--json", action="store_true", help="print a JSON summary")

    from consul_connect.cli_tools import add_subcommands

    add_subcommands(sub)
    return parser


def _run_dev(args: argparse.Namespace) -> int:
    from consul_connect.devagent.context import DevAgentConfig
    from consul_connect.devagent.server import serve_forever

    acl_enabled = bool(
        args.acl_enabled or args.acl_default_policy or args.acl_initial_management_token
    )
    kwargs = {}
    if args.node_name:
        kwargs["node_name"] = args.node_name
    config = DevAgentConfig(
        datacenter=args.datacenter,
        bind=args.bind,
        http_port=args.http_port,
        acl_enabled=acl_enabled,
        acl_default_policy=args.acl_default_policy or "allow",
        acl_initial_management_token=args.acl_initial_management_token,
        data_dir=args.data_dir,
        leaf_cert_ttl=args.leaf_cert_ttl,
        log_level=args.log_level,
        **kwargs,
    )
    logging.basicConfig(level=args.log_level.upper() if args.log_level != "trace" else "DEBUG")
    host = f"[{config.bind}]" if ":" in config.bind else config.bind
    if not args.json:
        print(
            f"consul-connect dev agent: datacenter={config.datacenter} node={config.node_name} "
            f"acl={'enabled, default ' + config.acl_default_policy if acl_enabled else 'disabled'}",
            flush=True,
        )

    def announce(address: str) -> None:
        if args.json:
            line = {
                "http_addr": f"http://{address}",
                "consul_http_addr": address,
                "datacenter": config.datacenter,
                "node_name": config.node_name,
                "acl_enabled": acl_enabled,
                "acl_default_policy": config.acl_default_policy,
            }
            print(json.dumps(line), flush=True)
        else:
            print(f"HTTP API on http://{address} (CONSUL_HTTP_ADDR={address})", flush=True)

    try:
        serve_forever(config, announce=announce)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        if exc.filename is not None:
            # Creating or reading --data-dir; a failed bind names no file.
            print(
                f"error: cannot use the data directory {config.data_dir}: {exc.strerror}: "
                f"{exc.filename}",
                file=sys.stderr,
            )
        else:
            print(
                f"error: cannot listen on {host}:{config.http_port}: {exc.strerror}",
                file=sys.stderr,
            )
        return 1
    except ValueError as exc:
        # An unreadable state file in --data-dir.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "dev":
        return _run_dev(args)
    if args.command == "demo":
        from consul_connect.demo import run_demo

        return run_demo(json_output=args.json)
    func = getattr(args, "func", None)
    if func is None:
        return 2
    return int(func(args))


if __name__ == "__main__":
    sys.exit(main())
