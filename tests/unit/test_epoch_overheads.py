"""The per-epoch costs issue 24 removed keep exact resume: a loader whose workers live for the run
deals every epoch's batches exactly as a loader built for that epoch (skipped steps and
progressive crops included), each rank draws only its own sample streams, collate can stack NHWC,
and a checkpoint written in the background holds the state as it was when the save was asked."""
import io

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from rn50.config import DataConfig
from rn50.core.background_save import host_copy, save_in_background
from rn50.io.checkpoints import load_checkpoint
from rn50.data.epoch_loader import EpochLoader
from rn50.data.loaders import build_loader, collate_skip_corrupt, set_train_crop_px
from rn50.data.samplers import epoch_streams
from rn50.data.transforms import train_transform


class _Photos(Dataset):
    """JPEGs through the real train preset (crop first, flip, jitter): label = index."""

    def __init__(self, size: int = 24):
        self.transform = train_transform(DataConfig(train_crop_px=16, color_jitter=0.2))
        generator = torch.Generator().manual_seed(0)
        self.jpegs = []
        for _ in range(size):
            pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=generator)
            buffer = io.BytesIO()
            Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
            self.jpegs.append(buffer.getvalue())

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, index):
        return self.transform.decode(self.jpegs[index]), index


def _plain(loader) -> list:
    return [(images.clone(), labels.tolist()) for images, labels, _ in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_long_loader_deals_what_a_per_epoch_loader_deals(workers):
    dataset = _Photos()
    options = dict(rank=1, world_size=2, seed=3, loader_workers=workers,
                   repeated_augmentations=2, micro_batches_per_step=4)
    persistent = EpochLoader(dataset, 2, train=True, **options)
    epochs = [(0, 1, 16), (1, 0, 24), (2, 0, 16)]  # (epoch, steps skipped, crop side)
    pids = []
    for epoch, skip, crop_px in epochs:
        got = _plain(persistent.epoch(epoch, skip, crop_px))
        if workers:
            pids.append([w.pid for w in persistent.loader._iterator._workers])
        set_train_crop_px(dataset, crop_px)  # what a per-epoch loader's fresh workers would see
        expected = _plain(build_loader(dataset, 2, epoch=epoch, train=True, skip_steps=skip,
                                       **options))
        assert [labels for _, labels in got] == [labels for _, labels in expected]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, expected))
        assert got[0][0].shape[-1] == crop_px and len(got) == persistent.steps * 2 - 2 * skip
    if workers:
        assert pids[0] == pids[1] == pids[2]  # the same processes served every epoch
    val = EpochLoader(dataset, 5, train=False, **options)
    shard = [b[1].tolist() for b in build_loader(dataset, 5, epoch=0, train=False, **options)]
    assert [b[1].tolist() for b in val.epoch(0)] == [b[1].tolist() for b in val.epoch(1)] == \
        shard == [list(range(1, 10, 2)), list(range(11, 20, 2)), [21, 23]]


def test_a_rank_draws_only_its_own_streams_and_they_are_the_full_sets():
    dataset = _Photos(50)
    for repeats in (1, 3):
        every = epoch_streams(dataset, 4, seed=1, epoch=2, repeats=repeats)
        own = epoch_streams(dataset, 4, seed=1, epoch=2, repeats=repeats, only=[1, 3])
        assert sorted(own) == [1, 3] and len(every) == 4
        for index in (1, 3):
            assert list(own[index]) == list(every[index])
            assert len(own[index]) == len(every[0])  # every stream as long: the step count


def test_collate_can_stack_nhwc_with_the_same_pixels():
    images = [torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8) for _ in range(3)]
    hwc_made = [image.permute(1, 2, 0).contiguous().permute(2, 0, 1) for image in images]
    plain, labels, skipped = collate_skip_corrupt([(images[0], 0), None, (images[1], 1),
                                                   (images[2], 2)])
    nhwc, labels_nhwc, _ = collate_skip_corrupt([(hwc_made[0], 0), None, (images[1], 1),
                                                 (hwc_made[2], 2)], channels_last=True)
    assert skipped == 1 and labels.tolist() == labels_nhwc.tolist() == [0, 1, 2]
    assert torch.equal(plain, nhwc) and plain.is_contiguous()
    assert nhwc.shape == (3, 3, 5, 6) and nhwc.is_contiguous(memory_format=torch.channels_last)


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 200)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 300)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2,
            "shape": torch.Size([2, 3]), "rng": [{"torch": torch.get_rng_state()}]}


def test_host_copy_is_independent_of_the_live_tensors():
    state = _state()
    copied = host_copy(state)
    before = state["model"]["weight"].clone()
    state["model"]["weight"].add_(1.0)  # training goes on
    state["optimizer"]["state"][0]["momentum_buffer"].zero_()
    assert torch.equal(copied["model"]["weight"], before)
    assert copied["optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0
    assert copied["shape"] == torch.Size([2, 3]) and copied["epoch"] == 2


def test_a_background_save_holds_the_state_at_the_call_and_reports_a_failed_write(tmp_path):
    state = _state()
    expected = state["model"]["weight"].clone()
    written = save_in_background(tmp_path / "c", state, {"epoch": 2})
    state["model"]["weight"].mul_(0)  # the training thread goes on at once
    assert written.result(timeout=60) == tmp_path / "c"
    assert torch.equal(load_checkpoint(tmp_path / "c")["model"]["weight"], expected)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        save_in_background(tmp_path / "file", state, {}).result(timeout=60)
