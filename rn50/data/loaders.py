"""Data sets and loaders: the recipe's data set built from its config, sharded deterministic loading.

Public API: `build_datasets(data_cfg)` -> (train, val, class names); `build_loader(...)` -> a
DataLoader yielding `(uint8 images [B,3,H,W], int64 labels [B], num_skipped)`. The datasets and
`DataError` live in rn50.data.datasets; the cached digits / Imagenette preparation in
rn50.small_datasets.

Determinism: a training loader's order is a DistributedSampler permutation of (seed, epoch), and
each sample's augmentation is drawn from torch's CPU generator re-seeded from (seed, epoch,
dataset index) around that one `__getitem__` (the caller's RNG state is restored afterwards). With
repeated augmentation (`data.repeated_augmentations` = N) the samplers deal virtual indices
`index + copy * len(dataset)`, copy < N, and the seed uses the virtual index, so the N copies of an
image get N different augmentations (copy 0 keeps the plain index, hence the plain draws). So
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


def _prepared_root(data_cfg) -> Path:
    """The folder holding `data_cfg`'s class folders, writing the digits / Imagenette cache first."""
    root = Path(os.path.expanduser(data_cfg.root))
    if data_cfg.dataset == "digits":
        return prepare_digits(root)
    if data_cfg.dataset == "imagenette":
        return prepare_imagenette(root, data_cfg.imagenette_size_px)
    if data_cfg.dataset == "imagefolder":
        return root
    raise DataError(f"unknown data.dataset {data_cfg.dataset!r}")


def build_val_dataset(data_cfg, classes: list[str] | None = None) -> Dataset:
    """The validation split `data_cfg` describes, exactly as training evaluates it (uint8 out).

    `classes` (the training set's) fixes the label order; without it the split's own is used.
    `max_val_samples` takes a fixed shuffled subset (a plain prefix of a class-sorted folder would
    be a single class)."""
    transform = val_transform(data_cfg)
    if data_cfg.dataset == "parquet":
        val = ParquetDataset(data_cfg.root, "val", transform, num_classes=data_cfg.num_classes)
    else:
        val = ImageFolderDataset(_prepared_root(data_cfg), "val", transform, classes=classes)
    if len(val.classes) != data_cfg.num_classes:
        raise DataError(f"the validation data at {data_cfg.root} has {len(val.classes)} classes "
                        f"but data.num_classes is {data_cfg.num_classes}: point data.root at the "
                        f"data set the model was trained on, or set data.num_classes")
    return _fixed_subset(val, data_cfg.max_val_samples)


def build_datasets(data_cfg) -> tuple[Dataset, Dataset, list[str]]:
    """Train and val datasets (uint8 tensors out) and the class names for `data_cfg`.

    The names are readable: ImageNet wnids (folders, shards from the ILSVRC tars) become
    torchvision's names (`n01440764` -> `tench`); `dataset_classes(train)` gives the wnids too.
    Digits are written at 32 px regardless of the crop (the source is 8 px), so one cache serves
    every recipe."""
    train_tf = DeviceDecodePreset(data_cfg) if data_cfg.decode_on_device else \
        train_transform(data_cfg)
    if data_cfg.dataset == "parquet":
        train = ParquetDataset(data_cfg.root, "train", train_tf, num_classes=data_cfg.num_classes)
    else:
        train = ImageFolderDataset(_prepared_root(data_cfg), "train", train_tf)
    names = readable_names(train.classes)
    if len(names) != data_cfg.num_classes:
        raise DataError(f"the data set has {len(names)} classes but data.num_classes is "
                        f"{data_cfg.num_classes}; set data.num_classes={len(names)}")
    val = build_val_dataset(data_cfg, classes=None if data_cfg.dataset == "parquet"
                            else train.classes)
    return _fixed_subset(train, data_cfg.max_train_samples), val, names


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


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from a sequence of ints, e.g. (seed, epoch, index)."""
    seed = 0x2545F491
    for value in values:
        seed = (seed * 0x9E3779B97F4A7C15 + int(value) + 1) % (1 << 63)
    return seed


class SeededAugmentation(Dataset):
    """Draw each sample's augmentation from torch's CPU generator seeded by (seed, epoch, index).

    `index` may be virtual (`copy * len(dataset) + i`, repeated augmentation): sample i is read,
    with draws seeded by the virtual index, so each copy is augmented differently.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, repeats: int = 1):
        self.dataset, self.seed, self.epoch, self.repeats = dataset, seed, epoch, repeats

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, index: int):
        generator = torch.default_generator  # CPU only: CUDA RNG state is never touched
        state = generator.get_state()
        generator.manual_seed(mix_seed(self.seed, self.epoch, index))
        try:
            return self.dataset[index % len(self.dataset)]
        finally:
            generator.set_state(state)


