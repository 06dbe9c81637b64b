"""What a cold node installs at setup, and how long setup takes when the image holds it already.

    python -m benchmarks.node_setup        # -> results/node_setup.json (~1 min)

The measured half of docs/aws.md's cold-node estimate ("A prebuilt image"):
- `deps_installed_gb`: the installed size of pyproject.toml's dependency closure (every
  distribution its requirements reach, extras included), summed over each one's RECORD. On Ray's
  image every cold node's setup_commands download and unpack these (less what the image has);
  the prebuilt image (./Dockerfile) carries them in a layer. `torch_cuda_installed_gb`: the part
  that is torch, torchvision, triton and the nvidia-* CUDA wheels.
- `prebuilt_setup_s`: cluster.yaml's setup_commands, run as they run on the prebuilt image, where
  everything is installed: the gcc/libjpeg check, then `pip install -e` of a copy of the project
  (from a venv that sees this machine's installed packages; pip fetches setuptools for the build
  from PyPI, as on the cluster). Median of `--repeats`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


from benchmarks.results import write_result

REPO = Path(__file__).resolve().parents[1]
CUDA_STACK = ("torch", "torchvision", "triton", "nvidia-")


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """{name: installed distribution} of everything `requirements` reach (markers honoured)."""
    found: dict[str, metadata.Distribution] = {}
    stack = [Requirement(r) for r in requirements]
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:  # a marker-less optional dependency not installed
            continue
        extras = [{"extra": e} for e in requirement.extras] or [{"extra": ""}]
        new = name not in found
        found[name] = dist
        for text in dist.requires or []:
            child = Requirement(text)
            if child.marker and not any(child.marker.evaluate(env) for env in extras):
                continue
            if new or child.marker:  # an extra asked for later may reach more packages
                stack.append(child)
    return found


def installed_bytes(dist: metadata.Distribution) -> int:
    """Bytes of the files a distribution's RECORD lists (those present)."""
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def setup_seconds(repeats: int) -> list[float]:
    """cluster.yaml's setup_commands on a node whose image has everything, timed `repeats` times."""
    commands = yaml.safe_load((REPO / "cluster.yaml").read_text())["setup_commands"]
    timings = []
    with tempfile.TemporaryDirectory(prefix="rn50-node-setup-") as tmp:
        project, venv = Path(tmp, "rn50"), Path(tmp, "venv")
        project.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, project)
        shutil.copytree(REPO / "rn50", project / "rn50",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True)
        shell = [c.replace("/home/ray/rn50", str(project))
                 .replace("pip install", f"{venv / 'bin' / 'pip'} install") for c in commands]
        for _ in range(repeats):
            start = time.perf_counter()
            for command in shell:
                subprocess.run(["bash", "-c", command], check=True, capture_output=True)
            timings.append(time.perf_counter() - start)
    return timings


def main() -> None:
    """Measure and write results/node_setup.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dists = closure(project["dependencies"])
    sizes = {name: installed_bytes(dist) for name, dist in dists.items()}
    cuda = sum(size for name, size in sizes.items()
               if name.startswith(CUDA_STACK) and name != "nvidia-ml-py")  # NVML bindings: KBs
    timings = setup_seconds(args.repeats)
    figures = {"deps_installed_gb": round(sum(sizes.values()) / 1e9, 2),
               "torch_cuda_installed_gb": round(cuda / 1e9, 2),
               "distributions": len(dists),
               "prebuilt_setup_s": round(statistics.median(timings), 1)}
    print(figures, flush=True)
    write_result("node_setup", figures, context={
        "setup_s_each": [round(t, 1) for t in timings],
        "largest_gb": {n: round(s / 1e9, 2) for n, s in
                       sorted(sizes.items(), key=lambda item: -item[1])[:8]}})


if __name__ == "__main__":
    main()
