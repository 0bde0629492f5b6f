"""Edge cases of the command line: bad input and interruptions end in a message and an exit
status, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from consul_connect import cli as entry
from consul_connect.agent.config import AgentConfig
from consul_connect.devagent import DevAgent, server
from consul_connect.service import ConnectListener, Service
from tests.cli.support import Run, runner


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run one command in-process (:func:`tests.cli.support.runner`)."""
    return runner(capsys, monkeypatch)


def _echo(listener: ConnectListener) -> None:
    """Send back whatever each authorized peer sends, until it hangs up."""
    while True:
        try:
            sock, _identity = listener.accept()
        except OSError:
            return
        with sock:
            try:
                while data := sock.recv(65536):
                    sock.sendall(data)
            except OSError:
                continue


@pytest.fixture
def api(agent: DevAgent) -> Iterator[Service]:
    """A Connect-native ``api`` registered in the agent that echoes its input."""
    svc = Service("api", agent=AgentConfig.from_address(agent.address))
    svc.wait_ready(10)
    listener = svc.listen()
    httpx.put(
        f"{agent.http_addr}/v1/agent/service/register",
        json={
            "Name": "api",
            "Port": listener.address[1],
            "Address": "127.0.0.1",
            "Connect": {"Native": True},
        },
        timeout=10,
    ).raise_for_status()
    thread = threading.Thread(target=_echo, args=(listener,), daemon=True)
    thread.start()
    yield svc
    listener.close()
    svc.close()
    thread.join(5)


# ------------------------------------------------------------------------ agent address


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (["--http-addr", "127.0.0.1:notaport"], {}),
        ([], {"CONSUL_HTTP_ADDR": "127.0.0.1:abc"}),
    ],
    ids=["flag", "environment"],
)
def test_an_agent_address_with_a_bad_port_is_a_config_error(
    cli: Run, flags: list[str], env: dict[str, str]
) -> None:
    res = cli("cert", "web", "--json", *flags, env=env)
    assert res.code == 1
    assert "port" in res.err
    assert res.json()["kind"] == "config"


# ---------------------------------------------------------------------------------- dev


def _must_not_bind(host: str, port: int) -> Any:
    raise AssertionError("the dev command got as far as listening")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_dev_refuses_a_port_out_of_range_as_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        entry.main(["dev", "--http-port", port])
    assert exited.value.code == 2
    assert "--http-port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["cert", ""],
        ["cert", "a/b"],
        ["intention", "create", "", "api"],
        ["intention", "check", "web", "a/b"],
        ["call", "--as", "bad/name", "api"],
        ["dial", "--as", "web", " "],
        ["call", "--as", "web", "api", "--max-bytes", "-1"],
        ["dial", "--as", "web", "api", "--max-bytes", "x"],
    ],
    ids=[
        "empty",
        "slash",
        "empty-source",
        "slash-destination",
        "as",
        "blank-target",
        "negative-max-bytes",
        "max-bytes-not-a-number",
    ],
)
def test_names_and_sizes_the_agent_would_refuse_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Sent on, they come back as an agent 500 that reads like "the agent is failing".
    with pytest.raises(SystemExit) as exited:
        entry.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "not a service name" in err or "max-bytes" in err


@pytest.mark.parametrize(
    "content",
    ['{"version": 1, "index": ', "[]", '{"version": 1}', '{"version": 7}'],
    ids=["truncated", "not-an-object", "missing-fields", "other-version"],
)
def test_dev_reports_an_unreadable_state_file_without_a_traceback(
    content: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(server, "_bind", _must_not_bind)
    (tmp_path / "state.json").write_text(content)
    assert entry.main(["dev", "--data-dir", str(tmp_path), "--log-level", "error"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "state.json" in err


def test_dev_with_a_data_dir_that_is_a_file_blames_the_data_dir_not_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(server, "_bind", _must_not_bind)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert entry.main(["dev", "--data-dir", str(not_a_dir), "--log-level", "error"]) == 1
    err = capsys.readouterr().err
    assert "data directory" in err and "cannot listen" not in err


# ------------------------------------------------------------------------------ call/dial


@pytest.mark.usefixtures("api")
@pytest.mark.parametrize(
    "request_flags",
    [["/a b"], ["-X", "GE T"], ["-H", "Bad Name: v"]],
    ids=["path", "method", "header"],
)
def test_call_with_an_illegal_request_is_a_config_error(
    cli: Run, agent: DevAgent, request_flags: list[str]
) -> None:
    res = cli("call", "--as", "web", "api", *request_flags, "--json", "--http-addr", agent.address)
    assert res.code == 1
    assert res.json()["kind"] == "config"


@pytest.mark.usefixtures("api")
def test_ctrl_c_during_dial_exits_130_without_a_fatal_error(agent: DevAgent) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "consul_connect.cli", "dial", "--as", "web", "api", "-v"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "CONSUL_HTTP_ADDR": agent.address},
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith(b"connected to ")
        # stdin stays open: the command is waiting for input when the user presses Ctrl-C.
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert "Fatal Python error" not in err and "Traceback" not in err
    assert code == 130
