"""Turn EC2's spot interruption notice into a Ray drain of this node; one runs on every worker.

`python -m rn50.distributed.spot_watcher --address HEAD_IP:6379` (cluster.yaml's worker start
commands start it). Every `--poll-s` seconds it asks the instance metadata service (IMDSv2: a
token from `PUT /latest/api/token`, then `GET /latest/meta-data/spot/instance-action`, 404 = no
notice). On a notice it runs Ray's own drain for this node, once (the GCS call behind
`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds <until the
action time>`). Ray Train then sees the drain (`ray.train.get_preemption_info()`), the workers
checkpoint, and the run restarts from that checkpoint on another node when the deadline passes.
A rebalance recommendation (`/latest/meta-data/events/recommendations/rebalance`) is logged.

This node's Ray id: the alive node whose instance id (autoscaler v2 starts Ray with
RAY_CLOUD_INSTANCE_ID = the EC2 instance id) equals IMDS's `instance-id`, else the one whose IP is
IMDS's `local-ipv4`; read from the GCS without `ray.init`, so the watcher is never a Ray driver.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from rn50.io.imds import DEFAULT_IMDS_URL, IMDS_URL_ENV, Imds, ImdsError, imds_url

logger = logging.getLogger("rn50.spot_watcher")
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
NOTICE_LEAD_S = 120  # AWS posts the notice two minutes before it acts
DrainFn = Callable[[str, int, str], None]  # (node id, seconds to the deadline, message)


@dataclass(frozen=True)
class Notice:
    """An interruption notice as IMDS gave it."""
    action: str
    """`terminate`, `stop`, `hibernate`, or `unknown` for a notice that could not be read."""
    deadline_s: int
    """Seconds from now until the action."""
    body: str
    """What IMDS answered."""


def parse_notice(body: str, now: float, first_seen: float) -> Notice:
    """Read IMDS's `{"action": ..., "time": "<ISO 8601 UTC>"}`. IMDS answers 200 only when an
    action is scheduled, so an unreadable one still counts, with AWS's two minutes counted from
    when it was first seen."""
    try:
        data = json.loads(body)
        at = datetime.fromisoformat(str(data["time"]).replace("Z", "+00:00"))
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)  # IMDS times are UTC
        return Notice(str(data["action"]), max(0, int(at.timestamp() - now)), body)
    except (ValueError, TypeError, KeyError) as err:
        logger.warning("malformed interruption notice %r (%s); assuming AWS's %d s from when it "
                       "was first seen", body[:200], err, NOTICE_LEAD_S)
        return Notice("unknown", max(0, int(first_seen + NOTICE_LEAD_S - now)), body)


def find_node_id(nodes: list[dict], instance_id: str, ip: str) -> str:
    """The id of this machine's alive Ray node: by EC2 instance id, else by private IP."""
    alive = [node for node in nodes if node["alive"]]
    for key, value in (("instance_id", instance_id), ("ip", ip)):
        matches = [node["node_id"] for node in alive if value and node[key] == value]
        if len(matches) == 1:
            return matches[0]
    raise LookupError(f"no single alive Ray node has instance id {instance_id!r} or IP {ip!r} "
                      f"(alive: {[(n['instance_id'], n['ip']) for n in alive]}); pass --node-id")


def gcs_nodes(address: str) -> list[dict]:
    """Every node the GCS at `address` knows, as plain dicts (no `ray.init`, no driver)."""
    import ray._raylet
    from ray.core.generated import gcs_pb2
    infos = ray._raylet.GcsClient(address=address).get_all_node_info(timeout=10)
    return [{"node_id": node_id.hex(), "instance_id": info.instance_id,
             "ip": info.node_manager_address, "alive": info.state == gcs_pb2.GcsNodeInfo.ALIVE}
            for node_id, info in infos.items()]


def ray_drain(address: str) -> DrainFn:
    """Ray's own drain against the GCS at `address`: the call `ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` makes (ray/scripts/scripts.py),
    made in this process: the CLI's start-up alone took 8 s of the notice's 120 on a busy node."""
    def drain(node_id: str, deadline_s: int, message: str) -> None:
        import ray._raylet
        from ray.core.generated import autoscaler_pb2
        deadline_ms = time.time_ns() // 1_000_000 + deadline_s * 1000
        accepted, why = ray._raylet.GcsClient(address=address).drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            message, deadline_ms)
        if not accepted:
            raise RuntimeError(f"the GCS did not accept the drain: {why}")
    return drain


