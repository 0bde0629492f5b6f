"""The dev agent's store: index, watch sets and crash-safe persistence."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from consul_connect.devagent.state import Store


def test_commit_bumps_one_index_and_records_it_per_table() -> None:
    s = Store()
    first = s.commit("a")
    second = s.commit("b")
    assert second == first + 1
    assert s.max_index("a") == first
    assert s.max_index("a", "b") == second
    assert s.max_index("never-written") == 1


async def test_watch_fires_only_for_the_tables_watched() -> None:
    s = Store()
    [ev_a] = s.watch(["a"])
    [ev_b] = s.watch(["b"])
    s.commit("b")
    assert ev_b.is_set() and not ev_a.is_set()
    assert await s.wait_any([ev_a], 0.05) is False


async def test_close_wakes_every_waiter() -> None:
    s = Store()
    events = s.watch(["a"])
    waiter = asyncio.create_task(s.wait_any(events, 30))
    await asyncio.sleep(0)
    s.close()
    assert await asyncio.wait_for(waiter, 5) is True


def test_state_survives_a_restart(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.table("things")["x"] = {"Value": 1}
    idx = s.commit("things")
    again = Store(tmp_path)
    assert again.table("things") == {"x": {"Value": 1}}
    assert again.index == idx
    assert again.max_index("things") == idx


def test_an_interrupted_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.table("things")["x"] = {"Value": 1}
    s.commit("things")
    # A crash after writing the temporary file but before the rename.
    (tmp_path / "state.json.tmp").write_text('{"version": 1, "index": 999, "tab')
    again = Store(tmp_path)
    assert again.table("things") == {"x": {"Value": 1}}
    assert not (tmp_path / "state.json.tmp").exists()


def test_state_file_is_private(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.commit("a")
    mode = (tmp_path / "state.json").stat().st_mode & 0o777
    assert mode == 0o600
    assert json.loads((tmp_path / "state.json").read_text())["index"] == s.index
