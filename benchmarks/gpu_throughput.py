"""ResNet-50 training throughput on one GPU, in figures that can be trusted, in one short run.

    python -m benchmarks.gpu_throughput                # on a GPU: ~7 min on an H100/H200
    python -m benchmarks.gpu_throughput --smoke        # every section on CPU, tiny (< 3 min)
    python -m benchmarks.gpu_throughput --images DIR   # real photos for the real-data section

Sections, in this order, each with its own time limit, the whole run within `--budget-s`
(default 510 s, 8.5 min): `env`; `sync_audit` (host syncs per step, CUDA's sync reports:
benchmarks/host_syncs.py); `synthetic` (bf16 + channels_last at 224 and 176 px, batch 128 and
256; fp32 with TF32 tensor cores at 224); `real_data` (gpu_data.py: the loader alone and feeding
training, from files and from shards, decode on device too, at 11 workers); `eval`;
`checkpoint` (save seconds, stall on the training thread); `compile` (fixed shapes at 224, its
compile time apart); `features` (EMA, MixUp/CutMix, BlurPool, single-rank DDP over NCCL, each
against the plain step). Timing: CUDA events after a synchronize, warm-up steps excluded, per-step
host time beside device time (gpu_timing.py); MFU = images/s x training FLOPs per image / the
dense bf16 peak (`--peak-tflops`, else the table below).

Figures go to `gpu_throughput.json` (`-smoke` in smoke mode) in `--out-dir` (default `$OUT` when
set, else benchmarks/results/), rewritten after every section: a run cut short keeps what it
measured. Needs only torch, torchvision (and its Pillow), numpy, pyarrow and PyYAML; simplejpeg
and the region-decode extension are used when present (the JSON says which decoder ran).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.gpu_sections import (Bench, section_checkpoint, section_compile,
                                     section_eval, section_features, section_sync_audit,
                                     section_synthetic)
from benchmarks.gpu_timing import SectionTimeout, time_limit

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.5,
                    "H100 NVL": 835.5, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0,
                    "A10": 125.0}
# Section -> seconds it may take on a GPU. Smoke mode keeps them: its tiny CPU sections take a few
# seconds each alone, but the suite runs it on a CPU its integration tests keep busy.
LIMITS_S = {"env": 30, "sync_audit": 45, "synthetic": 110, "real_data": 170, "eval": 25,
            "checkpoint": 30, "compile": 150, "features": 80}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak: `override`, else the table entry its name contains."""
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def section_env(bench: Bench, report) -> dict:
    """What ran: device, versions, CPUs, the JPEG decoder in use, FLOPs per image."""
    from rn50.data.turbo_decode import decoder_name
    cuda = bench.device.type == "cuda"
    report({}, details={"device": torch.cuda.get_device_name(bench.device) if cuda else "cpu",
                        "torch": torch.__version__, "cuda": torch.version.cuda,
                        "cudnn": torch.backends.cudnn.version() if cuda else None,
                        "python": platform.python_version(), "cpus": os.cpu_count(),
                        "jpeg_decoder": decoder_name()})
    return {"peak_bf16_tflops": bench.peak_tflops or 0.0, "cpus": os.cpu_count(),
            **{f"train_gflops_per_image_{px}": bench.train_flops(px) / 1e9 for px in bench.px}}


class Report:
    """The JSON of the run so far, rewritten whenever a section adds to it."""

    def __init__(self, path: Path, argv: list[str]):
        self.path, self.argv, self.figures, self.sections = path, argv, {}, {}

    def section(self, name: str):
        """A `report(figures, details=None)` callable for section `name`."""
        def report(figures: dict, details: dict | None = None) -> None:
            self.figures.update({f"{name}.{k}": v for k, v in figures.items()})
            if details is not None:
                self.sections.setdefault(name, {})["details"] = details
            self.write()
        return report

    def write(self) -> None:
        """Rewrite the file with every figure and section status so far."""
        from benchmarks.results import write_result
        write_result("gpu_throughput", self.figures, argv=self.argv, path=self.path,
                     context={"sections": self.sections})


