"""Keep the head's MLflow sqlite database safe on S3: restore it at start, copy it periodically.

The cluster head (cluster.yaml) runs `restore` before starting `mlflow server`, and `loop` in the
background, so `ray down` + `ray up` (or a replaced head) keeps every experiment. Copies are
taken with sqlite's online backup API, which is consistent while the server writes.

    python -m rn50.mlflow_backup restore --db ~/mlflow/mlflow.db --backup s3://B/rn50/mlflow.db
    python -m rn50.mlflow_backup backup  --db ~/mlflow/mlflow.db --backup s3://B/rn50/mlflow.db
    python -m rn50.mlflow_backup loop --every-s 900 --db ... --backup ...
"""
from __future__ import annotations

import argparse
import hashlib
import logging
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
    """Copy `db` to `uri` (s3:// or local); return the copy's SHA-256."""
    data = snapshot(db)
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def restore(db: Path, uri: str) -> bool:
    """Download `uri` to `db` if `db` does not exist yet; return whether it did.

    First proves the backup location writable, so a wrong bucket or a missing permission stops
    the head's start commands (and `ray up`) instead of failing silently every 15 minutes.
    """
    storage.preflight(uri.rsplit("/", 1)[0])
    if db.exists():
        log.info("keeping the existing %s (not restoring over a live database)", db)
        return False
    if not storage.exists(uri):
        log.info("no backup at %s yet: MLflow starts with an empty database", uri)
        return False
    data = storage.read_bytes(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(db.name + ".partial")
    partial.write_bytes(data)
    _check_sqlite(partial)
    partial.replace(db)  # atomic: the server never sees half a file
    log.info("restored %s (%d bytes) from %s", db, len(data), uri)
    return True


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


def loop(db: Path, uri: str, every_s: float, rounds: int = 0) -> None:
    """Back up every `every_s` seconds when the database changed; `rounds` > 0 stops after N."""
    last, done = None, 0
    while not rounds or done < rounds:
        done += 1
        try:
            digest = hashlib.sha256(snapshot(db)).hexdigest() if db.exists() else None
            if digest is not None and digest != last:
                last = backup(db, uri)
                log.info("backed up %s to %s (sha256 %s)", db, uri, last[:12])
        except Exception as err:  # a transient S3 error must not end the backups for good
            log.warning("backup of %s to %s failed, retrying next round: %s", db, uri, err)
        if not rounds or done < rounds:
            time.sleep(every_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("restore", "backup", "loop"))
    parser.add_argument("--db", required=True, type=Path, help="the MLflow sqlite file")
    parser.add_argument("--backup", required=True, help="s3://bucket/key or a local path")
    parser.add_argument("--every-s", type=float, default=900.0, help="loop period in seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    db = args.db.expanduser()
    try:
        if args.action == "restore":
            restore(db, args.backup)
        elif args.action == "backup":
            print(backup(db, args.backup))
        else:
            loop(db, args.backup, args.every_s)
    except (storage.StorageError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
