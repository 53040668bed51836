"""Migrations: every earlier schema, from frozen files, reaches the current one keeping its data; a step is atomic."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from edgeforward.store import SCHEMA_VERSION, Buffer
from edgeforward.store import schema as schema_module
from edgeforward.store.recovery import recover_file

FIXTURES = Path(__file__).parent / "data" / "buffers"


def rows(path: Path, query: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.execute(query).fetchall())


@pytest.mark.parametrize("version", [1, 2, 3, 5, 6])
async def test_frozen_file_of_each_earlier_version_is_migrated_keeping_everything(tmp_path: Path, version: int) -> None:
    path = tmp_path / "buffer.db"
    shutil.copyfile(FIXTURES / f"buffer-v{version}.db", path)
    readings = 5 if version == 6 else 0  # buffer-v6.db: 5 readings of pin 2 on top (tests/data/buffers/README)
    buf = Buffer(path)
    await buf.open()
    assert buf.recovery is None  # migrated, never taken for a damaged or foreign file
    counts = await buf.ledger("pump")
    assert counts["received"] == 61 + readings and counts["queued"] == 50 + readings and counts["rejected"] == 1
    assert len(await buf.oldest("pump", 1, 100)) == 50
    assert len(await buf.oldest("pump", 2, 100)) == readings
    assert await buf.remembered_server("unused") is None
    await buf.close()
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows(path, "PRAGMA auto_vacuum") == [(2,)]
    assert rows(path, "SELECT COUNT(*) FROM deadletter") == [(1,)]
    assert rows(path, "SELECT COUNT(*) FROM import_seen") == [(50 if version >= 3 else 0,)]
    newest = int(str(rows(path, "SELECT MAX(id) FROM points")[0][0]))
    if version < 6:
        # Every point of an older file is filed (in the pin index); the mark is past the newest one.
        assert rows(path, "SELECT COUNT(*) FROM points WHERE filed = 1") == [(50,)]
        assert rows(path, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'filed_below'") == [(newest + 1,)]
    # Every point of an older file is counted in its ledger: the counting mark is past the newest one.
    assert rows(path, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'counted_below'") == [(newest + 1,)]
    if version == 5:
        assert rows(path, "SELECT port, seq, ms FROM resend_window") == [("/dev/ttyUSB0", 7, 1234)]


def test_a_step_that_fails_leaves_the_file_at_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buffer.db"
    shutil.copyfile(FIXTURES / "buffer-v3.db", path)
    broken = "CREATE TABLE IF NOT EXISTS import_seen (device TEXT) WITHOUT ROWID; SELECT no_such_function();"
    steps = tuple(
        (v, (lambda conn: schema_module._in_one_transaction(conn, broken, 4)) if v == 4 else step)
        for v, step in schema_module.MIGRATIONS
    )
    monkeypatch.setattr(schema_module, "MIGRATIONS", steps)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn, pytest.raises(sqlite3.Error):
        schema_module.migrate(conn)
    assert rows(path, "PRAGMA user_version") == [(3,)]  # the step and its stamp went together, or neither


def test_a_new_file_gets_the_whole_schema_and_its_version_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        schema_module.migrate(conn)
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows(path, "PRAGMA page_size") == [(schema_module.PAGE_SIZE_BYTES,)]
    tables = {name for (name,) in rows(path, "SELECT name FROM sqlite_schema WHERE type = 'table'")}
    assert tables == set(schema_module.expected_columns())
    # The recovery's list of tables without a rowid is the schema's own (SQLite says which have none).
    without_rowid = {
        name for name in tables if not rows(path, f"SELECT 1 FROM pragma_table_list WHERE name = '{name}' AND wr = 0")
    }
    assert without_rowid == schema_module.WITHOUT_ROWID_TABLES


async def test_recovery_keeps_what_was_imported(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    shutil.copyfile(FIXTURES / "buffer-v3.db", path)
    buf = Buffer(path)
    await buf.open()
    await buf.close()
    recover_file(path, "test: salvage every table")
    assert rows(path, "SELECT COUNT(*) FROM import_seen") == [(50,)]
    assert rows(path, "SELECT COUNT(*) FROM points") == [(50,)]