def default_plan() -> dict:
    """Section name -> function(bench, report) -> figures, in running order."""
    synthetic: dict = {}

    def synthetic_kept(bench: Bench, report) -> dict:
        synthetic.update(section_synthetic(bench, report))
        return synthetic
    return {"env": section_env, "sync_audit": section_sync_audit, "synthetic": synthetic_kept,
            "real_data": lambda b, r: _real_data(b, r, synthetic), "eval": section_eval,
            "checkpoint": section_checkpoint, "compile": section_compile,
            "features": section_features}


def _timed_out(err: BaseException) -> bool:
    """Whether `err` is (or wraps, as dynamo wraps what a traced frame raises) SectionTimeout."""
    while err is not None:
        if isinstance(err, SectionTimeout):
            return True
        err = err.__cause__ or err.__context__
    return False


def run_sections(bench: Bench, report: Report, budget_s: float, only: list[str],
                 plan: dict | None = None, limits_s: dict | None = None) -> None:
    """Each section in order under its time limit and what is left of the budget."""
    deadline = time.monotonic() + budget_s
    limits_s = limits_s or LIMITS_S
    for name, run in (plan or default_plan()).items():
        if only and name not in only:
            continue
        left_s = deadline - time.monotonic()
        limit_s = min(limits_s[name], left_s)
        status = {"limit_s": round(limit_s, 1)}
        report.sections[name] = status
        if limit_s < min(5.0, limits_s[name]):
            status["status"] = "skipped: the run's budget is spent"
            report.write()
            continue
        start_s = time.monotonic()
        try:
            with time_limit(limit_s):
                figures = run(bench, report.section(name))
            status["status"] = "done"
        except Exception as err:  # noqa: BLE001 - one section's failure must not lose the rest
            figures = {}
            if _timed_out(err):
                status["status"] = f"cut short: past its {limit_s:.0f} s limit"
            else:
                status["status"] = f"failed: {type(err).__name__}: {err}"
                status["traceback"] = traceback.format_exc()[-3000:]
        status["seconds"] = round(time.monotonic() - start_s, 1)
        report.section(name)(figures)
        print(f"[gpu_throughput] {name}: {status['status']} ({status['seconds']} s)", flush=True)


def _real_data(bench: Bench, report, synthetic: dict) -> dict:
    from benchmarks.gpu_data import section_real_data
    key = f"bf16_cl_{bench.px[0]}_b{bench.batches[-1]}_images_per_s"
    return section_real_data(bench, report, synthetic.get(key))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every section on CPU, tiny sizes")
    parser.add_argument("--out-dir", help="where the JSON goes (default $OUT, else "
                                          "benchmarks/results/)")
    parser.add_argument("--images", type=Path, help="a folder of real JPEGs for real_data")
    parser.add_argument("--workers", type=int, default=11, help="loader processes (p4d: 11)")
    parser.add_argument("--budget-s", type=float, default=510.0)
    parser.add_argument("--sections", nargs="*", default=[], choices=list(LIMITS_S),
                        help="only these sections")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    return parser.parse_args(argv)


def make_bench(args: argparse.Namespace, work: Path) -> Bench:
    """The sizes and timed windows: GPU-sized, or tiny on CPU for --smoke."""
    if args.smoke:
        torch.set_num_threads(1)
        return Bench(torch.device("cpu"), True, px=[32], batches=[2, 4], warmup=1, min_steps=2,
                     min_s=0.0, workers=1, work=work, images_dir=args.images,
                     peak_tflops=args.peak_tflops, compile_backend="eager")
    if not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --smoke for the CPU rehearsal")
    device = torch.device("cuda", 0)
    return Bench(device, False, px=[224, 176], batches=[128, 256], warmup=15, min_steps=30,
                 min_s=6.0, workers=args.workers, work=work, images_dir=args.images,
                 peak_tflops=peak_tflops(device, args.peak_tflops))


def main(argv: list[str] | None = None) -> Path:
    """Run every section; return the JSON's path."""
    args = parse_args(argv)
    out_dir = Path(args.out_dir or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    path = out_dir / ("gpu_throughput-smoke.json" if args.smoke else "gpu_throughput.json")
    work = Path(tempfile.mkdtemp(prefix="rn50-gpu-bench-"))
    report = Report(path, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    try:
        run_sections(make_bench(args, work), report, args.budget_s, args.sections)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, value in report.figures.items():
        print(f"{key:56s} {value:.4g}" if isinstance(value, float) else f"{key:56s} {value}")
    return path


if __name__ == "__main__":
    main()
