"""The node provider of the laptop rehearsal (cluster.local.yaml): Ray's fake multi-node provider,
with each fake node set up the way a real machine would be.

Ray's provider starts every fake node inside the autoscaler's process, on this one machine, which
shows in two places a real cluster never does:
- Ray reads a node's `ray.io/node-group` label from the starting process's environment, so every
  node would carry the head's type (`ray.head.default`) and the rehearsal would price a fake p4d
  as the head: each node is started with `RAY_NODE_TYPE_NAME` set to its own type, as `ray up`
  starts a real one;
- every node would unpack jobs' working directories into the head's own runtime-resources folder,
  and a node unpacking one replaces the folder a running driver stands in (its current directory
  vanishes mid-job): each node gets a folder of its own, as each machine has its own disk.
"""
from __future__ import annotations

import itertools
import os
import threading

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

_START_LOCK = threading.Lock()  # launches run in threads; what is patched belongs to the process
NODE_TYPE_ENV = "RAY_NODE_TYPE_NAME"
_NODE_NUMBERS = itertools.count(1)


class RehearsalNodeProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider whose nodes carry their own node type and unpack jobs apart."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        make_params = ray._private.parameter.RayParams
        folder = f"runtime_resources_node{next(_NODE_NUMBERS)}"

        def own_folder(*args, **kwargs):
            return make_params(*args, **{"runtime_env_dir_name": folder, **kwargs})
        with _START_LOCK:
            saved = os.environ.get(NODE_TYPE_ENV)
            os.environ[NODE_TYPE_ENV] = tags[TAG_RAY_USER_NODE_TYPE]
            ray._private.parameter.RayParams = own_folder
            try:
                return super()._create_node_with_resources_and_labels(
                    node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = make_params
                if saved is None:
                    os.environ.pop(NODE_TYPE_ENV, None)
                else:
                    os.environ[NODE_TYPE_ENV] = saved
