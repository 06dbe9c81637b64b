"""A run never writes into a Ray job's working directory, which Ray deletes after the job."""
import pytest

from rn50.io import storage


def test_checkpoints_and_a_sqlite_store_in_a_jobs_working_directory_are_refused(tmp_path):
    scratch = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    scratch.mkdir(parents=True)
    with pytest.raises(storage.StorageError) as refused:
        storage.refuse_job_scratch(str(scratch / "runs"), f"sqlite:///{scratch / 'mlflow.db'}")
    message = str(refused.value)
    assert "Ray job's working directory" in message and str(scratch / "runs") in message
    assert "--storage s3://" in message and storage.STORAGE_ENV in message
    assert "MLFLOW_TRACKING_URI" in message and "tracking.uri=" in message


def test_a_relative_default_is_refused_only_when_run_from_a_jobs_working_directory(
        tmp_path, monkeypatch):
    scratch = tmp_path / "runtime_resources" / "working_dir_files" / "pkg"
    scratch.mkdir(parents=True)
    monkeypatch.chdir(scratch)
    with pytest.raises(storage.StorageError, match="checkpoints"):
        storage.refuse_job_scratch("./runs", "http://head:5000")
    monkeypatch.chdir(tmp_path)
    storage.refuse_job_scratch("./runs", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a checkout


def test_durable_places_pass(tmp_path):
    storage.refuse_job_scratch("s3://bucket/runs", "http://head:5000")
    storage.refuse_job_scratch(str(tmp_path / "runs"), f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_the_default_storage_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(storage.STORAGE_ENV, "s3://bucket/rn50/runs")
    assert storage.default_storage() == "s3://bucket/rn50/runs"
    monkeypatch.setenv(storage.STORAGE_ENV, "")
    assert storage.default_storage() == "./runs"
