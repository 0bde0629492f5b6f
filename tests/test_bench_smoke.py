"""The benchmark harness runs end to end at tiny sizes (so it cannot rot).

The numbers are not judged here: benchmarks are not pass/fail. What must hold is that
the one command runs, measures the native path in both modes without failed requests,
runs the micro-benchmarks and the rotation, and writes its JSON and Markdown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.timeout(150)
def test_smoke_run_measures_native_path_and_writes_results(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        timeout=140,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for mode in ("conn", "keep"):
        for name in ("plain", "mtls", "native-intentions", "native-agent"):
            runs = results["raw"][mode][name]
            assert runs, (mode, name)
            assert all(r["requests"] > 0 for r in runs), (mode, name, runs)
            assert all(r["failures"] == 0 for r in runs), (mode, name, runs)
    # The resuming native client really resumes (nginx and uvloop are optional).
    resumed = results["raw"]["conn"]["native-intentions+resume"]
    assert all(r["failures"] == 0 for r in resumed), resumed
    assert all(r["sessions_offered"] > 0 for r in resumed), resumed
    # Without +resume the native client makes full handshakes only.
    full = results["raw"]["conn"]["native-intentions"]
    assert all(r["sessions_offered"] == 0 for r in full), full
    # Latency at a fixed rate: paced keep-alive runs near the asked rate, none failed.
    rate = results["config"]["rate"]
    for name in ("plain", "native-intentions"):
        paced = results["raw"]["rate"][name]
        assert all(r["failures"] == 0 and r["requests"] > 0 for r in paced), (name, paced)
        assert all(r["rps"] < rate * 1.5 for r in paced), (name, paced)
    if "uvloop" in sys.modules or _importable("uvloop"):
        for mode in ("conn", "keep"):  # server and client on uvloop
            uv = results["raw"][mode]["native-intentions-uvloop"]
            assert all(r["requests"] > 0 and r["failures"] == 0 for r in uv), uv
    two = results["twohost"]
    if shutil.which("cc") and Path("/usr/include/openssl/ssl.h").exists():
        for mode in ("conn", "keep"):
            for name in ("plain", "mtls", "native-intentions"):
                runs = two["raw"][mode][name]
                assert all(r["requests"] > 0 and r["failures"] == 0 for r in runs), runs
                # The server side is pinned to one core.
                assert all(r["server_cpu_s"] <= 1.2 * r["window_s"] + 0.05 for r in runs), runs
        # The C client resumes against the ticket-sending server, and cannot against
        # the full-handshake one (Service(session_tickets=False)).
        assert all(r["resumed"] > 0 for r in two["raw"]["conn"]["native-intentions+resume"])
        assert all(r["resumed"] == 0 for r in two["raw"]["conn"]["native-intentions"])
        assert all(r["handshakes"] > 0 for r in two["raw"]["conn"]["native-intentions"])
    else:
        assert "skipped" in two
    for mode in ("conn", "conn+resume"):
        rotation = results["rotation"][mode]
        assert rotation["requests"] > 0, mode
        assert rotation["failures"] == 0, (mode, rotation["errors"])
    micro = results["micro"]
    assert micro["authz"]["10"]["authorizer_decide"]["median_us"] > 0
    scale = micro["scale_shipped"]
    assert scale["ready"] == scale["services"]
    assert scale["roots_watch_hubs"] == 1
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Targets" in text
    assert "## Two-host view: one server core" in text
    assert "native-intentions" in text
