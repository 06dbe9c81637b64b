"""A run's spent cost survives its head: checkpoints record it (in the manifest, read without the
state), and a resumed run's budget counts on from the larger of MLflow's figure and theirs."""
import pytest
import torch

from rn50.config import load_config
from rn50.io import checkpoints as ckpt
from rn50.distributed import cost
from rn50.io import pricing, tracking
from rn50.io.pricing import CostBasis, Prices


def _checkpoint(run, second: int, spent: tuple[float, int] | None):
    state = {"model": {"w": torch.zeros(4)}, "epoch": second}
    if spent is not None:
        state.update(zip(ckpt.SPENT_KEYS, spent))
    return ckpt.save_checkpoint(run / f"checkpoint_2026-01-01_00-00-0{second}.000001", state,
                                {"epoch": second})


def test_the_newest_checkpoint_that_verifies_says_what_the_run_had_cost(tmp_path, caplog):
    run = tmp_path / "run"
    assert ckpt.spent_of_run(str(run)) is None  # no run yet
    _checkpoint(run, 1, None)  # from before checkpoints recorded it
    assert ckpt.spent_of_run(str(run)) is None
    _checkpoint(run, 2, (12.5, 400))
    newest = _checkpoint(run, 3, (20.25, 650))
    manifest = ckpt.verify(newest)
    assert manifest["summary"] == {"epoch": 3, "spent_usd": 20.25, "spent_run_s": 650}
    assert ckpt.spent_of_run(str(run)) == (20.25, 650)
    # A newest copy cut short (its state has the wrong size) is not believed: the one before is.
    # Red if the figure were read from a checkpoint whose files do not match its manifest.
    (newest / ckpt.STATE_FILE).write_bytes(b"torn")
    assert ckpt.spent_of_run(str(run)) == (12.5, 400)
    assert f"not reading the cost recorded in {newest}" in caplog.text


def test_a_checkpoint_records_the_cost_so_far_where_there_is_a_price():
    free = CostBasis(Prices(), since_s=0.0, spent_before_usd=7.5, run_s_before=100)
    spent = cost.spent_now(free)  # a laptop: no price, so no node list is needed
    assert spent["spent_usd"] == 7.5 and spent["spent_run_s"] > 100
    assert cost.spent_now(None) == {}  # sweep trials: no basis


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A sqlite MLflow store holding run `r` of the demo recipe, $5 spent at run second 300."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri, config = f"sqlite:///{folder / 'mlflow.db'}", load_config("demo")
    run_dir = folder / "runs" / "r"
    tracker, _ = tracking.start_or_resume_run(config, uri, str(run_dir), "r", tags={})
    tracker.log_metrics({"cost/usd": 5.0}, step=300)
    return uri, run_dir


def test_a_resumed_budget_counts_from_the_checkpoint_when_mlflow_lost_records(tracked, capsys):
    # MLflow restored from an older backup says $5; the newest checkpoint says $20.25. Red if
    # spent_before reads MLflow only (the budget would allow $15 more than it should).
    uri, run_dir = tracked
    config = load_config("demo", ["train.budget_usd=100"])
    assert cost.spent_before(config, uri, str(run_dir), "r") == (5.0, 300)  # no checkpoint yet
    _checkpoint(run_dir, 1, (20.25, 650))
    assert cost.spent_before(config, uri, str(run_dir), "r") == (20.25, 650)
    assert "had cost $20.25 by its newest checkpoint, more than MLflow's records say ($5.00" \
        in capsys.readouterr().out
    with pytest.raises(pricing.BudgetError,
                       match=r"already cost \$20\.25 \(recorded in its newest checkpoint\)"):
        cost.spent_before(load_config("demo", ["train.budget_usd=20"]), uri, str(run_dir), "r")


def test_mlflows_figure_counts_when_it_is_the_larger(tracked):
    # The usual case: MLflow's last cost/usd is logged after the last checkpoint was taken.
    uri, run_dir = tracked
    other = run_dir.parent / "other"
    tracker, _ = tracking.start_or_resume_run(load_config("demo"), uri, str(other), "other", {})
    tracker.log_metrics({"cost/usd": 30.0}, step=900)
    _checkpoint(other, 1, (29.0, 880))
    assert cost.spent_before(load_config("demo"), uri, str(other), "other") == (30.0, 900)
    with pytest.raises(pricing.BudgetError, match=r"\(MLflow's cost/usd\)"):
        cost.spent_before(load_config("demo", ["train.budget_usd=30"]), uri, str(other), "other")
