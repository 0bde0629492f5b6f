"""Running ``consul-connect`` sub-commands in-process, for the CLI tests."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from consul_connect.cli_tools import add_subcommands

ENV = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")


@dataclass
class Result:
    """What one command returned and printed."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consul-connect")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def runner(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv, stdin=b"", env=None)``: one command, with ``stdin`` as standard input
    and ``env`` set for it; no ``CONSUL_HTTP_*`` variable of the test process leaks in."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> Result:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        args = _parser().parse_args(list(argv))
        code = args.func(args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
