"""Every built-in recipe dry-runs: loaded with overrides that shrink it to digits at 32 px, batch 8,
it builds its data, model, optimizer, schedule and EMA and takes one training step on the CPU with
all of its regularizers on. The issue-16 recipes also keep the published settings they cite, and
every GPU recipe's header says what throughput it expects per GPU and from which figure."""
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from rn50.config import RECIPES_DIR, load_config
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.model import EMA, build_model
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState
from rn50.data.cpu_budget import plan_cpus
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
    assert config.scaling.cpus_per_worker <= 8  # g5.2xlarge: 8 vCPU
    g5 = plan_cpus(config.train.torch_threads, config.data.loader_workers, 8, 1,
                   config.scaling.cpus_per_worker, trains_on_gpu=True)
    assert (g5.torch_threads, g5.loader_workers) == (1, 6) and not g5.oversubscribed
    assert config.train.ema_decay == 0.9999 and config.model.stochastic_depth_prob == 0.05


REPO = Path(__file__).resolve().parents[2]
# "Throughput: ~2,078 images/s per A100, a projection until measured on a GPU, from docs/aws.md
# "16,621" (...)": the rate, the GPU, and a source file holding the quoted figure.
THROUGHPUT = re.compile(r'Throughput: ~(?P<rate>[\d,]+(?:-[\d,]+)?) images/s per (?P<gpu>\w+), '
                        r'a projection until measured on a GPU, from (?P<source>\S+) '
                        r'"(?P<figure>[^"]+)"')
GPU_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")
                     if load_config(p.stem).scaling.use_gpu
                     and not load_config(p.stem).scaling.cpu_stands_in_for_gpu)


def header(recipe: str) -> str:
    """A recipe file's leading comment lines, as one line of text."""
    lines = (RECIPES_DIR / f"{recipe}.yaml").read_text().splitlines()
    comments = itertools.takewhile(lambda line: line.startswith("#"), lines)
    return " ".join(line.lstrip("#").strip() for line in comments)


def expected_throughput(recipe: str) -> re.Match | None:
    """The header's throughput line, if it has one."""
    return THROUGHPUT.search(header(recipe))


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_every_gpu_recipe_says_what_it_expects_per_gpu_and_from_which_figure(recipe):
    found = expected_throughput(recipe)
    assert found, (f"{recipe}.yaml's header has no 'Throughput: ~N images/s per GPU, a projection "
                   'until measured on a GPU, from FILE "FIGURE"\' line')
    assert found["gpu"] == load_config(recipe).scaling.accelerator_type, recipe
    source = REPO / found["source"]
    assert source.is_file(), f"{recipe}: no such file {found['source']}"
    # The quoted figure is in the source, as written there (line breaks aside).
    assert found["figure"] in " ".join(source.read_text().split()), \
        f"{recipe}: {found['source']} does not say {found['figure']!r}"


def test_the_throughput_check_catches_a_missing_or_misquoted_figure():
    """Negative control: the pattern needs the label and a quote, and finds a wrong one."""
    good = ('Throughput: ~3,500-4,000 images/s per H100, a projection until measured on a GPU, '
            'from benchmarks/README.md "~3,500-4,000 images/s per H100" (the step)')
    found = THROUGHPUT.search(good)
    assert (found["rate"], found["gpu"], found["figure"]) == \
        ("3,500-4,000", "H100", "~3,500-4,000 images/s per H100")
    assert THROUGHPUT.search(good.replace("a projection until measured on a GPU", "measured")) \
        is None
    readme = " ".join((REPO / "benchmarks" / "README.md").read_text().split())
    assert found["figure"] in readme and "~9,999 images/s per H100" not in readme
    assert {"imagenet_h100", "imagenet_90ep", "imagenet_a10g_spot"} <= set(GPU_RECIPES)
    assert "rehearsal" not in GPU_RECIPES  # the CPU stands in for its fake GPUs


def test_imagenet_h100_is_imagenet_90ep_on_p5_nodes_at_256_per_gpu():
    seed, h100 = load_config("imagenet_90ep"), load_config("imagenet_h100")
    assert h100.scaling.accelerator_type == "H100" and h100.scaling.num_workers == 8
    assert h100.micro_batch_size == 256 and h100.train.global_batch_size == 2048
    # The LR by imagenet_90ep's rule, 0.1 x batch / 256; the rest of the recipe unchanged.
    assert h100.peak_lr == pytest.approx(0.1 * 2048 / 256)
    assert (h100.optim, h100.schedule, h100.train.epochs) == (seed.optim, seed.schedule, 90)
    # Spot first, falling back to on-demand exactly as the A100 recipes do.
    keys = ("prefer_spot", "spot_wait_s", "spot_refusals_to_fall_back", "node_start_timeout_s",
            "start_timeout_s")
    assert [getattr(h100.scaling, k) for k in keys] == [getattr(seed.scaling, k) for k in keys]
    assert h100.scaling.prefer_spot
    p5 = plan_cpus(h100.train.torch_threads, h100.data.loader_workers, 192, 8,
                   h100.scaling.cpus_per_worker, trains_on_gpu=True)
    assert (p5.torch_threads, p5.loader_workers) == (1, 22)
    assert h100.scaling.cpus_per_worker * 8 <= 192
