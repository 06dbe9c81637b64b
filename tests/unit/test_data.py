"""Data preparation, datasets and loaders, on data the tests generate themselves (no network)."""
import csv
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from rn50.config import DataConfig
from rn50.data.loaders import build_datasets, build_loader, collate_skip_corrupt
from rn50.data.datasets import DataError, ImageFolderDataset, ParquetDataset
from rn50.data.small_datasets import DIGITS_CLASSES, prepare_digits
from rn50.data.transforms import load_rgb


def _jpeg_bytes(seed: int, size=(20, 16), mode="RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg"))


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return prepare_digits(tmp_path_factory.mktemp("digits") / "cache")


def test_digits_written_once_with_marker(digits_root):
    files = _images(digits_root)
    assert len(files) == 1797
    assert len(_images(digits_root / "train")) == 1437 and len(_images(digits_root / "val")) == 360
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == DIGITS_CLASSES
    assert json.loads((digits_root / ".complete").read_text())["images"] == 1797
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    before = {p: p.stat().st_mtime_ns for p in [*files[:50], digits_root / ".complete"]}
    assert prepare_digits(digits_root) == digits_root
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_half_written_digits_tree_is_rebuilt(digits_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    (root / ".complete").unlink()
    for path in _images(root / "val" / "3"):
        path.unlink()
    (root / "train" / "0" / "stray.jpg").write_bytes(b"half")
    prepare_digits(root)
    assert len(_images(root)) == 1797 and not (root / "train" / "0" / "stray.jpg").exists()
    assert (root / ".complete").is_file()


def test_build_datasets_digits_subsets_are_fixed(digits_root):
    cfg = DataConfig(root=str(digits_root), max_train_samples=100, max_val_samples=30)
    train, val, names = build_datasets(cfg)
    assert names == DIGITS_CLASSES and len(train) == 100 and len(val) == 30
    assert build_datasets(cfg)[0].indices == train.indices
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    with pytest.raises(DataError, match="num_classes"):
        build_datasets(DataConfig(root=str(digits_root), num_classes=1000))


# ---------------------------------------------------------------- image folders


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    for label in ("cat", "dog"):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        for i in range(5):
            (folder / f"{i}.JPEG").write_bytes(_jpeg_bytes(i, mode="L" if i == 0 else "RGB"))
    (tmp_path / "train" / "cat" / "bad.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "train" / "dog" / "cut.jpg").write_bytes(_jpeg_bytes(9)[:200])  # truncated
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    dataset = ImageFolderDataset(tmp_path, "train")
    assert dataset.classes == ["cat", "dog"] and len(dataset.samples) == 12
    bad = [i for i, (path, _) in enumerate(dataset.samples) if Path(path).stem in ("bad", "cut")]
    assert all(dataset[i] is None for i in bad)
    images, labels, skipped = collate_skip_corrupt([dataset[bad[0]], dataset[0]])
    assert images.shape == (1, 3, 16, 20) and labels.dtype == torch.int64 and skipped == 1
    assert collate_skip_corrupt([None])[2] == 1
    dataset.transform = lambda image: torch.zeros(3, 8, 8, dtype=torch.uint8)
    loader = build_loader(dataset, 4, rank=0, world_size=1, seed=0, epoch=0, train=False,
                          loader_workers=0)
    batches = list(loader)
    assert sum(b[2] for b in batches) == 2 and sum(len(b[1]) for b in batches) == 10


def test_ilsvrc_flat_val_with_kaggle_solution_csv(tmp_path):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    wnids = ["n01440764", "n01443537", "n01484850"]
    for i, wnid in enumerate(wnids):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_1.JPEG").write_bytes(_jpeg_bytes(i))
    (root / "val").mkdir()
    truth = {}
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as handle:  # Kaggle: 3 levels up
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        for i in range(7):
            image_id, wnid = f"ILSVRC2012_val_{i + 1:08d}", wnids[(i * 2) % 3]
            (root / "val" / f"{image_id}.JPEG").write_bytes(_jpeg_bytes(10 + i))
            writer.writerow([image_id, f"{wnid} 1 2 10 12 {wnid} 3 4 8 9"])
            truth[image_id] = wnids.index(wnid)
    train = ImageFolderDataset(root, "train")
    val = ImageFolderDataset(root, "val", classes=train.classes)
    assert val.classes == wnids == ImageFolderDataset(root, "val").classes
    assert {Path(p).stem: label for p, label in val.samples} == truth
    assert val[0][0].shape == (3, 16, 20)
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match="LOC_val_solution.csv"):
        ImageFolderDataset(root, "val")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere", "train")


# ---------------------------------------------------------------- parquet


def _write_shards(directory: Path, split: str, rows: list[tuple[bytes | None, int]], shards: int,
                  names: list[str] | None, flat: bool = False) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per_shard = -(-len(rows) // shards)
    for shard in range(shards):
        chunk = rows[shard * per_shard:(shard + 1) * per_shard]
        table = pa.table({
            "image": pa.array([{"bytes": b, "path": f"{i}.JPEG"} for i, (b, _) in enumerate(chunk)],
                              type=image_type),
            "label": pa.array([label for _, label in chunk], type=pa.int64())})
        if names:
            features = {"image": {"_type": "Image"},
                        "label": {"names": names, "_type": "ClassLabel"}}
            table = table.replace_schema_metadata(
                {"huggingface": json.dumps({"info": {"features": features}})})
        name = f"{split}-{shard:05d}-of-{shards:05d}.parquet"
        path = directory / split / name if flat else directory / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=3)


def test_parquet_shards_round_trip(tmp_path):
    rows = [(_jpeg_bytes(i), i % 4) for i in range(11)]
    rows[5] = (b"\xff\xd8garbage", rows[5][1])
    names = ["tench", "goldfish", "shark", "ray"]
    _write_shards(tmp_path, "train", rows, shards=2, names=names)
    _write_shards(tmp_path, "validation", rows[:4], shards=1, names=names)
    train = ParquetDataset(tmp_path, "train", cache_row_groups=2)
    assert len(train) == 11 and train.classes == names and len(train.files) == 2
    for i in [0, 10, 4, 3, 7, 0]:  # crosses files and row groups, revisits an evicted group
        image, label = train[i]
        assert label == rows[i][1]
        assert torch.equal(image, torch.from_numpy(np.array(load_rgb(rows[i][0]))).permute(2, 0, 1))
    assert train[5] is None
    with pytest.raises(IndexError):
        train[11]
    clone = pickle.loads(pickle.dumps(train))  # what DataLoader workers under spawn receive
    assert clone[10][1] == rows[10][1]
    val = ParquetDataset(f"file://{tmp_path}", "val", filesystem=None)
    assert [val[i][1] for i in range(len(val))] == [0, 1, 2, 3]
    assert len(ParquetDataset(str(tmp_path), "val", filesystem=pafs.LocalFileSystem())) == 4


def test_parquet_split_folders_without_metadata_and_build_datasets(tmp_path):
    rows = [(_jpeg_bytes(i, size=(40, 40)), i % 3) for i in range(9)]
    _write_shards(tmp_path, "train", rows, shards=3, names=None, flat=True)
    _write_shards(tmp_path, "val", rows[:3], shards=1, names=None, flat=True)
    assert ParquetDataset(tmp_path, "train").classes == ["0", "1", "2"]  # from the labels
    cfg = DataConfig(dataset="parquet", root=str(tmp_path), num_classes=3, train_crop_px=24,
                     val_resize_px=28, val_crop_px=24)
    train, val, names = build_datasets(cfg)
    assert names == ["0", "1", "2"] and len(train) == 9 and len(val) == 3
    assert train[0][0].shape == val[0][0].shape == (3, 24, 24)
    with pytest.raises(DataError, match="no parquet shards"):
        ParquetDataset(tmp_path, "test")


# ---------------------------------------------------------------- sharding and determinism


class _Indexed(Dataset):
    """Label = index; the image is drawn from torch's global RNG, like torchvision transforms."""

    def __len__(self):
        return 20

    def __getitem__(self, index):
        return torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8), index


