"""Data sets and loaders: the recipe's data set built from its config, sharded deterministic loading.

Public API: `build_datasets(data_cfg)` -> (train, val, class names); `build_loader(...)` -> a
DataLoader yielding `(uint8 images [B,3,H,W], int64 labels [B], num_skipped)`. The datasets and
`DataError` live in rn50.data.datasets; the cached digits / Imagenette preparation in
rn50.small_datasets.

Determinism: a training loader's order is a DistributedSampler permutation of (seed, epoch), and
each sample's augmentation is drawn from torch's CPU generator re-seeded from (seed, epoch,
dataset index) around that one `__getitem__` (the caller's RNG state is restored afterwards). So
the images a rank sees for a given (seed, epoch, rank) are identical whatever `loader_workers` is,
and a resumed run reproduces a run that never stopped, with nothing for the caller to seed.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from rn50.data.datasets import DataError, ImageFolderDataset, ParquetDataset
from rn50.data.device_decode import DeferredBatch, DeviceDecodePreset, EncodedImage
from rn50.data.class_names import readable_classes, readable_names
from rn50.data.small_datasets import prepare_digits, prepare_imagenette
from rn50.data.transforms import train_transform, val_transform


def _fixed_subset(dataset: Dataset, limit: int) -> Dataset:
    """The first `limit` samples of a fixed (seed 0) shuffle, kept in index order; 0 keeps all."""
    if limit <= 0 or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return Subset(dataset, sorted(order[:limit].tolist()))


def build_datasets(data_cfg) -> tuple[Dataset, Dataset, list[str]]:
    """Train and val datasets (uint8 tensors out) and the class names for `data_cfg`.

    The names are readable: ImageNet wnids (folders, shards from the ILSVRC tars) become
    torchvision's names (`n01440764` -> `tench`); `dataset_classes(train)` gives the wnids too.

    `max_val_samples` also takes a fixed shuffled subset (a plain prefix of a class-sorted folder
    would be a single class). Digits are written at 32 px regardless of the crop (the source is
    8 px), so one cache serves every recipe.
    """
    train_tf = DeviceDecodePreset(data_cfg) if data_cfg.decode_on_device else \
        train_transform(data_cfg)
    val_tf, kind = val_transform(data_cfg), data_cfg.dataset
    root = Path(os.path.expanduser(data_cfg.root))
    if kind == "parquet":
        train = ParquetDataset(data_cfg.root, "train", train_tf, num_classes=data_cfg.num_classes)
        val = ParquetDataset(data_cfg.root, "val", val_tf, num_classes=data_cfg.num_classes)
    elif kind in ("digits", "imagefolder", "imagenette"):
        if kind == "digits":
            root = prepare_digits(root)
        elif kind == "imagenette":
            root = prepare_imagenette(root, data_cfg.imagenette_size_px)
        train = ImageFolderDataset(root, "train", train_tf)
        val = ImageFolderDataset(root, "val", val_tf, classes=train.classes)
    else:
        raise DataError(f"unknown data.dataset {kind!r}")
    names = readable_names(train.classes)
    if len(names) != data_cfg.num_classes:
        raise DataError(f"the data set has {len(names)} classes but data.num_classes is "
                        f"{data_cfg.num_classes}; set data.num_classes={len(names)}")
    return (_fixed_subset(train, data_cfg.max_train_samples),
            _fixed_subset(val, data_cfg.max_val_samples), names)


def dataset_classes(dataset: Dataset) -> tuple[list[str], list[str] | None]:
    """(readable class names, ImageNet wnids or None) of a dataset built here."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return readable_classes(dataset.classes)


def set_train_crop_px(train_set: Dataset, crop_px: int) -> None:
    """Point the train dataset's RandomResizedCrop at `crop_px` (progressive resizing)."""
    while isinstance(train_set, Subset):
        train_set = train_set.dataset
    train_set.transform.set_crop_px(crop_px)


