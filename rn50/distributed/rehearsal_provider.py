"""The node provider of the laptop rehearsal (cluster.local.yaml): Ray's fake multi-node provider,
with each fake node labelled with its own node type.

Ray's provider starts every fake node inside the autoscaler's process, where Ray reads a node's
`ray.io/node-group` label from that process's environment: every node would carry the head's type
(`ray.head.default`), so the rehearsal would price a fake p4d as the head. Here each node is
created with `RAY_NODE_TYPE_NAME` set to its own type, as `ray up` starts a real one.
"""
from __future__ import annotations

import os
import threading

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

_ENV_LOCK = threading.Lock()  # node launches run in threads; the environment is the process's
NODE_TYPE_ENV = "RAY_NODE_TYPE_NAME"


class RehearsalNodeProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider whose nodes carry their own node type as `ray.io/node-group`."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        with _ENV_LOCK:
            saved = os.environ.get(NODE_TYPE_ENV)
            os.environ[NODE_TYPE_ENV] = tags[TAG_RAY_USER_NODE_TYPE]
            try:
                return super()._create_node_with_resources_and_labels(
                    node_config, tags, count, resources, labels)
            finally:
                if saved is None:
                    os.environ.pop(NODE_TYPE_ENV, None)
                else:
                    os.environ[NODE_TYPE_ENV] = saved
