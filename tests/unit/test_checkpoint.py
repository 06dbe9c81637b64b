"""Checkpoint files: round trip, manifest integrity, fingerprint, CLI."""
import random
import shutil
import time

import numpy as np
import pytest
import torch
from torch import nn

from rn50.checkpoint import main
from rn50.io.checkpoints import CheckpointError, load_checkpoint, save_checkpoint, verify
from rn50.io import storage
from rn50.core.training_state import (TrainingState, capture_rng_state, fingerprint_weights,
                                      restore_rng_state)
from rn50.config import ModelConfig
from rn50.core.model import build_model
from rn50.records import CheckpointExtras


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(), 10)


def _state(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
            "rng": capture_rng_state(), "config": {"optim": {"lr": 0.1}}}


def test_round_trip_preserves_every_tensor(tmp_path, model):
    state = _state(model)
    save_checkpoint(tmp_path / "c", state, summary={"epoch": 3})
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded["epoch"] == 3
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor), name
    assert fingerprint_weights(loaded["model"]) == fingerprint_weights(state["model"])


def test_fingerprint_tells_different_weights_apart(model):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = fingerprint_weights(weights)
    weights["fc.bias"][0] += 1e-7
    assert fingerprint_weights(weights) != before


def test_missing_manifest_is_refused(tmp_path, model):
    save_checkpoint(tmp_path / "c", {"model": {"w": torch.ones(2)}}, {})
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not finished"):
        load_checkpoint(tmp_path / "c")


def test_truncated_state_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c", {"model": {"w": torch.ones(1000)}}, {})
    state_file = tmp_path / "c" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "c")


def test_altered_state_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c", {"model": {"w": torch.ones(1000)}}, {})
    state_file = tmp_path / "c" / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[-50] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "c")


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item()


def _seeded_rng_state(seed: int) -> dict:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return capture_rng_state()


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_gets_back_its_own_rng_states(rank):
    per_rank = [_seeded_rng_state(10), _seeded_rng_state(11)]
    expected = []
    for state in per_rank:
        restore_rng_state(state)
        expected.append(_draws())
    assert expected[0] != expected[1]  # the control: two ranks' streams differ
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    training = TrainingState(model, optimizer, scheduler)
    state = training.state_dict(0, 3, {}, rng_per_rank=per_rank)
    training.restore(state, steps_per_epoch=8, rank=rank)
    assert _draws() == expected[rank]


