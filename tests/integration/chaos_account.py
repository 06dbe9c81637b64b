"""The account of a chaos run (tests/integration/chaos.py) from its job log: which steps some
worker group trained, where each group resumed and whether that checkpoint had verified, and
what the run did about each fault. Shared by tests/integration/test_chaos.py and
benchmarks/chaos.py."""
from __future__ import annotations

from dataclasses import asdict

from tests.integration.chaos import PER_EPOCH, RESPONSES, RESUMED, STEP, Chaos, global_steps


def groups(output: str) -> list[dict]:
    """The worker groups in the order they appeared: rank 0 pid, the checkpoint it resumed from
    (None for a fresh start) and the most global steps it trained. Lines repeat (every node's
    log monitor streams the shared session's worker logs): each group is keyed by its pid."""
    found: dict[str, dict] = {}
    offset = 0
    for line in output.splitlines(keepends=True):
        offset += len(line)
        if step := STEP.search(line):
            group = found.setdefault(step.group(1), {"pid": step.group(1), "resume": None,
                                                     "trained": 0})
            group["trained"] = max(group["trained"], global_steps(*step.groups()[1:], True))
        elif resume := RESUMED.search(line):
            pid, folder, epoch, steps, saved_by, now = resume.groups()
            group = found.setdefault(pid, {"pid": pid, "resume": None, "trained": 0})
            group["resume"] = group["resume"] or {
                "checkpoint": folder.rsplit("/", 1)[1], "epoch": int(epoch),
                "steps_done": int(steps), "at_step": global_steps(epoch, steps),
                "saved_by_workers": int(saved_by), "now_workers": int(now), "log_offset": offset}
    return list(found.values())


def account(chaos: Chaos, result: dict | None) -> dict:
    """Steps lost and repeated, resumes and whether each started from a verified checkpoint, and
    per fault what the run did about it."""
    output = chaos.log()
    total = chaos.epochs * PER_EPOCH
    trained = {global_steps(e, s, True) for _, e, s in STEP.findall(output)}
    found, reached, repeated, skipped_ahead, resumes = groups(output), chaos.start_step, 0, 0, []
    for group in found:
        point = group["resume"]["at_step"] if group["resume"] else 0  # fresh: from the start
        repeated += max(0, reached - point)
        skipped_ahead += max(0, point - reached)  # a resume past what any group had trained
        if group["resume"]:
            folder = group["resume"]["checkpoint"]
            at = None if folder in chaos.torn else chaos.verified.get(folder)
            resumes.append({**group["resume"], "repeated_steps": max(0, reached - point),
                            "checkpoint_verified": at == (group["resume"]["epoch"],
                                                          group["resume"]["steps_done"])})
        reached = max(reached, group["trained"])
    ends = [fault.log_offset for fault in chaos.faults[1:]] + [len(output)]
    faults = []
    for fault, end in zip(chaos.faults, ends):
        segment = output[fault.log_offset:end]
        did = {name: len(set(pattern.findall(segment))) for name, pattern in RESPONSES.items()}
        record = {**asdict(fault), "responses": {k: v for k, v in did.items() if v}}
        record["resumes"] = [{k: v for k, v in r.items() if k != "log_offset"} for r in resumes
                             if fault.log_offset <= r["log_offset"] < end]
        record.pop("log_offset")
        faults.append(record)
    owed = set(range(chaos.start_step + 1, total + 1))  # the steps this run had to train
    return {"steps_total": total - chaos.start_step, "steps_never_trained": sorted(owed - trained),
            "steps_lost": len(owed - trained) + skipped_ahead,
            "steps_repeated": repeated, "groups": len(found),
            "resumes": [{k: v for k, v in r.items() if k != "log_offset"} for r in resumes],
            "faults": faults, "finished": result is not None}
