"""The rehearsal's node provider (rn50.distributed.rehearsal_provider) with two faults of the real
cloud, set from the test's copy of
cluster.local.yaml (`provider:`), never from the product:

- `refuse_node_types: [gpu.a100x8.spot]`: every launch of those types fails as EC2 fails a spot
  request it has no capacity for (an `InsufficientInstanceCapacity` error from RunInstances);
- `start_delay_s: {gpu.a10g.spot: 90}`: a launch of that type returns only after that many
  seconds (a cold node booting, pulling its image and installing its packages).
"""
from __future__ import annotations

import time

from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

from rn50.distributed.rehearsal_provider import RehearsalNodeProvider


class InsufficientInstanceCapacity(Exception):
    """What botocore raises for EC2's error code of that name (its ClientError's message)."""


class RehearsalProvider(RehearsalNodeProvider):
    """The rehearsal's provider, refusing or delaying the launches its config names."""

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        node_type = tags[TAG_RAY_USER_NODE_TYPE]
        if node_type in self.provider_config.get("refuse_node_types", []):
            raise InsufficientInstanceCapacity(
                "An error occurred (InsufficientInstanceCapacity) when calling the RunInstances "
                f"operation (reached max retries: 0): We currently do not have sufficient "
                f"capacity for {node_type} in the Availability Zone you requested.")
        time.sleep(float(self.provider_config.get("start_delay_s", {}).get(node_type, 0)))
        return super().create_node_with_resources_and_labels(node_config, tags, count,
                                                             resources, labels)
