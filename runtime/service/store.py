"""The state store: what the runtime has made, recorded before it is made.

SQLite in WAL mode with synchronous=FULL: a committed write survives kill -9 and power
loss, and a write cut short by kill -9 is rolled back on the next open. Records are JSON
documents keyed by id; the few columns outside the JSON are the ones queried by. The
schema version lives in PRAGMA user_version and MIGRATIONS brings an old file up to date.
The connection is shared by the event loop's worker threads, so every access holds a lock.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A migration changes the schema inside one transaction. It gets the state directory, so it
# can carry records over from files an older version kept, and returns the files to delete
# once its transaction has committed (a crash before that leaves them, unread, behind).
Migration = Callable[[sqlite3.Connection, Path], list[Path]]


def _v1(db: sqlite3.Connection, root: Path) -> list[Path]:
    db.execute("CREATE TABLE sandboxes (id TEXT PRIMARY KEY, data TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE containers (id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, "
        "data TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX containers_by_sandbox ON containers (sandbox_id)")
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    return []


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.error("state file %s cannot be read (%s); leaving it for an operator", path, e)
        return None
    if not isinstance(data, dict):
        log.error("state file %s holds no JSON object; leaving it for an operator", path)
        return None
    return data


def _v2(db: sqlite3.Connection, root: Path) -> list[Path]:
    """Pod network state and image names move into the store from the files version 1
    kept: <root>/networks/<sandbox id>/network.json and <root>/images/names/<sha>.json."""
    db.execute("CREATE TABLE networks (id TEXT PRIMARY KEY, data TEXT NOT NULL)")
    db.execute("CREATE TABLE image_names (id TEXT PRIMARY KEY, digest TEXT NOT NULL, "
               "data TEXT NOT NULL)")
    db.execute("CREATE INDEX image_names_by_digest ON image_names (digest)")
    carried: list[Path] = []
    for path in sorted((root / "networks").glob("*/network.json")):
        data = _read_json(path)
        if data is None or data.get("sandbox_id") != path.parent.name:
            continue
        db.execute("INSERT OR REPLACE INTO networks (id, data) VALUES (?, ?)",
                   (path.parent.name, json.dumps(data, sort_keys=True)))
        carried.append(path)
    for path in sorted((root / "images" / "names").glob("*.json")):
        data = _read_json(path)
        if data is None or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("digest"), str):
            continue
        db.execute("INSERT OR REPLACE INTO image_names (id, digest, data) VALUES (?, ?, ?)",
                   (data["name"], data["digest"], json.dumps(data, sort_keys=True)))
        carried.append(path)
    if carried:
        log.info("state store: carried %d record file(s) over from the previous version",
                 len(carried))
    return carried


def _v3(db: sqlite3.Connection, root: Path) -> list[Path]:
    """VM snapshots (CreateSnapshot): one row per snapshot, id '<container id>/<snapshot
    id>' (a snapshot id has no '/'), listed by container."""
    db.execute("CREATE TABLE snapshots (id TEXT PRIMARY KEY, container_id TEXT NOT NULL, "
               "data TEXT NOT NULL)")
    db.execute("CREATE INDEX snapshots_by_container ON snapshots (container_id)")
    return []


# MIGRATIONS[n] takes a store at version n to version n + 1. Append; never edit.
MIGRATIONS: list[Migration] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)

TABLES = ("sandboxes", "containers", "networks", "image_names", "snapshots")
# The columns outside the JSON that rows are selected by.
_COLUMNS = {"containers": ("sandbox_id",), "image_names": ("digest",),
            "snapshots": ("container_id",)}


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"state store {self.path} has schema version {version}, newer than this "
                    f"runtime's {SCHEMA_VERSION}; refusing to downgrade it"
                )
            for n in range(version, SCHEMA_VERSION):
                with self.transaction() as db:
                    carried = MIGRATIONS[n](db, self.path.parent)
                    db.execute(f"PRAGMA user_version={n + 1}")
                for path in carried:
                    path.unlink(missing_ok=True)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put(self, table: str, id_: str, data: dict[str, Any], **columns: str) -> None:
        assert table in TABLES
        names = ["id", "data", *columns]
        values = [id_, json.dumps(data, sort_keys=True), *columns.values()]
        marks = ",".join("?" * len(names))
        with self.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO {table} ({','.join(names)}) VALUES ({marks})", values
            )

    def put_many(self, table: str, rows: Iterable[tuple[str, dict[str, Any], dict[str, str]]]
                 ) -> None:
        """Several puts (id, data, columns) in one transaction: one commit, one fsync."""
        assert table in TABLES
        with self.transaction() as db:
            for id_, data, columns in rows:
                names = ["id", "data", *columns]
                values = [id_, json.dumps(data, sort_keys=True), *columns.values()]
                marks = ",".join("?" * len(names))
                db.execute(f"INSERT OR REPLACE INTO {table} ({','.join(names)}) "
                           f"VALUES ({marks})", values)

    def update(self, table: str, id_: str, data: dict[str, Any], **columns: str) -> bool:
        """Replaces the row `id_` if it exists; never inserts one. False when there was no
        row: a writer holding a record read before the row was deleted (a StopPodSandbox
        that overlapped RemovePodSandbox) cannot bring it back."""
        return self.update_many(table, [(id_, data, columns)]) == 1

    def update_many(self, table: str,
                    rows: Iterable[tuple[str, dict[str, Any], dict[str, str]]]) -> int:
        """Several updates in one transaction; rows whose id is gone are skipped. Returns
        how many rows were updated."""
        assert table in TABLES
        updated = 0
        with self.transaction() as db:
            for id_, data, columns in rows:
                sets = ",".join(f"{name}=?" for name in ("data", *columns))
                values = [json.dumps(data, sort_keys=True), *columns.values(), id_]
                updated += db.execute(f"UPDATE {table} SET {sets} WHERE id=?",
                                      values).rowcount
        return updated

    def count(self, table: str) -> int:
        assert table in TABLES
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def get(self, table: str, id_: str) -> dict[str, Any] | None:
        assert table in TABLES
        with self._lock:
            row = self._db.execute(f"SELECT data FROM {table} WHERE id=?", (id_,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def all(self, table: str) -> list[dict[str, Any]]:
        assert table in TABLES
        with self._lock:
            rows = self._db.execute(f"SELECT data FROM {table} ORDER BY id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def all_by(self, table: str, column: str, value: str) -> list[dict[str, Any]]:
        """The rows whose indexed `column` (one of the table's own columns) is `value`."""
        assert table in TABLES and column in _COLUMNS.get(table, ())
        with self._lock:
            rows = self._db.execute(f"SELECT data FROM {table} WHERE {column}=? ORDER BY id",
                                    (value,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete(self, table: str, id_: str) -> None:
        self.delete_many(table, [id_])

    def delete_many(self, table: str, ids: Iterable[str]) -> None:
        """Deletes the rows `ids` in one transaction (missing ones are no error)."""
        assert table in TABLES
        with self.transaction() as db:
            for id_ in ids:
                db.execute(f"DELETE FROM {table} WHERE id=?", (id_,))

    def set_setting(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def setting(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
