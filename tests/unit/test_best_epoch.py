"""`_Worker.improves_best`: which epochs the run keeps as its best (the checkpoint evaluation, the
demo and exports take from a run directory). A run whose best epoch is neither its first nor its
last, end to end: tests/integration/test_train_job.py."""
from rn50.config import load_config
from rn50.distributed.worker import _Worker
from rn50.records import EpochReport


def _worker(keep_best_by: str = "val_top1", best_value: float | None = None) -> _Worker:
    """A worker with only what `improves_best` reads (the rest is built by Ray Train)."""
    worker = object.__new__(_Worker)
    worker.config = load_config("demo", [f"checkpoint.keep_best_by={keep_best_by}",
                                         "train.ema_decay=0.99"])
    worker.best_value = best_value
    return worker


def _report(**metrics) -> EpochReport:
    """An epoch's report with the given validation figures (the rest does not matter here)."""
    return EpochReport(epoch=0, train_loss=1.0, val_top5=0.0, val_loss=1.0, lr=0.1,
                       images_per_s=1.0, skipped_images=0, train_crop_px=32, **metrics)


def test_only_an_epoch_that_beats_every_earlier_one_is_kept():
    worker = _worker()
    top1 = [9.4, 25.8, 13.3, 25.8, 26.0]  # a peak in the middle, a tie, a new best at the end
    assert [worker.improves_best(_report(val_top1=value)) for value in top1] == [
        True, True, False, False, True]
    assert worker.best_value == 26.0


def test_a_resumed_run_compares_with_the_best_before_its_restart():
    """`best_value` comes back from the checkpoint: an epoch after a restart that is worse than
    the best before it must not replace it."""
    worker = _worker(best_value=25.8)
    assert not worker.improves_best(_report(val_top1=13.3)) and worker.best_value == 25.8


def test_other_metrics_and_none():
    ema = _worker("val_top1_ema")
    assert ema.improves_best(_report(val_top1=90.0, val_top1_ema=50.0))
    assert not ema.improves_best(_report(val_top1=99.0, val_top1_ema=40.0))
    assert not ema.improves_best(_report(val_top1=99.0))  # no EMA figure: nothing to keep
    assert not _worker("none").improves_best(_report(val_top1=99.0))