def collate_skip_corrupt(batch: list) -> tuple[torch.Tensor | DeferredBatch, torch.Tensor, int]:
    """Stack the decodable samples; `None` (corrupt) ones are dropped and counted. Samples still
    encoded (`data.decode_on_device`) make a `DeferredBatch` that the training step decodes."""
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), \
            skipped
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    if any(isinstance(image, EncodedImage) for image, _ in good):
        return DeferredBatch([image for image, _ in good]), labels, skipped
    return torch.stack([image for image, _ in good]), labels, skipped


def _mix(*values: int) -> int:
    seed = 0x2545F491
    for value in values:
        seed = (seed * 0x9E3779B97F4A7C15 + int(value) + 1) % (1 << 63)
    return seed


class _SeededAugmentation(Dataset):
    """Draw each sample's augmentation from torch's CPU generator seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        generator = torch.default_generator  # CPU only: CUDA RNG state is never touched
        state = generator.get_state()
        generator.manual_seed(_mix(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class ShardedEvalSampler(DistributedSampler):
    """Rank r takes indices r, r+W, ...: disjoint, covering, no padding duplicates (exact eval)."""

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode per core: intra-op threads would only oversubscribe
    random.seed(torch.initial_seed() % (1 << 32))
    np.random.seed(torch.initial_seed() % (1 << 32))


class _SkipSampler(Sampler):
    """A sampler's order without its first `skip` indices: resuming mid-epoch never decodes the
    images already trained on, and sees the rest in exactly the original order."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class RowGroupSampler(Sampler):
    """Shuffled reading of parquet shards without random access (what streaming from S3 needs).

    Row groups are dealt to ranks in a seeded order per epoch, and rows are shuffled within each
    group, so every rank reads each of its row groups once, front to back, and never touches
    another rank's. Ranks are cut to the same length (DDP needs equal step counts). The shards
    written by prepare_imagenet are globally shuffled, so this keeps the randomness of a full
    shuffle at the cost of one group's worth of correlation inside a batch.
    """

    def __init__(self, dataset: ParquetDataset, rank: int, world_size: int, seed: int, epoch: int):
        ends = [*dataset._starts[1:], len(dataset)]
        order = torch.randperm(len(ends), generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        per_rank = [order[r::world_size].tolist() for r in range(world_size)]
        self.length = min(sum(ends[g] - dataset._starts[g] for g in groups) for groups in per_rank)
        self.indices = []
        for group in per_rank[rank]:
            rows = torch.randperm(ends[group] - dataset._starts[group],
                                  generator=torch.Generator().manual_seed(_mix(seed, epoch, group)))
            self.indices += (rows + dataset._starts[group]).tolist()
        self.indices = self.indices[:self.length]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.length


def build_loader(dataset: Dataset, batch_size_per_worker: int, rank: int, world_size: int,
                 seed: int, epoch: int, train: bool, loader_workers: int = 0,
                 skip_batches: int = 0) -> DataLoader:
    """This rank's loader for one epoch: train shuffles by (seed, epoch) and drops the ragged tail
    (DistributedSampler, drop_last), starting after `skip_batches` batches; val is an unshuffled,
    unpadded 1/world_size shard."""
    if train and isinstance(dataset, ParquetDataset):
        sampler = RowGroupSampler(dataset, rank, world_size, seed, epoch)
    elif train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    if train:
        if skip_batches:
            sampler = _SkipSampler(sampler, skip_batches * batch_size_per_worker)
        dataset = _SeededAugmentation(dataset, seed, epoch)
    else:
        sampler = ShardedEvalSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size_per_worker, sampler=sampler,
                      num_workers=loader_workers, collate_fn=collate_skip_corrupt, drop_last=train,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      worker_init_fn=_worker_init if loader_workers > 0 else None,
                      generator=torch.Generator().manual_seed(_mix(seed, epoch, rank)))
