"""Which samples each rank trains on, step by step: one order per epoch, whatever the world size.

An epoch's order is `micro_batches_per_step` (K) *streams*, each a function of (seed, epoch) only:
the K per-rank orders a K-worker run would use (DistributedSampler, torchvision's RASampler for
repeated augmentation, or row groups for parquet shards). Global step s is micro-batch j = the
s-th slice of `micro_batch` indices of stream j, for j < K; a run on W workers deals micro-batch j
to rank j % W, which accumulates the gradients of its micro-batches before the optimizer step. So
the samples of a step, the BatchNorm batch (one micro-batch) and the resume point (global steps
done) do not depend on W: a run that loses a node goes on with fewer workers, or grows back, and
sees exactly the samples an unchanged run would. With K = W (no accumulation) a rank's order is
exactly that of the plain per-rank sampler. A resume at another K finishes the checkpoint's epoch
in that epoch's order, each step re-split into the new K micro-batches
(`ReslicedMicroBatchSampler`).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from rn50.data.datasets import ParquetDataset


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from a sequence of ints, e.g. (seed, epoch, index)."""
    seed = 0x2545F491
    for value in values:
        seed = (seed * 0x9E3779B97F4A7C15 + int(value) + 1) % (1 << 63)
    return seed


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
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.epoch, self.repeats = seed, epoch, repeats

    def __iter__(self):
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        per_rank = len(self)
        dealt = _with_copies(order, self.size, self.repeats)[
            self.rank:per_rank * self.world_size:self.world_size]
        return iter(dealt.tolist())

    def __len__(self) -> int:
        return self.size // self.world_size


class ShardedEvalSampler(DistributedSampler):
    """Rank r takes indices r, r+W, ...: disjoint, covering, no padding duplicates (exact eval)."""

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


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


def _stream(dataset: Dataset, index: int, streams: int, seed: int, epoch: int,
            repeats: int) -> Sampler:
    """Stream `index` of `streams`: parquet row groups, RASampler semantics with repeated
    augmentation, else DistributedSampler's (seed, epoch) permutation dealt round-robin."""
    if isinstance(dataset, ParquetDataset):
        return RowGroupSampler(dataset, index, streams, seed, epoch, repeats)
    if repeats > 1:
        return RepeatedAugmentationSampler(len(dataset), index, streams, seed, epoch, repeats)
    sampler = DistributedSampler(dataset, num_replicas=streams, rank=index, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


def epoch_streams(dataset: Dataset, streams: int, seed: int, epoch: int, repeats: int = 1,
                  only: list[int] | None = None) -> dict[int, Sampler]:
    """The epoch's sample orders (see the module docstring), stream index -> sampler, for the
    streams in `only` (default: all `streams`); a function of (seed, epoch) and the data set only.
    Building one is cheap; its order is drawn when it is iterated."""
    wanted = range(streams) if only is None else only
    return {index: _stream(dataset, index, streams, seed, epoch, repeats) for index in wanted}


def micro_batch_slots(rank: int, world_size: int, micro_batches_per_step: int) -> list[int]:
    """The micro-batches (stream indices j) of every step that `rank` of `world_size` trains on."""
    return list(range(rank, micro_batches_per_step, world_size))


class MicroBatchSampler(Sampler):
    """A rank's micro-batches (lists of dataset indices), step by step from `start_step` on.

    `streams` are the rank's own streams (slot -> sampler, `micro_batch_slots`): only those are
    drawn, never the other ranks'. Yields, for each step, the rank's micro-batches in slot order;
    each is a full `micro_batch` of indices. Every stream of an epoch has the same length (each
    sampler cuts its ranks to a common one), so the rank's own give the epoch's step count."""

    def __init__(self, streams: dict[int, Sampler], micro_batch: int, start_step: int = 0):
        self.slots = sorted(streams)
        self.streams = [streams[slot] for slot in self.slots]
        self.micro_batch, self.start_step = micro_batch, start_step
        self.steps = min(len(stream) for stream in self.streams) // micro_batch
        self._orders: list[list[int]] | None = None

    def __iter__(self):
        if self._orders is None:  # drawn once, at the first pass
            self._orders = [list(stream) for stream in self.streams]
        m = self.micro_batch
        for step in range(self.start_step, self.steps):
            for order in self._orders:
                yield order[step * m:(step + 1) * m]

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0) * len(self.slots)


class ReslicedMicroBatchSampler(Sampler):
    """`MicroBatchSampler` for an epoch dealt for another micro-batch count: a resume after
    `train.micro_batch_size` or the top of `scaling.num_workers` changed finishes the epoch its
    checkpoint began in that epoch's order (rn50.core.resume_order).

    `streams` are all of the epoch's streams, in stream order. Step s is the s-th `share` indices
    of each (share = the global batch / the number of streams), concatenated: the samples the
    checkpoint's run would have trained in that step, each once. It is split into this run's
    micro-batches of `micro_batch`, and the rank yields those of its `slots`."""

    def __init__(self, streams: list[Sampler], micro_batch: int, slots: list[int],
                 micro_batches_per_step: int, start_step: int = 0):
        if (micro_batch * micro_batches_per_step) % len(streams):
            raise ValueError(f"a step of {micro_batches_per_step} micro-batches of {micro_batch} "
                             f"does not split evenly over {len(streams)} sample streams")
        self.streams, self.slots = streams, slots
        self.micro_batch, self.start_step = micro_batch, start_step
        self.share = micro_batch * micro_batches_per_step // len(streams)
        self.steps = min(len(stream) for stream in streams) // self.share
        self._orders: list[list[int]] | None = None

    def __iter__(self):
        if self._orders is None:  # drawn once, at the first pass
            self._orders = [list(stream) for stream in self.streams]
        m, share = self.micro_batch, self.share
        for step in range(self.start_step, self.steps):
            batch = [i for order in self._orders for i in order[step * share:(step + 1) * share]]
            for slot in self.slots:
                yield batch[slot * m:(slot + 1) * m]

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0) * len(self.slots)
