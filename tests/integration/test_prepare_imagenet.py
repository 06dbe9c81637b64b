"""`ray_jobs/prepare_imagenet.py` end to end: ILSVRC tars on the S3 server -> shuffled parquet
shards on the S3 server, read back by the training reader; reruns skip finished shards."""
import json
import os
import subprocess
import sys

from rn50.data.datasets import ParquetDataset
from tests.ilsvrc_fixture import WNIDS, make_hf_parquet, make_ilsvrc, make_tars
from tests.integration.jobs import REPO


def _run(args, s3_env, returncode=0):
    env = {**os.environ, **s3_env.env(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "ray_jobs/prepare_imagenet.py", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == returncode, output[-4000:]
    if returncode:
        return None, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), output


def test_tars_on_s3_become_shuffled_verified_shards(tmp_path, s3_env):
    labels = make_ilsvrc(tmp_path / "folders")
    make_tars(tmp_path / "folders", tmp_path / "tars")
    client, bucket = s3_env.client(), s3_env.bucket
    for path in (tmp_path / "tars").iterdir():
        client.upload_file(str(path), bucket, f"ilsvrc/{path.name}")
    out = f"s3://{bucket}/imagenet-parquet"
    args = ["--source", f"s3://{bucket}/ilsvrc", "--out", out, "--max-px", "64",
            "--images-per-shard", "7"]
    result, output = _run(args, s3_env)
    assert result["images"] == {"train": 24, "val": 8} and result["classes"] == 4
    assert result["written"] == result["shards"] == 6 and "[prepare] 6/6 shards" in output
    assert "train: 24 images in 4 classes (listed in" in output
    client.head_object(Bucket=bucket, Key="imagenet-parquet/_plan.json")  # the listing, kept

    manifest = json.loads(client.get_object(Bucket=bucket, Key="imagenet-parquet/manifest.json")
                          ["Body"].read())
    assert manifest["classes"] == ["tench", "English springer", "chain saw", "parachute"]
    assert manifest["class_wnids"] == manifest["class_labels"] == WNIDS
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [7, 7, 7, 3]
    for split, size in (("train", 24), ("val", 8)):
        dataset = ParquetDataset(out, split)  # straight from S3, as training reads it
        assert dataset.classes == WNIDS and len(dataset) == size
        names = [n.decode() if isinstance(n, bytes) else n for n in _column(dataset, "path")]
        expected = [n for n in labels if (split == "val") == n.startswith("ILSVRC")]
        assert sorted(names) == sorted(expected)
        assert [WNIDS[label] for label in _column(dataset, "label")] == [labels[n] for n in names]
        assert names != sorted(names), "shards are not shuffled"

    # Resumable and idempotent: a rerun writes nothing; a lost shard is the only one rewritten.
    result, output = _run(args, s3_env)
    assert result["written"] == 0 and result["skipped"] == 6
    assert "train: 24 images in 4 classes (from _plan.json" in output  # not listed again
    assert "val: 8 images in 4 classes (from _plan.json" in output
    lost = manifest["splits"]["train"]["shards"][2]["name"]
    client.delete_object(Bucket=bucket, Key=f"imagenet-parquet/train/{lost}")
    result, _ = _run(args, s3_env)
    assert result["written"] == 1 and result["skipped"] == 5


def test_hf_parquet_on_s3_becomes_shrunk_shards(tmp_path, s3_env):
    labels = make_ilsvrc(tmp_path / "folders")
    make_hf_parquet(tmp_path / "folders", labels, tmp_path / "hf")
    client, bucket = s3_env.client(), s3_env.bucket
    for path in (tmp_path / "hf" / "data").iterdir():
        client.upload_file(str(path), bucket, f"imagenet-1k/data/{path.name}")
    out = f"s3://{bucket}/imagenet-1k-shrunk"
    result, _ = _run(["--source", f"s3://{bucket}/imagenet-1k", "--out", out, "--max-px", "48",
                      "--images-per-shard", "10"], s3_env)
    assert result["images"] == {"train": 24, "val": 8} and result["written"] == 4
    for split in ("train", "val"):
        dataset = ParquetDataset(out, split)
        names = _column(dataset, "path")
        assert dataset.classes == WNIDS
        assert [WNIDS[label] for label in _column(dataset, "label")] == [labels[n] for n in names]
        assert all(min(image.shape[1:]) <= 48 for image, _ in (dataset[i] for i in range(8)))


def _column(dataset, name):
    """A column over all shards in dataset order (paths come from the image struct)."""
    import pyarrow.parquet as pq
    values = []
    for path in dataset.files:
        table = pq.read_table(path, filesystem=dataset.fs)
        column = table.column("image").combine_chunks().field("path") if name == "path" \
            else table.column(name)
        values += column.to_pylist()
    return values


def test_a_source_that_cannot_be_read_says_what_to_do(tmp_path, s3_env):
    out = f"s3://{s3_env.bucket}/never-written"
    _, stderr = _run(["--source", "s3://no-such-bucket-rn50/ilsvrc", "--out", out], s3_env, 2)
    assert ("bucket 'no-such-bucket-rn50' of s3://no-such-bucket-rn50/ilsvrc does not exist"
            in stderr)
    assert "Traceback" not in stderr
    labels = make_ilsvrc(tmp_path / "folders")
    make_tars(tmp_path / "folders", tmp_path / "tars")
    data = (tmp_path / "tars" / "ILSVRC2012_img_train.tar").read_bytes()
    client = s3_env.client()
    client.put_object(Bucket=s3_env.bucket, Key="cut/ILSVRC2012_img_train.tar", Body=data[:-30000])
    _, stderr = _run(["--source", f"s3://{s3_env.bucket}/cut", "--out", out], s3_env, 2)
    assert "not a readable tar" in stderr and "re-upload" in stderr and len(labels) == 32
