"""Keep the head's MLflow sqlite database safe on S3: restore it at start, copy it periodically.

The cluster head (cluster.yaml) runs `restore` before starting `mlflow server` (it also puts the
database in WAL mode, so writers and the backup's reader do not lock each other out), and `loop`
in the background; every training job and sweep backs up when it ends (`backup_at_job_end`), so
`ray down` + `ray up` (or a replaced head) keeps every experiment. Copies are taken with sqlite's
online backup API, which is consistent while the server writes; each one is also kept as a
timestamped version (`<backup>.versions/<UTC time>.db`).

    python -m rn50.mlflow_backup restore --db ~/mlflow/mlflow.db --backup s3://B/rn50/mlflow.db
    python -m rn50.mlflow_backup backup  --db ~/mlflow/mlflow.db --backup s3://B/rn50/mlflow.db
    python -m rn50.mlflow_backup loop --every-s 900 --db ... --backup ...
    python -m rn50.mlflow_backup status --db ~/mlflow/mlflow.db   # exit 1 if the last one failed

Every attempt writes `<db>.backup-status.json` beside the database. A failed backup is logged as
an error, the status file says so (and `status` exits non-zero, a health check), and the next
training run started on this head tags its MLflow run with it (`RN50_MLFLOW_BACKUP_STATUS`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from rn50.io import storage

log = logging.getLogger("rn50.io.mlflow_backup")


def snapshot(db: Path) -> bytes:
    """A consistent copy of the sqlite file at `db`, taken while writers may be active."""
    if not db.is_file():
        raise FileNotFoundError(f"no MLflow database at {db}")
    with tempfile.TemporaryDirectory(prefix="rn50-mlflow-") as directory:
        copy_path = Path(directory, "copy.db")
        source, target = sqlite3.connect(db), sqlite3.connect(copy_path)
        try:
            source.backup(target)  # page-by-page copy under sqlite's own locking
        finally:
            target.close()
            source.close()
        return copy_path.read_bytes()


def backup(db: Path, uri: str) -> str:
    """Copy `db` to `uri` (s3:// or local) and keep a timestamped version beside it
    (`<uri>.versions/<UTC time>.db`); return the copy's SHA-256."""
    data = snapshot(db)
    storage.write_bytes(version_uri(uri, time.time()), data)
    storage.write_bytes(uri, data)  # last: `uri` is always a complete, newest copy
    return hashlib.sha256(data).hexdigest()


def version_uri(uri: str, when_s: float) -> str:
    """Where the version of a backup taken at `when_s` is kept (restorable like `uri` itself)."""
    return f"{uri}.versions/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(when_s))}.db"


def backup_and_record(db: Path, uri: str) -> str:
    """`backup`, with its outcome written to the status file (an error is raised, and recorded
    for the health check and the next run's tag)."""
    previous = read_status(status_path(db)) or {}
    try:
        digest = backup(db, uri)
    except Exception as err:
        failures = previous.get("consecutive_failures", 0) + 1
        log.error("backup of %s to %s FAILED (%d in a row): %s", db, uri, failures, err)
        _write_status(db, uri, str(err) or type(err).__name__, failures)
        raise
    _write_status(db, uri, "", 0)
    log.info("backed up %s to %s (sha256 %s)", db, uri, digest[:12])
    return digest


def backup_at_job_end() -> None:
    """On a cluster head (`RN50_MLFLOW_BACKUP_STATUS` set, the backup location known from the
    status `restore` and every backup write), back the database up now, so that `ray down` right
    after a job loses nothing; a failure is logged and recorded, never raised into the job."""
    path = os.environ.get("RN50_MLFLOW_BACKUP_STATUS")
    status = read_status(path) if path else None
    if not status or not status.get("uri"):
        return
    db = Path(path[: -len(STATUS_SUFFIX)]) if path.endswith(STATUS_SUFFIX) else None
    if db is None or not db.is_file():
        log.error("no MLflow database beside %s: the job-end backup was not taken", path)
        return
    try:
        backup_and_record(db, status["uri"])
    except Exception:  # noqa: BLE001 - recorded by backup_and_record; the job's result stands
        pass


def use_wal(db: Path) -> None:
    """Put `db` in sqlite's write-ahead-log mode (kept in the file): the server's writers and the
    backup's reader no longer block each other ("database is locked")."""
    db.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(db)
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        connection.close()
    if mode.lower() != "wal":
        raise ValueError(f"{db} could not be switched to WAL mode (it is in {mode} mode)")


def restore(db: Path, uri: str) -> bool:
    """Download `uri` to `db` if `db` does not exist yet; return whether it did.

    First proves the backup location writable, so a wrong bucket or a missing permission stops
    the head's start commands (and `ray up`) instead of failing silently every 15 minutes.
    """
    storage.preflight(uri.rsplit("/", 1)[0])
    restored = False
    if db.exists():
        log.info("keeping the existing %s (not restoring over a live database)", db)
    elif not storage.exists(uri):
        log.info("no backup at %s yet: MLflow starts with an empty database", uri)
    else:
        data = storage.read_bytes(uri)
        db.parent.mkdir(parents=True, exist_ok=True)
        partial = db.with_name(db.name + ".partial")
        partial.write_bytes(data)
        _check_sqlite(partial)
        partial.replace(db)  # atomic: the server never sees half a file
        log.info("restored %s (%d bytes) from %s", db, len(data), uri)
        restored = True
    use_wal(db)
    if read_status(status_path(db)) is None:  # jobs find the backup location here
        _write_status(db, uri, "", 0)
    return restored


def _check_sqlite(path: Path) -> None:
    connection = sqlite3.connect(path)
    try:
        result = connection.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path} is not a sqlite database ({err}); not restoring it") from err
    finally:
        connection.close()
    if result != "ok":
        raise ValueError(f"{path} failed sqlite's integrity check ({result}); refusing to restore")