def test_a_checkpoint_with_one_rng_dict_still_resumes():
    """Checkpoints written before per-rank RNG states held a single dict."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    training = TrainingState(model, optimizer, scheduler)
    state = training.state_dict(1, 8, {})
    state["rng"] = _seeded_rng_state(5)
    restore_rng_state(state["rng"])
    expected = _draws()
    assert training.restore(state, 8, rank=1) == (2, 0)
    assert _draws() == expected


def test_cli_fingerprint_and_verify(tmp_path, capsys):
    save_checkpoint(tmp_path / "c", {"model": {"w": torch.arange(4.0)}}, {"epoch": 0})
    assert main(["fingerprint", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.strip() == fingerprint_weights({"w": torch.arange(4.0)})
    assert main(["verify", str(tmp_path / "nowhere")]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_ls_lists_and_verifies_each_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint_2026-01-01_00-00-00.000001", {"model": {"w": torch.ones(3)}},
                    {"epoch": 0, "val_top1": 50.0})
    save_checkpoint(run / "checkpoint_2026-01-01_00-00-01.000001", {"model": {"w": torch.ones(3)}},
                    {"epoch": 1, "steps_done": 4})
    broken = run / "checkpoint_2026-01-01_00-00-02.000001" / "state.pt"
    save_checkpoint(broken.parent, {"model": {"w": torch.ones(300)}}, {"epoch": 1})
    broken.write_bytes(broken.read_bytes()[:10])
    assert main(["ls", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "epoch=0 steps=end" in lines[0] and "val_top1=50.00 verified=yes" in lines[0]
    assert "epoch=1 steps=4" in lines[1] and "verified=yes" in lines[1]
    assert "verified=NO" in lines[2]


def test_uploaded_copy_is_checked_against_its_manifest(tmp_path):
    """The post-upload check passes a complete copy and names a torn or unfinished one."""
    import pyarrow.fs as pafs
    local = pafs.LocalFileSystem()
    save_checkpoint(tmp_path / "c", {"model": {"w": torch.ones(1000)}}, {})
    verify((local, str(tmp_path / "c")), hashes=False)
    state_file = tmp_path / "c" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="state.pt is 100 bytes"):
        verify((local, str(tmp_path / "c")), hashes=False)
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not finished"):
        verify((local, str(tmp_path / "c")), hashes=False)


def test_snapshot_is_taken_on_rank_0_only():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    training = TrainingState(model, optimizer, scheduler)
    assert training.snapshot(1, 0, 3, {}) is None
    torch.manual_seed(4)
    expected = capture_rng_state()
    state = training.snapshot(0, 0, 3, {"a": 1}, extra=CheckpointExtras(class_names=["x"]))
    assert state["steps_done"] == 3 and state["class_names"] == ["x"] and len(state["rng"]) == 1
    assert torch.equal(state["rng"][0]["torch"], expected["torch"])


def _run_with_three_checkpoints(run):
    """A run folder with checkpoints at steps 1, 2 and 3 (names sort by time, as Ray's do)."""
    paths = []
    for step in (1, 2, 3):
        path = run / f"checkpoint_2026-01-01_00-00-0{step}.000001"
        save_checkpoint(path, {"model": {"w": torch.full((100,), float(step))}, "step": step},
                        {"epoch": 0, "steps_done": step})
        paths.append(path)
    return paths


def test_resume_picks_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    from rn50.io.checkpoints import load_newest_good
    first, second, third = _run_with_three_checkpoints(tmp_path / "run")
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")  # not a checkpoint
    chosen, state = load_newest_good(str(tmp_path / "run"))
    assert chosen == str(third) and state["step"] == 3
    (third / "state.pt").write_bytes((third / "state.pt").read_bytes()[:50])  # torn
    chosen, state = load_newest_good(str(tmp_path / "run"))
    assert chosen == str(second) and state["step"] == 2
    assert f"skipping checkpoint {third}" in caplog.text
    assert load_newest_good(str(tmp_path / "empty")) == (None, None)
    for path in (first, second):
        (path / "manifest.json").unlink()
    # All torn mid-upload and none ever registered with Ray: start over, with a warning.
    assert load_newest_good(str(tmp_path / "run")) == (None, None)
    assert "starting from the beginning" in caplog.text
    # But a checkpoint Ray registered (it verified when uploaded) that no longer verifies is lost
    # work: an error, not a silent restart.
    with pytest.raises(CheckpointError, match="not even .*had verified when it was uploaded"):
        load_newest_good(str(tmp_path / "run"), registered=str(second))


def _flaky_filesystem(failures: int):
    """A real pyarrow filesystem over the local disk whose first `failures` opens for reading
    raise OSError, as a storage blip does."""
    import fsspec
    import pyarrow.fs as pafs

    class FlakyHandler(pafs.FSSpecHandler):
        def __init__(self):
            super().__init__(fsspec.filesystem("file"))
            self.failures, self.opens = failures, 0

        def _maybe_fail(self):
            self.opens += 1
            if self.failures > 0:
                self.failures -= 1
                raise OSError("connection reset by peer (injected)")

        def open_input_stream(self, path):
            self._maybe_fail()
            return super().open_input_stream(path)

        def open_input_file(self, path):
            self._maybe_fail()
            return super().open_input_file(path)

    handler = FlakyHandler()
    return pafs.PyFileSystem(handler), handler


def test_a_passing_read_error_is_retried_not_taken_for_a_bad_checkpoint(tmp_path, monkeypatch):
    """A read error on the newest checkpoint must not fall back to an older one (lost work)."""
    from rn50.io import checkpoints as ckpt
    _, _, third = _run_with_three_checkpoints(tmp_path / "run")
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the back-off, not the behaviour
    filesystem, handler = _flaky_filesystem(failures=2)
    chosen, state = ckpt.load_newest_good((filesystem, str(tmp_path / "run")))
    assert chosen == str(third) and state["step"] == 3 and handler.opens > 2
    handler.failures = 10_000  # a read error that persists is raised, not skipped over
    with pytest.raises(OSError, match="injected"):
        ckpt.load_newest_good((filesystem, str(tmp_path / "run")))


def test_upload_is_retried_until_the_copy_verifies(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from rn50.io import checkpoints as ckpt
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    source = save_checkpoint(tmp_path / "src", {"model": {"w": torch.ones(1000)}}, {})
    dest, attempts = tmp_path / "dest", []

    def upload():
        attempts.append(1)
        import shutil
        shutil.copytree(source, dest, dirs_exist_ok=True)
        if len(attempts) == 1:  # the first copy is torn by an outage
            (dest / "state.pt").write_bytes((source / "state.pt").read_bytes()[:10])
        if len(attempts) == 2:
            raise OSError("S3 unreachable (injected)")
        return pafs.LocalFileSystem(), str(dest)
    assert ckpt.upload_with_retries(upload, "c") == (pafs.LocalFileSystem(), str(dest))
    assert len(attempts) == 3
    verify(dest)
    with pytest.raises(OSError):
        ckpt.upload_with_retries(lambda: (_ for _ in ()).throw(OSError("down")), "c", attempts=2)


def test_the_best_checkpoint_is_kept_apart_found_first_and_marked(tmp_path, capsys):
    from rn50.io.checkpoints import best_checkpoint, download, find_checkpoint, keep_as_best
    run = tmp_path / "run"
    first, second, third = _run_with_three_checkpoints(run)
    assert best_checkpoint(str(run)) is None and find_checkpoint(str(run)) == str(third)
    keep_as_best(str(run), str(first))
    keep_as_best(str(run), str(second))  # a better one replaces it
    kept = run / "best" / second.name
    assert best_checkpoint(str(run)) == str(kept) and [p.name for p in (run / "best").iterdir()] \
        == [second.name]
    shutil.rmtree(second)  # Ray pruning the original (keep_last) does not touch the best copy
    assert find_checkpoint(str(run)) == str(kept) and download(str(run)) == kept
    assert find_checkpoint(str(run), latest=True) == str(third)
    assert load_checkpoint(kept)["step"] == 2
    assert main(["ls", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"best/{second.name}") and lines[-1].endswith("<- best")
    assert not any(line.endswith("<- best") for line in lines[:-1])


def test_a_storage_call_that_succeeds_only_slowly_says_so(monkeypatch, caplog):
    # The S3 client handed to Ray rides out an outage inside one attempt: red if that wait is
    # silent, or if a quick call is reported as slow.
    from rn50.io import storage
    monkeypatch.setattr(storage, "SLOW_ATTEMPT_S", 0.2)
    with caplog.at_level("WARNING", logger="rn50.io.storage"):
        assert storage.with_retries("checkpoint upload quick", lambda: 1, 3) == 1
        assert storage.with_retries("checkpoint upload slow", lambda: time.sleep(0.3) or 2, 3) == 2
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("checkpoint upload slow took 0 s (attempt 1/3)")
