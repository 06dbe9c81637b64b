"""MixUp / CutMix (rn50.core.mixing): soft targets, draws seeded by (seed, step, micro-batch) and
nothing else, label smoothing that composes, and a resumed loop that is bit-identical."""
import pytest
import torch
from torch import nn

from rn50.config import Config
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.mixing import BatchMixer, build_mixer, seeded_rng
from rn50.core.model import build_model
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState

CLASSES = 5


def _batch(size: int = 8, px: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, px, px, generator=generator), \
        torch.randint(0, CLASSES, (size,), generator=generator)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_targets_are_soft_labels_that_sum_to_one(mixup, cutmix):
    images, labels = _batch()
    mixer = BatchMixer(CLASSES, mixup, cutmix, seed=0)
    mixed_any = False
    for step in range(6):
        mixed, targets = mixer(images, labels, step, 0)
        assert mixed.shape == images.shape and targets.shape == (8, CLASSES)
        assert targets.dtype.is_floating_point and (targets >= 0).all()
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
        # Row i mixes sample i with sample i-1 (v2 pairs by roll): both labels carry weight.
        mixed_any |= bool(((targets > 0).sum(dim=1) == 2).any())
    assert mixed_any


def test_same_seed_and_step_give_the_same_batch_and_other_steps_differ():
    images, labels = _batch()
    mixer = BatchMixer(CLASSES, 0.2, 1.0, seed=3)
    torch.manual_seed(0)
    first = mixer(images, labels, step=7, micro_batch=1)
    torch.manual_seed(99)  # the global RNG's running state plays no part
    again = mixer(images, labels, step=7, micro_batch=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in (mixer(images, labels, 8, 1), mixer(images, labels, 7, 0),
                  BatchMixer(CLASSES, 0.2, 1.0, seed=4)(images, labels, 7, 1)):
        assert not torch.equal(other[1], first[1])


def test_mixing_leaves_the_global_rng_untouched():
    images, labels = _batch()
    mixer = BatchMixer(CLASSES, 0.2, 1.0, seed=0)
    state = torch.get_rng_state()
    mixer(images, labels, 0, 0)
    assert torch.equal(torch.get_rng_state(), state)


def test_both_on_chooses_mixup_or_cutmix_per_batch():
    images, labels = _batch()
    mixer = BatchMixer(CLASSES, 0.2, 1.0, seed=0)
    kinds = set()
    for step in range(20):
        mixed, _ = mixer(images, labels, step, 0)
        unchanged = (mixed == images).float().mean().item()
        # CutMix pastes a box (most pixels kept exactly); MixUp blends every pixel.
        kinds.add("cutmix" if unchanged > 0.2 else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_label_smoothing_composes_with_mixed_targets():
    """What the loop relies on: torch smooths probability targets as (1 - eps) p + eps / C, so
    smoothing after mixing (CrossEntropyLoss(label_smoothing)) = mixing smoothed one-hots."""
    images, labels = _batch(size=CLASSES)[0], torch.arange(CLASSES)  # all labels distinct
    _, targets = BatchMixer(CLASSES, 0.2, 0.0, seed=0)(images, labels, 0, 0)
    lam = targets[0, 0].item()  # sample 0's own weight (its partner, sample 4, is another class)
    eps, logits = 0.1, torch.randn(CLASSES, CLASSES, generator=torch.Generator().manual_seed(1))
    smooth = nn.functional.one_hot(labels, CLASSES).float() * (1 - eps) + eps / CLASSES
    mixed_smooth = smooth * lam + smooth.roll(1, 0) * (1 - lam)
    torch.testing.assert_close(nn.CrossEntropyLoss(label_smoothing=eps)(logits, targets),
                               nn.CrossEntropyLoss()(logits, mixed_smooth))
    assert not torch.isclose(nn.CrossEntropyLoss()(logits, targets),
                             nn.CrossEntropyLoss()(logits, mixed_smooth))  # eps does something


def test_no_mixer_without_alphas():
    assert build_mixer(Config()) is None
    config = Config()
    config.train.cutmix_alpha = 1.0
    assert isinstance(build_mixer(config), BatchMixer)
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        BatchMixer(CLASSES, 0.0, 0.0, seed=0)


def test_seeded_rng_restores_the_callers_state():
    state = torch.get_rng_state()
    with seeded_rng(torch.device("cpu"), 1, 2, 3):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded_rng(torch.device("cpu"), 1, 2, 3):
        assert torch.equal(torch.rand(3), inside)


# ---------------------------------------------------------------- the loop, resumed mid-epoch


def _loop_config() -> Config:
    config = Config()
    config.data.num_classes = CLASSES
    config.model.stochastic_depth_prob = 0.5
    config.model.zero_init_residual = False  # else every residual branch starts at 0: none to drop
    config.train.mixup_alpha, config.train.cutmix_alpha = 0.2, 1.0
    config.optim.label_smoothing, config.schedule.warmup_epochs = 0.1, 0.0
    config.train.log_every_steps = 1000
    return config


def _batches(steps: int = 3) -> list:
    generator = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=generator),
             torch.randint(0, CLASSES, (4,), generator=generator), 0) for _ in range(steps)]


