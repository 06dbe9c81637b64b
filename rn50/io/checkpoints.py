"""The checkpoint store: writing, uploading, verifying, choosing what to resume, downloading.

The one module that knows a checkpoint's files and folder names; everything else calls it. A
checkpoint is a folder with the whole training state in `state.pt` and a `manifest.json`,
written last, listing every file's size and SHA-256. A folder without a manifest, or whose files
do not match it, was cut short (a worker died mid-write, an upload broke) and is never loaded.
Loading uses `torch.load(weights_only=True)`, so a checkpoint cannot execute code. Every function
takes a local path or an s3:// URI (or a pyarrow filesystem and path).
The command line over this API is `python -m rn50.checkpoint` (`rn50/checkpoint.py`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
import torch

from rn50.io import staging, storage
from rn50.records import check_state_version

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
UPLOAD_ATTEMPTS = 6  # 2+4+8+16+30 s of back-off: rides out a storage restart of ~1 minute
READ_ATTEMPTS = 4    # 2+4+8 s: a passing read error is retried, never taken for a bad checkpoint
# Ray names checkpoint folders checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff> (sorting is chronological);
# the same run folder also holds checkpoint_manager_snapshot.json, which is not one.
CHECKPOINT_DIR_NAME = re.compile(r"^checkpoint_\d{4}-\d{2}-\d{2}_[\d.-]+$")
# The best checkpoint by validation metric (checkpoint.keep_best_by) is copied into this folder of
# the run; Ray neither sees nor prunes it, and resume never reads it.
BEST_DIR = "best"
# What the run had cost when the checkpoint was taken (US$, and the run's seconds over all its
# starts), kept in the state and copied into the manifest: a resumed run's budget reads it from
# storage, which outlives a head whose MLflow records were lost, without downloading the state.
SPENT_KEYS = ("spent_usd", "spent_run_s")

log = logging.getLogger(__name__)
Location = storage.Location


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


def save_checkpoint(directory: str | Path, state: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Write `state` (tensors, dicts, numbers) and then a manifest with `summary` (and the state's
    `SPENT_KEYS`) into `directory`."""
    directory = Path(directory)
    summary = {**summary, **{key: state[key] for key in SPENT_KEYS if key in state}}
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    torch.save(state, state_path)
    digest = storage.sha256_of(pafs.LocalFileSystem(), str(state_path))
    manifest = {"format_version": FORMAT_VERSION, "summary": summary,
                "files": {STATE_FILE: {"size": state_path.stat().st_size, "sha256": digest}}}
    # Written last and atomically: its presence means every file above is complete.
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(directory / MANIFEST_FILE)
    return directory


