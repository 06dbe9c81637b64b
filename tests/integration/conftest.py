"""Fixtures for the integration tests: one real S3 server and one MLflow server per session."""
from pathlib import Path

import pytest

from tools.local_servers import MlflowServer, S3Server
from tests.integration.faults import fingerprint
from tests.integration.jobs import reference_maths, run_job

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: needs a local Ray cluster, the S3 server or the MLflow server")


def pytest_collection_modifyitems(config, items):
    # Everything under tests/integration is an integration test, marked or not.
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server with bucket `rn50-test`; yields a `servers.S3Server`."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _s3_server_running(request):
    """A test that stopped the shared S3 server and failed before restarting it must not take
    the rest of the session down with it."""
    if "s3_server" in request.fixturenames:
        server = request.getfixturevalue("s3_server")
        if not server.running():
            server.start()
    yield


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """os.environ pointed at the S3 server (and nothing else AWS); yields the server."""
    for name in ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """`mlflow server` (sqlite, artifacts in s3://rn50-test/mlflow-artifacts); yields a
    `servers.MlflowServer` whose `tracking_uri` is http://127.0.0.1:PORT."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The straight run every cluster fault run is compared with (`jobs.reference_maths`), made
    once, on a local Ray, the first time a test asks, every epoch's checkpoint kept; yields
    (digits root, RESULT record, fingerprint of its final weights)."""
    tmp = tmp_path_factory.mktemp("reference")
    code, output, result = run_job([
        "--recipe", "demo", "--name", "straight", "--storage", str(tmp / "runs"),
        *reference_maths(tmp / "digits"), f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "checkpoint.keep_last=5"])
    assert code == 0, output[-4000:]
    return tmp / "digits", result, fingerprint(result["checkpoint"])