STATUS_SUFFIX = ".backup-status.json"


def status_path(db: Path) -> Path:
    """Where the outcome of the last backup attempt of `db` is written."""
    return db.with_name(db.name + STATUS_SUFFIX)


def _write_status(db: Path, uri: str, error: str, failures: int) -> None:
    status = {"ok": not error, "uri": uri, "error": error, "consecutive_failures": failures,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    status_path(db).write_text(json.dumps(status))


def read_status(path: Path | str) -> dict | None:
    """The last backup status written at `path`, or None when there is none (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def failed_backup_note() -> str:
    """A one-line description of a failed last backup, from $RN50_MLFLOW_BACKUP_STATUS (set on
    the cluster head), or "" when it succeeded or nothing says otherwise."""
    status = read_status(os.environ.get("RN50_MLFLOW_BACKUP_STATUS", "")) \
        if os.environ.get("RN50_MLFLOW_BACKUP_STATUS") else None
    if not status or status.get("ok"):
        return ""
    return (f"the MLflow backup to {status.get('uri')} has failed "
            f"{status.get('consecutive_failures')} time(s) in a row, last at {status.get('time')}:"
            f" {status.get('error')}")


def loop(db: Path, uri: str, every_s: float, rounds: int = 0) -> None:
    """Back up every `every_s` seconds when the database changed; `rounds` > 0 stops after N."""
    last, done = None, 0
    while not rounds or done < rounds:
        done += 1
        try:
            digest = hashlib.sha256(snapshot(db)).hexdigest() if db.exists() else None
            if digest is not None and digest != last:
                last = backup_and_record(db, uri)
            else:
                _write_status(db, uri, "", 0)
        except Exception:  # noqa: BLE001 - logged and recorded; keep trying
            pass
        if not rounds or done < rounds:
            time.sleep(every_s)


def check(db: Path, max_age_s: float) -> tuple[bool, str]:
    """(healthy, message): the last backup attempt succeeded and is at most `max_age_s` old."""
    path = status_path(db)
    status = read_status(path)
    if status is None:
        return False, f"no backup status at {path}: is the backup loop running?"
    age_s = time.time() - path.stat().st_mtime
    if not status["ok"]:
        return False, f"last backup FAILED ({status['consecutive_failures']} in a row): " \
            f"{status['error']}"
    if age_s > max_age_s:
        return False, f"last backup attempt was {age_s:.0f} s ago (> {max_age_s:.0f} s): " \
            "is the backup loop running?"
    return True, f"last backup OK at {status['time']} to {status['uri']}"


def main(argv: list[str] | None = None) -> int:
    """CLI: restore, backup, loop, status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("restore", "backup", "loop", "status"))
    parser.add_argument("--db", required=True, type=Path, help="the MLflow sqlite file")
    parser.add_argument("--backup", help="s3://bucket/key or a local path (not for status)")
    parser.add_argument("--every-s", type=float, default=900.0, help="loop period in seconds")
    parser.add_argument("--max-age-s", type=float, default=2000.0,
                        help="status: how old the last attempt may be (default ~2 periods)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    db = args.db.expanduser()
    if args.action == "status":
        healthy, message = check(db, args.max_age_s)
        print(message, file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else 1
    if not args.backup:
        parser.error(f"{args.action} needs --backup s3://bucket/key (or a local path)")
    try:
        if args.action == "restore":
            restore(db, args.backup)
        elif args.action == "backup":
            print(backup_and_record(db, args.backup))
        else:
            loop(db, args.backup, args.every_s)
    except (storage.StorageError, OSError, ValueError, sqlite3.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
