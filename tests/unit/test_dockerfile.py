"""The prebuilt node image: ./Dockerfile starts from cluster.yaml's image, pins exactly what
pyproject.toml pins, and copies what builds the project with its JPEG region decoder; cluster.yaml
switches to such an image with the one sed its comment (and docs/aws.md) gives, and then logs each
host in to a private ECR registry before the pull.

No docker engine is needed (none runs here): the Dockerfile is read, its build context is built
with pip as its last RUN would, and cluster.yaml's commands run in bash with `aws` and `docker`
replaced by scripts that record their arguments.
"""
import copy
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
ECR_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/rn50:deps-0123456789ab"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of ./Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1]) for line in joined.splitlines() if line.strip()
            for parts in [line.strip().split(None, 1)]]


def _by_name(requirements) -> dict[str, Requirement]:
    found = [Requirement(r) for r in requirements]
    return {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in found}


def test_the_image_starts_from_cluster_yamls_image():
    froms = [args for name, args in _instructions() if name == "FROM"]
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert froms == [cluster["docker"]["image"]] == [RAY_IMAGE]


def test_the_image_pins_exactly_what_pyproject_pins():
    # Red when a pin changes in pyproject.toml and not here (or the reverse): the image would
    # run other versions than the tests, and every node's `pip install -e` would fix it slowly.
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    installs = [shlex.split(args) for name, args in _instructions()
                if name == "RUN" and "pip install" in args and "--no-deps" not in args]
    assert len(installs) == 1, installs
    words = installs[0][installs[0].index("install") + 1:]
    pinned = _by_name(w for w in words if not w.startswith("-"))
    expected = _by_name(dependencies)
    assert pinned.keys() == expected.keys(), pinned.keys() ^ expected.keys()
    for name, requirement in expected.items():
        assert (pinned[name].specifier, pinned[name].extras) == \
            (requirement.specifier, requirement.extras), name
    text = (REPO / "Dockerfile").read_text()
    assert "--index-url" not in text and "whl/cpu" not in text, "torch must be PyPI's CUDA build"
    assert "assert torch.version.cuda" in text and "import rn50, rn50_jpeg_region" in text


def _ignored(relative: str, rules: list[str]) -> bool:
    """Whether .dockerignore's `rules` leave `relative` out of the build context (last rule
    matching the path or one of its folders wins; `!` puts it back)."""
    parents = [str(p) for p in Path(relative).parents if str(p) != "."] + [relative]
    ignored = False
    for rule in rules:
        pattern = rule.lstrip("!")
        if any(fnmatch.fnmatch(path, pattern) for path in parents):
            ignored = not rule.startswith("!")
    return ignored


def _build_context(tmp_path: Path, build_dir: str) -> Path:
    """What the COPY lines put into `build_dir` (a file into a folder ending in /, a folder's
    contents into its destination), from the context .dockerignore leaves; copied to tmp_path."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for name, args in _instructions():
        if name != "COPY":
            continue
        *sources, destination = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in sources:
            root = REPO / source
            pairs = [(root, PurePosixPath(destination) / root.name)] if root.is_file() else \
                [(p, PurePosixPath(destination) / p.relative_to(root).as_posix())
                 for p in root.rglob("*") if p.is_file()]
            kept = [(path, landed) for path, landed in pairs
                    if not _ignored(path.relative_to(REPO).as_posix(), rules)]
            assert kept, f"COPY {source}: .dockerignore leaves it out, so `docker build` fails"
            for path, landed in kept:
                out = tmp_path / landed.relative_to(build_dir)  # ValueError: lands elsewhere
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    return tmp_path


@pytest.mark.skipif(not (shutil.which("gcc") and Path("/usr/include/jpeglib.h").is_file()),
                    reason="the decoder needs gcc and libjpeg's headers, as the image has")
def test_what_the_image_copies_builds_the_project_with_its_jpeg_decoder(tmp_path):
    # Red when a COPY line or .dockerignore leaves out something the build needs (the C source,
    # the recipes, README.md that pyproject names) or lets a stale built .so in.
    runs = [args for name, args in _instructions() if name == "RUN" and "--no-deps" in args]
    assert len(runs) == 1, runs
    build_dir = re.search(r"--no-deps (\S+)", runs[0]).group(1)
    context = _build_context(tmp_path / "rn50-build", build_dir)
    assert not list(context.rglob("*.so")) and not list(context.rglob("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(context)], check=True, timeout=300,
                   capture_output=True)
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("rn50-*.whl"))).namelist()
    assert any(re.fullmatch(r"rn50_jpeg_region\..*\.so", n) for n in names), names
    assert {"rn50/recipes/imagenet_fast_16.yaml", "rn50/data/imagenet_wnids.txt"} <= set(names)


def _switched(tmp_path: Path, image: str) -> Path:
    """A copy of cluster.yaml after the sed its docker comment gives, run by bash."""
    text = (REPO / "cluster.yaml").read_text()
    seds = [line.split("#", 1)[1].strip() for line in text.splitlines()
            if line.lstrip().startswith("#") and "sed -i" in line and "$IMAGE" in line]
    assert len(seds) == 1, seds
    assert seds[0] in (REPO / "docs/aws.md").read_text(), "docs/aws.md gives the same command"
    shutil.copy(REPO / "cluster.yaml", tmp_path / "cluster.yaml")
    subprocess.run(["bash", "-c", seds[0]], cwd=tmp_path, env={**os.environ, "IMAGE": image},
                   check=True, timeout=30)
    return tmp_path / "cluster.yaml"


def _login_calls(tmp_path: Path, command: str) -> str:
    """Run a host command with `aws` and `docker` recording their arguments; what they got."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for tool, output in (("aws", "echo ecr-password"), ("docker", "cat > /dev/null")):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n{output}\n')
        (bin_dir / tool).chmod(0o755)
    subprocess.run(["bash", "-c", command], env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"},
                   check=True, timeout=30)
    return log.read_text() if log.exists() else ""


def test_one_sed_switches_every_node_to_a_prebuilt_image_from_ecr(tmp_path):
    # Red when the sed misses a place that names the image, the result is not a config Ray
    # accepts, or a host pulls a private ECR image without logging in first.
    before = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    after = yaml.safe_load(_switched(tmp_path, ECR_IMAGE).read_text())
    validate_config(prepare_config(copy.deepcopy(after)))
    assert after["docker"]["image"] == ECR_IMAGE
    assert RAY_IMAGE not in (tmp_path / "cluster.yaml").read_text()
    # Nothing else changes: the setup commands are the same (they find everything installed).
    unchanged = ("setup_commands", "head_setup_commands", "head_start_ray_commands",
                 "worker_start_ray_commands", "available_node_types", "file_mounts")
    assert all(prepare_config(copy.deepcopy(after))[k] == before[k] for k in unchanged)
    (default_login,) = before["initialization_commands"]
    assert default_login.startswith(f"IMAGE={before['docker']['image']};"), default_login
    (login,) = after["initialization_commands"]
    calls = _login_calls(tmp_path, login)
    assert sorted(calls.splitlines()) == [  # a pipeline: either may log first
        "aws ecr get-login-password --region eu-west-1",
        "docker login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com"]
    # Ray's public image (today's default): no login, no AWS call on any host.
    (tmp_path / "default").mkdir()
    assert _login_calls(tmp_path / "default", default_login) == ""
