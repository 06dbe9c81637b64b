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


def test_restore_without_a_backup_starts_empty(tmp_path):
    db = tmp_path / "mlflow.db"
    assert mlflow_backup.restore(db, str(tmp_path / "missing.db")) is False
    assert not db.exists()


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
