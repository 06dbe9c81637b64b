"""Batch-level MixUp / CutMix (torchvision.transforms.v2) and the seeding of every random draw the
training step makes (mixing, stochastic depth).

Each draw comes from a generator freshly seeded by (train.seed, global step, micro-batch index,
stream) and never from a generator's running state, so a run resumed from a checkpoint draws
exactly what an uninterrupted one did, and a micro-batch's draws are the same whichever rank (or
world size) trains it. The micro-batch index is the step's stream index (rn50.data.samplers),
which is the rank when no gradients are accumulated. The caller's RNG states are restored
afterwards.

Targets: MixUp/CutMix turn labels into per-row class probabilities (one-hot rows mixed with weights
lam and 1 - lam), which `nn.CrossEntropyLoss` accepts. For probability targets torch applies label
smoothing as (1 - eps) * p + eps / C, an affine map, so smoothing the mixed target equals mixing
the smoothed one-hots: the loop keeps `CrossEntropyLoss(label_smoothing=eps)`, as torchvision's
classification reference does.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torchvision.transforms import v2

from rn50.data.samplers import mix_seed

MIXING_STREAM, DEPTH_STREAM = 1, 2  # separate streams: switching one regularizer on or off
# leaves the other's draws unchanged


@contextlib.contextmanager
def seeded_rng(device: torch.device, *keys: int) -> Iterator[None]:
    """Seed the CPU generator (and `device`'s, on CUDA) from `keys` for the block, then restore."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        seed = mix_seed(*keys)
        # Not torch.manual_seed: it would reseed every CUDA device, outside what fork_rng restores.
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class BatchMixer:
    """MixUp and/or CutMix on a normalised batch; with both on, one of them per batch, chosen with
    equal probability (v2.RandomChoice, as torchvision's classification reference)."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, seed: int):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int,
                 micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, float targets [B, num_classes] with rows summing to 1) on their device."""
        # v2's draws (the choice, Beta(alpha, alpha), the box) are all on the CPU generator, even
        # for CUDA images, so only the CPU generator needs seeding.
        with seeded_rng(torch.device("cpu"), self.seed, step, micro_batch, MIXING_STREAM):
            return self.transform(images, labels)


def build_mixer(config) -> BatchMixer | None:
    """The run's BatchMixer (`train.mixup_alpha`, `train.cutmix_alpha`), None when both are 0."""
    train = config.train
    if train.mixup_alpha <= 0 and train.cutmix_alpha <= 0:
        return None
    return BatchMixer(config.data.num_classes, train.mixup_alpha, train.cutmix_alpha, train.seed)

