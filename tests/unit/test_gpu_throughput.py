"""benchmarks/gpu_throughput.py --smoke: every section runs on CPU, each writes its figures as it
ends, and the script needs nothing beyond torch, torchvision (Pillow), numpy, pyarrow and PyYAML,
as on a lent GPU machine running it from a bare checkout (the other dependencies are blocked)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The package's other dependencies (pyproject.toml) and the optional decoders: none is needed.
BLOCKED = ["ray", "mlflow", "boto3", "botocore", "simplejpeg", "rn50_jpeg_region", "turbojpeg",
           "matplotlib", "sklearn", "gradio", "pytorch_grad_cam", "onnx", "onnxscript", "optuna",
           "psutil", "pynvml"]
RUN_BLOCKED = ("import runpy, sys\n"
               f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
               "sys.argv = ['benchmarks/gpu_throughput.py', *sys.argv[1:]]\n"
               "runpy.run_path('benchmarks/gpu_throughput.py', run_name='__main__')\n")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke")
    done = subprocess.run([sys.executable, "-c", RUN_BLOCKED, "--smoke", "--out-dir", str(out),
                           "--peak-tflops", "0.001"], capture_output=True, text=True,
                          timeout=300, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu_throughput-smoke.json").read_text()), done.stdout


def test_every_section_ran_and_wrote_its_figures(smoke):
    record, stdout = smoke
    from benchmarks.gpu_throughput import LIMITS_S
    statuses = {name: section["status"] for name, section in record["sections"].items()}
    assert statuses == {name: "done" for name in LIMITS_S}, record["sections"]
    assert record["sections"]["env"]["details"]["jpeg_decoder"].startswith("pillow")
    figures = record["figures"]
    for key in ("synthetic.bf16_cl_32_b4_images_per_s", "synthetic.fp32_tf32_32_b4_images_per_s",
                "features.ema_images_per_s", "features.mixup_cutmix_images_per_s",
                "features.blurpool_images_per_s", "features.ddp_1rank_images_per_s",
                "compile.bf16_cl_compile_32_b4_images_per_s", "eval.eval_32_b4_images_per_s",
                "real_data.files_train_images_per_s", "real_data.shards_train_images_per_s",
                "real_data.shards_decode_on_device_train_images_per_s",
                "real_data.shards_loader_images_per_s_per_worker"):
        assert figures[key] > 0, key
    assert 0 <= figures["real_data.files_data_wait_fraction"] <= 1
    assert figures["sync_audit.syncs_outside_logging_steps"] == 0
    assert figures["sync_audit.syncs_at_logging_steps"] >= 1
    assert figures["checkpoint.ckpt_size_mb"] > 280  # ResNet-50 weights + momentum + EMA
    flops = figures["env.train_gflops_per_image_32"]
    per_s = figures["synthetic.bf16_cl_32_b4_images_per_s"]
    # peak 0.001 TFLOP/s = 1 GFLOP/s: MFU is images/s x GFLOPs per image
    assert figures["synthetic.bf16_cl_32_b4_mfu"] == pytest.approx(per_s * flops, rel=1e-6)
    assert "[gpu_throughput] compile: done" in stdout


def test_resnet50_training_flops_per_image():
    from benchmarks.gpu_sections import Bench
    import torch
    bench = Bench(torch.device("cpu"), True, [224], [2], 1, 1, 0.0, 1, Path("."))
    # ResNet-50 at 224 px: 4.1 G multiply-adds forward = 8.2 GFLOPs; training ~3x that.
    assert 23e9 < bench.train_flops(224) < 26e9


def test_a_run_cut_short_keeps_what_it_measured(tmp_path):
    """The runner: each section's figures are on disk before the next starts; a section past its
    limit is cut (SIGALRM), a failing one is recorded, neither stops the run; an exhausted budget
    skips what is left."""
    import time

    import torch

    from benchmarks.gpu_sections import Bench
    from benchmarks.gpu_throughput import Report, run_sections
    path = tmp_path / "out.json"

    def slow(bench, report):
        on_disk = json.loads(path.read_text())
        assert on_disk["figures"] == {"first.x": 1.0}  # written when `first` ended
        report({"partial": 2.0})
        time.sleep(30)

    def broken(bench, report):
        raise ValueError("a bug")

    plan = {"first": lambda b, r: {"x": 1.0}, "slow": slow, "broken": broken,
            "late": lambda b, r: {"y": 3.0}}
    limits = {"first": 10, "slow": 1, "broken": 10, "late": 10}
    bench = Bench(torch.device("cpu"), True, [32], [2], 1, 1, 0.0, 1, tmp_path)
    run_sections(bench, Report(path, ["gpu_throughput.py"]), 30, [], plan, limits)
    record = json.loads(path.read_text())
    statuses = {name: section["status"] for name, section in record["sections"].items()}
    assert statuses["first"] == "done" and statuses["late"] == "done"
    assert statuses["slow"].startswith("cut short") and record["sections"]["slow"]["seconds"] < 5
    assert statuses["broken"] == "failed: ValueError: a bug"
    assert record["figures"] == {"first.x": 1.0, "slow.partial": 2.0, "late.y": 3.0}
    run_sections(bench, Report(path, ["gpu_throughput.py"]), 0.5, [], plan, limits)
    assert all(s["status"].startswith("skipped")
               for s in json.loads(path.read_text())["sections"].values())
