"""Where runs live: a local directory or `s3://bucket/prefix`, reached through pyarrow.fs.

The one resolver of storage URIs: every path rn50 reads or writes (runs, checkpoints, data,
backups) becomes a (filesystem, path) here, S3 ones with the settings and messages of
`rn50.io.s3`, and URIs are put together by `join` / `from_ray_path`, never by hand. Ray Train
writes checkpoints through the same pyarrow filesystem, so everything here (the preflight check
included) exercises the exact code path the run will use. This module must not import Ray: the
CLI calls `preflight` before Ray starts so that a bad key fails in seconds.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from rn50.io.s3 import StorageError, credentials_note, endpoint_url, is_s3, region, s3_error, \
    s3_filesystem, s3_uri, split_s3

__all__ = ["StorageError"]  # re-exported: callers catch storage.StorageError
log = logging.getLogger(__name__)
SLOW_ATTEMPT_S = 10.0  # a storage call this slow is worth a line: an outage was ridden out
Location = tuple[pafs.FileSystem, str]
T = TypeVar("T")
FILE_SCHEME = "file://"

SUPPORTED = "a local path (/data/runs, ./runs, ~/runs) or s3://BUCKET/PREFIX"
# Set on the head (cluster.yaml does, beside MLFLOW_TRACKING_URI): where runs go when a command
# is not given --storage, so `ray job submit ... train_full.py` typed bare keeps its work.
STORAGE_ENV = "RN50_STORAGE"
LOCAL_STORAGE = "./runs"


def default_storage() -> str:
    """Where runs go without --storage: $RN50_STORAGE, else ./runs."""
    return os.environ.get(STORAGE_ENV) or LOCAL_STORAGE


def refuse_job_scratch(storage: str, tracking_uri: str) -> None:
    """Refuse, before anything is written, a run whose checkpoints or sqlite MLflow store would
    land in a Ray job's working directory (`.../runtime_resources/...`), which Ray deletes."""
    problems = []
    if "://" not in storage and _in_job_scratch(storage):
        problems.append(f"its checkpoints ({_local(storage)}): pass --storage s3://BUCKET/PREFIX "
                        f"or an absolute path that outlives the job, or set {STORAGE_ENV} on "
                        "the head (cluster.yaml sets it)")
    if tracking_uri.startswith("sqlite:///") and _in_job_scratch(tracking_uri[len("sqlite:///"):]):
        problems.append(f"its MLflow store ({tracking_uri}): pass tracking.uri=http://HEAD:5000 "
                        "(or a sqlite file outside the job), or set MLFLOW_TRACKING_URI on the "
                        "head (cluster.yaml sets it)")
    if problems:
        raise StorageError("this run would write into the Ray job's working directory, which "
                           "Ray deletes after the job, losing " + "; and ".join(problems))


def _local(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _in_job_scratch(path: str) -> bool:
    return f"{os.sep}runtime_resources{os.sep}" in _local(path)


def resolve_storage(storage: str, patient: bool = False) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) as Ray's RunConfig wants: (None, /abs/path) or (S3, bucket/prefix);
    `patient` for the one handed to Ray, whose own calls ride out a short S3 outage with it."""
    if not storage:
        raise StorageError(f"no storage given: pass {SUPPORTED}")
    if is_s3(storage):
        return s3_filesystem(patient), split_s3(storage)
    if storage.startswith(FILE_SCHEME):  # as pyarrow reads it: file:///abs/path is a local path
        storage = urlsplit(storage).path
    if "://" in storage:
        raise StorageError(f"unsupported storage {storage!r}: use {SUPPORTED}")
    return None, os.path.abspath(os.path.expanduser(storage))


def describe_storage(storage: str) -> str:
    """A one-line description of `storage` that is safe to log (never a secret)."""
    if not is_s3(storage):
        return f"{resolve_storage(storage)[1]} (local filesystem)"
    return f"{storage} (endpoint {endpoint_url()}, region {region()}, {credentials_note()})"


def explain_error(exc: BaseException, uri: str) -> str:
    """What a failed read of `uri` means and what to do, for messages of other layers."""
    if is_s3(uri):
        return str(s3_error(exc, uri))
    return f"{exc}: check the path and its permissions"


def _preflight_local(path: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path, f".rn50-preflight-{uuid.uuid4().hex}")
        probe.write_bytes(b"rn50 preflight\n")
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"local storage {path} is not writable ({exc.strerror or exc}): pass a "
                           "writable directory as --storage, or fix its permissions") from exc


def preflight(storage: str) -> None:
    """Prove `storage` is writable (write and delete a probe) before any training starts."""
    filesystem, path = resolve_storage(storage)
    if filesystem is None:
        _preflight_local(path)
        return
    probe = f"{path}/.rn50-preflight-{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"rn50 preflight\n")
        filesystem.delete_file(probe)  # Ray deletes old checkpoints, so delete must work too
    except OSError as exc:
        raise s3_error(exc, storage) from exc


def join(storage: str, *parts: str) -> str:
    """Join relative path parts onto a local path or an s3:// URI."""
    # Parts are always relative: a stray leading "/" must not escape the storage root.
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if "://" not in storage:
        return os.path.join(storage, *pieces)
    return "/".join([storage.rstrip("/"), *pieces])