def _epoch(rank, epoch, seed=0, world_size=2, train=True, workers=0, dataset=None):
    loader = build_loader(dataset or _Indexed(), 5, rank=rank, world_size=world_size, seed=seed,
                          epoch=epoch, train=train, loader_workers=workers)
    batches = list(loader)
    return torch.cat([b[1] for b in batches]).tolist(), torch.cat([b[0] for b in batches])


def test_ranks_are_disjoint_cover_the_epoch_and_reshuffle():
    order0, images0 = _epoch(0, epoch=0)
    order1, _ = _epoch(1, epoch=0)
    assert len(order0) == len(order1) == 10 and sorted(order0 + order1) == list(range(20))
    torch.manual_seed(123)  # the caller's RNG state does not matter ...
    again, images_again = _epoch(0, epoch=0)
    assert again == order0 and torch.equal(images_again, images0)  # ... same (seed, epoch, rank)
    assert _epoch(0, epoch=1)[0] != order0 and _epoch(0, epoch=0, seed=1)[0] != order0
    state = torch.get_rng_state()
    _epoch(0, epoch=3)
    assert torch.equal(torch.get_rng_state(), state)  # augmentation seeding leaves it untouched
    odd = _epoch(0, epoch=0, world_size=3)[0]
    assert len(odd) == 5  # 20 // 3 = 6 per rank, drop_last batches of 5


