"""The searchers a sweep file names are built with its space and propose values inside it."""
from pathlib import Path

from rn50.distributed.contexts import SweepContext
from rn50.distributed.tune import param_space, tune_config
from rn50.search_space import load_sweep

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"


def _sweep(epochs: int) -> SweepContext:
    return SweepContext(name="s", storage_uri="/tmp/rn50-unused", overrides=(), tracking_uri="",
                        parent_run_id="", epochs=epochs)


def test_optuna_searcher_proposes_inside_the_space():
    spec = load_sweep(SPACES / "imagenette_lr_wd.yaml")
    config = tune_config(spec, _sweep(20), concurrency=2)
    searcher = config.search_alg
    assert type(searcher).__name__ == "OptunaSearch" and config.max_concurrent_trials == 2
    assert searcher.set_search_properties(spec.metric, spec.mode, param_space(spec))
    for index in range(5):
        proposal = searcher.suggest(f"trial_{index}")
        assert 0.02 <= proposal["optim.lr"] <= 0.8
        assert 1e-5 <= proposal["optim.weight_decay"] <= 1e-3
    assert config.scheduler._max_t == 20


def test_random_searcher_limits_concurrency_itself():
    spec = load_sweep(SPACES / "smoke.yaml")
    config = tune_config(spec, _sweep(3), concurrency=2)
    assert config.max_concurrent_trials is None
    assert config.search_alg.max_concurrent == 2