def _run(config: Config, split: int | None) -> dict:
    torch.manual_seed(0)
    model = build_model(config.model, CLASSES)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 4, 1, config.schedule)
    batches, state = _batches(), TrainingState(model, optimizer, scheduler)
    if split is None:
        train_one_epoch(state, batches, torch.device("cpu"), config)
        return model.state_dict()
    train_one_epoch(state, batches[:split], torch.device("cpu"), config)
    torch.manual_seed(12345)  # a restarted process: the global RNG is somewhere else
    train_one_epoch(state, batches[split:], torch.device("cpu"), config, start_step=split)
    return model.state_dict()


def test_a_resumed_epoch_is_bit_identical_with_mixing_and_stochastic_depth():
    config = _loop_config()
    straight, resumed = _run(config, None), _run(config, split=1)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    config.train.seed = 1  # the draws do depend on train.seed: the test can tell them apart
    other = _run(config, None)
    assert any(not torch.equal(straight[k], other[k]) for k in straight
               if straight[k].dtype.is_floating_point)


def _resumed_through_a_checkpoint(config: Config, alter=None) -> dict:
    """`_run` split after step 1, the second half in fresh objects restored from the first
    half's checkpoint state (altered by `alter`), as a restarted worker does."""
    def objects() -> TrainingState:
        torch.manual_seed(0)
        model = build_model(config.model, CLASSES)
        optimizer = build_optimizer(model, config)
        return TrainingState(model, optimizer, build_scheduler(optimizer, 4, 1, config.schedule))
    batches, first = _batches(), objects()
    train_one_epoch(first, batches[:1], torch.device("cpu"), config)
    saved = first.state_dict(epoch=0, steps_done=1, config_dict={})
    if alter is not None:
        alter(saved)
    second = objects()
    torch.manual_seed(12345)  # a restarted process: the global RNG is somewhere else
    epoch, step = second.restore(saved, steps_per_epoch=3)
    assert (epoch, step) == (0, 1)
    train_one_epoch(second, batches[1:], torch.device("cpu"), config, start_step=step)
    return second.model.state_dict()


def test_a_resume_without_the_optimizer_and_rng_state_changes_the_weights():
    """The negative control of every bit-exact resume (tests/integration/test_faults.py): the
    same checkpoint restored without its momentum buffers and RNG states must not end on the
    straight run's weights, while restored whole it does. Red if the comparison is blind to
    the state a resume restores."""
    config = _loop_config()
    straight = _run(config, None)

    def same(weights: dict) -> bool:
        return all(torch.equal(straight[k], weights[k]) for k in straight)

    def forget_optimizer_and_rng(state: dict) -> None:
        state["optimizer"]["state"] = {}  # momentum buffers gone, as if never saved
        torch.manual_seed(12345)
        state["rng"] = [{**state["rng"][0], "torch": torch.get_rng_state()}]
    assert same(_resumed_through_a_checkpoint(config))
    assert not same(_resumed_through_a_checkpoint(config, forget_optimizer_and_rng))
