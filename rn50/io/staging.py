"""Local scratch folders for checkpoints on their way to or from storage, and their clean-up.

A checkpoint is written into a local folder before Ray's upload thread uploads and deletes it;
one being read from S3 is downloaded into one. A process killed in between (a SIGKILLed worker, a
lost node's raylet, a spot reclaim) cannot delete its folder, and at ~180 MB a ResNet-50 state a
few dozen of them fill a disk. So each folder's name carries its host name and process id, and
a worker starting on a node removes the folders of its host's processes that no longer exist (a
temp dir shared with another container, whose processes this one cannot see, is left alone).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
PREFIX = "rn50-ckpt-"


def _owner_prefix() -> str:
    return f"{PREFIX}{socket.gethostname()}-"


def _this_process_prefix() -> str:
    return f"{_owner_prefix()}{os.getpid()}-"


def staging_folder() -> str:
    """A new local folder, named after this process, to write a checkpoint into before upload."""
    return tempfile.mkdtemp(prefix=_this_process_prefix())


def download_folder() -> tempfile.TemporaryDirectory:
    """A local folder, named after this process, that is deleted when its `with` block ends."""
    return tempfile.TemporaryDirectory(prefix=_this_process_prefix())


def remove_orphaned(root: str | Path | None = None) -> int:
    """Delete the scratch folders under `root` (the temp dir) whose process is gone; the count.

    A folder of a live process, another host's, or one without a process id in its name, is
    kept."""
    root = Path(root or tempfile.gettempdir())
    owned = re.compile(rf"^{re.escape(_owner_prefix())}(\d+)-")
    removed_bytes, removed = 0, 0
    for folder in root.glob(f"{PREFIX}*"):
        owner = owned.match(folder.name)
        if not owner or not folder.is_dir() or _alive(int(owner.group(1))):
            continue
        removed_bytes += _size_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)  # another worker of the node may race us
        removed += 1
    if removed:
        log.warning("removed %d checkpoint scratch folder(s), %.0f MB, that killed processes "
                    "left in %s", removed, removed_bytes / 1e6, root)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


def _size_bytes(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    except OSError:  # removed under us by another worker of the node
        return 0
