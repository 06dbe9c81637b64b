"""cluster.local.yaml started for real: `ray start --head` as its header says, on free ports.

Each fake "node" the autoscaler adds is one more local raylet. Everything this cluster runs has
its private temp dir (or its GCS port) on the command line, so teardown ends exactly this
cluster's processes by pid; `ray stop --force` would also end every other Ray on the machine.
Processes are read from /proc (Linux), which is all the fake provider supports here anyway.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
PROVIDER = "tests.integration.rehearsal_provider"
HEAD_NODE_ID = "f" * 51 + "00000"  # what the fake provider and `ray start --head` agree on
# The environment cluster.local.yaml's header gives `ray start --head`.
HEAD_START_ENV = {"RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
                  "RAY_CLOUD_INSTANCE_ID": HEAD_NODE_ID, "RAY_NODE_TYPE_NAME": "ray.head.default"}
PORT_NAMES = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
              "node-manager-port", "object-manager-port")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _read(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


def cmdline(pid: int) -> str:
    """The command line of `pid` ('' once it is gone)."""
    return _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")


def environ(pid: int) -> dict:
    """The environment `pid` started with ({} once it is gone)."""
    pairs = (item.partition(b"=") for item in _read(pid, "environ").split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def _parents() -> dict[int, int]:
    """{pid: parent pid} for every process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read(int(entry.name), "stat").decode(errors="replace")
            if stat:  # "pid (comm) state ppid ...": comm may hold spaces, so split after ")"
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def with_descendants(pids: list[int]) -> list[int]:
    """`pids` plus every process below them."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), list(pids)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return sorted(found)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (what a vanished machine looks like)."""
    for victim in with_descendants([pid]):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class FakeCluster:
    """One head from cluster.local.yaml; `env` is what the `ray` CLI needs to reach it."""
    head_env: dict = field(default_factory=dict)
    # {node type: {field: value}} changed in this cluster's copy of cluster.local.yaml (e.g. a
    # node type's max_workers set to 0: the provider never launches it, like refused capacity).
    node_types: dict = field(default_factory=dict)
    # Faults of the cloud (tests/integration/rehearsal_provider.py): {"refuse_node_types": [...],
    # "start_delay_s": {type: s}}; given, the autoscaler launches nodes through that provider.
    provider: dict = field(default_factory=dict)
    # Short, under /tmp: Ray's unix sockets live in the temp dir; paths are capped at 107 bytes.
    temp_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="rn50lc-", dir="/tmp")))
    ports: dict = field(default_factory=dict)
    node_ip: str = ""
    # False: a plain head without the autoscaler, whose nodes are the ones `add_node` starts.
    autoscaling: bool = True
    # The head's Ray node id: the fake provider's for an autoscaling head, else Ray's own (read
    # once the head is up).
    head_node_id: str = HEAD_NODE_ID

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def env(self) -> dict:
        # Ray 2.60's CLIs send the token from ~/.ray/auth_token only when this is set.
        env = {**os.environ, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        return env

    def _config(self) -> Path:
        """cluster.local.yaml with the provider pointed at this head's GCS port."""
        config = yaml.safe_load((REPO / "cluster.local.yaml").read_text())
        config["provider"]["gcs_address"] = f"{self.node_ip}:{self.ports['port']}"
        for name, fields in self.node_types.items():
            config["available_node_types"][name].update(fields)
        if self.provider:  # the same provider, with the cloud's faults
            config["provider"].update(self.provider, module=f"{PROVIDER}.RehearsalProvider")
        path = self.temp_dir / "cluster.local.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, timeout_s: float = 180) -> None:
        """`ray start --head` with the head resources cluster.local.yaml declares."""
        import ray.util  # the node IP the fake provider will use for the GCS address
        # With RAY_AUTH_MODE=token set, `ray start` only reads a token: make the one the docs
        # tell users to make (`ray get-auth-token --generate`) if this machine has none yet.
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True, timeout=60)
        self.node_ip = ray.util.get_node_ip_address()
        self.ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES))))
        config = yaml.safe_load((REPO / "cluster.local.yaml").read_text())
        head = config["available_node_types"][config["head_node_type"]]["resources"]
        extra = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        config_path = self._config()
        autoscaler = [f"--autoscaling-config={config_path}"] if self.autoscaling else []
        command = [RAY, "start", "--head", f"--num-cpus={head.get('CPU', 0)}",
                   f"--resources={json.dumps(extra)}", *autoscaler,
                   f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1",
                   "--object-store-memory=268435456", "--disable-usage-stats",
                   *[f"--{name}={port}" for name, port in self.ports.items()]]
        env = {**self.env, **(HEAD_START_ENV if self.autoscaling else {}), **self.head_env,
               "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # react in 1 s, not 5: a shorter test
               # the autoscaler imports the test's provider module from the repository
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")])),
               # where the jobs' drivers read the node types (cluster.yaml's head: ray up's
               # ~/ray_bootstrap_config.yaml), as docs/aws.md's rehearsal sets it
               **({"RN50_CLUSTER_CONFIG": str(config_path)} if self.autoscaling else {})}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed ({proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        if not self.autoscaling:  # a plain head's node id is Ray's own: its raylet, the only one
            self.head_node_id = next(iter(self._raylets()))

    def add_node(self, num_cpus: int = 1, timeout_s: float = 120) -> str:
        """`ray start --address` one more node (a raylet on free ports); its Ray node id."""
        before = set(self.worker_raylets())
        node_ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                      "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                      "object-manager-port")
        command = [RAY, "start", f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                   "--object-store-memory=268435456", "--disable-usage-stats",
                   *[f"--{name}={port}" for name, port in
                     zip(node_ports, _free_ports(len(node_ports)))]]
        proc = subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start --address failed ({proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            new = set(self.worker_raylets()) - before
            if new:
                return new.pop()
            time.sleep(0.5)
        raise RuntimeError("the new node's raylet did not show up")

    def processes(self) -> list[int]:
        """Pids of every process of this cluster: its daemons and everything they started."""
        marks = (str(self.temp_dir), f":{self.ports.get('port', -1)} ")
        roots = [pid for pid in _parents() if pid != os.getpid()
                 and any(mark in cmdline(pid) + " " for mark in marks)]
        return with_descendants(roots)

    def worker_raylets(self) -> dict[str, int]:
        """{node id: raylet pid} for the live worker nodes (added, or the autoscaler's): never
        the head's (a fault that takes a node must not take the head, the drivers' node)."""
        return {node: pid for node, pid in self._raylets().items() if node != self.head_node_id}

    def _raylets(self) -> dict[str, int]:
        raylets = {}
        for pid in self.processes():
            line = cmdline(pid)
            if "/raylet/raylet " in line and "--node_id=" in line:
                raylets[line.split("--node_id=", 1)[1].split()[0]] = pid
        return raylets

    @staticmethod
    def node_type(raylet_pid: int) -> str:
        """The node type the autoscaler launched this raylet as."""
        return environ(raylet_pid).get("RAY_NODE_TYPE_NAME", "")

    @staticmethod
    def instance_id(raylet_pid: int) -> str:
        """The cloud instance id the autoscaler gave this raylet's node (an EC2 id on AWS)."""
        return environ(raylet_pid).get("RAY_CLOUD_INSTANCE_ID", "")

    @property
    def gcs_address(self) -> str:
        """What `ray start --address` and the spot watcher's --address take."""
        return f"{self.node_ip}:{self.ports['port']}"

    def __enter__(self) -> "FakeCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def stop(self) -> None:
        """SIGKILL this cluster's processes only (by pid), then wait until they are gone."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = self.processes()
            if not pids:
                return
            for pid in pids:
                kill_tree(pid)
            time.sleep(0.5)  # let the kernel reap them before looking again
        raise RuntimeError(f"processes of the fake cluster in {self.temp_dir} survived SIGKILL")
