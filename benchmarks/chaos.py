"""The chaos run: one number for "nothing lost". One elastic training run (the integration tests'
reference maths: 2 micro-batches of 16 per step on 1 or 2 workers, 16 steps an epoch) on the
local rehearsal cluster, a head and two 1-CPU raylets, its checkpoints on a real S3 server
(SeaweedFS), while a seeded controller outside the product (tests/integration/chaos.py) hits it
with faults at moments it draws: a worker SIGKILLed, a node lost and one added back, a spot notice
through a fake IMDS, the S3 server stopped for 10-40 s, the driver killed and the job submitted
again, the newest checkpoint torn in storage, another job holding a CPU for a while.

The same maths on a fixed two workers, never interrupted, runs first: the chaos run must end on
its weights, bit for bit. Writes benchmarks/results/chaos.json.

    python -m benchmarks.chaos                      # 22 faults of 7 kinds, 24 epochs (~30 min)
    python -m benchmarks.chaos --epochs 8           # shorter: its faults may run out of steps
    python -m benchmarks.chaos --faults 3 --out /tmp/chaos.json   # a smoke run
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import write_result
from tests.integration.chaos import KINDS, Chaos, draw_plan
from tests.integration.chaos_account import account
from tests.integration.fake_cluster import FakeCluster
from tests.integration.faults import fingerprint
from tests.integration.jobs import epochs_logged, reference_maths, run_job
from tools.local_servers import S3Server


def straight_run(work: Path, epochs: int) -> str:
    """The uninterrupted fixed-size run; the fingerprint of its final weights."""
    code, output, result = run_job([
        "--recipe", "demo", "--name", "straight", "--storage", str(work / "straight"),
        *reference_maths(work / "digits", epochs), "checkpoint.keep_last=1",
        f"tracking.uri=sqlite:///{work / 'straight.db'}"], timeout=1800)
    if code != 0:
        raise SystemExit(f"the straight run failed ({code}):\n{output[-4000:]}")
    return fingerprint(result["checkpoint"])


def chaos_run(work: Path, args, s3) -> tuple[Chaos, dict | None, str]:
    """The run under fire on a fresh cluster; (controller, RESULT record, why it failed)."""
    with FakeCluster(autoscaling=False) as cluster:
        cluster.add_node()
        cluster.add_node()
        chaos = Chaos(cluster, work / "chaos", work / "digits", args.epochs, args.seed,
                      draw_plan(args.seed, args.kinds, args.faults), gap_s=tuple(args.gap_s),
                      s3=s3)
        chaos.workdir.mkdir()
        try:
            return chaos, chaos.run(finish_timeout_s=1800), ""
        except (TimeoutError, RuntimeError) as err:  # a hang or a dead job: recorded
            return chaos, None, str(err)[-3000:]


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--seed", type=int, default=2026)
    cli.add_argument("--faults", type=int, default=22)
    cli.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS),
                     help=f"comma-separated, from {','.join(KINDS)}")
    cli.add_argument("--epochs", type=int, default=24)
    cli.add_argument("--gap-s", type=float, nargs=2, default=(1.0, 4.0),
                     help="a fault comes this long (drawn) after the run got over the last")
    cli.add_argument("--out", help="write here instead of benchmarks/results/chaos.json")
    args = cli.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rn50-chaos-", dir="/tmp"))
    s3 = S3Server(work / "s3")
    started = time.monotonic()
    try:
        s3.start()
        os.environ.update(s3.env())  # the cluster's nodes, the driver and this process
        straight = straight_run(work, args.epochs)
        straight_s = time.monotonic() - started
        chaos, result, failure = chaos_run(work, args, s3)
        report = account(chaos, result)
        if result is not None:
            report["epochs_logged"] = epochs_logged(result)
            report["fingerprint_equal"] = fingerprint(result["checkpoint"]) == straight
        record(args, chaos, report, failure, straight_s, time.monotonic() - started)
        if failure:  # the run's own account of what went wrong, kept beside the result
            kept = Path(args.out or "benchmarks/results/chaos.json").with_suffix(".failed.log")
            shutil.copyfile(chaos.log_path, kept)
            print(f"[benchmarks] the failed run's log: {kept}", flush=True)
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


def record(args, chaos: Chaos, report: dict, failure: str, straight_s: float,
           total_s: float) -> None:
    """benchmarks/results/chaos.json: flat figures, then every fault and resume."""
    faults = report["faults"]
    survived = [f for f in faults if f["time_lost_s"] is not None and report["finished"]]
    lost = [f["time_lost_s"] for f in faults if f["time_lost_s"] is not None]
    figures = {
        "seed": args.seed, "faults": len(faults), "fault_kinds": len({f["kind"] for f in faults}),
        "faults_survived": len(survived), "steps_lost": report["steps_lost"],
        "steps_repeated": report["steps_repeated"], "steps_total": report["steps_total"],
        "resumes": len(report["resumes"]),
        "resumes_from_verified_checkpoints": sum(r["checkpoint_verified"]
                                                 for r in report["resumes"]),
        "epochs": args.epochs,
        "epochs_logged_once": int(report.get("epochs_logged") == list(range(args.epochs))),
        "final_weights_equal_the_straight_runs": int(report.get("fingerprint_equal", False)),
        "time_lost_s": round(sum(lost), 1),
        "time_lost_per_fault_s": round(sum(lost) / max(1, len(lost)), 1),
        "chaos_run_s": round(total_s - straight_s, 1), "straight_run_s": round(straight_s, 1)}
    print("chaos:", figures, flush=True)
    context = {
        "setup": "head (0 CPU) + 2 raylets (1 CPU each) on the 2-core machine; demo recipe, "
                 "tests/integration/jobs.py reference_maths (16 steps an epoch, 2 micro-batches "
                 "of 16 per step), scaling.num_workers=[1,2], checkpoint.every_steps 5, storage "
                 "on a local SeaweedFS S3; the straight run: the same maths at a fixed 2 workers",
        "same_run": "one run took every fault: elastic (1-2 workers) and still the fixed-size "
                    "maths (2 micro-batches per step on 1 worker or 2 are the same arithmetic), "
                    "so its final weights are compared with the straight fixed-size run's",
        "finished": report["finished"], "failure": failure, "fault_log": faults,
        "resume_log": report["resumes"],
        "steps_never_trained": report["steps_never_trained"],
        "epochs_logged": report.get("epochs_logged")}
    argv = [sys.argv[0], *sys.argv[1:]]
    write_result("chaos", figures, argv=argv, path=args.out, context=context)


if __name__ == "__main__":
    main()