def _with_copies(indices: torch.Tensor, size: int, repeats: int) -> torch.Tensor:
    """Each index followed by its other copies' virtual indices (index + copy * size)."""
    return (indices[:, None] + torch.arange(repeats)[None, :] * size).flatten()


class RepeatedAugmentationSampler(Sampler):
    """torchvision's RASampler (references/classification/sampler.py), deterministic per epoch.

    A seeded permutation of the data set, each index repeated `repeats` times in a row (as virtual
    indices, see `SeededAugmentation`), dealt to ranks round-robin, so the copies of an image land
    on different ranks when world_size >= repeats. Each rank keeps len(dataset) // world_size of
    them, as DistributedSampler(drop_last=True) does: the epoch length is unchanged and an epoch
    sees about len(dataset) / repeats distinct images.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int, epoch: int, repeats: int):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        per_rank = size // world_size
        dealt = _with_copies(order, size, repeats)[rank:per_rank * world_size:world_size]
        self.indices = dealt.tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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

    With `repeats` > 1 (repeated augmentation) each row is followed by its other copies (virtual
    indices, see `SeededAugmentation`) on the same rank: dealing copies to other ranks would make
    them read each other's row groups. A rank then reads only the first ~1/repeats of its groups.
    """

    def __init__(self, dataset: ParquetDataset, rank: int, world_size: int, seed: int, epoch: int,
                 repeats: int = 1):
        groups = dataset.row_group_ranges()
        order = torch.randperm(len(groups),
                               generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        per_rank = [order[r::world_size].tolist() for r in range(world_size)]
        self.length = min(sum(len(groups[g]) for g in dealt) for dealt in per_rank)
        self.indices = []
        for group in per_rank[rank]:
            rows = torch.randperm(len(groups[group]),
                                  generator=torch.Generator().manual_seed(
                                      mix_seed(seed, epoch, group)))
            rows = _with_copies(rows + groups[group].start, len(dataset), repeats)
            self.indices += rows.tolist()
            if len(self.indices) >= self.length:
                break  # the rank's remaining groups are not read this epoch
        self.indices = self.indices[:self.length]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.length


def _train_sampler(dataset: Dataset, rank: int, world_size: int, seed: int, epoch: int,
                   repeats: int) -> Sampler:
    """Parquet: row groups; repeated augmentation: RASampler semantics; else DistributedSampler."""
    if isinstance(dataset, ParquetDataset):
        return RowGroupSampler(dataset, rank, world_size, seed, epoch, repeats)
    if repeats > 1:
        return RepeatedAugmentationSampler(len(dataset), rank, world_size, seed, epoch, repeats)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


def build_loader(dataset: Dataset, batch_size_per_worker: int, *, rank: int, world_size: int,
                 seed: int, epoch: int, train: bool, loader_workers: int = 0,
                 skip_batches: int = 0, repeated_augmentations: int = 1) -> DataLoader:
    """This rank's loader for one epoch: train shuffles by (seed, epoch) and drops the ragged tail
    (DistributedSampler, drop_last), starting after `skip_batches` batches; val is an unshuffled,
    unpadded 1/world_size shard. `repeated_augmentations` (train only, `data.repeated_augmentations`)
    shows each image that many times per epoch, each copy augmented differently."""
    if train:
        repeats = repeated_augmentations
        sampler = _train_sampler(dataset, rank, world_size, seed, epoch, repeats)
        if skip_batches:
            sampler = _SkipSampler(sampler, skip_batches * batch_size_per_worker)
        dataset = SeededAugmentation(dataset, seed, epoch, repeats)
    else:
        sampler = ShardedEvalSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size_per_worker, sampler=sampler,
                      num_workers=loader_workers, collate_fn=collate_skip_corrupt, drop_last=train,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      worker_init_fn=_worker_init if loader_workers > 0 else None,
                      generator=torch.Generator().manual_seed(mix_seed(seed, epoch, rank)))
