"""Data sets and loaders: the recipe's data set built from its config, sharded, deterministic.

Public API: `build_datasets(data_cfg)` -> (train, val, class names); `build_loader(...)` -> a
DataLoader yielding `(uint8 images [B,3,H,W], int64 labels [B], num_skipped)`. The datasets and
`DataError` live in rn50.data.datasets; the cached digits / Imagenette preparation in
rn50.small_datasets.

Determinism: a training loader's order is a function of (seed, epoch) (rn50.data.samplers: the same
samples per step at any world size), and each sample's augmentation is drawn from torch's CPU
generator re-seeded from (seed, epoch, dataset index) around that one `__getitem__` (the caller's
RNG state is restored afterwards). With repeated augmentation (`data.repeated_augmentations` = N)
the samplers deal virtual indices `index + copy * len(dataset)`, copy < N, and the seed uses the
virtual index, so the N copies of an image get N different augmentations (copy 0 keeps the plain
index, hence the plain draws). So the images a rank sees for a given (seed, epoch, rank) are
identical whatever `loader_workers` is, and a resumed run reproduces a run that never stopped, with
nothing for the caller to seed.
The samplers themselves live in rn50.data.samplers.
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from rn50.config_sections import DataSource, choices
from rn50.data.datasets import DataError, ImageFolderDataset, ParquetDataset
from rn50.data.device_decode import DeferredBatch, DeviceDecodePreset, EncodedImage
from rn50.data.class_names import readable_classes, readable_names
from rn50.data.samplers import (MicroBatchSampler, ReslicedMicroBatchSampler, ShardedEvalSampler,
                                 epoch_streams, micro_batch_slots, mix_seed)
from rn50.data.small_datasets import prepare_digits, prepare_imagenette
from rn50.data.transforms import train_transform, val_transform


def _fixed_subset(dataset: Dataset, limit: int) -> Dataset:
    """The first `limit` samples of a fixed (seed 0) shuffle, kept in index order; 0 keeps all."""
    if limit <= 0 or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return Subset(dataset, sorted(order[:limit].tolist()))


def _prepared_root(data_cfg) -> Path:
    """The folder holding `data_cfg`'s class folders (writing the digits / Imagenette cache
    first)."""
    root = Path(os.path.expanduser(data_cfg.root))
    if data_cfg.dataset == "digits":
        return prepare_digits(root)
    if data_cfg.dataset == "imagenette":
        return prepare_imagenette(root, data_cfg.imagenette_size_px)
    if data_cfg.dataset == "imagefolder":
        return root
    raise DataError(f"unknown data.dataset {data_cfg.dataset!r}; must be one of "
                    f"{list(choices(DataSource))}")


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


def collate_skip_corrupt(batch: list, channels_last: bool = False
                         ) -> tuple[torch.Tensor | DeferredBatch, torch.Tensor, int]:
    """Stack the decodable samples; `None` (corrupt) ones are dropped and counted. Samples still
    encoded (`data.decode_on_device`) make a `DeferredBatch` that the training step decodes.

    With `channels_last` the [B, 3, H, W] batch is NHWC in memory, the layout the crops come in
    and the model trains in on a GPU, so neither side transposes it."""
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), \
            skipped
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    if any(isinstance(image, EncodedImage) for image, _ in good):
        return DeferredBatch([image for image, _ in good]), labels, skipped
    images = [image for image, _ in good]
    if not channels_last:
        return torch.stack(images, out=_batch_tensor(images, images[0].shape)), labels, skipped
    hwc = [image.permute(1, 2, 0) for image in images]
    out = torch.stack(hwc, out=_batch_tensor(images, hwc[0].shape))
    return out.permute(0, 3, 1, 2), labels, skipped


def _batch_tensor(images: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """An empty uint8 batch of `images`, in shared memory inside a loader worker (as PyTorch's
    default collate does: the batch then crosses to the training process without a copy)."""
    if get_worker_info() is None:
        return torch.empty((len(images), *shape), dtype=images[0].dtype)
    storage = images[0]._typed_storage()._new_shared(len(images) * shape.numel())
    return images[0].new(storage).resize_(len(images), *shape)


class SampleKey(NamedTuple):
    """What a persistent loader's sampler deals: the index with the epoch it belongs to (and the
    train crop side, progressive resizing), so worker processes kept across epochs need no
    other message to augment it as that epoch's (seed, epoch, index) says."""
    index: int
    epoch: int
    crop_px: int = 0  # 0: the transform's crop as it is


