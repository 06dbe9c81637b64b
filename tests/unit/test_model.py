"""Model: parameter count, variants, zero-init, EMA."""
import pytest
import torch

from rn50.config import ModelConfig
from rn50.core.model import EMA, build_model, count_parameters, parameter_groups, unwrap


def test_resnet50_has_the_published_parameter_count():
    assert count_parameters(build_model(ModelConfig(), 1000)) == 25_557_032


def test_resnet50d_runs_and_differs():
    model = build_model(ModelConfig(arch="resnet50d"), 10)
    assert count_parameters(model) != count_parameters(build_model(ModelConfig(), 10))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert isinstance(model.layer2[0].downsample[0], torch.nn.AvgPool2d)


def test_blurpool_wraps_the_strided_convs_and_keeps_the_parameters():
    from rn50.core.model import BlurPoolConv2d
    model = build_model(ModelConfig(arch="resnet50_blurpool"), 1000)
    assert count_parameters(model) == 25_557_032
    wrapped = [name for name, m in model.named_modules() if isinstance(m, BlurPoolConv2d)]
    # layer2-4: the first block's 3x3 conv and its 1x1 shortcut; the RGB stem stays as it is
    assert wrapped == [f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")]
    assert "layer2.0.conv2.conv.weight" in model.state_dict()  # a plain resnet50 refuses it
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_blurpool_passes_flat_images_and_removes_a_checkerboard():
    from rn50.core.model import BlurPoolConv2d
    conv = torch.nn.Conv2d(16, 4, 3, stride=2, padding=1, bias=False)
    blurpool = BlurPoolConv2d(conv)
    flat = torch.full((1, 16, 8, 8), 3.0)
    assert torch.allclose(blurpool(flat), conv(flat), atol=1e-5)  # a blur leaves flat areas alone
    signs = torch.tensor([[(-1.0) ** (row + col) for col in range(8)] for row in range(8)])
    checkerboard = signs.expand(1, 16, 8, 8)
    interior = blurpool(checkerboard)[..., 1:-1, 1:-1]
    assert interior.abs().max() < 1e-5 < conv(checkerboard)[..., 1:-1, 1:-1].abs().max()


def test_zero_init_residual_zeroes_last_bn():
    zero = build_model(ModelConfig(zero_init_residual=True), 10)
    plain = build_model(ModelConfig(zero_init_residual=False), 10)
    assert zero.layer1[0].bn3.weight.abs().sum() == 0
    assert plain.layer1[0].bn3.weight.abs().sum() > 0


def test_parameter_groups_exclude_bn_and_bias():
    model = build_model(ModelConfig(), 10)
    groups = parameter_groups(model, 1e-4, no_bn_bias_decay=True)
    assert groups[1]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[1]["params"])
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == count_parameters(model)


def test_ema_tracks_and_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    before = ema.state_dict()["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], before + 0.5)
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.state_dict()["weight"], ema.state_dict()["weight"])
    with pytest.raises(ValueError, match="shape"):
        EMA(torch.nn.Linear(4, 2), 0.5).load_state_dict(ema.state_dict())


def test_unwrap_compiled_like_wrapper():
    model = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._orig_mod = model
    assert unwrap(Wrapper()) is model


def _pair(arch: str = "resnet50", p: float = 0.5) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights with and without stochastic depth (zero-init off: with it every residual
    branch starts at 0, and dropping a zero would go unseen)."""
    plain = build_model(ModelConfig(arch=arch, zero_init_residual=False), 10)
    dropped = build_model(ModelConfig(arch=arch, zero_init_residual=False,
                                      stochastic_depth_prob=p), 10)
    dropped.load_state_dict(plain.state_dict())  # strict: the keys are the same
    return plain, dropped


@pytest.mark.parametrize("arch", ["resnet50", "resnet50d", "resnet50_blurpool"])
def test_stochastic_depth_drops_each_block_with_the_linear_rule(arch):
    from torchvision.ops import StochasticDepth
    plain, dropped = _pair(arch, p=0.2)
    drops = [m for m in dropped.modules() if isinstance(m, StochasticDepth)]
    assert [d.mode for d in drops] == ["row"] * 16
    assert [d.p for d in drops] == pytest.approx([0.2 * block / 16 for block in range(1, 17)])
    assert list(dropped.state_dict()) == list(plain.state_dict())  # checkpoints stay loadable
    plain.load_state_dict(dropped.state_dict())
    assert not any(isinstance(m, StochasticDepth) for m in plain.modules())


def test_stochastic_depth_is_the_identity_in_eval_and_drops_in_train():
    plain, dropped = _pair()
    images = torch.randn(4, 3, 32, 32)
    plain.eval(), dropped.eval()
    torch.manual_seed(0)
    assert torch.equal(dropped(images), plain(images))
    plain.train(), dropped.train()
    torch.manual_seed(0)
    assert not torch.allclose(dropped(images), plain(images))
    torch.manual_seed(0)
    first = dropped(images)
    torch.manual_seed(0)
    assert torch.equal(dropped(images), first)  # its draws come from the seeded generator
