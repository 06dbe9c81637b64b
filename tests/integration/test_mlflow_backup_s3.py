"""The head's MLflow database survives `ray down`: backup to and restore from the S3 server."""
import sqlite3

import pytest

from rn50.io import mlflow_backup


from rn50.io import storage


def test_backup_and_restore_through_s3(tmp_path, s3_env):
    db = tmp_path / "head" / "mlflow.db"
    db.parent.mkdir()
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE experiments (name TEXT)")
    connection.execute("INSERT INTO experiments VALUES ('rn50-imagenet')")
    connection.commit()
    connection.close()
    uri = f"s3://{s3_env.bucket}/backup-test/mlflow.db"
    mlflow_backup.backup(db, uri)
    assert storage.exists(uri)
    fresh = tmp_path / "replaced-head" / "mlflow.db"
    assert mlflow_backup.restore(fresh, uri) is True
    connection = sqlite3.connect(fresh)
    assert connection.execute("SELECT name FROM experiments").fetchall() == [("rn50-imagenet",)]
    connection.close()


def test_restore_fails_fast_on_a_missing_bucket(tmp_path, s3_env):
    with pytest.raises(storage.StorageError, match="does not exist"):
        mlflow_backup.restore(tmp_path / "mlflow.db", "s3://no-such-rn50-bucket/x/mlflow.db")
