"""Per-image policies (`data.auto_augment`, `data.random_erasing_prob`): drawn inside the per-image
seeding of the loaders, so deterministic per (seed, epoch, index), on the CPU and on the
device-decode path alike."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from rn50.config import DataConfig
from rn50.data.device_decode import DeferredBatch, DeviceDecodePreset, EncodedImage
from rn50.data.loaders import SeededAugmentation, build_loader
from rn50.data.transforms import ERASE_VALUE_UINT8, IMAGENET_MEAN, train_transform

POLICIES = ("trivialaugment_wide", "randaugment", "autoaugment")


def _photo(seed: int, size=(120, 90)) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC)


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    _photo(seed).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


class _Photos(Dataset):
    """Four photo-like images through a train preset, like ImageFolderDataset without files."""

    def __init__(self, cfg: DataConfig):
        self.preset, self.images = train_transform(cfg), [_photo(i) for i in range(4)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.preset(self.images[index]), index


def _cfg(**overrides) -> DataConfig:
    return DataConfig(**{"train_crop_px": 48, "hflip": True, **overrides})


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_draws_are_deterministic_per_seed_epoch_and_index(policy):
    seeded = SeededAugmentation(_Photos(_cfg(auto_augment=policy, random_erasing_prob=0.5)),
                                 seed=0, epoch=3)
    torch.manual_seed(1)
    first = seeded[2][0]
    state = torch.get_rng_state()
    torch.manual_seed(2)  # the caller's RNG state plays no part ...
    assert torch.equal(seeded[2][0], first)
    torch.manual_seed(1)
    seeded[2]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left as it was
    # The same crop of one image under other index seeds: the policy must differ somewhere.
    plain = SeededAugmentation(_Photos(_cfg()), seed=0, epoch=3)
    assert not torch.equal(seeded[1][0], seeded[2][0])
    assert any(not torch.equal(seeded[i][0], plain[i][0]) for i in range(4))


def test_policy_is_applied_after_crop_and_flip_with_the_same_crop():
    """Crop and flip are drawn first, so the policy changes pixels, not the framing: with an
    identity-free policy (AutoAugment always applies two ops) most draws differ from plain."""
    plain = train_transform(_cfg())
    augmented = train_transform(_cfg(auto_augment="autoaugment"))
    differs = 0
    for seed in range(8):
        torch.manual_seed(seed)
        a = plain(_photo(seed))
        torch.manual_seed(seed)
        b = augmented(_photo(seed))
        assert a.shape == b.shape == (3, 48, 48) and b.dtype == torch.uint8
        differs += not torch.equal(a, b)
    assert differs >= 6


def test_random_erasing_fills_a_box_with_the_mean_colour_on_uint8():
    assert ERASE_VALUE_UINT8 == tuple(round(255 * m) for m in IMAGENET_MEAN) == (124, 116, 104)
    erase = train_transform(_cfg(random_erasing_prob=0.999999))
    plain = train_transform(_cfg())
    torch.manual_seed(0)
    erased = erase(_photo(0))
    torch.manual_seed(0)
    original = plain(_photo(0))
    changed = (erased != original).any(dim=0)
    assert changed.any()
    mean = torch.tensor(ERASE_VALUE_UINT8, dtype=torch.uint8).view(3, 1, 1)
    assert (erased == mean).all(dim=0)[changed].all()  # every changed pixel is the mean colour
    rows, cols = changed.nonzero().unbind(1)  # ... and they form one rectangle
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()


def test_unknown_policy_is_refused_by_the_preset():
    with pytest.raises(ValueError, match="unknown data.auto_augment 'rand'"):
        train_transform(_cfg(auto_augment="rand"))


def test_loader_images_are_the_same_with_and_without_workers():
    dataset = _Photos(_cfg(auto_augment="trivialaugment_wide", random_erasing_prob=0.5))
    runs = [torch.cat([b[0] for b in build_loader(dataset, 2, rank=0, world_size=1, seed=5,
                                                  epoch=1, train=True, loader_workers=workers)])
            for workers in (0, 2)]
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------- device-decode path


def decode_sample(planned: EncodedImage) -> torch.Tensor:
    return DeferredBatch([planned]).decode(torch.tensor([0]), torch.device("cpu"))[0][0]


def test_device_path_applies_the_policies_with_replayable_draws():
    cfg = _cfg(auto_augment="trivialaugment_wide", random_erasing_prob=0.999999)
    preset = DeviceDecodePreset(cfg)
    torch.manual_seed(4)
    planned = preset.plan(_jpeg(0))
    torch.manual_seed(4)
    again = preset.plan(_jpeg(0))
    assert isinstance(planned, EncodedImage) and planned.policy_seed == again.policy_seed
    state = torch.get_rng_state()
    decoded = decode_sample(planned)
    assert torch.equal(torch.get_rng_state(), state)  # decoding draws from its own seed
    assert torch.equal(decoded, decode_sample(again)) and decoded.dtype == torch.uint8
    torch.manual_seed(4)
    plain = DeviceDecodePreset(_cfg()).plan(_jpeg(0))
    assert plain.box == planned.box and plain.flip == planned.flip  # same crop, then the policy
    mean = torch.tensor(ERASE_VALUE_UINT8, dtype=torch.uint8).view(3, 1, 1)
    assert (decoded == mean).all(dim=0).any()  # the erased box reached the device path
    assert not torch.equal(decoded, decode_sample(plain))


def test_device_path_without_policies_makes_no_extra_draw():
    torch.manual_seed(0)
    DeviceDecodePreset(_cfg()).plan(_jpeg(1))
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    DeviceDecodePreset(_cfg(random_erasing_prob=0.5)).plan(_jpeg(1))
    assert torch.rand(1) != after_plain  # the policy seed is one draw more ...
    torch.manual_seed(0)
    train_transform(_cfg())(_photo(1))
    assert torch.rand(1) == after_plain  # ... and without policies the CPU preset's draws match