def absolute(uri: str) -> str:
    """`uri` in the form a run's record gives every path in: an s3:// URI as it is, a local path
    made absolute (a `./runs/...` means nothing once the reader is in another folder). Any other
    URI (`runs:/<id>/model`) is left as it is too."""
    if not uri or urlsplit(uri).scheme:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def from_ray_path(path: str, storage: str) -> str:
    """A path Ray reports (a checkpoint's, bucket/key on S3) as a URI in `storage`'s form."""
    if not path:
        return ""
    return s3_uri(path) if is_s3(storage) else absolute(path)


def run_uri(storage: str, name: str) -> str:
    """Where run (or sweep) `name` lives in `storage`; also its key in MLflow."""
    return join(storage, name)


def filesystem_and_path(uri: str) -> Location:
    """(filesystem, path) for a local path or s3:// URI; local paths get a LocalFileSystem."""
    filesystem, path = resolve_storage(uri)
    return filesystem or pafs.LocalFileSystem(), path


def locate(where: str | Path | Location) -> Location:
    """(filesystem, path) for a URI, a local path, or a (filesystem, path) pair already resolved
    (as Ray hands them over; a None filesystem is the local one), without a trailing slash."""
    if isinstance(where, tuple):
        return (where[0] or pafs.LocalFileSystem()), where[1].rstrip("/")
    return filesystem_and_path(str(where).rstrip("/"))


def with_retries(what: str, action: Callable[[], T], attempts: int) -> T:
    """`action()`, retried with back-off (2, 4, 8, ... 30 s) on OSError, a storage blip; any
    other error is final at once. An attempt that succeeds only after SLOW_ATTEMPT_S (the S3
    client handed to Ray retries connections itself, for most of a minute) says so."""
    for attempt in range(1, attempts + 1):
        started_s = time.monotonic()
        try:
            result = action()
            took_s = time.monotonic() - started_s
            if took_s >= SLOW_ATTEMPT_S:
                log.warning("%s took %.0f s (attempt %d/%d): the storage was slow or "
                            "unreachable for a while", what, took_s, attempt, attempts)
            return result
        except OSError as err:
            if attempt == attempts:
                raise
            delay_s = min(2 ** attempt, 30)
            log.warning("%s failed (attempt %d/%d): %s; retrying in %d s", what, attempt,
                        attempts, err, delay_s)
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def _call(uri: str, action):
    """Run `action`; S3 failures other than a missing object become StorageErrors."""
    try:
        return action()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if is_s3(uri):
            raise s3_error(exc, uri) from exc
        raise


def read_bytes(uri: str) -> bytes:
    """The contents of the file at `uri` (local path or s3:// URI)."""
    filesystem, path = filesystem_and_path(uri)

    def read() -> bytes:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    return _call(uri, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`, replacing it; local parent directories are created."""
    filesystem, path = filesystem_and_path(uri)

    def write() -> None:
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem.create_dir(os.path.dirname(path), recursive=True)
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
    _call(uri, write)


def exists(uri: str) -> bool:
    """Whether a file or directory exists at `uri`."""
    filesystem, path = filesystem_and_path(uri)
    return _call(uri, lambda: filesystem.get_file_info(path).type != pafs.FileType.NotFound)


def list_dir(uri: str) -> list[str]:
    """Sorted names (not paths) directly under `uri`; [] if it does not exist."""
    filesystem, path = filesystem_and_path(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = _call(uri, lambda: filesystem.get_file_info(selector))
    return sorted(info.base_name for info in infos)


def sha256_of(filesystem: pafs.FileSystem, path: str) -> str:
    """SHA-256 hex digest of a file on `filesystem`, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