class Watcher:
    """Polls IMDS and drains this node once when a notice appears."""

    def __init__(self, imds: Imds, drain: DrainFn, node_id: Callable[[], str],
                 clock: Callable[[], float] = time.time, drain_on_rebalance: bool = False):
        self.imds, self.drain, self.node_id, self.clock = imds, drain, node_id, clock
        self.drain_on_rebalance = drain_on_rebalance
        self.first_seen: float | None = None
        self.rebalance_seen = False
        self._last_unreachable_log = -1e18

    def poll_once(self) -> bool:
        """One look at IMDS; True once this node has been drained."""
        try:
            status, body = self.imds.get(NOTICE_PATH)
            if status == 404 and self._rebalance():
                return self._drain(Notice("rebalance", NOTICE_LEAD_S, "rebalance recommendation"))
        except ImdsError as err:
            if self.clock() - self._last_unreachable_log >= 300:  # every 5 min, not every poll
                logger.warning("IMDS unreachable, still polling: %s", err)
                self._last_unreachable_log = self.clock()
            return False
        if status == 404:
            return False
        if status != 200:
            logger.warning("unexpected IMDS answer to %s: HTTP %d %r", NOTICE_PATH, status,
                           body[:200])
            return False
        now = self.clock()
        if self.first_seen is None:
            self.first_seen = now
        return self._drain(parse_notice(body, now, self.first_seen))

    def _rebalance(self) -> bool:
        """Whether a rebalance recommendation should drain the node (logged once either way)."""
        status, body = self.imds.get(REBALANCE_PATH)
        if status != 200 or self.rebalance_seen:
            return False
        self.rebalance_seen = True
        logger.warning("rebalance recommendation %s: an interruption is more likely; %s",
                       body.strip()[:200], "draining" if self.drain_on_rebalance else
                       "not draining (--drain-on-rebalance would)")
        return self.drain_on_rebalance

    def _drain(self, notice: Notice) -> bool:
        message = f"EC2 spot {notice.action} notice: {notice.body.strip()[:200]}"
        try:
            node_id = self.node_id()
            self.drain(node_id, notice.deadline_s, message)
        except Exception as err:  # noqa: BLE001 - the GCS or this node's lookup may be back soon
            logger.error("draining this node failed, trying again at the next poll: %s", err)
            return False
        logger.warning("drained Ray node %s (deadline in %d s): %s", node_id, notice.deadline_s,
                       message)
        return True


class NodeIdentity:
    """This machine's Ray node id: given, or looked up at every call (Ray may have been restarted
    on this machine since the watcher started, under a new node id)."""

    def __init__(self, imds: Imds, address: str, node_id: str = ""):
        self.imds, self.address, self.node_id = imds, address, node_id

    def __call__(self) -> str:
        if self.node_id:
            return self.node_id
        instance_id = self.imds.text("/latest/meta-data/instance-id")
        ip = self.imds.text("/latest/meta-data/local-ipv4")
        return find_node_id(gcs_nodes(self.address), instance_id, ip)


def watch(watcher: Watcher, poll_s: float, stop: threading.Event) -> None:
    """Poll every `poll_s` seconds until the node is drained or `stop` is set."""
    while not stop.is_set():
        try:
            if watcher.poll_once():
                return
        except Exception:  # nothing restarts a dead watcher: log, poll again
            logger.exception("unexpected error in the spot watcher; polling on")
        stop.wait(poll_s)


def parser() -> argparse.ArgumentParser:
    """The command line (cluster.yaml's worker start commands use it; a unit test parses them)."""
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--address", required=True, help="the GCS, HEAD_IP:6379")
    cli.add_argument("--imds-url", default=imds_url(),
                     help=f"metadata service base URL (${IMDS_URL_ENV}, default "
                          f"{DEFAULT_IMDS_URL})")
    cli.add_argument("--poll-s", type=float, default=5.0, help="seconds between polls")
    cli.add_argument("--node-id", default="", help="this node's Ray id (default: looked up)")
    cli.add_argument("--drain-on-rebalance", action="store_true",
                     help="drain on a rebalance recommendation too, with a 120 s deadline")
    return cli


def main(argv: list[str] | None = None) -> int:
    """Watch until this node is drained."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.poll_s <= 0:
        cli.error(f"--poll-s must be > 0, got {args.poll_s}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    imds = Imds(args.imds_url)
    identity = NodeIdentity(imds, args.address, args.node_id)
    try:
        logger.info("watching %s for Ray node %s every %g s", args.imds_url, identity(),
                    args.poll_s)
    except Exception as err:  # noqa: BLE001 - looked up again when a notice comes
        logger.warning("this node's Ray id is not known yet (%s); looking again on a notice", err)
    watcher = Watcher(imds, ray_drain(args.address), identity,
                      drain_on_rebalance=args.drain_on_rebalance)
    watch(watcher, args.poll_s, threading.Event())
    return 0


if __name__ == "__main__":
    sys.exit(main())
