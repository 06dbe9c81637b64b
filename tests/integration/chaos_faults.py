"""The faults of the chaos controller (tests/integration/chaos.py), each from outside the
product: a pid SIGKILLed, a raylet taken, a spot notice from a fake IMDS, the S3 server stopped,
a file cut short in storage, another job holding a CPU. Each draws what it needs (which worker,
which node, how long) from the controller's seeded RNG."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.fake_imds import FakeImds
from tests.integration.fake_cluster import REPO, cmdline, kill_tree

HOLDER = """
import ray, sys, time
ray.init(address=sys.argv[1])
holder = ray.remote(num_cpus=1)(type("OtherJob", (), {"ready": lambda self: True})).remote()
ray.get(holder.ready.remote())
print("holding one CPU", flush=True)
time.sleep(float(sys.argv[2]))
"""


class Faults:
    """The fault kinds, mixed into `Chaos`: each returns what it did, or None when it cannot
    apply yet (drawn again after the next pause)."""

    def train_workers(self) -> list[int]:
        return [pid for pid in self.cluster.processes() if "RayTrainWorker" in cmdline(pid)]

    def worker_kill(self) -> dict | None:
        """A training worker SIGKILLed by pid (an OOM kill, a segfault)."""
        pids = self.train_workers()
        if not pids:
            return None
        victim = self.rng.choice(pids)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:  # its group restarted between the listing and the kill
            return None
        return {"pid": victim}

    def _node_back(self) -> dict:
        """A new node joins after a while, as an autoscaler or a spot market gives one back."""
        after_s = self.rng.uniform(5, 15)
        self.pause(after_s)
        return {"node_added_after_s": round(after_s, 1), "node_added": self.cluster.add_node()}

    def node_lost(self) -> dict | None:
        """A node's raylet and everything on it SIGKILLed without warning; a node added back."""
        raylets = self.cluster.worker_raylets()
        if len(raylets) < 2:
            return None
        node = self.rng.choice(sorted(raylets))
        kill_tree(raylets[node])
        return {"node_lost": node, **self._node_back()}

    def spot_notice(self, deadline_s: float = 15) -> dict | None:
        """A spot interruption notice from the node's (fake) IMDS: its spot watcher drains it,
        the node is taken at the action time, and a node is added back."""
        raylets = self.cluster.worker_raylets()
        if len(raylets) < 2:
            return None
        node = self.rng.choice(sorted(raylets))
        imds, watcher_log = FakeImds().start(), self.workdir / f"watcher-{len(self.faults)}.log"
        with open(watcher_log, "w") as log:
            watcher = subprocess.Popen(
                [sys.executable, "-m", "rn50.distributed.spot_watcher", "--address",
                 self.cluster.gcs_address, "--poll-s", "1", "--node-id", node], cwd=REPO,
                env={**self.cluster.env, "RN50_IMDS_URL": imds.url}, stdout=log,
                stderr=subprocess.STDOUT)
        try:
            self.wait(lambda: "watching" in watcher_log.read_text(), 60, "the spot watcher")
            action_at = imds.post_notice(in_s=deadline_s)
            self.pause(max(0.0, action_at - time.time()))
            kill_tree(raylets[node])  # the action time: EC2 takes the node
        finally:
            watcher.kill()
            watcher.wait()
            imds.stop()
        drained = f"drained Ray node {node}" in watcher_log.read_text()
        return {"node_noticed": node, "notice_to_action_s": deadline_s, "drained": drained,
                **self._node_back()}

    def driver_kill(self) -> dict | None:
        """The driver SIGKILLed (its job's actors go with it); the same command submitted again."""
        os.killpg(self.driver.pid, signal.SIGKILL)
        self.driver.wait()
        after_s = self.rng.uniform(2, 8)
        self.pause(after_s)
        self.start_driver()
        return {"resubmitted_after_s": round(after_s, 1)}

    def torn_checkpoint(self) -> dict | None:
        """A training worker SIGKILLed, then the newest checkpoint in storage cut to half its
        state file (an upload torn by the crash): the restart must skip it for an older one.
        Torn once the old group is gone and before the new one reads storage: its surviving
        rank can still finish an upload begun before the kill, which would be the newest."""
        if len(self.note_checkpoints(recheck=True)) < 2 or not self.train_workers():
            return None
        old_group = set(self.train_workers())
        # The tear stands even when no worker is there to kill (a group between restarts): the
        # next start must skip it all the same.
        killed = self.worker_kill() or {}
        deadline = time.monotonic() + 60
        while old_group & set(self.train_workers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        newest = self.note_checkpoints(recheck=True)[0]
        filesystem, state = self.run_location()[0], f"{newest}/state.pt"
        self.torn.add(newest.rsplit("/", 1)[1])
        with filesystem.open_input_stream(state) as stream:
            half = stream.read(filesystem.get_file_info(state).size // 2)
        with filesystem.open_output_stream(state) as stream:
            stream.write(half)
        return {"checkpoint_torn": newest.rsplit("/", 1)[1], **killed}

    def cpu_hog(self) -> dict | None:
        """Another job takes one CPU of the cluster as soon as one is free, holds it a while."""
        hold_s = self.rng.uniform(10, 30)
        self.helpers.append(subprocess.Popen(
            [sys.executable, "-c", HOLDER, self.cluster.gcs_address, str(hold_s)],
            env=self.cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return {"hold_s": round(hold_s, 1)}

    def s3_outage(self) -> dict | None:
        """The S3 server stopped abruptly for 10-40 s while the run uploads to it."""
        if self.s3 is None:
            return None
        down_s = self.rng.uniform(10, 40)
        self.s3.stop()
        try:
            self.pause(down_s, look=False)
        finally:
            self.s3.start()
        return {"down_s": round(down_s, 1)}
