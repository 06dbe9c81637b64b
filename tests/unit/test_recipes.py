"""Every built-in recipe dry-runs: loaded with overrides that shrink it to digits at 32 px, batch 8,
it builds its data, model, optimizer, schedule and EMA and takes one training step on the CPU with
all of its regularizers on. The issue-16 recipes also keep the published settings they cite."""
import itertools
import math

import pytest
import torch

from rn50.config import RECIPES_DIR, load_config
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.model import EMA, build_model
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState
from rn50.data.loaders import build_datasets, build_loader
from rn50.data.small_datasets import prepare_digits

TINY = ["data.dataset=digits", "data.num_classes=10", "data.train_crop_px=32",
        "data.val_resize_px=32", "data.val_crop_px=32", "data.progressive_min_px=0",
        "data.loader_workers=0", "data.max_train_samples=64", "data.max_val_samples=16",
        "train.global_batch_size=8", "scaling.num_workers=1", "train.compile=false"]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return prepare_digits(tmp_path_factory.mktemp("digits") / "cache")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_takes_a_training_step_at_tiny_size(recipe, digits_root):
    published = load_config(recipe)
    config = load_config(recipe, [*TINY, f"data.root={digits_root}"])
    # The shrink keeps the regularizers: the step below runs them as the recipe sets them.
    for key in ("data.auto_augment", "data.random_erasing_prob", "data.repeated_augmentations",
                "train.mixup_alpha", "train.cutmix_alpha", "model.stochastic_depth_prob"):
        assert config.flat()[key] == published.flat()[key], key
    train_set, _, _ = build_datasets(config.data)
    loader = build_loader(train_set, 8, rank=0, world_size=1, seed=config.train.seed, epoch=0,
                          train=True, repeated_augmentations=config.data.repeated_augmentations)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.data.num_classes)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, len(loader), config.train.epochs, config.schedule)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    stats = train_one_epoch(TrainingState(model, optimizer, scheduler, ema=ema),
                            itertools.islice(loader, 1), torch.device("cpu"), config)
    assert stats.images == 8 and math.isfinite(stats.loss)
    assert scheduler.last_epoch == 1


def test_imagenet_tv2_keeps_torchvisions_settings():
    config = load_config("imagenet_tv2")
    assert (config.train.epochs, config.train.global_batch_size, config.peak_lr) == (600, 1024, 0.5)
    assert (config.train.mixup_alpha, config.train.cutmix_alpha) == (0.2, 1.0)
    assert (config.data.auto_augment, config.data.random_erasing_prob,
            config.data.repeated_augmentations) == ("trivialaugment_wide", 0.1, 4)
    assert (config.data.train_crop_px, config.data.val_resize_px, config.data.val_crop_px) == \
        (176, 232, 224)
    assert config.optim.weight_decay == 2e-5 and config.optim.no_bn_bias_decay
    assert config.optim.label_smoothing == 0.1 and config.schedule.decay == "cosine"
    # torchvision: decay 1 - (1 - 0.99998) x 1024 x 32 / 600 per update, one update per 32 steps.
    per_update = 1 - (1 - 0.99998) * 1024 * 32 / 600
    assert config.train.ema_decay == pytest.approx(per_update ** (1 / 32), abs=1e-7)


def test_imagenet_a10g_spot_fits_one_a10g():
    config = load_config("imagenet_a10g_spot")
    assert (config.scaling.num_workers, config.scaling.accelerator_type) == (1, "A10G")
    assert config.train.global_batch_size == 128 and config.train.amp_dtype == "bfloat16"
    assert config.data.loader_workers < config.scaling.cpus_per_worker <= 8  # g5.2xlarge: 8 vCPU
    assert config.train.ema_decay == 0.9999 and config.model.stochastic_depth_prob == 0.05
