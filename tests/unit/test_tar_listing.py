"""Listing ILSVRC-shaped tars with few reads, in parallel tasks, cached in OUT/_plan.json, and the
messages a user gets for a broken source."""
import io
import os
import shutil
import tarfile

import pytest

from benchmarks.ilsvrc_tars import synthetic_ilsvrc
from rn50.data import imagenet_sources
from rn50.data.class_names import imagenet_wnids
from rn50.data.datasets import DataError
from rn50.data.imagenet_sources import list_source, list_train_tar
from rn50.data.plan_cache import PLAN_FILE, cached_listing
from rn50.data.tar_listing import (BIG_BLOCK, SMALL_BLOCK, group_ranges, members_of_range,
                                   tar_members)
from tests.ilsvrc_fixture import make_ilsvrc, make_tars


class CountingFile:
    """A file whose `read_at` calls are counted: each one would be a request on S3."""

    def __init__(self, path):
        self.handle, self.reads = open(path, "rb"), 0

    def read_at(self, size, offset):
        self.reads += 1
        self.handle.seek(offset)
        return self.handle.read(size)

    def size(self):
        return os.fstat(self.handle.fileno()).st_size


@pytest.fixture(scope="module")
def big_members(tmp_path_factory):
    """A train tar of 3 class tars of ~5 MB each (so headers are jumped to, not read through)."""
    out = tmp_path_factory.mktemp("big")
    synthetic_ilsvrc(out, [os.urandom(500_000) for _ in range(10)], classes=3, per_class=10,
                     val_per_class=1)
    return out


@pytest.fixture(scope="module")
def small_members(tmp_path_factory):
    """100 classes x 30 images of 2 KB, as benchmarks/prepare_listing.py makes them."""
    out = tmp_path_factory.mktemp("small")
    synthetic_ilsvrc(out, [os.urandom(2000) for _ in range(7)], classes=100, per_class=30,
                     val_per_class=5)
    return out


def test_large_members_cost_one_read_per_header_small_ones_are_read_through(big_members,
                                                                            small_members):
    big = CountingFile(big_members / "ILSVRC2012_img_train.tar")
    inner = list(tar_members(big, 0, big.size(), "train tar"))
    assert [name for name, _, _ in inner] == ["n01440764.tar", "n01443537.tar", "n01484850.tar"]
    assert big.reads <= 4 and all(size > 5_000_000 for _, _, size in inner)
    small = CountingFile(small_members / "ILSVRC2012_img_val.tar")  # 500 flat members
    assert len(list(tar_members(small, 0, small.size(), "val tar"))) == 500
    assert small.reads <= 2 + small.size() // BIG_BLOCK
    assert SMALL_BLOCK < 512 * 1024 < BIG_BLOCK


def test_a_run_of_class_tars_is_listed_from_one_read(small_members):
    handle = CountingFile(small_members / "ILSVRC2012_img_train.tar")
    inner = list(tar_members(handle, 0, handle.size(), "train tar"))
    handle.reads = 0
    listed = members_of_range(handle, inner, "train tar")
    assert handle.reads == 1 and [len(members) for members in listed] == [30] * 100
    name, offset, size = listed[7][3]
    wnid = imagenet_wnids()[7]
    with tarfile.open(small_members / "ILSVRC2012_img_train.tar") as outer:
        inner_bytes = outer.extractfile(f"{wnid}.tar").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner_tar:
        expected = inner_tar.extractfile(f"{wnid}_3.JPEG").read()
    assert name == f"{wnid}_3.JPEG" and handle.read_at(size, offset) == expected
    assert group_ranges([("a", 0, 40), ("b", 40, 40), ("c", 80, 10)], 50) == [[0, 1], [2]]


def test_the_train_tar_is_listed_in_tasks_of_runs_of_class_tars(small_members, monkeypatch):
    calls = []

    def recording_map(function, *arguments):
        calls.append(len(arguments[0]))
        return list(map(function, *arguments))
    monkeypatch.setattr(imagenet_sources, "TASK_BYTES", 200_000)  # ~3 class tars of ~62 KB
    records, classes = list_train_tar(str(small_members / "ILSVRC2012_img_train.tar"),
                                      recording_map)
    assert len(records) == 3000 and len(classes) == 100 and calls == [34]
    assert [r.label for r in records] == [i // 30 for i in range(3000)]
    assert records == list_train_tar(str(small_members / "ILSVRC2012_img_train.tar"))[0]


def test_the_listing_is_cached_beside_the_output_until_the_source_changes(small_members,
                                                                          tmp_path):
    source, out = tmp_path / "source", str(tmp_path / "out")
    shutil.copytree(small_members, source)
    first = cached_listing(str(source), "train", None, out)
    assert not first[2] and (tmp_path / "out" / PLAN_FILE).is_file()

    def no_listing(*args):
        raise AssertionError("listed again")
    again = cached_listing(str(source), "train", None, out, map_fn=no_listing)
    assert again == (first[0], first[1], True)
    val = cached_listing(str(source), "val", first[1], out)
    assert len(val[0]) == 500 and cached_listing(str(source), "val", first[1], out)[2]
    assert cached_listing(str(source), "train", None, out)[2], "val's entry replaced train's"
    tar = source / "ILSVRC2012_img_train.tar"
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))  # re-uploaded
    assert not cached_listing(str(source), "train", None, out)[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_ilsvrc(root / "folders")
    make_tars(root / "folders", root / "tars")
    return root


def _copy(tiny, tmp_path):
    shutil.copytree(tiny / "tars", tmp_path / "tars")
    return tmp_path / "tars"


def test_broken_sources_get_messages_saying_what_to_do(tiny, tmp_path):
    tars = _copy(tiny, tmp_path)
    train = tars / "ILSVRC2012_img_train.tar"
    train.write_bytes(train.read_bytes()[:-20_000])  # cut short in the last class tar's data
    with pytest.raises(DataError, match="not a readable tar .unexpected end of data.*re-upload"):
        list_source(str(tars), "train")
    train.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="not a readable tar.*re-upload"):
        list_source(str(tars), "train")
    shutil.copy(tiny / "tars" / "ILSVRC2012_img_train.tar", train)
    _, classes = list_source(str(tars), "train")
    with pytest.raises(DataError, match="n03888257, which the train tar does not have"):
        list_source(str(tars), "val", classes[:3])
    (tars / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match="upload it beside ILSVRC2012_img_val.tar"):
        list_source(str(tars), "val", classes)


def test_a_corrupt_class_tar_is_named(tiny, tmp_path):
    tars = _copy(tiny, tmp_path)
    train = tars / "ILSVRC2012_img_train.tar"
    data = bytearray(train.read_bytes())
    with tarfile.open(train) as archive:
        second = archive.getmember("n02102040.tar")
    data[second.offset_data:second.offset_data + 512] = b"\xff" * 512  # its first header
    train.write_bytes(bytes(data))
    with pytest.raises(DataError, match="n02102040.tar inside .* is not a readable tar"):
        list_source(str(tars), "train")
