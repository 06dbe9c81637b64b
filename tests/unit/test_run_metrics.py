"""The ETA on each epoch line: from the mean wall time of the epochs run so far."""
from rn50.distributed import run_metrics


def test_the_eta_is_the_mean_epoch_time_times_the_epochs_left(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(run_metrics.time, "monotonic", lambda: now[0])
    clock = run_metrics.EpochClock(epochs_left=5)
    now[0] += 40
    assert clock.epoch_done() == " | 40 s/epoch, eta 2m40s"
    now[0] += 80  # a slower second epoch: the mean is 60 s, 3 epochs left
    assert clock.epoch_done() == " | 60 s/epoch, eta 3m00s"


def test_long_etas_read_in_hours():
    assert run_metrics._duration(90 * 3600 + 59) == "90h00m"
    assert run_metrics._duration(59) == "0m59s"
