"""Imagenette's download, verification and extraction against a local HTTP server serving
archives the tests build (good, truncated, incomplete, with a path-traversal member), and the
offline error."""
import functools
import hashlib
import http.server
import io
import json
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from rn50.config import DataConfig
from rn50.data.loaders import build_datasets
from rn50.data.datasets import DataError
from rn50.data.small_datasets import IMAGENETTE_SYNSETS, prepare_imagenette
from tests.unit.test_data import _jpeg_bytes


def _imagenette_tgz(path: Path, synsets=tuple(IMAGENETTE_SYNSETS), extra: str | None = None):
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, wnid in enumerate(synsets):
            for split in ("train", "val"):
                add(f"imagenette2-160/{split}/{wnid}/{wnid}_{split}.JPEG", _jpeg_bytes(i))
        add("imagenette2-160/noisy_imagenette.csv", b"path,noisy_labels_0\n")
        if extra:
            add(extra, b"boom")
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_imagenette_download_verify_extract(tmp_path, server):
    served, base = server
    md5 = _imagenette_tgz(served / "imagenette2-160.tgz")
    cache = tmp_path / "cache"
    url = f"{base}/imagenette2-160.tgz"
    root = prepare_imagenette(cache, 160, url=url, expected_md5=md5)
    assert root == cache / "imagenette2-160"
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(IMAGENETTE_SYNSETS)
    marker = json.loads((root / ".complete").read_text())
    sha256 = hashlib.sha256((served / "imagenette2-160.tgz").read_bytes()).hexdigest()
    assert marker["images"] == 20 and marker["sha256"] == sha256
    assert (cache / "imagenette2-160.tgz.sha256").read_text().split()[0] == sha256
    assert not list(cache.glob("*.part")) and not list(cache.glob(".*extracting"))
    (served / "imagenette2-160.tgz").unlink()  # cached: no second download
    assert prepare_imagenette(cache, 160, url=url) == root
    cfg = DataConfig(dataset="imagenette", root=str(cache), train_crop_px=16, val_resize_px=16,
                     val_crop_px=16)
    train, val, names = build_datasets(cfg)  # default URL, but the marker short-circuits it
    assert names[0] == "tench" and names[-1] == "parachute" and len(train) == len(val) == 10


def test_imagenette_bad_archives_raise_and_leave_no_marker(tmp_path, server):
    served, base = server
    good = tmp_path / "good.tgz"
    md5 = _imagenette_tgz(good)
    (served / "imagenette2-160.tgz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cache = tmp_path / "cache"
    url = f"{base}/imagenette2-160.tgz"
    with pytest.raises(DataError, match="MD5"):
        prepare_imagenette(cache, 160, url=url, expected_md5=md5)
    with pytest.raises(DataError, match="not a readable archive"):
        prepare_imagenette(cache, 160, url=url)  # no checksum: the tar itself is checked
    assert not (cache / "imagenette2-160" / ".complete").exists()
    assert not (cache / "imagenette2-160.tgz").exists()  # a bad download is not kept
    _imagenette_tgz(served / "imagenette2-160.tgz", synsets=list(IMAGENETTE_SYNSETS)[:9])
    with pytest.raises(DataError, match="lacks the synsets"):
        prepare_imagenette(cache, 160, url=url)
    _imagenette_tgz(served / "imagenette2-160.tgz", extra="imagenette2-160/../../evil.txt")
    with pytest.raises(DataError, match="unsafe path"):
        prepare_imagenette(cache, 160, url=url)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (cache / "imagenette2-160" / ".complete").exists()


def test_imagenette_offline_error_says_what_to_do(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connection refused
    with pytest.raises(DataError, match="download it manually to .*imagenette2-160.tgz"):
        prepare_imagenette(tmp_path, 160, url=f"http://127.0.0.1:{port}/imagenette2-160.tgz")
    with pytest.raises(DataError, match="160, 320 or 0"):
        prepare_imagenette(tmp_path, 224)
