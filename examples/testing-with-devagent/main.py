"""Run this folder's example tests (``test_my_service.py``) with pytest.

The tests use the ``consul_dev_agent`` / ``consul_dev_agent_factory`` fixtures that
installing consul-connect registers with pytest, and ``TestCA`` for tests without an
agent. They always start their own embedded agents: ``CONSUL_HTTP_ADDR`` is not used.
Exit status is pytest's (0 when every test passed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    tests = HERE / "test_my_service.py"
    print(f"running pytest on {tests.name}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            str(tests),
        ],
        cwd=HERE,
        timeout=60,
        check=False,
    )
    if result.returncode == 0:
        print("testing example: OK")
    else:
        print(f"testing example: pytest exited with status {result.returncode}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
