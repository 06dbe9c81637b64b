"""Elastic training keeps the maths: the samples of a step, the BatchNorm batch and the resume point
do not depend on the world size (rn50.data.samplers), and gradient accumulation makes one worker's
step the same SGD step as two workers' (rn50.core.engine)."""
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from rn50.config import load_config
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.model import EMA, build_model, unwrap
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState
from rn50.data.loaders import build_loader
from rn50.data.samplers import micro_batch_slots


class _Indexed(Dataset):
    """Label = index, so a loader's labels are the samples it dealt."""

    def __init__(self, size: int = 50):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.zeros((3, 2, 2), dtype=torch.uint8), index


def _steps(rank: int, world_size: int, *, skip: int = 0, repeats: int = 1, micro: int = 2,
           per_step: int = 4, size: int = 50) -> list[list[int]]:
    """The samples `rank` trains in each step (its micro-batches of the step, concatenated)."""
    loader = build_loader(_Indexed(size), micro, rank=rank, world_size=world_size, seed=3,
                          epoch=1, train=True, skip_steps=skip, repeated_augmentations=repeats,
                          micro_batches_per_step=per_step)
    slots = len(micro_batch_slots(rank, world_size, per_step))
    batches = [batch[1].tolist() for batch in loader]
    return [sum(batches[i:i + slots], []) for i in range(0, len(batches), slots)]


def _global_steps(world_size: int, **kwargs) -> list[list[int]]:
    """Each step's samples summed over the ranks, sorted (the order inside a step is the
    gradient's summation order, nothing else)."""
    per_rank = [_steps(rank, world_size, **kwargs) for rank in range(world_size)]
    return [sorted(sum(step, [])) for step in zip(*per_rank)]


@pytest.mark.parametrize("repeats", [1, 3])
def test_every_world_size_trains_the_same_samples_in_each_step(repeats):
    one = _global_steps(1, repeats=repeats)
    assert len(one) == 50 // 8 and all(len(step) == 8 for step in one)
    for world_size in (2, 3, 4):  # 3 does not divide the 4 micro-batches: ranks take 2, 1, 1
        assert _global_steps(world_size, repeats=repeats) == one
    assert _global_steps(1, repeats=repeats, size=49) != one  # the check can tell orders apart


def test_a_resume_on_another_world_size_sees_exactly_the_rest_of_the_epoch():
    """A checkpoint after 2 steps on 2 workers, resumed on 1: every sample of the epoch once."""
    before = [sample for rank in range(2) for step in _steps(rank, 2)[:2] for sample in step]
    after = [sample for step in _steps(0, 1, skip=2) for sample in step]
    whole = [sample for step in _steps(0, 1) for sample in step]
    assert len(before) == 16 and len(after) == len(whole) - 16
    assert sorted(before + after) == sorted(whole) and len(set(before + after)) == len(whole)
    assert not set(before) & set(after)


def test_without_accumulation_a_rank_sees_the_plain_distributed_sampler_order():
    """One micro-batch per rank and step is the order runs had before elastic training."""
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(_Indexed(), num_replicas=2, rank=1, shuffle=True, seed=3,
                                 drop_last=True)
    sampler.set_epoch(1)
    expected = list(sampler)[:(25 // 4) * 4]
    assert [s for step in _steps(1, 2, micro=4, per_step=2) for s in step] == expected


# ---------------------------------------------------------------- one step, any world size


class _Images(Dataset):
    """32 px images whose class (bright or dark) a ResNet can learn; deterministic per index."""

    def __len__(self):
        return 32

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        label = index % 2
        noise = torch.randint(-40, 40, (3, 32, 32), generator=generator)
        return (noise + (170 if label else 60)).clamp(0, 255).to(torch.uint8), label


class _PartlyUndecodable(_Images):
    """_Images, with the samples in `undecodable` coming out as None (what `decode_sample` gives
    for a file it cannot decode; the collate drops them)."""

    def __init__(self, undecodable: frozenset = frozenset()):
        self.undecodable = undecodable

    def __getitem__(self, index):
        return None if index in self.undecodable else super().__getitem__(index)


def _config(workers: str, extra: tuple[str, ...] = ()):
    return load_config("demo", [f"scaling.num_workers={workers}", "train.global_batch_size=8",
                                "train.epochs=1", "data.num_classes=2", "train.log_every_steps=100",
                                "schedule.warmup_epochs=0", *extra])


def _init_group(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    if world_size > 1:  # a collective one rank never joins fails in 60 s instead of hanging
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))


def _train_run(rank: int, world_size: int, config, dataset: Dataset, wrap=None) -> dict:
    """One epoch (4 steps) as `rank` of `world_size`: the final weights (and EMA weights); the
    model wrapped in `wrap` if given."""
    torch.manual_seed(0)
    model = build_model(config.model, 2)
    if wrap is not None:
        model = wrap(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model, config)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay else None
    state = TrainingState(model, optimizer, build_scheduler(optimizer, 4, 1, config.schedule),
                          ema=ema)
    loader = build_loader(dataset, config.micro_batch_size, rank=rank, world_size=world_size,
                          seed=0, epoch=0, train=True,
                          repeated_augmentations=config.data.repeated_augmentations,
                          micro_batches_per_step=config.micro_batches_per_step)
    train_one_epoch(state, loader, torch.device("cpu"), config,
                    micro_slots=micro_batch_slots(rank, world_size,
                                                  config.micro_batches_per_step))
    return {"model": unwrap(model).state_dict(), "ema": state.ema.state_dict() if state.ema else {}}


def _train(rank: int, world_size: int, workers: str, port: int, out: str,
           undecodable: frozenset = frozenset()) -> None:
    """Train one epoch (4 steps) as `rank` of `world_size`; each rank saves its final state."""
    _init_group(rank, world_size, port)
    final = _train_run(rank, world_size, _config(workers), _PartlyUndecodable(undecodable))
    torch.save(final["model"], f"{out}.rank{rank}")
    if world_size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _final_states(tmp_path, world_size: int, workers: str,
                  undecodable: frozenset = frozenset()) -> list[dict]:
    out = str(tmp_path / f"w{world_size}-{workers}-{len(undecodable)}.pt")
    mp.spawn(_train, args=(world_size, workers, _free_port(), out, undecodable),
             nprocs=world_size)
    return [torch.load(f"{out}.rank{rank}") for rank in range(world_size)]


def _final_state(tmp_path, world_size: int, workers: str) -> dict:
    return _final_states(tmp_path, world_size, workers)[0]


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if a[k].is_floating_point())


