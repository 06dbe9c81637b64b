"""Run the main job the way a user does: as a subprocess of the repository's entrypoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_job(args, env_extra=None, timeout=900):
    """Run ray_jobs/train_full.py; return (returncode, combined output, RESULT dict or None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "ray_jobs/train_full.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    result = next((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                   if line.startswith("RESULT ")), None)
    return proc.returncode, output, result


def small(tmp_path, epochs=2):
    """Overrides that make a demo run take seconds: a subset of digits, few epochs."""
    return [f"data.root={tmp_path / 'digits'}", f"train.epochs={epochs}",
            "data.max_train_samples=256", "data.max_val_samples=128", "train.global_batch_size=32",
            "optim.lr_reference_batch_size=32", "tracking.log_model=false"]
