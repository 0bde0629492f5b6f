"""The README's quickstart runs as printed (with a free port instead of 21000)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readme_quickstart_prints_hello_web(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S)
    assert found, "the README has a python quickstart block"
    code = found.group(1).replace("21000", str(_free_port()))
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello web"
