"""Every example under ``examples/`` runs standalone and does what its README says.

Each ``main.py`` runs in a fresh interpreter with every ``CONSUL_*`` variable removed,
so it starts its own embedded dev agent; it must exit 0 and print the lines that show
the behaviour it demonstrates. The optional-dependency examples must also skip cleanly
(exit 0, say why) when their package cannot be imported.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
RUN_TIMEOUT = 40.0

# example folder -> lines (substrings) its output must contain, in this order
EXPECTED: dict[str, list[str]] = {
    "echo-asyncio": [
        "client: connected; server proved it is spiffe://",
        "/svc/echo-client sent 'hello over mTLS'",
        "client: got back 'hello over mTLS'",
        "echo example: OK",
    ],
    "sync-sockets": [
        "caller: connected; server proved it is spiffe://",
        "caller: got 'hello caller, you are caller'",
        "sync example: OK",
    ],
    "fastapi-or-asgi": [
        "GET  /orders/7 -> 200",
        "POST /orders   -> 403 Forbidden by Consul intentions",
        "asgi example: OK",
    ],
    "requests-client": [
        "reports: GET /invoices/7 -> 200",
        "/svc/reports'",
        "requests example: OK",
    ],
    "aiohttp": ["warehouse: GET /stock/bolts -> 200", "aiohttp example: OK"],
    "grpc": ["frontend: got 'hello frontend, you are frontend'", "grpc example: OK"],
    "intentions": [
        "auditor: long-lived connection open, round trip ok=True",
        "auditor: the open connection was cut (read returned b'')",
        "auditor: a new connection is refused: True",
        "auditor: new connections work again",
        "intentions example: OK",
    ],
    "testing-with-devagent": ["4 passed", "testing example: OK"],
}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def _assert_in_order(output: str, expected: list[str]) -> None:
    position = 0
    for line in expected:
        found = output.find(line, position)
        assert found != -1, f"missing (in order) {line!r} in:\n{output}"
        position = found + len(line)


def test_every_example_folder_has_a_readme_and_a_main_and_is_run_here() -> None:
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and p.name[0] not in "._")
    assert folders == sorted(EXPECTED)
    for name in folders:
        assert (EXAMPLES / name / "README.md").is_file(), name
        assert (EXAMPLES / name / "main.py").is_file(), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_standalone_and_shows_its_behaviour(name: str, tmp_path: Path) -> None:
    result = _run([str(EXAMPLES / name / "main.py")], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    _assert_in_order(result.stdout, EXPECTED[name])


# Runs an example with one package made unimportable, as if it were not installed.
_WITHOUT = """
import runpy, sys
blocked = sys.argv[1]

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Missing())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    ("name", "package", "message"),
    [
        ("aiohttp", "aiohttp", "aiohttp example: skipped"),
        ("grpc", "grpc", "grpc example: skipped"),
    ],
)
def test_optional_example_skips_cleanly_without_its_package(
    name: str, package: str, message: str, tmp_path: Path
) -> None:
    result = _run(["-c", _WITHOUT, package, str(EXAMPLES / name / "main.py")], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert message in result.stdout
    assert "started an embedded dev agent" not in result.stdout


def test_quickstart_snippet_in_the_docs_runs(tmp_path: Path) -> None:
    text = (DOCS / "quickstart.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert snippet is not None, "no python block in docs/quickstart.md"
    code = snippet.group(1)
    assert "9443" in code
    # The snippet uses a fixed port for readability; a free one keeps CI runs independent.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace("9443", str(port)))
    result = _run([str(script)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^hello web from spiffe://\S+/svc/api$", result.stdout, re.MULTILINE), (
        result.stdout
    )


def test_docs_index_links_every_doc_and_relative_links_resolve() -> None:
    index = (DOCS / "index.md").read_text()
    pages = sorted(DOCS.glob("*.md")) + sorted((DOCS / "integrations").glob("*.md"))
    for page in pages:
        if page.name == "index.md":
            continue
        relative = page.relative_to(DOCS).as_posix()
        assert f"]({relative})" in index, f"docs/index.md does not link {relative}"
    for page in [*pages, *EXAMPLES.glob("*/README.md"), EXAMPLES / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page}: broken link {target}"
