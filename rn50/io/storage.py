"""Where runs live: a local directory or `s3://bucket/prefix`, reached through pyarrow.fs.

Ray Train writes checkpoints through the same pyarrow filesystem, so everything here (the
preflight check included) exercises the exact code path the run will use. This module must not
import Ray: the CLI calls `preflight` before Ray starts so that a bad key fails in seconds.
Error messages never contain the secret key or session token; the access key id is masked.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

DEFAULT_REGION = "us-east-1"
SUPPORTED = "a local path (/data/runs, ./runs, ~/runs) or s3://BUCKET/PREFIX"
# Seconds, not the SDK's minutes: a dead endpoint must fail the preflight quickly. The request
# timeout is an idle-socket limit, so large checkpoint uploads are not cut off by it.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
RETRY_ATTEMPTS = 3
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


class StorageError(RuntimeError):
    """Storage is unusable; the message says what is wrong and what to do about it."""
    exit_code = 3


def _env(*names: str) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n)), "")


def _region() -> str:
    return _env("AWS_REGION", "AWS_DEFAULT_REGION") or DEFAULT_REGION


def _endpoint() -> tuple[str, str] | None:
    """(scheme, host:port) from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, None for AWS itself."""
    url = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise StorageError(f"S3 endpoint {url!r} is not of the form http(s)://HOST[:PORT]: fix "
                           "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or unset them to use AWS S3")
    return parts.scheme, parts.netloc


def _endpoint_url() -> str:
    endpoint = _endpoint()
    return f"{endpoint[0]}://{endpoint[1]}" if endpoint else f"https://s3.{_region()}.amazonaws.com"


def _masked_key() -> str:
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    # Enough to tell two keys apart in a log, not enough to be one.
    return f"{key[:4]}…" if len(key) > 8 else ("…" if key else "")


def _credentials_note() -> str:
    key = _masked_key()
    if key:
        return f"access key {key} from AWS_ACCESS_KEY_ID"
    return "no AWS_ACCESS_KEY_ID set, so the default credential chain (instance profile, ~/.aws)"


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from the standard AWS_* environment, with short timeouts."""
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if bool(key) != bool(secret):
        raise StorageError("only one of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY is set: set "
                           "both, or neither to use the instance profile / default credential "
                           "chain")
    options: dict = dict(region=_region(), connect_timeout=CONNECT_TIMEOUT_S,
                         request_timeout=REQUEST_TIMEOUT_S,
                         retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS))
    if key:  # no keys: leave them out so pyarrow walks its default chain (IAM role on EC2)
        options.update(access_key=key, secret_key=secret,
                       session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    endpoint = _endpoint()
    if endpoint:
        options.update(scheme=endpoint[0], endpoint_override=endpoint[1])
    return pafs.S3FileSystem(**options)


def _split_s3(storage: str) -> str:
    """`s3://bucket/prefix` -> `bucket/prefix` (no trailing slash), validated."""
    path = storage[len("s3://"):].strip("/")
    if not path or not path.split("/")[0]:
        raise StorageError(f"storage {storage!r} names no bucket: use s3://BUCKET/PREFIX")
    return path


def resolve_storage(storage: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) as Ray's RunConfig wants: (None, /abs/path) or (S3, bucket/prefix)."""
    if not storage:
        raise StorageError(f"no storage given: pass {SUPPORTED}")
    if storage.startswith("s3://"):
        return s3_filesystem(), _split_s3(storage)
    if "://" in storage:
        raise StorageError(f"unsupported storage {storage!r}: use {SUPPORTED}")
    return None, os.path.abspath(os.path.expanduser(storage))


def describe_storage(storage: str) -> str:
    """A one-line description of `storage` that is safe to log (never a secret)."""
    if not storage.startswith("s3://"):
        return f"{resolve_storage(storage)[1]} (local filesystem)"
    return (f"{storage} (endpoint {_endpoint_url()}, region {_region()}, "
            f"{_credentials_note()})")


def _scrub(text: str) -> str:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name, "")
        if len(secret) >= 4:  # belt and braces: pyarrow does not echo secrets, but never risk it
            text = text.replace(secret, "***")
    return text


def _s3_error(exc: BaseException, storage: str) -> StorageError:
    """Turn a pyarrow/AWS SDK error into a StorageError that says what to do."""
    text = str(exc)
    found = re.search(r"AWS Error (\w+) during (\w+) operation", text)
    code, operation = found.groups() if found else ("", "")
    bucket = _split_s3(storage).split("/")[0]
    said = f" (S3 said {code} during {operation})" if code else f" ({_scrub(text)})"
    if code in ("SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "INVALID_CLIENT_TOKEN_ID",
                "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN", "EXPIRED_TOKEN"):
        return StorageError(
            f"S3 at {_endpoint_url()} rejected the credentials ({_credentials_note()}){said}: "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if you use "
            "temporary credentials) belong together and to this endpoint")
    if code == "NO_SUCH_BUCKET" or "NoSuchBucket" in text:
        return StorageError(f"bucket '{bucket}' does not exist at {_endpoint_url()}{said}: create "
                            f"it (`aws s3 mb s3://{bucket}`) or fix the bucket name in {storage}")
    if code in ("NETWORK_CONNECTION", "REQUEST_TIMEOUT") or "curlCode" in text:
        return StorageError(f"cannot reach S3 endpoint {_endpoint_url()}{said}: is the server "
                            "running, and is AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) right?")
    if code in ("REQUEST_TIME_TOO_SKEWED", "REQUEST_EXPIRED"):
        return StorageError(f"S3 rejected the request time{said}: fix this machine's clock (NTP)")
    if "HTTP status 301" in text or "PermanentRedirect" in text:
        return StorageError(f"bucket '{bucket}' is in another region{said}: set AWS_REGION to the "
                            "bucket's region")
    if code == "ACCESS_DENIED" or "HTTP status 403" in text:
        return StorageError(
            f"access denied to {storage} ({_credentials_note()}){said}: grant these credentials "
            f"s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on bucket '{bucket}', "
            "or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY to credentials that have them")
    return StorageError(f"S3 storage {storage} at {_endpoint_url()} failed{said}: check the "
                        "endpoint, credentials and bucket")


def explain_error(exc: BaseException, uri: str) -> str:
    """What a failed read of `uri` means and what to do, for messages of other layers."""
    if uri.startswith("s3://"):
        return str(_s3_error(exc, uri))
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
        raise _s3_error(exc, storage) from exc


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
    return f"s3://{path}" if storage.startswith("s3://") else absolute(path)


def run_uri(storage: str, name: str) -> str:
    """Where run (or sweep) `name` lives in `storage`; also its key in MLflow."""
    return join(storage, name)


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or s3:// URI; local paths get a LocalFileSystem."""
    filesystem, path = resolve_storage(uri)
    return filesystem or pafs.LocalFileSystem(), path


def _call(uri: str, action):
    """Run `action`; S3 failures other than a missing object become StorageErrors."""
    try:
        return action()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if uri.startswith("s3://"):
            raise _s3_error(exc, uri) from exc
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
