"""One loader per rank for a whole run: its worker processes outlive the epoch.

A loader rebuilt every epoch forks its workers again, each re-importing its state and decoding a
first batch before the GPU sees one, at every epoch start and every validation. Here the
DataLoader is built once (`persistent_workers`) and its batch sampler is pointed at the next
epoch (`set_epoch`, as with DistributedSampler): the sampler deals `SampleKey`s that carry the
epoch and train crop side, so the long-lived workers augment each sample exactly as a fresh
per-epoch loader would (seed, epoch, index) and a mid-epoch resume (`skip_steps`) is unchanged.
`rn50.data.loaders.build_loader` is the one-epoch form with the same batches.
"""
from __future__ import annotations

from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from rn50.data.loaders import (SampleKey, SeededAugmentation, loader_options, rank_slots,
                               train_batches)
from rn50.data.samplers import ShardedEvalSampler


class EpochBatchSampler(Sampler):
    """A rank's micro-batches of the epoch `set_epoch` chose, as lists of `SampleKey`s; only this
    rank's own sample streams are drawn (rn50.data.samplers)."""

    def __init__(self, dataset: Dataset, micro_batch: int, rank: int, world_size: int, seed: int,
                 repeats: int = 1, micro_batches_per_step: int = 0):
        self.dataset, self.micro_batch = dataset, micro_batch
        self.seed, self.repeats = seed, repeats
        self.per_step = micro_batches_per_step or world_size
        self.slots = rank_slots(rank, world_size, self.per_step)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_step: int = 0, crop_px: int = 0,
                  order_micro_batches: int = 0) -> None:
        """Deal `epoch`'s micro-batches from `start_step` on, cropped at `crop_px` (0: as set), in
        the order of `order_micro_batches` per step if given (`loaders.train_batches`)."""
        self.batches = train_batches(self.dataset, self.micro_batch, self.slots, self.per_step,
                                     self.seed, epoch, self.repeats, start_step,
                                     order_micro_batches)
        self.epoch, self.crop_px = epoch, crop_px

    @property
    def steps(self) -> int:
        """Global steps in the current epoch (the same on every rank)."""
        return self.batches.steps

    def __iter__(self):
        epoch, crop_px = self.epoch, self.crop_px
        for batch in self.batches:
            yield [SampleKey(index, epoch, crop_px) for index in batch]

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoader:
    """This rank's train or val loader for every epoch of a run (see the module docstring).

    `epoch(e, skip_steps, crop_px)` returns the DataLoader set up for epoch `e`; iterate it before
    asking for the next epoch. Validation batches do not depend on the epoch."""

    def __init__(self, dataset: Dataset, micro_batch: int, *, rank: int, world_size: int,
                 seed: int, train: bool, loader_workers: int = 0, repeated_augmentations: int = 1,
                 micro_batches_per_step: int = 0, channels_last: bool = False):
        self.train = train
        common = loader_options(loader_workers, seed, 0, rank, channels_last, persistent=True)
        if train:
            sampler = EpochBatchSampler(dataset, micro_batch, rank, world_size, seed,
                                        repeated_augmentations, micro_batches_per_step)
            dataset = SeededAugmentation(dataset, seed, 0, repeated_augmentations)
        else:
            shard = ShardedEvalSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
            sampler = BatchSampler(shard, micro_batch, drop_last=False)
        self.loader = DataLoader(dataset, batch_sampler=sampler, **common)

    @property
    def steps(self) -> int:
        """Global steps of the epoch last set (train loaders only)."""
        return self.loader.batch_sampler.steps

    def epoch(self, epoch: int, skip_steps: int = 0, crop_px: int = 0,
              order_micro_batches: int = 0) -> DataLoader:
        """The loader, dealing `epoch`'s batches from step `skip_steps` on (in the order of
        `order_micro_batches` per step if given: `loaders.train_batches`)."""
        if self.train:
            self.loader.batch_sampler.set_epoch(epoch, skip_steps, crop_px, order_micro_batches)
        return self.loader
