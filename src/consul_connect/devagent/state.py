"""The dev agent's state store: tables of JSON-able records, a raft-like index, watch sets.

Every write bumps one monotonically increasing index and records it as the
index of each table it touched. Blocking queries wait on the tables they read
(one ``asyncio.Event`` per table, replaced on each change) and re-run when any
of them changes. With a data directory, every acknowledged write is on disk
(written to a temporary file, fsynced, renamed over the old one) before the
write returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["Store"]

_STATE_FILE = "state.json"
_FORMAT_VERSION = 1


class Store:
    """In-memory tables with one raft-like index and per-table watch sets.

    ``tables[name]`` is a ``dict`` of JSON-able records that endpoint modules own
    and mutate directly, then call :meth:`commit` naming the tables they changed.
    Only the event-loop thread of the dev agent touches a Store. With ``data_dir``,
    construction raises ``OSError`` if the directory cannot be used and ``ValueError``
    if its state file is damaged.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        self.index: int = 1
        self.tables: dict[str, dict[str, Any]] = {}
        self.table_index: dict[str, int] = {}
        self.meta: dict[str, Any] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._closed = False
        self._unsaved: list[tuple[str, str, tuple[str, ...]]] = []
        self._data_dir = Path(data_dir) if data_dir is not None else None
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._load()

    # -- tables ---------------------------------------------------------------

    def table(self, name: str) -> dict[str, Any]:
        """Return the (mutable) table ``name``, creating it empty."""
        t = self.tables.get(name)
        if t is None:
            t = self.tables[name] = {}
        return t

    def commit(self, *tables: str, persist: bool = True) -> int:
        """Record a write to ``tables``: bump the index, wake their watchers, persist.

        Returns the new index (the ``ModifyIndex`` of what was written).
        """
        self.index += 1
        for name in tables:
            self.table_index[name] = self.index
        if persist:
            self.save()
        for name in tables:
            ev = self._events.pop(name, None)
            if ev is not None:
                ev.set()
        return self.index

    def next_index(self) -> int:
        """Return the index the next :meth:`commit` will produce (for CreateIndex fields)."""
        return self.index + 1

    def max_index(self, *tables: str) -> int:
        """Return the highest index among ``tables``; never 0 (Consul rewrites 0 to 1)."""
        return max([self.table_index.get(t, 0) for t in tables] + [1])

    def touch(self, *tables: str) -> None:
        """Wake watchers of ``tables`` without changing anything (e.g. a TTL expiry)."""
        for name in tables:
            ev = self._events.pop(name, None)
            if ev is not None:
                ev.set()

    # -- watching -------------------------------------------------------------

    def watch(self, tables: Iterable[str]) -> list[asyncio.Event]:
        """Return the events that fire on the next change of any of ``tables``."""
        out = []
        for name in tables:
            ev = self._events.get(name)
            if ev is None:
                ev = self._events[name] = asyncio.Event()
                if self._closed:
                    ev.set()
            out.append(ev)
        return out

    async def wait_any(self, events: list[asyncio.Event], timeout: float) -> bool:
        """Wait until one of ``events`` fires or ``timeout`` passes; True if one fired."""
        if self._closed or any(e.is_set() for e in events):
            return True
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            return bool(done)
        finally:
            for w in waiters:
                w.cancel()

    def close(self) -> None:
        """Wake every blocked query (the agent is shutting down)."""
        self._closed = True
        for ev in self._events.values():
            ev.set()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- persistence ----------------------------------------------------------

    def keep_in_memory(self, table: str, record: str, *path: str) -> None:
        """Never write this field (``tables[table][record][path...]``) to the data directory.

        For private keys: they live in memory only, and a restarted agent does
        not find them.
        """
        self._unsaved.append((table, record, path))

    def _tables_for_file(self) -> dict[str, dict[str, Any]]:
        tables = self.tables
        for table, record, path in self._unsaved:
            rec = tables.get(table, {}).get(record)
            if not isinstance(rec, dict):
                continue
            if tables is self.tables:
                tables = dict(tables)
            tables[table] = dict(tables[table])
            tables[table][record] = _without(rec, path)
        return tables

    def save(self) -> None:
        """Write the state atomically to the data directory (no-op without one).

        Fields named with :meth:`keep_in_memory` are left out.
        """
        if self._data_dir is None:
            return
        doc = {
            "version": _FORMAT_VERSION,
            "index": self.index,
            "table_index": self.table_index,
            "tables": self._tables_for_file(),
            "meta": self.meta,
        }
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        final = self._data_dir / _STATE_FILE
        tmp = self._data_dir / (_STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(self._data_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _load(self) -> None:
        assert self._data_dir is not None
        path = self._data_dir / _STATE_FILE
        with contextlib.suppress(FileNotFoundError):
            # A leftover .tmp is an unacknowledged write: the rename never happened.
            (self._data_dir / (_STATE_FILE + ".tmp")).unlink()
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the dev agent state in {path}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported dev agent state format in {path}")
        try:
            index = int(doc["index"])
            table_index = {k: int(v) for k, v in doc["table_index"].items()}
            tables = doc["tables"]
            meta = doc.get("meta", {})
            if not isinstance(tables, dict) or not isinstance(meta, dict):
                raise TypeError("tables and meta must be objects")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"damaged dev agent state in {path}: {exc!r}") from exc
        self.index, self.table_index, self.tables, self.meta = index, table_index, tables, meta


def _without(rec: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``rec`` without the field at ``path`` (only the dicts on the path copied)."""
    out = dict(rec)
    head, rest = path[0], path[1:]
    if head not in out:
        return out
    if rest:
        inner = out[head]
        if isinstance(inner, dict):
            out[head] = _without(inner, rest)
    else:
        del out[head]
    return out
