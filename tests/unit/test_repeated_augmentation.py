"""Repeated augmentation (`data.repeated_augmentations`): torchvision's RASampler semantics with the
loaders' determinism: copies of an image are augmented differently, spread over ranks, the epoch
keeps its length, a mid-epoch resume skips exactly, and parquet keeps its copies in row groups."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from rn50.config import DataConfig
from rn50.data.datasets import ParquetDataset
from rn50.data.loaders import build_loader
from rn50.data.samplers import RepeatedAugmentationSampler, RowGroupSampler
from rn50.data.transforms import train_transform


class _Indexed(Dataset):
    """Label = index; the image is drawn from torch's global RNG, like torchvision transforms."""

    def __init__(self, size: int = 24):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8), index


def _epoch(rank: int, world_size: int, epoch: int = 0, skip: int = 0, repeats: int = 3,
           dataset: Dataset | None = None) -> tuple[list[int], torch.Tensor]:
    loader = build_loader(dataset or _Indexed(), 4, rank=rank, world_size=world_size, seed=0,
                          epoch=epoch, train=True, skip_steps=skip,
                          repeated_augmentations=repeats)
    batches = list(loader)
    return torch.cat([b[1] for b in batches]).tolist(), torch.cat([b[0] for b in batches])


def test_sampler_deals_copies_across_ranks_and_keeps_the_epoch_length():
    samplers = [RepeatedAugmentationSampler(24, rank, 3, seed=0, epoch=1, repeats=3)
                for rank in range(3)]
    orders = [list(sampler) for sampler in samplers]
    assert [len(order) for order in orders] == [len(s) for s in samplers] == [8, 8, 8]  # 24 // 3
    virtual = [index for order in orders for index in order]
    assert len(set(virtual)) == 24 and all(0 <= v < 72 for v in virtual)  # no copy twice
    images = [v % 24 for v in virtual]
    assert len(set(images)) == 8  # 24 draws = 8 distinct images x 3 copies
    for image in set(images):  # the 3 copies of an image sit on the 3 ranks, one each
        ranks = {r for r, order in enumerate(orders) for v in order if v % 24 == image}
        assert ranks == {0, 1, 2}
    assert orders[0] == list(RepeatedAugmentationSampler(24, 0, 3, 0, 1, 3))
    assert orders[0] != list(RepeatedAugmentationSampler(24, 0, 3, 0, 2, 3))


def test_the_copies_of_an_image_get_different_augmentations():
    labels, images = _epoch(rank=0, world_size=1)
    assert len(labels) == 24 and len(set(labels)) == 8  # one rank: the copies are adjacent
    for label in set(labels):
        copies = [images[i] for i, seen in enumerate(labels) if seen == label]
        assert len(copies) == 3
        assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])


def test_the_copies_differ_across_ranks_too():
    runs = [_epoch(rank, world_size=3) for rank in range(3)]
    first = {label: image for label, image in zip(*runs[0])}
    shared = [(label, image) for label, image in zip(*runs[1]) if label in first]
    assert shared and all(not torch.equal(first[label], image) for label, image in shared)


def test_one_repeat_is_the_plain_distributed_sampler():
    plain = build_loader(_Indexed(), 4, rank=0, world_size=2, seed=0, epoch=0, train=True)
    assert _epoch(0, 2, repeats=1)[0] == torch.cat([b[1] for b in plain]).tolist()


def test_resume_skips_exactly_the_batches_already_trained():
    labels, images = _epoch(rank=1, world_size=2, epoch=5)
    tail_labels, tail_images = _epoch(rank=1, world_size=2, epoch=5, skip=2)
    assert tail_labels == labels[8:] and torch.equal(tail_images, images[8:])


def _parquet(tmp_path, rows: int = 18) -> ParquetDataset:
    images = []
    for i in range(rows):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG")
        images.append({"bytes": buffer.getvalue(), "path": f"{i}.jpg"})
    table = pa.table({"image": images, "label": list(range(rows))})
    (tmp_path / "train").mkdir()
    pq.write_table(table, tmp_path / "train" / "train-0.parquet", row_group_size=3)
    preset = train_transform(DataConfig(train_crop_px=8, hflip=True))
    return ParquetDataset(tmp_path, "train", preset, num_classes=rows)


def test_parquet_copies_stay_in_the_ranks_row_groups(tmp_path):
    dataset = _parquet(tmp_path)
    plain = [list(RowGroupSampler(dataset, rank, 2, 0, 1)) for rank in range(2)]
    repeated = [list(RowGroupSampler(dataset, rank, 2, 0, 1, repeats=3)) for rank in range(2)]
    assert [len(order) for order in repeated] == [len(order) for order in plain]
    for rank in range(2):
        rows = [v % 18 for v in repeated[rank]]
        assert set(rows) <= set(plain[rank])  # only rows of the rank's own groups
        assert all(rows[i] == rows[i + 1] == rows[i + 2] for i in range(0, len(rows) - 2, 3))
        assert len(set(repeated[rank])) == len(repeated[rank])  # distinct virtual indices
    labels, images = _epoch(0, 2, repeats=3, dataset=dataset)
    for first in range(0, len(labels) - 2, 3):
        assert labels[first] == labels[first + 1] == labels[first + 2]
        assert not torch.equal(images[first], images[first + 1])
