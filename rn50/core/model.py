"""ResNet-50 (torchvision v1.5) built from scratch, plus the ResNet-50D and BlurPool variants.

ResNet-50D (Bag of Tricks, He et al. 2019) replaces the 7×7 stem with three 3×3 convs and moves
the stride-2 of each downsampling shortcut into an average pool, so the 1×1 shortcut conv no longer
throws away three quarters of its input. It costs ~5% more compute for ~+1% top-1.

BlurPool (Zhang 2019, as FFCV's fast ImageNet recipes use it) low-pass filters the input of every
strided conv, so downsampling aliases less; same parameters, ~+0.5-1% top-1 in FFCV's ablation.

Stochastic depth (Huang et al. 2016, `model.stochastic_depth_prob`) drops each Bottleneck's residual
branch for a random subset of the samples in training (torchvision.ops.StochasticDepth, "row" mode),
with the linear rule of the paper: block l of L drops with probability l/L x the setting, so the
first blocks are nearly always kept and the last one is dropped with the full probability. Its
masks are drawn from generators the training loop seeds per step (rn50.core.engine).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck
from torchvision.ops import StochasticDepth

from rn50.config import ModelConfig
from rn50.config_sections import Arch, choices


def build_model(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A randomly initialised ResNet-50 (or -50D) with `num_classes` outputs."""
    # zero_init_residual starts every block's last BN gamma at 0: each block begins as an identity,
    # which is what lets a from-scratch ResNet-50 take a large LR in its first epochs.
    model = resnet50(weights=None, num_classes=num_classes,
                     zero_init_residual=model_cfg.zero_init_residual)
    if model_cfg.arch not in ARCH_CHANGES:
        raise ValueError(f"unknown model.arch {model_cfg.arch!r}; must be one of "
                         f"{list(choices(Arch))}")
    change = ARCH_CHANGES[model_cfg.arch]
    if change is not None:
        change(model)
    if model_cfg.stochastic_depth_prob > 0:
        _add_stochastic_depth(model, model_cfg.stochastic_depth_prob)
    return model


class BatchNormThenDrop(nn.BatchNorm2d):
    """A Bottleneck's last BatchNorm followed by StochasticDepth on its output: the residual branch,
    just before `out += identity`. Same parameters and buffers as the BN it replaces, so the
    state_dict (and any checkpoint) is unchanged; torchvision's Bottleneck.forward is kept as is."""

    def __init__(self, bn: nn.BatchNorm2d, drop_prob: float):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.stochastic_depth = StochasticDepth(drop_prob, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm, then zero the rows the draw drops and scale the kept ones by 1 / (1 - p)."""
        return self.stochastic_depth(super().forward(x))


def _add_stochastic_depth(model: nn.Module, drop_prob: float) -> None:
    """Give block l (1-based) of the L Bottlenecks a drop probability of l / L x `drop_prob`."""
    blocks = [module for module in model.modules() if isinstance(module, Bottleneck)]
    for depth, block in enumerate(blocks, start=1):
        block.bn3 = BatchNormThenDrop(block.bn3, drop_prob * depth / len(blocks))


class BlurPoolConv2d(nn.Module):
    """A strided conv fed through a fixed 3x3 binomial blur ([1, 2, 1] outer itself, / 16)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv  # kept as a child, so its weights are `...conv.weight`: a plain resnet50
        # refuses this state_dict instead of silently dropping the blur
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16
        self.register_buffer("blur", kernel.expand(conv.in_channels, 1, 3, 3).clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur each channel (reflect padding keeps borders unchanged in level), then convolve."""
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.blur.to(x.dtype),
                           groups=self.conv.in_channels)
        return self.conv(blurred)


def _add_blurpool(module: nn.Module) -> None:
    """Wrap every strided conv with >= 16 input channels (not the RGB stem), in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            _add_blurpool(child)


def _make_resnet_d(model: nn.Module) -> None:
    """Swap in the deep stem and avg-pool shortcuts, in place."""
    def conv_bn_relu(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True)]

    stem = conv_bn_relu(3, 32, 2) + conv_bn_relu(32, 32, 1) + conv_bn_relu(32, 64, 1)
    model.conv1 = nn.Sequential(*stem[:-2])
    model.bn1 = stem[-2]
    for module in model.conv1.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        block: Bottleneck = layer[0]
        if block.downsample is None:
            continue
        conv, bn = block.downsample[0], block.downsample[1]
        stride = conv.stride[0]
        conv.stride = (1, 1)
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) \
            if stride > 1 else nn.Identity()
        block.downsample = nn.Sequential(pool, conv, bn)


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """`model` on `device`, in channels_last memory format on CUDA when asked (cuDNN's NHWC
    kernels are what pay for it; on CPU it would only add layout conversions)."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under a DDP / torch.compile wrapper (never `.module` blindly)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def parameter_groups(model: nn.Module, weight_decay: float, no_bn_bias_decay: bool) -> list[dict]:
    """SGD parameter groups; BN weights and biases get no weight decay when asked."""
    if not no_bn_bias_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of a model's parameters and buffers, kept in fp32.

    The update is two foreach ops (one multiply, one add) over cached tensor lists, not one small
    kernel pair per tensor after a `state_dict()` walk: the same arithmetic, element by element,
    in a handful of kernel launches."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone().float() for k, v in unwrap(model).state_dict().items()}
        self._lists: tuple | None = None  # (model, averaged, live floats, averaged, live others)

    def _tensor_lists(self, model: nn.Module) -> tuple:
        """The averaged tensors and the live ones they follow, built once per model object (the
        live ones are views of its parameters and buffers, which training updates in place)."""
        if self._lists is None or self._lists[0] is not model:
            live = unwrap(model).state_dict()
            floats = [name for name, value in live.items() if value.dtype.is_floating_point]
            others = [name for name, value in live.items() if not value.dtype.is_floating_point]
            self._lists = (model, [self.state[n] for n in floats], [live[n] for n in floats],
                           [self.state[n] for n in others], [live[n] for n in others])
        return self._lists

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average a step towards the model's current weights."""
        _, averaged, live, averaged_others, live_others = self._tensor_lists(model)
        live = [value if value.dtype == torch.float32 else value.float() for value in live]
        torch._foreach_mul_(averaged, self.decay)
        torch._foreach_add_(averaged, live, alpha=1 - self.decay)
        for average, value in zip(averaged_others, live_others):  # BN's num_batches_tracked
            average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (a plain state_dict)."""
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averaged weights saved by `state_dict`, checking names and shapes."""
        missing = set(self.state) ^ set(state)
        if missing:
            raise ValueError("EMA state does not match the model: differing keys "
                             f"{sorted(missing)[:5]}")
        for name, value in state.items():
            if value.shape != self.state[name].shape:
                raise ValueError(f"EMA tensor '{name}' has shape {tuple(value.shape)}, "
                                 f"model has {tuple(self.state[name].shape)}")
            self.state[name] = value.detach().clone().float()
        self._lists = None  # the cached lists held the replaced tensors


ARCH_CHANGES: dict[str, Callable[[nn.Module], None] | None] = {
    "resnet50": None, "resnet50d": _make_resnet_d, "resnet50_blurpool": _add_blurpool}
"""Each `model.arch` choice (`Arch` in rn50.config_sections): what it changes in torchvision's
ResNet-50, in place."""
