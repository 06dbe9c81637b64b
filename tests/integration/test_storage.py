"""rn50.io.storage against a real S3 server (SeaweedFS) and the local filesystem; no mocks."""
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

from rn50.io import s3, storage
from rn50.io.storage import StorageError
from tools.local_servers import free_ports

pytestmark = pytest.mark.integration


def _everything(error: BaseException) -> str:
    """The error's message and every message chained under it (what a traceback would show)."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def test_preflight_writes_and_removes_a_probe_on_s3(s3_env):
    storage.preflight(f"s3://{s3_env.bucket}/some/prefix")
    listed = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="some/prefix/")
    assert not [o["Key"] for o in listed.get("Contents", []) if ".rn50-preflight-" in o["Key"]]


@pytest.mark.parametrize("variable, wrong", [("AWS_SECRET_ACCESS_KEY", "wrong-secret-3f9a1c77e2"),
                                             ("AWS_ACCESS_KEY_ID", "NOSUCHACCESSKEY1234")])
def test_bad_credentials_name_the_variables_and_hide_the_secret(s3_env, monkeypatch, variable,
                                                                wrong):
    monkeypatch.setenv(variable, wrong)
    with pytest.raises(StorageError) as caught:
        storage.preflight(f"s3://{s3_env.bucket}/runs")
    message = str(caught.value)
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message, message
    assert "rejected the credentials" in message, message
    everything = _everything(caught.value)
    secret = wrong if variable == "AWS_SECRET_ACCESS_KEY" else s3_env.secret_key
    assert secret not in everything
    assert s3.masked_key() in message  # the key id, masked, tells which key was used


def test_missing_bucket_is_named_with_how_to_create_it(s3_env):
    with pytest.raises(StorageError) as caught:
        storage.preflight("s3://rn50-no-such-bucket/runs")
    assert "bucket 'rn50-no-such-bucket' does not exist" in str(caught.value)
    assert "aws s3 mb s3://rn50-no-such-bucket" in str(caught.value)


def test_read_only_credentials_get_access_denied(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.reader_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.reader_secret)
    with pytest.raises(StorageError) as caught:
        storage.preflight(f"s3://{s3_env.bucket}/runs")
    assert "access denied" in str(caught.value) and "s3:PutObject" in str(caught.value)
    assert s3_env.reader_secret not in _everything(caught.value)


def test_unreachable_endpoint_fails_fast_and_names_it(s3_env, monkeypatch):
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.preflight(f"s3://{s3_env.bucket}/runs")
    assert time.monotonic() - start < 20
    assert f"cannot reach S3 endpoint {closed}" in str(caught.value)
    assert "AWS_ENDPOINT_URL" in str(caught.value)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_write_read_exists_list_round_trip(where, s3_env, tmp_path):
    base = (f"s3://{s3_env.bucket}/round-trip-{uuid.uuid4().hex[:8]}" if where == "s3"
            else str(tmp_path / "store"))
    target = storage.join(base, "run", "/state.json")
    assert target == f"{base}/run/state.json"
    assert not storage.exists(target) and storage.list_dir(base) == []
    storage.write_bytes(target, b'{"epoch": 3}')
    storage.write_bytes(storage.join(base, "run", "manifest.json"), b"{}")
    assert storage.exists(target) and storage.exists(storage.join(base, "run"))
    assert storage.read_bytes(target) == b'{"epoch": 3}'
    assert storage.list_dir(base) == ["run"]
    assert storage.list_dir(storage.join(base, "run")) == ["manifest.json", "state.json"]
    storage.write_bytes(target, b"replaced")
    assert storage.read_bytes(target) == b"replaced"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "run", "missing.json"))


def test_local_preflight_creates_the_directory_and_reports_an_unwritable_one(tmp_path):
    storage.preflight(str(tmp_path / "runs" / "deep"))
    deep = tmp_path / "runs" / "deep"
    assert deep.is_dir() and not list(deep.iterdir())
    (tmp_path / "file.txt").write_text("a regular file")
    blocked = tmp_path / "file.txt" / "sub"  # root may write anywhere, but not under a file
    with pytest.raises(StorageError, match="is not writable") as caught:
        storage.preflight(str(blocked))
    assert str(blocked) in str(caught.value) and "--storage" in str(caught.value)


def test_resolve_storage_gives_what_ray_run_config_wants(s3_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_storage("runs") == (None, str(tmp_path / "runs"))
    assert storage.resolve_storage("~/runs")[1] == str(Path.home() / "runs")
    filesystem, path = storage.resolve_storage(f"s3://{s3_env.bucket}/runs/")
    assert isinstance(filesystem, pafs.S3FileSystem) and path == f"{s3_env.bucket}/runs"
    assert filesystem.region == "us-east-1"
    for bad in ("gs://bucket/runs", "s3://", ""):
        with pytest.raises(StorageError, match="s3://BUCKET/PREFIX"):
            storage.resolve_storage(bad)


def test_describe_storage_shows_endpoint_but_no_secret(s3_env):
    text = storage.describe_storage(f"s3://{s3_env.bucket}/runs")
    assert s3_env.endpoint_url in text and f"s3://{s3_env.bucket}/runs" in text
    assert s3_env.secret_key not in text and s3_env.access_key not in text


def test_mlflow_server_stores_artifacts_in_the_s3_bucket(s3_server, mlflow_server):
    client = MlflowClient(mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"storage-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5, step=0)
    client.log_text(run.info.run_id, "hello from rn50", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.5]
    key = f"mlflow-artifacts/{experiment_id}/{run.info.run_id}/artifacts/notes/hello.txt"
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert body == b"hello from rn50"


def test_s3_server_stops_and_restarts_with_its_data(s3_env):
    uri = f"s3://{s3_env.bucket}/restart/{uuid.uuid4().hex[:8]}.bin"
    storage.write_bytes(uri, b"survives a restart")
    s3_env.stop()
    try:
        with pytest.raises(StorageError, match="cannot reach S3 endpoint"):
            storage.read_bytes(uri)
    finally:
        s3_env.start()
    assert storage.read_bytes(uri) == b"survives a restart"


def test_the_filesystem_handed_to_ray_rides_out_a_short_outage(s3_env):
    # Ray's controller writes its snapshot through this filesystem after every checkpoint, with no
    # retry of its own: red if a refused connection fails it at once (the chaos run's controller
    # restarts) or if the quick one, used for checks that must fail fast, waits too.
    uri = f"s3://{s3_env.bucket}/patient/{uuid.uuid4().hex[:8]}.json"
    patient, path = storage.resolve_storage(uri, patient=True)
    quick, _ = storage.resolve_storage(uri)
    s3_env.stop()
    restart = threading.Timer(5.0, s3_env.start)
    restart.start()
    try:
        started = time.monotonic()
        with pytest.raises(OSError):
            with quick.open_output_stream(path) as out:
                out.write(b"{}")
        assert time.monotonic() - started < 5, "the quick filesystem waited out the outage"
        with patient.open_output_stream(path) as out:
            out.write(b'{"written": "after the restart"}')
        assert time.monotonic() - started > 5, "written while the server was down?"
    finally:
        restart.join()
    assert storage.read_bytes(uri) == b'{"written": "after the restart"}'
