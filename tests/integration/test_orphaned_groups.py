"""After its Train controller died, a run frees the placement groups its job still holds with no
live actor (the dead controller's worker group), and nothing else: red if an orphan keeps the
job's own CPUs reserved (the next start would wait for them, then end with exit code 4), or if a
group in use is taken from its actor."""
import pytest
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rn50.distributed.capacity import release_orphaned_placement_groups

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=1)
class Holder:
    def ready(self) -> bool:
        return True


def test_a_dead_controllers_group_is_freed_and_a_group_in_use_is_kept():
    ray.init(address="local", num_cpus=2, include_dashboard=True)
    try:
        orphan, used = placement_group([{"CPU": 1}]), placement_group([{"CPU": 1}])
        ray.get([orphan.ready(), used.ready()], timeout=60)
        holder = Holder.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
        ray.get(holder.ready.remote(), timeout=60)
        removed = release_orphaned_placement_groups()
        assert removed == [orphan.id.hex()], (removed, orphan.id.hex(), used.id.hex())
        # The orphan's CPU is free again; the holder's group and actor are untouched.
        assert ray.get(holder.ready.remote(), timeout=30)
        freed = placement_group([{"CPU": 1}])
        ray.get(freed.ready(), timeout=30)
    finally:
        ray.shutdown()
