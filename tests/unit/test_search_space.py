"""Sweep files: the shipped ones load; mistakes name the key."""
from pathlib import Path

import pytest
import yaml

from rn50.config import ConfigError
from rn50.search_space import load_sweep, trial_run_name

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_load(path):
    spec = load_sweep(path)
    assert {"optim.lr", "optim.weight_decay"} <= set(spec.space)
    config = spec.trial_config({"optim.lr": 0.05, "optim.weight_decay": 2e-5})
    assert config.optim.lr == 0.05 and config.optim.weight_decay == 2e-5


def write(tmp_path, **changes):
    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, fragment", [
    ({"space": {"optim.lrr": {"loguniform": [0.01, 0.1]}}},
     "space key 'optim.lrr' is not a config field"),
    ({"space": {"optim.lr": {"loguniform": [0.1, 0.01]}}}, "empty range"),
    ({"space": {"optim.lr": {"loguniform": [-0.1, 0.1]}}}, "loguniform bounds must be > 0"),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.1]}}}, "empty range"),
    ({"space": {"optim.lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
    ({"space": {"optim.lr": {"choice": []}}}, "non-empty list"),
    ({"space": {"train.epochs": {"choice": [1, "two"]}}}, "'train.epochs' expects int"),
    ({"space": {"optim.label_smoothing": {"uniform": [0.0, 1.5]}}}, "must be in [0, 1)"),
    ({"space": {}}, "non-empty 'space'"),
    ({"metric": "accuracy"}, "sweep 'metric' must be one of"),
    ({"search": "optuna", "space": {"optim.lr": {"grid": [0.1, 0.2]}}}, "cannot take 'grid'"),
    ({"num_samples": 0}, "'num_samples' must be >= 1"),
    ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "reduction_factor > 1"),
    ({"base_recipe": "nope"}, "unknown recipe 'nope'"),
    ({"overrides": ["optim.lrr=1"]}, "unknown config key 'optim.lrr'"),
    ({"searcher": "random"}, "unknown sweep key(s) ['searcher']"),
])
def test_bad_spaces_give_clear_errors(tmp_path, changes, fragment):
    with pytest.raises(ConfigError) as err:
        load_sweep(write(tmp_path, **changes))
    assert fragment in str(err.value)


def test_grid_and_choice_coerce_to_field_types(tmp_path):
    spec = load_sweep(write(tmp_path, space={"train.global_batch_size": {"grid": ["32", 64]},
                                             "optim.nesterov": {"choice": ["true", False]}}))
    assert spec.space["train.global_batch_size"].values == [32, 64]
    assert spec.space["optim.nesterov"].values == [True, False]


def test_a_trial_run_is_named_by_its_searched_values():
    """Two trials' curves in MLflow's compare view carry their values, not Tune's ids."""
    assert trial_run_name({"optim.lr": 0.1, "optim.weight_decay": 5.0e-5}) == \
        "lr=0.1 weight_decay=5e-05"
    mixed = {"optim.lr": 0.043217891, "train.global_batch_size": 64, "optim.nesterov": False}
    assert trial_run_name(mixed) == "lr=0.0432 global_batch_size=64 nesterov=False"
    # Two keys ending alike keep their full names, so neither hides the other.
    assert trial_run_name({"optim.lr": 0.2, "data.lr": 1.5}) == "optim.lr=0.2 data.lr=1.5"