def test_augmentation_independent_of_worker_count():
    order, images = _epoch(1, epoch=2)
    order_w, images_w = _epoch(1, epoch=2, workers=2)
    assert order_w == order and torch.equal(images_w, images)


def test_val_shards_are_unpadded_and_ordered():
    class Odd(_Indexed):
        def __len__(self):
            return 21
    shards = [_epoch(rank, epoch=0, world_size=2, train=False, dataset=Odd())[0] for rank in (0, 1)]
    assert shards[0] == list(range(0, 21, 2)) and shards[1] == list(range(1, 21, 2))


# ---------------------------------------------------------------- imagenette


def test_row_group_sampler_reads_each_group_once_per_rank(tmp_path):
    from rn50.data.samplers import RowGroupSampler
    rows = [(_jpeg_bytes(i), i % 4) for i in range(20)]  # 2 shards x row groups of 3
    _write_shards(tmp_path, "train", rows, shards=2, names=None, flat=True)
    dataset = ParquetDataset(tmp_path, "train", num_classes=4)
    samplers = [RowGroupSampler(dataset, rank, 2, seed=0, epoch=3) for rank in range(2)]
    orders = [list(sampler) for sampler in samplers]
    assert len(orders[0]) == len(orders[1]) == len(samplers[0])  # equal steps for DDP
    assert not set(orders[0]) & set(orders[1])
    def group_of(index):
        return max(i for i, start in enumerate(dataset._starts) if start <= index)
    for order in orders:  # each group's rows come together: one read per group
        groups = [group_of(i) for i in order]
        assert groups == sorted(groups, key=groups.index)
    assert orders[0] == list(RowGroupSampler(dataset, 0, 2, seed=0, epoch=3))
    assert orders[0] != list(RowGroupSampler(dataset, 0, 2, seed=0, epoch=4))
    loader = build_loader(dataset, 2, rank=0, world_size=2, seed=0, epoch=3, train=True)
    assert all(isinstance(stream, RowGroupSampler) for stream in loader.batch_sampler.streams)
    assert [i for batch in loader.batch_sampler for i in batch] == orders[0]  # 8 rows, batches of 2
