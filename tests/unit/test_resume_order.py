"""A resume at another micro-batch count (another `train.micro_batch_size`, or top of
`scaling.num_workers`) sees every sample of the interrupted epoch exactly once, or is refused with
a message naming the setting that changed (rn50.core.resume_order, rn50.data.samplers)."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rn50.config import load_config
from rn50.core.resume_order import check_same_steps, resumed_order
from rn50.data.datasets import ParquetDataset
from rn50.data.loaders import build_loader

SEED, EPOCH, GLOBAL_BATCH = 3, 0, 16


def _parquet(tmp_path, rows: int = 64, row_group: int = 12) -> ParquetDataset:
    """`rows` rows in row groups of `row_group` (the last one shorter); the samplers read only
    the row-group layout, never the images."""
    table = pa.table({"image": pa.array([{"bytes": b"", "path": f"{i}.JPEG"} for i in range(rows)]),
                      "label": pa.array([i % 2 for i in range(rows)], type=pa.int64())})
    (tmp_path / "train").mkdir()
    pq.write_table(table, tmp_path / "train" / "train-00000-of-00001.parquet",
                   row_group_size=row_group)
    return ParquetDataset(tmp_path, "train", num_classes=2)


def _steps(dataset, per_step: int, *, skip: int = 0, order: int = 0) -> list[list[int]]:
    """Each step's samples, summed over a world of `per_step` ranks (one micro-batch each)."""
    ranks = [list(build_loader(dataset, GLOBAL_BATCH // per_step, rank=rank, world_size=per_step,
                               seed=SEED, epoch=EPOCH, train=True, skip_steps=skip,
                               micro_batches_per_step=per_step,
                               order_micro_batches=order).batch_sampler)
             for rank in range(per_step)]
    return [sum(step, []) for step in zip(*ranks)]


def test_a_parquet_epoch_resumed_at_another_micro_batch_count_sees_each_sample_once(tmp_path):
    """64 rows in row groups of 12, a global batch of 16: one step at 2 micro-batches of 8, then
    resumed at 4 of 4. The rest of the epoch comes in the order of the 2 streams it began with,
    each step split in 4: the same samples in every step as the run left alone. Negative control
    (in the test): dealt afresh for 4 streams, as before, 4 samples repeat and 4 of the epoch's 48
    are never seen (measured, seed 3)."""
    dataset = _parquet(tmp_path)
    whole = _steps(dataset, 2)
    assert len(whole) == 3 and all(len(step) == GLOBAL_BATCH for step in whole)
    before = _steps(dataset, 2)[:1]
    after = _steps(dataset, 4, skip=1, order=2)
    assert [sorted(step) for step in before + after] == [sorted(step) for step in whole]
    seen = sum(before + after, [])
    assert sorted(seen) == sorted(sum(whole, [])) and len(set(seen)) == len(seen) == 48

    dealt_afresh = sum(before + _steps(dataset, 4, skip=1), [])
    assert len(dealt_afresh) - len(set(dealt_afresh)) == 4
    assert len(set(sum(whole, [])) - set(dealt_afresh)) == 4


def _config(workers: str, micro: int = 0):
    return load_config("demo", [f"scaling.num_workers={workers}",
                                f"train.global_batch_size={GLOBAL_BATCH}",
                                f"train.micro_batch_size={micro}", f"train.seed={SEED}"])


def _checkpoint(config) -> dict:
    return {"config": config.to_dict(), "epoch": 0, "steps_done": 1}


def _steps_per_epoch(dataset, config) -> int:
    return build_loader(dataset, config.micro_batch_size, rank=0, world_size=1, seed=SEED,
                        epoch=0, train=True,
                        micro_batches_per_step=config.micro_batches_per_step).batch_sampler.steps


def test_the_worker_finishes_the_epoch_in_the_checkpoints_order(tmp_path):
    """What the worker passes its loaders: the checkpoint's micro-batch count where it differs
    (the seed is one where the parquet epoch keeps its 3 steps at both counts)."""
    dataset, then = _parquet(tmp_path), _config("2")
    for now in (_config("4"), _config("2", micro=4), _config("[1,4]")):
        assert _steps_per_epoch(dataset, now) == _steps_per_epoch(dataset, then) == 3
        assert resumed_order(_checkpoint(then), now, dataset, _steps_per_epoch(dataset, now)) == 2
    assert resumed_order(_checkpoint(then), _config("[1,2]"), dataset, 3) == 0  # the same 2


def test_a_resume_that_would_change_the_steps_of_an_epoch_is_refused_naming_the_setting(tmp_path):
    """60 rows in row groups of 8 (the last of 4): 4 streams of 2 row groups hold 12 rows each
    (3 steps of 4), 8 streams of one group 4 rows each (2 steps of 2). Refused, naming what
    changed and what to do."""
    dataset = _parquet(tmp_path, rows=60, row_group=8)
    then, now = _config("4"), _config("4", micro=2)
    steps_now = _steps_per_epoch(dataset, now)
    assert steps_now != _steps_per_epoch(dataset, then)
    with pytest.raises(ValueError) as refused:
        resumed_order(_checkpoint(then), now, dataset, steps_now)
    message = str(refused.value)
    assert "train.micro_batch_size from 0 to 2" in message and "scaling.num_workers" not in message
    assert "set them back, or start a new run" in message
    with pytest.raises(ValueError, match="the top of scaling.num_workers from 4 to 8"):
        resumed_order(_checkpoint(then), _config("8"), dataset,
                      _steps_per_epoch(dataset, _config("8")))


def test_a_resume_with_another_global_batch_is_refused():
    with pytest.raises(ValueError, match="set train.global_batch_size=16"):
        check_same_steps(_checkpoint(_config("2")),
                         load_config("demo", ["train.global_batch_size=32"]))


def test_the_run_long_loader_deals_the_resumed_epoch_alike(tmp_path):
    """The worker's loader (EpochLoader, workers kept for the run) deals the resumed epoch as
    `build_loader` does, and the next epoch in this run's own order."""
    from rn50.data.epoch_loader import EpochLoader
    dataset = _parquet(tmp_path)
    for rank in range(4):
        loader = EpochLoader(dataset, 4, rank=rank, world_size=4, seed=SEED, train=True,
                             micro_batches_per_step=4)
        for epoch, skip, order in ((EPOCH, 1, 2), (EPOCH + 1, 0, 0)):
            dealt = [[key.index for key in batch]
                     for batch in loader.epoch(epoch, skip, 0, order).batch_sampler]
            assert dealt == list(build_loader(
                dataset, 4, rank=rank, world_size=4, seed=SEED, epoch=epoch, train=True,
                skip_steps=skip, micro_batches_per_step=4, order_micro_batches=order).batch_sampler)
