"""What a training process runs on, said once: the GPU model and count, driver, CUDA and NCCL
versions as torch and the NVIDIA driver see them; and, for a node that should have a GPU torch
cannot use, what is wrong and what to fix. Plain PyTorch (and `nvidia-smi` when installed)."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceReport:
    """One process's device, as its MLflow tags and its console line give it."""
    device: str
    """`cuda:0`, `cpu`, ..."""
    gpu_model: str
    gpu_count: int
    """GPUs torch sees in this process (Ray gives each worker its own)."""
    driver: str
    """NVIDIA driver version ('' without a GPU)."""
    cuda: str
    """The CUDA version torch was built with ('' for a CPU build)."""
    nccl: str

    def line(self) -> str:
        """`cuda:0: NVIDIA A100-SXM4-40GB x1, driver 580.65, CUDA 13.0, NCCL 2.30.7` or `cpu`."""
        if not self.gpu_count:
            return f"{self.device} (torch {torch.__version__}, CUDA build: {self.cuda or 'none'})"
        return (f"{self.device}: {self.gpu_model} x{self.gpu_count}, driver {self.driver}, "
                f"CUDA {self.cuda}, NCCL {self.nccl}")


def _nccl_version() -> str:
    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except Exception:  # noqa: BLE001 - a CPU build has no NCCL
        return ""


def nvidia_smi() -> str:
    """What `nvidia-smi` says about this machine's GPUs (one line each), or why it cannot."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not installed (no NVIDIA driver on this machine or container)"
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {err}"
    text = (proc.stdout or proc.stderr).strip()
    return text if proc.returncode == 0 else f"nvidia-smi exit {proc.returncode}: {text[:300]}"


def describe(device: torch.device) -> DeviceReport:
    """The report of `device` (a CUDA device must be usable: torch.cuda.is_available())."""
    cuda = torch.version.cuda or ""
    if device.type != "cuda":
        return DeviceReport(str(device), "", 0, "", cuda, _nccl_version())
    driver = nvidia_smi().split(",")[-1].strip() if shutil.which("nvidia-smi") else ""
    return DeviceReport(str(device), torch.cuda.get_device_name(device),
                        torch.cuda.device_count(), driver, cuda, _nccl_version())


def missing_gpu_message(where: str) -> str:
    """Why a process that asked for a GPU has none torch can use, and what to fix (`where`
    names the node)."""
    cuda = torch.version.cuda
    build = f"torch {torch.__version__} built for CUDA {cuda}" if cuda else \
        f"torch {torch.__version__} is a CPU-only build"
    fixes = ("install the CUDA build of torch the project pins (pyproject.toml; the Ray GPU "
             "image, Dockerfile)" if not cuda else
             "use an AMI/image whose NVIDIA driver supports that CUDA version, and start the "
             "container with the NVIDIA runtime (docker --gpus all)")
    return (f"this run asked for GPUs (scaling.use_gpu) but torch sees none on {where}: {build}; "
            f"nvidia-smi says: {nvidia_smi()}. Fix: {fixes}. Training on the CPU of a GPU node "
            "happens only with scaling.cpu_stands_in_for_gpu=true (rehearsals on fake GPU nodes)")
