"""A tiny run of the dev agent benchmark, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_devagent_benchmark_runs_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "devagent.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "devagent_bench.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--queries", "20", "--leaves", "5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["blocking"]["held_open"] == 20
    assert result["blocking"]["returned_on_change"] == 20
    assert result["signing"]["agent_leaves_per_second"] > 0