class SeededAugmentation(Dataset):
    """Draw each sample's augmentation from torch's CPU generator seeded by (seed, epoch, index).

    `index` may be virtual (`copy * len(dataset) + i`, repeated augmentation): sample i is read,
    with draws seeded by the virtual index, so each copy is augmented differently. A `SampleKey`
    brings its own epoch (and crop side) instead of the one given here.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, repeats: int = 1):
        self.dataset, self.seed, self.epoch, self.repeats = dataset, seed, epoch, repeats
        self.crop_px = 0

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, key: int | SampleKey):
        index, epoch = key, self.epoch
        if isinstance(key, SampleKey):
            index, epoch = key.index, key.epoch
            if key.crop_px and key.crop_px != self.crop_px:  # this process's copy of the preset
                set_train_crop_px(self.dataset, key.crop_px)
                self.crop_px = key.crop_px
        generator = torch.default_generator  # CPU only: CUDA RNG state is never touched
        state = generator.get_state()
        generator.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            return self.dataset[index % len(self.dataset)]
        finally:
            generator.set_state(state)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode per core: intra-op threads would only oversubscribe
    random.seed(torch.initial_seed() % (1 << 32))
    np.random.seed(torch.initial_seed() % (1 << 32))


def loader_options(loader_workers: int, seed: int, epoch: int, rank: int,
                   channels_last: bool = False, persistent: bool = False) -> dict:
    """The DataLoader arguments every loader of the project shares."""
    return dict(num_workers=loader_workers,
                collate_fn=functools.partial(collate_skip_corrupt, channels_last=channels_last),
                pin_memory=torch.cuda.is_available(),
                persistent_workers=persistent and loader_workers > 0,
                worker_init_fn=_worker_init if loader_workers > 0 else None,
                generator=torch.Generator().manual_seed(mix_seed(seed, epoch, rank)))


def build_loader(dataset: Dataset, micro_batch: int, *, rank: int, world_size: int, seed: int,
                 epoch: int, train: bool, loader_workers: int = 0, skip_steps: int = 0,
                 repeated_augmentations: int = 1, micro_batches_per_step: int = 0,
                 channels_last: bool = False, order_micro_batches: int = 0) -> DataLoader:
    """This rank's loader for one epoch, in batches of `micro_batch` images (NHWC in memory with
    `channels_last`); its worker processes end with the epoch (`rn50.data.epoch_loader` keeps
    them for a whole run, with the same batches).

    Train: the rank's micro-batches of every step from `skip_steps` on (rn50.data.samplers; the
    order is a function of (seed, epoch) and `micro_batches_per_step`, default `world_size`, i.e.
    no accumulation), the ragged tail dropped; `repeated_augmentations` (`data.repeated_
    augmentations`) shows each image that many times per epoch, each copy augmented differently;
    `order_micro_batches`: see `train_batches`. Val: an unshuffled, unpadded 1/world_size shard."""
    common = loader_options(loader_workers, seed, epoch, rank, channels_last)
    if not train:
        sampler = ShardedEvalSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=micro_batch, sampler=sampler, **common)
    per_step = micro_batches_per_step or world_size
    batches = train_batches(dataset, micro_batch, rank_slots(rank, world_size, per_step), per_step,
                            seed, epoch, repeated_augmentations, skip_steps, order_micro_batches)
    return DataLoader(SeededAugmentation(dataset, seed, epoch, repeated_augmentations),
                      batch_sampler=batches, **common)


def train_batches(dataset: Dataset, micro_batch: int, slots: list[int], per_step: int, seed: int,
                  epoch: int, repeats: int = 1, start_step: int = 0,
                  order_micro_batches: int = 0) -> MicroBatchSampler | ReslicedMicroBatchSampler:
    """A rank's micro-batch sampler for `epoch` from `start_step` on: its `slots` of `per_step`
    micro-batches per step. `order_micro_batches`: the micro-batches per step the epoch was dealt
    for, where that differs (a resume at another count finishes its epoch in the checkpoint's
    order, `rn50.core.resume_order`); 0 or `per_step`: this run's own."""
    if order_micro_batches and order_micro_batches != per_step:
        streams = epoch_streams(dataset, order_micro_batches, seed, epoch, repeats)
        return ReslicedMicroBatchSampler([streams[i] for i in range(order_micro_batches)],
                                         micro_batch, slots, per_step, start_step)
    streams = epoch_streams(dataset, per_step, seed, epoch, repeats, only=slots)
    return MicroBatchSampler(streams, micro_batch, start_step=start_step)


def rank_slots(rank: int, world_size: int, micro_batches_per_step: int) -> list[int]:
    """`micro_batch_slots`, refusing a rank that would train none of a step's micro-batches."""
    slots = micro_batch_slots(rank, world_size, micro_batches_per_step)
    if not slots:
        raise ValueError(f"rank {rank} of {world_size} gets none of the {micro_batches_per_step} "
                         "micro-batches of a step: use at most as many workers as micro-batches "
                         "per step (train.global_batch_size / train.micro_batch_size)")
    return slots
