"""A crash-safe home for small mutable state: consumer cursors, in-flight tasks, dedup windows.

SQLite from the standard library in WAL mode with ``synchronous=FULL``: every ``put`` that
returned is committed and fsynced, survives ``kill -9`` and a power cut, and a crash mid-write
leaves the previous value (SQLite's journal makes every transaction atomic). Values are
msgpack-encoded, keys are strings in a namespace (one namespace per consumer, task queue...).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack

from mesh.errors import ClosedError, StateError

_WAL_LIMIT = 4 << 20  # bytes of write-ahead log kept after a checkpoint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    ns    TEXT NOT NULL,
    key   TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID
"""


class StateStore:
    """Namespaced key/value store with msgpack values; thread-safe; context manager.

    Args:
        path: the database file (its directory is created when missing).

    Raises:
        StateError: the database cannot be opened or is not a state store.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        try:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # The write-ahead file is cut back to this after each checkpoint; without it, it
            # keeps the size of the largest transaction (or checkpoint backlog) forever.
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            self._db.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot open state store {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ClosedError(f"state store {self.path} is closed")
        return self._db

    @staticmethod
    def _encode(value: Any) -> bytes:
        try:
            return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
        except (TypeError, ValueError, OverflowError) as exc:
            raise StateError(f"value cannot be stored (not msgpack-encodable): {exc}") from exc

    @staticmethod
    def _decode(blob: bytes) -> Any:
        try:
            return msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types on bad bytes
            raise StateError(f"stored value cannot be decoded: {exc}") from exc

    def get(self, ns: str, key: str, default: Any = None) -> Any:
        """The value of ``key`` in namespace ``ns``, or ``default``.

        Raises:
            StateError: the database failed or holds an undecodable value.
            ClosedError: the store is closed.
        """
        with self._lock:
            try:
                row = self._conn().execute(
                    "SELECT value FROM kv WHERE ns=? AND key=?", (ns, key)).fetchone()
            except sqlite3.Error as exc:
                raise StateError(f"state get {ns}/{key} failed: {exc}") from exc
        return default if row is None else self._decode(row[0])

    def put(self, ns: str, key: str, value: Any) -> None:
        """Store ``value`` (committed and fsynced when this returns).

        Raises:
            StateError: the value is not msgpack-encodable or the database failed.
            ClosedError: the store is closed.
        """
        self.put_many(ns, {key: value})

    def put_many(self, ns: str, mapping: Mapping[str, Any]) -> None:
        """Store every item of ``mapping`` in one transaction: all or none survive a crash.

        Raises:
            StateError: a value is not msgpack-encodable or the database failed.
            ClosedError: the store is closed.
        """
        rows = [(ns, str(k), self._encode(v)) for k, v in mapping.items()]
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany(
                        "INSERT INTO kv (ns, key, value) VALUES (?, ?, ?) "
                        "ON CONFLICT (ns, key) DO UPDATE SET value=excluded.value", rows)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateError(f"state put in {ns} failed: {exc}") from exc

    def delete(self, ns: str, key: str) -> bool:
        """Remove ``key``; True when it existed.

        Raises:
            StateError: the database failed.
            ClosedError: the store is closed.
        """
        with self._lock:
            try:
                cur = self._conn().execute("DELETE FROM kv WHERE ns=? AND key=?", (ns, key))
            except sqlite3.Error as exc:
                raise StateError(f"state delete {ns}/{key} failed: {exc}") from exc
        return cur.rowcount > 0

    def items(self, ns: str) -> Iterator[tuple[str, Any]]:
        """The (key, value) pairs of namespace ``ns``, sorted by key (a snapshot).

        Raises:
            StateError: the database failed.
            ClosedError: the store is closed.
        """
        with self._lock:
            try:
                rows = self._conn().execute(
                    "SELECT key, value FROM kv WHERE ns=? ORDER BY key", (ns,)).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"state items of {ns} failed: {exc}") from exc
        return iter([(k, self._decode(v)) for k, v in rows])

    def namespaces(self) -> list[str]:
        """Every namespace holding at least one key, sorted.

        Raises:
            StateError: the database failed.
        """
        with self._lock:
            try:
                rows = self._conn().execute("SELECT DISTINCT ns FROM kv ORDER BY ns").fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"state namespaces failed: {exc}") from exc
        return [r[0] for r in rows]

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._db is not None:
                try:
                    self._db.close()
                finally:
                    self._db = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
