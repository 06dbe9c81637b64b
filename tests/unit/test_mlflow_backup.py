"""MLflow sqlite backup/restore on a local path (the S3 path is in tests/integration)."""
import sqlite3

import pytest

from rn50.io import mlflow_backup


def _make_db(path, rows):
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE IF NOT EXISTS runs (name TEXT)")
    connection.executemany("INSERT INTO runs VALUES (?)", [(r,) for r in rows])
    connection.commit()
    connection.close()


def _rows(path):
    connection = sqlite3.connect(path)
    try:
        return [r[0] for r in connection.execute("SELECT name FROM runs ORDER BY name")]
    finally:
        connection.close()


def test_backup_then_restore_on_a_fresh_head(tmp_path):
    db, copy = tmp_path / "head" / "mlflow.db", str(tmp_path / "bucket" / "mlflow.db")
    db.parent.mkdir()
    _make_db(db, ["a", "b"])
    mlflow_backup.backup(db, copy)
    fresh = tmp_path / "new-head" / "mlflow.db"
    assert mlflow_backup.restore(fresh, copy) is True
    assert _rows(fresh) == ["a", "b"]


def test_restore_never_overwrites_a_live_database(tmp_path):
    db, copy = tmp_path / "mlflow.db", str(tmp_path / "copy.db")
    _make_db(db, ["old"])
    mlflow_backup.backup(db, copy)
    _make_db(db, ["new"])
    assert mlflow_backup.restore(db, copy) is False
    assert _rows(db) == ["new", "old"]


def _journal_mode(path) -> str:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        connection.close()


def test_restore_without_a_backup_starts_empty(tmp_path):
    db = tmp_path / "mlflow.db"
    assert mlflow_backup.restore(db, str(tmp_path / "missing.db")) is False
    connection = sqlite3.connect(db)
    assert connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    connection.close()


def test_a_restored_database_is_in_wal_mode_so_writers_and_backups_do_not_block(tmp_path):
    db, copy = tmp_path / "head" / "mlflow.db", str(tmp_path / "bucket" / "mlflow.db")
    db.parent.mkdir()
    _make_db(db, ["a"])
    assert _journal_mode(db) == "delete"  # sqlite's default: a reader blocks the writer
    mlflow_backup.backup(db, copy)
    fresh = tmp_path / "new-head" / "mlflow.db"
    mlflow_backup.restore(fresh, copy)
    assert _journal_mode(fresh) == "wal" and _rows(fresh) == ["a"]


def test_every_backup_keeps_a_timestamped_version_that_restores(tmp_path, monkeypatch):
    db, copy = tmp_path / "mlflow.db", str(tmp_path / "bucket" / "mlflow.db")
    _make_db(db, ["a"])
    monkeypatch.setattr(mlflow_backup.time, "time", lambda: 1_800_000_000.0)
    mlflow_backup.backup(db, copy)
    _make_db(db, ["b"])
    monkeypatch.setattr(mlflow_backup.time, "time", lambda: 1_800_000_900.0)
    mlflow_backup.backup(db, copy)
    versions = sorted((tmp_path / "bucket" / "mlflow.db.versions").iterdir())
    assert [v.name for v in versions] == ["20270115T080000Z.db", "20270115T081500Z.db"]
    mlflow_backup.restore(tmp_path / "old" / "mlflow.db", str(versions[0]))
    assert _rows(tmp_path / "old" / "mlflow.db") == ["a"]
    mlflow_backup.restore(tmp_path / "new" / "mlflow.db", copy)
    assert _rows(tmp_path / "new" / "mlflow.db") == ["a", "b"]


