"""`data.decode_on_device` on CPU (its fallback): the same augmentation draws as the CPU preset,
files nvJPEG cannot take decoded on the CPU, corrupt files dropped and counted, and a whole
loader -> train step that is as deterministic as the CPU path."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rn50.config import Config, DataConfig, load_config
from rn50.data.loaders import build_datasets, build_loader, collate_skip_corrupt
from rn50.data.device_decode import DeferredBatch, DeviceDecodePreset, EncodedImage
from rn50.core.engine import build_optimizer, train_one_epoch
from rn50.core.schedule import build_scheduler
from rn50.core.training_state import TrainingState
from rn50.data.transforms import load_rgb, train_transform


def _photo_jpeg(seed: int, size=(120, 90), mode="RGB", fmt="JPEG") -> bytes:
    """Smooth, photo-like content (a bicubic-upsampled tiny random image)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


CFG = DataConfig(train_crop_px=64, color_jitter=0.4, hflip=True)


@pytest.mark.parametrize("seed", range(6))
def test_device_path_draws_what_the_cpu_preset_draws(seed):
    data = _photo_jpeg(seed)  # 120x90: below 2x the crop, so the CPU path decodes at full size
    torch.manual_seed(seed)
    planned = DeviceDecodePreset(CFG).plan(data)
    after_plan = torch.rand(1)
    torch.manual_seed(seed)
    on_cpu = train_transform(CFG)(load_rgb(data, CFG.train_crop_px))
    assert torch.rand(1) == after_plan  # both consumed the same random numbers
    assert isinstance(planned, EncodedImage) and planned.jitter is not None
    images, labels, undecodable = DeferredBatch([planned]).decode(torch.tensor([7]),
                                                                  torch.device("cpu"))
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.tolist() == [7] and undecodable == 0
    # Same crop, flip and jitter factors; only the decoders' and resizers' rounding differ.
    assert (images[0].float() - on_cpu.float()).abs().mean() < 2.0


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "CMYK")])
def test_files_nvjpeg_cannot_take_are_augmented_on_the_cpu(fmt, mode):
    data = _photo_jpeg(1, mode=mode, fmt=fmt)
    torch.manual_seed(3)
    planned = DeviceDecodePreset(CFG).plan(data)
    torch.manual_seed(3)
    on_cpu = train_transform(CFG)(load_rgb(data, CFG.train_crop_px))
    assert isinstance(planned, torch.Tensor) and torch.equal(planned, on_cpu)


def test_mixed_and_corrupt_batches_keep_labels_aligned():
    preset = DeviceDecodePreset(CFG)
    whole = _photo_jpeg(2)
    truncated = preset.plan(whole[: len(whole) // 2])  # the header parses; the pixels do not
    samples = [(preset.plan(_photo_jpeg(0)), 0), (truncated, 1),
               (preset.plan(_photo_jpeg(1, fmt="PNG")), 2), None, (preset.plan(_photo_jpeg(3)), 3)]
    batch, labels, skipped = collate_skip_corrupt(samples)
    assert isinstance(batch, DeferredBatch) and len(batch) == 4 and skipped == 1
    images, labels, undecodable = batch.decode(labels, torch.device("cpu"))
    assert images.shape == (3, 3, 64, 64) and labels.tolist() == [0, 2, 3] and undecodable == 1


def test_garbage_is_skipped_before_it_reaches_the_device(tmp_path):
    config = load_config("demo", [f"data.root={tmp_path}", "data.dataset=imagefolder",
                                  "data.num_classes=2", "data.decode_on_device=true"])
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i}.jpg").write_bytes(_photo_jpeg(i + (label == "b") * 10))
    (tmp_path / "train" / "a" / "bad.jpg").write_bytes(b"not an image")
    train_set, val_set, _ = build_datasets(config.data)
    batches = list(build_loader(train_set, 7, rank=0, world_size=1, seed=0, epoch=0, train=True))
    assert len(batches) == 1 and batches[0][2] == 1 and len(batches[0][0]) == 6
    assert isinstance(val_set[0][0], torch.Tensor)  # validation decodes on the CPU as before


def _digits_config(tmp_path, on_device: bool) -> Config:
    return load_config("demo", [f"data.root={tmp_path / 'digits'}", "data.max_train_samples=96",
                                f"data.decode_on_device={str(on_device).lower()}",
                                "train.global_batch_size=32", "data.color_jitter=0.4"])


def test_loader_with_workers_is_deterministic_and_trains(tmp_path):
    config = _digits_config(tmp_path, on_device=True)
    train_set, _, _ = build_datasets(config.data)

    def first_epoch_images(workers: int) -> list[torch.Tensor]:
        return [batch.decode(labels, torch.device("cpu"))[0] for batch, labels, _ in
                build_loader(train_set, 32, rank=0, world_size=1, seed=0, epoch=0, train=True,
                             loader_workers=workers)]
    with_workers, in_process = first_epoch_images(2), first_epoch_images(0)
    assert len(with_workers) == 3
    assert all(torch.equal(a, b) for a, b in zip(with_workers, in_process))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 3, 1, config.schedule)
    loader = build_loader(train_set, 32, rank=0, world_size=1, seed=0, epoch=0, train=True)
    stats = train_one_epoch(TrainingState(model, optimizer, scheduler), loader,
                            torch.device("cpu"), config)
    assert stats.images == 96 and stats.skipped_images == 0 and np.isfinite(stats.loss)