def verify(where: str | Path | Location, hashes: bool = True) -> dict[str, Any]:
    """The manifest, if every file is there at its size (and SHA-256, unless `hashes=False`, the
    cheap check run before Ray records an upload); else CheckpointError saying what is wrong.
    Storage errors other than a missing file are raised as they are (OSError): retry those."""
    filesystem, path = storage.locate(where)
    try:
        with filesystem.open_input_stream(f"{path}/{MANIFEST_FILE}") as stream:
            manifest = json.loads(stream.read())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST_FILE}: it was not finished") \
            from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable manifest: {err}") from None
    infos = filesystem.get_file_info([f"{path}/{name}" for name in files])
    for (name, expected), info in zip(files.items(), infos):
        if info.type != pafs.FileType.File:
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if info.size != expected["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} is {info.size} bytes, the manifest "
                                  f"says {expected['size']} (truncated?)")
        if hashes and storage.sha256_of(filesystem, info.path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its SHA-256 "
                                  "(altered or corrupted)")
    return manifest


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Verify and load a local checkpoint's state dict (weights_only, so no code runs)."""
    verify(Path(directory))
    try:
        state = torch.load(Path(directory) / STATE_FILE, map_location=map_location,
                           weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
        raise CheckpointError(f"checkpoint {directory} could not be loaded: {err}") from None
    # Not a CheckpointError: a newer format is no broken copy to skip for an older one.
    return check_state_version(state, f"checkpoint {directory}")


def upload_with_retries(upload: Callable[[], Location], name: str,
                        attempts: int = UPLOAD_ATTEMPTS) -> Location:
    """Run `upload()` (which returns where the copy landed) until the copy verifies cheaply.

    A retry rewrites the same folder; a copy torn by an outage is never loaded because its files
    do not match the manifest. The caller records the checkpoint (and prunes older ones) only
    after this returns, so the last good checkpoint outlives a failed upload."""
    def attempt() -> Location:
        landed = upload()
        try:
            verify(landed, hashes=False)
        except CheckpointError as err:  # torn by the outage: upload again
            raise OSError(str(err)) from err
        return landed
    return storage.with_retries(f"checkpoint upload {name}", attempt, attempts)


def checkpoints_newest_first(run: str | Location, also: tuple[str, ...] = ()) -> list[str]:
    """Every `checkpoint_*` folder of a run in storage (plus `also`), newest first."""
    filesystem, run_dir = storage.locate(run)
    listing = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    paths = {info.path.rstrip("/") for info in listing if info.type == pafs.FileType.Directory
             and CHECKPOINT_DIR_NAME.match(posixpath.basename(info.path.rstrip("/")))}
    paths.update(path.rstrip("/") for path in also)
    return sorted(paths, key=posixpath.basename, reverse=True)


def _load_from(filesystem: pafs.FileSystem, path: str) -> dict[str, Any]:
    if isinstance(filesystem, pafs.LocalFileSystem):
        return load_checkpoint(path)
    with staging.download_folder() as local:
        pafs.copy_files(path, local, source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        return load_checkpoint(local)


def load_newest_good(run: str | Location, registered: str | None = None
                     ) -> tuple[str | None, dict | None]:
    """(path, state) of the run's newest checkpoint whose files match its manifest, or
    (None, None) to start from the beginning.

    Storage, not only Ray's record, is the source: a checkpoint uploaded moments before a crash
    may never have reached the controller, and it is still the newest complete state. A broken
    checkpoint is named and skipped; a read error is retried, and raised if it persists (falling
    back to an older checkpoint over a passing error would silently cost work). When nothing
    verifies, a run whose checkpoints were all torn mid-upload (none `registered` with Ray, which
    records one only after its upload verified) starts over; if the registered one is broken too,
    storage lost completed work, and that is an error."""
    filesystem, _ = storage.locate(run)
    candidates = checkpoints_newest_first(run, (registered,) if registered else ())
    for path in candidates:
        try:
            return path, storage.with_retries(f"reading checkpoint {path}",
                                              lambda path=path: _load_from(filesystem, path),
                                              READ_ATTEMPTS)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
    if registered:
        raise CheckpointError(f"no checkpoint of this run verifies, not even {registered}, which "
                              "had verified when it was uploaded: start a fresh run with a new "
                              "--name, or restore the storage")
    if candidates:
        log.warning("no checkpoint of this run is complete (all were cut short mid-upload): "
                    "starting from the beginning")
    return None, None


def spent_of_run(run: str | Location) -> tuple[float, int] | None:
    """(US$, run seconds) the run had cost at its newest checkpoint that records it and whose
    manifest verifies (file sizes only: nothing is downloaded); None when none does."""
    filesystem, _ = storage.locate(run)
    for path in checkpoints_newest_first(run):
        try:
            summary = storage.with_retries(f"reading checkpoint {path}", lambda path=path: verify(
                (filesystem, path), hashes=False), READ_ATTEMPTS)["summary"]
        except CheckpointError as err:
            log.warning("not reading the cost recorded in %s: %s", path, err)
            continue
        if all(key in summary for key in SPENT_KEYS):
            return float(summary[SPENT_KEYS[0]]), int(summary[SPENT_KEYS[1]])
    return None


def load_state(path: str | Location) -> dict[str, Any]:
    """Load one checkpoint (local or in storage), retrying passing read errors."""
    filesystem, where = storage.locate(path)
    return storage.with_retries(f"reading checkpoint {where}",
                                lambda: _load_from(filesystem, where), READ_ATTEMPTS)


def cache_root() -> Path:
    """Where downloaded checkpoints are kept: $RN50_CACHE or ~/.cache/rn50."""
    return Path(os.environ.get("RN50_CACHE") or "~/.cache/rn50").expanduser()


def keep_as_best(run: str | Location, checkpoint_path: str) -> str:
    """Copy an uploaded checkpoint into the run's `best/` folder, then drop the previous best
    (only once the new copy verifies, so there is always a best); return the copy's path."""
    filesystem, run_dir = storage.locate(run)
    best_dir = f"{run_dir}/{BEST_DIR}"
    target = f"{best_dir}/{posixpath.basename(checkpoint_path.rstrip('/'))}"
    def copy() -> None:
        filesystem.create_dir(target, recursive=True)  # copy_files does not create it
        pafs.copy_files(checkpoint_path, target, source_filesystem=filesystem,
                        destination_filesystem=filesystem)
    storage.with_retries(f"copying {checkpoint_path} to {best_dir}", copy, UPLOAD_ATTEMPTS)
    verify((filesystem, target), hashes=False)
    for info in filesystem.get_file_info(pafs.FileSelector(best_dir, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.path.rstrip("/") != target:
            filesystem.delete_dir(info.path)
    return target


def checkpoint_names(run_uri: str) -> list[str]:
    """A run's checkpoints as paths relative to it: its `checkpoint_*` folders, oldest first,
    then its best copy (`best/checkpoint_*`) if it keeps one."""
    best = best_checkpoint(run_uri)
    names = sorted(n for n in storage.list_dir(run_uri) if CHECKPOINT_DIR_NAME.match(n))
    return names + ([f"{BEST_DIR}/{posixpath.basename(best)}"] if best else [])


def files_bytes(manifest: dict[str, Any]) -> int:
    """Total size of the files a checkpoint's manifest lists."""
    return sum(entry["size"] for entry in manifest["files"].values())


def best_checkpoint(run_uri: str) -> str | None:
    """The run's best checkpoint (in `best/`, see `keep_as_best`), or None if it keeps none."""
    best_dir = storage.join(run_uri.rstrip("/"), BEST_DIR)
    names = [n for n in storage.list_dir(best_dir) if CHECKPOINT_DIR_NAME.match(n)]
    return storage.join(best_dir, max(names)) if names else None


def find_checkpoint(uri: str, latest: bool = False) -> str:
    """`uri` if it is a checkpoint folder, else the run's best checkpoint (unless `latest`, or it
    keeps none), else its newest finished `checkpoint_*`."""
    uri = uri.rstrip("/")
    names = storage.list_dir(uri)
    if MANIFEST_FILE in names:
        return uri
    best = None if latest or BEST_DIR not in names else best_checkpoint(uri)
    if best and storage.exists(storage.join(best, MANIFEST_FILE)):
        return best
    # Any checkpoint_* folder with a manifest (Ray's names sort by time; a user's may not).
    for name in sorted((n for n in names if n.startswith("checkpoint_")), reverse=True):
        if storage.exists(storage.join(uri, name, MANIFEST_FILE)):
            return storage.join(uri, name)
    what = "is empty or does not exist" if not names else "holds no finished checkpoint"
    raise CheckpointError(f"{uri} {what}: pass a checkpoint directory (…/checkpoint_*, with "
                          f"{MANIFEST_FILE} and {STATE_FILE}), a run directory holding some, or "
                          "an MLflow model URI (runs:/<run id>/model)")


def download(uri: str, cache_dir: str | Path | None = None, latest: bool = False) -> Path:
    """A verified local checkpoint folder for `uri` (a run: its best, or newest if `latest`);
    s3:// ones are copied to a cache once."""
    uri = find_checkpoint(uri, latest)
    filesystem, path = storage.filesystem_and_path(uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        path = Path(uri).expanduser()
        verify(path)
        return path
    root = Path(cache_dir).expanduser() if cache_dir else cache_root() / "checkpoints"
    # A finished checkpoint never changes (its manifest is written last), so the URI is the key.
    dest = root / hashlib.sha256(uri.encode()).hexdigest()[:16] / uri.rsplit("/", 1)[-1]
    if dest.is_dir():
        try:
            verify(dest)
            return dest
        except CheckpointError as err:
            log.warning("re-downloading %s: cached copy is bad (%s)", uri, err)
            shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    part.mkdir()  # copy_files writes into the folder but does not create it
    try:
        try:
            storage.with_retries(f"downloading {uri}", lambda: pafs.copy_files(
                path, str(part), source_filesystem=filesystem,
                destination_filesystem=pafs.LocalFileSystem()), READ_ATTEMPTS)
        except OSError as err:
            raise storage.StorageError(f"copying {uri} to {part} failed ({err}): check the S3 "
                                       "credentials/endpoint and that the disk has room") from err
        verify(part)
        try:
            os.replace(part, dest)
        except OSError:
            if not dest.is_dir():  # else another process (a Ray task) finished it first
                raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return dest
