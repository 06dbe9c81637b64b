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
