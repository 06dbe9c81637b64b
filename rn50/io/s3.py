"""S3 as rn50 reaches it: one configured pyarrow filesystem, and errors that say what to do.

Every S3 path goes through `rn50.io.storage`'s resolver, which builds its filesystem here, so the
timeouts, retries and credentials are the same for checkpoints, data and backups. Error messages
never contain the secret key or session token; the access key id is masked.
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import pyarrow.fs as pafs

SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
# Seconds, not the SDK's minutes: a dead endpoint must fail the preflight quickly. The request
# timeout is an idle-socket limit, so large checkpoint uploads are not cut off by it.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
RETRY_ATTEMPTS = 3
# Ray's own storage calls (the Train controller's snapshot after each checkpoint, pruning old
# checkpoints, Ray's upload) retry nothing themselves: one refused connection fails the
# controller, and a new controller and worker group start from the newest checkpoint. The SDK's
# default strategy backs off 50 ms, doubling, over these attempts: ~50 s of outage ridden out.
PATIENT_RETRY_ATTEMPTS = 11


class StorageError(RuntimeError):
    """Storage is unusable; the message says what is wrong and what to do about it."""
    exit_code = 3


def _env(*names: str) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n)), "")


def region() -> str:
    """The AWS region: $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1."""
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


def endpoint_url() -> str:
    """The S3 endpoint requests go to (a local server's, or AWS's for the region)."""
    endpoint = _endpoint()
    return f"{endpoint[0]}://{endpoint[1]}" if endpoint else f"https://s3.{region()}.amazonaws.com"


def masked_key() -> str:
    """The access key id in use, masked: enough to tell keys apart, never a usable key."""
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    # Enough to tell two keys apart in a log, not enough to be one.
    return f"{key[:4]}…" if len(key) > 8 else ("…" if key else "")


def credentials_note() -> str:
    """Which credentials S3 is reached with, safe to log."""
    key = masked_key()
    if key:
        return f"access key {key} from AWS_ACCESS_KEY_ID"
    return "no AWS_ACCESS_KEY_ID set, so the default credential chain (instance profile, ~/.aws)"


def is_s3(uri: str) -> bool:
    """Whether `uri` names a place in S3 (`s3://...`)."""
    return uri.startswith(SCHEME)


def s3_filesystem(patient: bool = False) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from the standard AWS_* environment, with short timeouts; a
    `patient` one retries a failed connection for ~50 s (PATIENT_RETRY_ATTEMPTS)."""
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if bool(key) != bool(secret):
        raise StorageError("only one of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY is set: set "
                           "both, or neither to use the instance profile / default credential "
                           "chain")
    retry = (pafs.AwsDefaultS3RetryStrategy(max_attempts=PATIENT_RETRY_ATTEMPTS) if patient
             else pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS))
    options: dict = dict(region=region(), connect_timeout=CONNECT_TIMEOUT_S,
                         request_timeout=REQUEST_TIMEOUT_S, retry_strategy=retry)
    if key:  # no keys: leave them out so pyarrow walks its default chain (IAM role on EC2)
        options.update(access_key=key, secret_key=secret,
                       session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    endpoint = _endpoint()
    if endpoint:
        options.update(scheme=endpoint[0], endpoint_override=endpoint[1])
    return pafs.S3FileSystem(**options)


def split_s3(storage: str) -> str:
    """`s3://bucket/prefix` -> `bucket/prefix` (no trailing slash), validated."""
    path = storage[len(SCHEME):].strip("/")
    if not path or not path.split("/")[0]:
        raise StorageError(f"storage {storage!r} names no bucket: use s3://BUCKET/PREFIX")
    return path


def scrub(text: str) -> str:
    """`text` with the secret key and session token, should they appear, replaced by ***."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name, "")
        if len(secret) >= 4:  # belt and braces: pyarrow does not echo secrets, but never risk it
            text = text.replace(secret, "***")
    return text


def s3_error(exc: BaseException, storage: str) -> StorageError:
    """Turn a pyarrow/AWS SDK error into a StorageError that says what to do."""
    text = str(exc)
    found = re.search(r"AWS Error (\w+) during (\w+) operation", text)
    code, operation = found.groups() if found else ("", "")
    bucket = split_s3(storage).split("/")[0]
    said = f" (S3 said {code} during {operation})" if code else f" ({scrub(text)})"
    if code in ("SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "INVALID_CLIENT_TOKEN_ID",
                "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN", "EXPIRED_TOKEN"):
        return StorageError(
            f"S3 at {endpoint_url()} rejected the credentials ({credentials_note()}){said}: "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if you use "
            "temporary credentials) belong together and to this endpoint")
    if code == "NO_SUCH_BUCKET" or "NoSuchBucket" in text:
        return StorageError(f"bucket '{bucket}' does not exist at {endpoint_url()}{said}: create "
                            f"it (`aws s3 mb s3://{bucket}`) or fix the bucket name in {storage}")
    if code in ("NETWORK_CONNECTION", "REQUEST_TIMEOUT") or "curlCode" in text:
        return StorageError(f"cannot reach S3 endpoint {endpoint_url()}{said}: is the server "
                            "running, and is AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) right?")
    if code in ("REQUEST_TIME_TOO_SKEWED", "REQUEST_EXPIRED"):
        return StorageError(f"S3 rejected the request time{said}: fix this machine's clock (NTP)")
    if "HTTP status 301" in text or "PermanentRedirect" in text:
        return StorageError(f"bucket '{bucket}' is in another region{said}: set AWS_REGION to the "
                            "bucket's region")
    if code == "ACCESS_DENIED" or "HTTP status 403" in text:
        return StorageError(
            f"access denied to {storage} ({credentials_note()}){said}: grant these credentials "
            f"s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on bucket '{bucket}', "
            "or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY to credentials that have them")
    return StorageError(f"S3 storage {storage} at {endpoint_url()} failed{said}: check the "
                        "endpoint, credentials and bucket")




def s3_uri(bucket: str, *parts: str) -> str:
    """`s3://bucket/part/...`: the one place an S3 URI is put together from its pieces."""
    return "/".join([SCHEME + bucket.strip("/"), *(p.strip("/") for p in parts if p.strip("/"))])
