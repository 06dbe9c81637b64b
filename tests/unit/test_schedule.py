"""LR schedule: warmup, step, cosine and linear decay per step."""
import pytest
import torch

from rn50.config import ScheduleConfig
from rn50.core.schedule import build_scheduler, lr_multiplier


def test_warmup_is_linear_from_start_fraction():
    cfg = ScheduleConfig(warmup_epochs=2, warmup_start_fraction=0.1, decay="step")
    assert lr_multiplier(0, 10, 90, cfg) == pytest.approx(0.1)
    assert lr_multiplier(10, 10, 90, cfg) == pytest.approx(0.55)
    assert lr_multiplier(20, 10, 90, cfg) == pytest.approx(1.0)


def test_step_decay_at_milestones():
    cfg = ScheduleConfig(warmup_epochs=0, decay="step", step_milestones_epochs=[30, 60],
                         step_gamma=0.1)
    assert lr_multiplier(299, 10, 90, cfg) == pytest.approx(1.0)
    assert lr_multiplier(300, 10, 90, cfg) == pytest.approx(0.1)
    assert lr_multiplier(600, 10, 90, cfg) == pytest.approx(0.01)


@pytest.mark.parametrize("decay, midpoint", [("cosine", 0.5), ("linear", 0.5)])
def test_smooth_decay_reaches_final_fraction(decay, midpoint):
    cfg = ScheduleConfig(warmup_epochs=0, decay=decay, final_lr_fraction=0.0)
    assert lr_multiplier(0, 10, 10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(50, 10, 10, cfg) == pytest.approx(midpoint)
    assert lr_multiplier(100, 10, 10, cfg) == pytest.approx(0.0, abs=1e-9)


def test_scheduler_state_resumes_on_the_same_lr():
    cfg = ScheduleConfig(warmup_epochs=1, decay="cosine")
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
        return optimizer, build_scheduler(optimizer, 5, 4, cfg)
    optimizer, scheduler = make()
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    resumed_optimizer, resumed = make()
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
