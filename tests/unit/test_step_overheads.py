"""The per-step overheads issue 24 removed keep the maths: EMA's foreach update is the per-tensor
formula bit for bit, the minutes-based save schedule looks at the clock only at fixed steps, the
CUDA-only prefetch is a pass-through on CPU, normalize builds its constants once, and
torch.compile compiles the training shape only (rare shapes run eager)."""
import datetime
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

from rn50.config import Config
from rn50.core.device import FixedShapeCompile, maybe_compile, prefetch_to_device
from rn50.core.engine import build_optimizer, evaluate, train_one_epoch
from rn50.core.model import EMA, unwrap
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState
from rn50.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from rn50.distributed.save_schedule import DEFAULT_CHECK_EVERY_STEPS, MidEpochSaves


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _reference_ema(average: dict, model: nn.Module, decay: float) -> None:
    """The update as it was before foreach ops: per tensor, through state_dict()."""
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            average[name].mul_(decay).add_(value.float(), alpha=1 - decay)
        else:
            average[name].copy_(value)


def _train_step(model: nn.Module, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 3, 8, 8, generator=generator)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_ema_foreach_update_is_the_per_tensor_formula_bit_for_bit_and_follows_a_reload():
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, 0.9)
    reference = {k: v.clone().float() for k, v in model.state_dict().items()}
    for step in range(3):
        _train_step(model, optimizer, step)
        ema.update(model)
        _reference_ema(reference, model, 0.9)
    assert all(torch.equal(ema.state_dict()[k], reference[k]) for k in reference)
    assert ema.state_dict()["1.num_batches_tracked"] == 3
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    _train_step(model, optimizer, 7)
    ema.update(model)  # moves away from `saved` ...
    ema.load_state_dict(saved)  # ... and a resume puts it back: later updates must use these
    _train_step(model, optimizer, 8)
    ema.update(model)
    _reference_ema(saved, model, 0.9)
    assert all(torch.equal(ema.state_dict()[k], saved[k]) for k in saved)


def _saves(every_minutes: float, check_every: int, every_steps: int = 0) -> MidEpochSaves:
    config = Config()
    config.checkpoint.every_minutes = every_minutes
    config.checkpoint.preemption_check_every_steps = check_every
    config.checkpoint.every_steps = every_steps
    return MidEpochSaves(config, torch.device("cpu"))


def test_the_minutes_schedule_reads_the_clock_only_at_check_steps():
    overdue = _saves(every_minutes=1e-9, check_every=0)  # any clock reading says "due"
    due = [s for s in range(1, 31) if overdue.due(s)]
    assert due == [DEFAULT_CHECK_EVERY_STEPS, 2 * DEFAULT_CHECK_EVERY_STEPS,
                   3 * DEFAULT_CHECK_EVERY_STEPS]
    assert [s for s in range(1, 10) if _saves(1e-9, check_every=3).due(s)] == [3, 6, 9]
    not_yet = _saves(every_minutes=60, check_every=3, every_steps=4)
    assert [s for s in range(1, 13) if not_yet.due(s)] == [4, 8, 12]  # every_steps unchanged


def test_the_clock_decision_is_rank_0s_over_a_gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        assert _saves(1e-9, check_every=2).due(2) and not _saves(60, check_every=2).due(2)
    finally:
        dist.destroy_process_group()


def test_prefetch_passes_cpu_batches_through_untouched():
    batches = [(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), 0)]
    assert all(a is b for a, b in zip(prefetch_to_device(batches, torch.device("cpu")), batches))


def test_normalize_builds_its_constants_once_and_gives_the_same_numbers():
    batch = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (batch.float() / 255 - mean) / std
    nhwc = batch.contiguous(memory_format=torch.channels_last)  # the torch path, as on a GPU
    for out in (normalize(batch), normalize(nhwc)):
        assert torch.allclose(out, expected, atol=1e-5)
    assert normalize(nhwc).is_contiguous(memory_format=torch.channels_last)
    from rn50.data.transforms import _normalize_constants
    assert _normalize_constants(torch.device("cpu"))[0] is \
        _normalize_constants(torch.device("cpu"))[0]


def _batches(sizes: list[int]) -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator),
             torch.randint(0, 3, (n,), generator=generator), 0) for n in sizes]


def test_compile_takes_the_training_shape_only_and_says_when_it_compiles(caplog):
    torch._dynamo.reset()
    config = Config()
    config.train.log_every_steps, config.schedule.warmup_epochs = 1000, 0.0
    model = maybe_compile(_tiny(), True, micro_batch=4)
    assert isinstance(model, FixedShapeCompile) and unwrap(model) is model._orig_mod
    assert list(model.state_dict()) == ["_orig_mod." + k for k in unwrap(model).state_dict()]
    optimizer = build_optimizer(model, config)
    state = TrainingState(model, optimizer, build_scheduler(optimizer, 8, 1, config.schedule))
    with caplog.at_level(logging.INFO, logger="rn50.core.device"):
        train_one_epoch(state, _batches([4, 4, 3, 4]), torch.device("cpu"), config)  # 3: short
        evaluate(model, _batches([5, 2]), torch.device("cpu"))  # eval: eager
    messages = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("torch.compile: compiling")
    assert model.compiled_shapes == [((4, 3, 8, 8), torch.float32, False)]
    with caplog.at_level(logging.INFO, logger="rn50.core.device"):
        train_one_epoch(state, [(torch.zeros(4, 3, 12, 12, dtype=torch.uint8),
                                 torch.zeros(4, dtype=torch.int64), 0)],
                        torch.device("cpu"), config)  # a new resolution: a logged recompile
    assert any(r.levelno == logging.WARNING and "recompiling" in r.getMessage()
               for r in caplog.records)
    assert maybe_compile(model, False) is model


@pytest.mark.parametrize("sizes", [[5, 2, 0, 4]])
def test_evaluation_summed_on_the_device_gives_the_per_batch_read_figures(sizes):
    model, batches = _tiny().eval(), _batches(sizes)
    loss, top1, top5, count = 0.0, 0.0, 0.0, 0  # the loop as it was: three reads per batch
    with torch.no_grad():
        for images, labels, _ in batches:
            if labels.numel() == 0:
                continue
            logits = model(normalize(images)).float()
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            hits = logits.topk(3, dim=1).indices.eq(labels[:, None])
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            count += labels.numel()
    figures = evaluate(model, batches, torch.device("cpu"))
    assert figures == {"loss": loss / count, "top1": 100 * top1 / count,
                       "top5": 100 * top5 / count}
