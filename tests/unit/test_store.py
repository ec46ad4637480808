"""The state store: schema migrations, including the v1 -> v2 carry-over of record files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from arktos_vm_runtime.service import store as store_mod
from arktos_vm_runtime.service.store import SCHEMA_VERSION, Store, StoreError


def _v1_store(root: Path) -> None:
    """A state.db exactly as version 1 of the runtime left it, with one sandbox."""
    db = sqlite3.connect(root / "state.db", isolation_level=None)
    store_mod.MIGRATIONS[0](db, root)
    db.execute("INSERT INTO sandboxes (id, data) VALUES ('sb1', '{\"id\": \"sb1\"}')")
    db.execute("PRAGMA user_version=1")
    db.close()


def test_new_store_is_at_the_current_version(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    assert s.schema_version == SCHEMA_VERSION
    s.put("networks", "sb1", {"sandbox_id": "sb1"})
    assert s.get("networks", "sb1") == {"sandbox_id": "sb1"}


def test_v2_carries_network_and_image_files_over(tmp_path: Path) -> None:
    _v1_store(tmp_path)
    net = tmp_path / "networks" / "sb1"
    net.mkdir(parents=True)
    (net / "network.json").write_text(json.dumps({"sandbox_id": "sb1", "version": 1}))
    (net / "dnsmasq.conf").write_text("artefact, not a record\n")
    bad = tmp_path / "networks" / "sb2"
    bad.mkdir()
    (bad / "network.json").write_text("{not json")
    names = tmp_path / "images" / "names"
    names.mkdir(parents=True)
    entry = {"name": "example.test/img.qcow2", "digest": "ab" * 32, "url": "http://x/",
             "pulled_at": "now", "virtual_size": 1, "format": "qcow2"}
    (names / "n1.json").write_text(json.dumps(entry))

    s = Store(tmp_path / "state.db")

    assert s.schema_version == SCHEMA_VERSION
    assert s.get("sandboxes", "sb1") == {"id": "sb1"}  # v1 records untouched
    assert s.get("networks", "sb1") == {"sandbox_id": "sb1", "version": 1}
    assert s.get("image_names", "example.test/img.qcow2") == entry
    # carried files are gone, artefacts and unreadable files stay for an operator
    assert not (net / "network.json").exists()
    assert (net / "dnsmasq.conf").exists()
    assert (bad / "network.json").exists()
    assert s.get("networks", "sb2") is None
    assert not (names / "n1.json").exists()


def test_a_newer_store_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this runtime"):
        Store(tmp_path / "state.db")


def test_put_many_is_one_transaction(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    s.put_many("containers", [("c1", {"id": "c1"}, {"sandbox_id": "s1"}),
                              ("c2", {"id": "c2"}, {"sandbox_id": "s1"})])
    assert s.all("containers") == [{"id": "c1"}, {"id": "c2"}]
    with pytest.raises(sqlite3.IntegrityError):  # the second row lacks its column
        s.put_many("containers", [("c1", {"id": "c1", "v": 2}, {"sandbox_id": "s1"}),
                                  ("c3", {"id": "c3"}, {})])
    assert s.get("containers", "c1") == {"id": "c1"}, "all or nothing"
    assert s.get("containers", "c3") is None


def test_v3_adds_the_snapshots_table_to_a_v2_store(tmp_path: Path) -> None:
    """A state.db exactly as version 2 left it (one sandbox, one container) gains the
    snapshots table; the records it held are untouched."""
    db = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    store_mod.MIGRATIONS[0](db, tmp_path)
    store_mod.MIGRATIONS[1](db, tmp_path)
    db.execute("INSERT INTO sandboxes (id, data) VALUES ('sb1', '{\"id\": \"sb1\"}')")
    db.execute("INSERT INTO containers (id, sandbox_id, data) VALUES ('c1', 'sb1', "
               "'{\"id\": \"c1\"}')")
    db.execute("PRAGMA user_version=2")
    with pytest.raises(sqlite3.OperationalError):
        db.execute("SELECT * FROM snapshots")
    db.close()

    s = Store(tmp_path / "state.db")

    assert s.schema_version == SCHEMA_VERSION == 3
    assert s.get("sandboxes", "sb1") == {"id": "sb1"}
    assert s.get("containers", "c1") == {"id": "c1"}
    s.put("snapshots", "c1/a", {"snapshot_id": "a"}, container_id="c1")
    s.put("snapshots", "c1/b", {"snapshot_id": "b"}, container_id="c1")
    s.put("snapshots", "c2/a", {"snapshot_id": "a"}, container_id="c2")
    assert s.all_by("snapshots", "container_id", "c1") == [{"snapshot_id": "a"},
                                                           {"snapshot_id": "b"}]
    s.delete_many("snapshots", ["c1/a", "c1/b", "c1/missing"])
    assert s.all_by("snapshots", "container_id", "c1") == []
    assert s.count("snapshots") == 1
    s.close()
    reopened = Store(tmp_path / "state.db")  # at the current version: no migration again
    assert reopened.count("snapshots") == 1