class _Augmented(_Images):
    """`size` images like _Images', through a random flip and noise drawn from torch's global
    generator, as torchvision's transforms draw: the loader seeds it per (seed, epoch, virtual
    index), so each repeated-augmentation copy comes out differently, and a draw that followed
    the rank would show."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        noise = torch.randint(-20, 21, image.shape, dtype=torch.int16)
        return (image.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8), label


class _Float64(torch.nn.Module):
    """The model in float64 (the loss follows its logits' dtype): the world-size-dependent
    arithmetic, the loss scaled by world size / micro-batches and the gradients summed across
    micro-batches and ranks, is rounded at ~1e-16 instead of float32's ~1e-7."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.double()

    def forward(self, images):
        return self.model(images.double())


# What the 75-80% recipes train with (rn50/recipes/imagenet_tv2.yaml, tests/integration/
# test_faults.py), all at once.
REGULARIZED = ("train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "model.stochastic_depth_prob=0.2",
               "train.ema_decay=0.9", "data.repeated_augmentations=2")


def _train_each(rank: int, world_size: int, port: int, out: str, runs: list) -> None:
    """Each of `runs` (tag, scaling.num_workers, overrides, float64) for one epoch of 4 steps as
    `rank` of `world_size`, one after the other in one process group (one start-up for all);
    rank 0 saves {tag: final state}."""
    _init_group(rank, world_size, port)
    finals = {}
    for tag, workers, extra, float64 in runs:
        config = _config(workers, extra)
        size = 4 * config.train.global_batch_size  # 4 steps, repeated augmentation or not
        finals[tag] = _train_run(rank, world_size, config, _Augmented(size),
                                 wrap=_Float64 if float64 else None)
    if rank == 0:
        torch.save(finals, out)
    if world_size > 1:
        dist.destroy_process_group()


K2 = ("k2", "[1,2]", (), False)  # global batch 8: 2 micro-batches of 4
WHOLE = ("whole", "1", (), False)  # the same global batch as 1 micro-batch of 8
K2_REGULARIZED = ("k2-regularized", "[1,2]", REGULARIZED, False)
# 4 micro-batches of 4 (of 2, BatchNorm over 2 images turns even float64 rounding into 1e-4)
K4 = ("train.global_batch_size=16", "train.micro_batch_size=4")
K4_REGULARIZED = ("k4-regularized", "[1,3]", (*REGULARIZED, *K4), True)
RUNS = {1: [K2, WHOLE, K2_REGULARIZED, K4_REGULARIZED],  # world size -> its runs
        2: [K2, K2_REGULARIZED, K4_REGULARIZED], 3: [K4_REGULARIZED]}


@pytest.fixture(scope="module")
def finals(tmp_path_factory) -> dict:
    """world size -> run tag -> rank 0's final {"model", "ema"} state: one process start-up per
    world size (most of the time these take; world size 1 runs here, one thread as the others)
    for all the runs the tests below compare."""
    tmp, found = tmp_path_factory.mktemp("elastic"), {}
    for world_size, runs in RUNS.items():
        out = str(tmp / f"w{world_size}.pt")
        if world_size == 1:
            threads = torch.get_num_threads()
            try:
                _train_each(0, 1, 0, out, runs)
            finally:
                torch.set_num_threads(threads)
        else:
            mp.spawn(_train_each, args=(world_size, _free_port(), out, runs), nprocs=world_size)
        found[world_size] = torch.load(out)
    return found


def test_one_worker_accumulating_two_micro_batches_takes_the_two_worker_step(finals):
    """World size 2 vs 1 with accumulation 2: the weights and BatchNorm statistics after 4 SGD
    steps agree to float32 summation order. DDP averages the two ranks' gradients in its bucket
    all-reduce, (g0 + g1) / 2; one worker adds half of each micro-batch's gradient in `.grad`,
    g0 / 2 + g1 / 2: the same terms in another order. With two terms halving is exact and the sum
    has one order, so the states come out identical (measured: max difference 0.0); with more
    workers the order differs, ~1e-7 relative per step (float32 epsilon), hence a bound of 1e-6
    rather than equality. Turns red if the loss is not scaled by world size / micro-batches, if
    the ranks' shares of a step differ from the one worker's, or if the BatchNorm running
    statistics follow another micro-batch than the first. Negative control: the same global batch
    of 8 as one micro-batch (what a world-size-dependent per-worker batch would do) is far off
    (measured: 2.5 in the running statistics, 0.037 in the weights)."""
    two, one = finals[2]["k2"]["model"], finals[1]["k2"]["model"]
    assert _max_difference(two, one) < 1e-6
    whole_batch = finals[1]["whole"]["model"]  # micro-batch 8: other BatchNorm batches
    assert _max_difference(two, whole_batch) > 1e-3


def test_a_rank_whose_micro_batch_is_all_undecodable_still_takes_the_step_with_the_others(tmp_path):
    """Rank 1's only micro-batch of step 0 is all undecodable. Under DDP every rank must join each
    forward (the buffer broadcast) and each step's backward (the gradient all-reduce), so a rank
    that skipped its empty micro-batch left the other waiting (gloo's timeout, 60 s here, instead
    of a hang) and, had it not, a rank that skipped the optimizer step would drift apart. Both
    ranks must end on the same weights, which differ from a run without undecodable samples.
    Negative control: with the engine skipping the empty micro-batch (as it did), gloo times out.
    """
    rank1_step0 = build_loader(_Indexed(32), 4, rank=1, world_size=2, seed=0, epoch=0, train=True,
                               micro_batches_per_step=2)
    undecodable = frozenset(next(iter(rank1_step0))[1].tolist())
    assert len(undecodable) == 4
    # The weights, not the BatchNorm statistics: DDP gives every rank rank 0's buffers at the
    # start of each forward, which then updates them from the rank's own micro-batch.
    weights = [{k: v for k, v in state.items() if "running_" not in k} for state in
               _final_states(tmp_path, 2, "[1,2]", undecodable)]
    assert _max_difference(*weights) == 0
    assert _max_difference(weights[0], _final_state(tmp_path, 2, "[1,2]")) > 1e-6


def test_mixing_stochastic_depth_ema_and_repeats_keep_the_step_at_world_sizes_1_2_and_3(finals):
    """MixUp/CutMix, stochastic depth, EMA and repeated augmentation all on; 4 SGD steps.

    Bit-identical where the arithmetic allows it: 2 micro-batches per step on 2 workers or 1, in
    float32 as trained (the reasons in the test above; the regularizers add no arithmetic that
    depends on the world size: mixing and depth draws are seeded by (step, micro-batch index),
    augmentations by (epoch, virtual index), and the EMA is a function of the weights).

    Not where it does not: 4 micro-batches on 1, 2 or 3 workers (3 takes 2, 1 and 1) sum the same
    gradient terms in other orders, (g0 + g2) / 2 + (g1 + g3) / 2 against g0 / 4 + ... + g3 / 4,
    and 3 workers scale the loss by 3/4 then average by 3, neither exact in binary. In float32
    that rounding, ~1e-7 relative, grows over 4 steps through BatchNorm to 1e-4 in the weights
    and 6e-3 in the running variances (measured, 3 vs 1 workers): too close to what a real
    mistake gives to tell them apart. So these runs compute in float64 (`_Float64`), where the
    same rounding is ~1e-16 and grows to ~1e-12 (measured): the weights and BatchNorm statistics
    must agree within 1e-9, the EMA weights (kept in float32 by design) within 1e-6. Turns red
    if a draw follows the rank or the world size instead of the micro-batch, if the loss scaling
    or a rank's share of a step is wrong at an uneven size, or if the BatchNorm statistics or the
    EMA follow another micro-batch or rank. The regularizers must change the weights (against
    the same run without them, at 2 micro-batches): the comparison is of something they did."""
    one, two, three = finals[1], finals[2], finals[3]
    for part in ("model", "ema"):
        assert _max_difference(two["k2-regularized"][part], one["k2-regularized"][part]) == 0, part
    for other in (two, three):
        assert _max_difference(other["k4-regularized"]["model"],
                               one["k4-regularized"]["model"]) < 1e-9
        assert _max_difference(other["k4-regularized"]["ema"], one["k4-regularized"]["ema"]) < 1e-6
    assert _max_difference(one["k2"]["model"], one["k2-regularized"]["model"]) > 1e-2