def test_a_job_end_backs_up_the_heads_database_where_restore_said(tmp_path, monkeypatch):
    db, copy = tmp_path / "head" / "mlflow.db", str(tmp_path / "bucket" / "mlflow.db")
    mlflow_backup.restore(db, copy)  # the head's start: nothing to restore yet
    _make_db(db, ["finished-run"])
    mlflow_backup.backup_at_job_end()  # not on a head: no variable, nothing written
    assert not (tmp_path / "bucket" / "mlflow.db").exists()
    monkeypatch.setenv("RN50_MLFLOW_BACKUP_STATUS", str(mlflow_backup.status_path(db)))
    mlflow_backup.backup_at_job_end()
    mlflow_backup.restore(tmp_path / "new-head" / "mlflow.db", copy)
    assert _rows(tmp_path / "new-head" / "mlflow.db") == ["finished-run"]
    assert mlflow_backup.read_status(mlflow_backup.status_path(db))["ok"] is True


def test_a_failed_job_end_backup_is_recorded_not_raised(tmp_path, monkeypatch):
    db = tmp_path / "head" / "mlflow.db"
    blocked = tmp_path / "bucket"
    mlflow_backup.restore(db, str(blocked / "mlflow.db"))
    _make_db(db, ["x"])
    if blocked.is_dir():
        blocked.rmdir()
    blocked.write_text("a file where the backup folder should be")
    monkeypatch.setenv("RN50_MLFLOW_BACKUP_STATUS", str(mlflow_backup.status_path(db)))
    mlflow_backup.backup_at_job_end()
    status = mlflow_backup.read_status(mlflow_backup.status_path(db))
    assert status["ok"] is False and status["consecutive_failures"] == 1
    assert "the MLflow backup" in mlflow_backup.failed_backup_note()


def test_restore_refuses_a_corrupt_backup(tmp_path):
    copy = tmp_path / "copy.db"
    copy.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a sqlite database|integrity"):
        mlflow_backup.restore(tmp_path / "mlflow.db", str(copy))
    assert not (tmp_path / "mlflow.db").exists()


def test_loop_copies_only_when_the_database_changed(tmp_path, monkeypatch):
    db, copy = tmp_path / "mlflow.db", tmp_path / "copy.db"
    _make_db(db, ["a"])
    uploads = []
    real_backup = mlflow_backup.backup
    monkeypatch.setattr(mlflow_backup, "backup",
                        lambda db, uri: uploads.append(uri) or real_backup(db, uri))
    mlflow_backup.loop(db, str(copy), every_s=0, rounds=3)
    assert len(uploads) == 1 and _rows(copy) == ["a"]


def test_cli_reports_a_missing_database(tmp_path, capsys):
    code = mlflow_backup.main(["backup", "--db", str(tmp_path / "none.db"),
                               "--backup", str(tmp_path / "copy.db")])
    assert code == 1 and "no MLflow database" in capsys.readouterr().err


def test_a_failing_backup_is_an_error_on_the_record_and_fails_the_health_check(
        tmp_path, caplog, monkeypatch, capsys):
    db = tmp_path / "mlflow.db"
    _make_db(db, ["a"])
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the backup folder should be")  # every write fails
    mlflow_backup.loop(db, str(blocked / "copy.db"), every_s=0, rounds=2)
    failures = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failures) == 2 and "FAILED (2 in a row)" in failures[-1].getMessage()
    assert mlflow_backup.main(["status", "--db", str(db)]) == 1
    assert "last backup FAILED (2 in a row)" in capsys.readouterr().err
    monkeypatch.setenv("RN50_MLFLOW_BACKUP_STATUS", str(mlflow_backup.status_path(db)))
    assert "has failed 2 time(s) in a row" in mlflow_backup.failed_backup_note()
    mlflow_backup.loop(db, str(tmp_path / "copy.db"), every_s=0, rounds=1)  # storage is back
    assert mlflow_backup.main(["status", "--db", str(db)]) == 0
    assert mlflow_backup.failed_backup_note() == ""


def test_status_without_a_loop_is_unhealthy(tmp_path, capsys):
    assert mlflow_backup.main(["status", "--db", str(tmp_path / "mlflow.db")]) == 1
    assert "is the backup loop running?" in capsys.readouterr().err
