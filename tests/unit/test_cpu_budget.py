"""`auto` torch threads and loader workers fit the node: the nodes cluster.yaml launches, a
laptop, explicit numbers passed through, and the oversubscription the old recipes had flagged."""
import pytest

from rn50.config import load_config
from rn50.config_sections import AUTO
from rn50.data.cpu_budget import plan_cpus


@pytest.mark.parametrize("node, cpus, gpus, reserved, expected", [
    ("p4d.24xlarge, 8x A100", 96, 8, 11, (1, 10, 12)),
    ("p5.48xlarge, 8x H100", 192, 8, 23, (1, 22, 24)),
    ("g5.2xlarge, 1x A10G", 8, 1, 8, (1, 6, 8)),
    ("a 2-GPU box with 4 CPUs", 4, 2, 2, (1, 0, 2)),
])
def test_auto_on_a_gpu_node_takes_its_cpus_per_gpu(node, cpus, gpus, reserved, expected):
    plan = plan_cpus(AUTO, AUTO, cpus, gpus, reserved, trains_on_gpu=True)
    assert (plan.torch_threads, plan.loader_workers, plan.cpus) == expected, node
    assert not plan.oversubscribed
    assert f"{cpus} CPUs / {gpus} GPUs on this node" in plan.line()


@pytest.mark.parametrize("reserved, expected", [(1, (1, 0, 1)), (2, (2, 0, 2)), (8, (2, 0, 2))])
def test_auto_on_a_2_core_laptop_cpu_run(reserved, expected):
    """On the CPU the step is the work: the reserved CPUs (at most the node's) are its threads."""
    plan = plan_cpus(AUTO, AUTO, 2, 0, reserved, trains_on_gpu=False)
    assert (plan.torch_threads, plan.loader_workers, plan.cpus) == expected


def test_a_gpu_node_whose_worker_trains_on_the_cpu_sizes_as_the_cpu():
    """A rehearsal's fake GPU node (scaling.cpu_stands_in_for_gpu): torch sees no GPU."""
    plan = plan_cpus(AUTO, AUTO, 2, 8, 1, trains_on_gpu=False)
    assert (plan.torch_threads, plan.loader_workers, plan.cpus) == (1, 0, 1)


def test_numbers_pass_through_and_auto_fills_the_rest():
    assert (plan_cpus(4, 10, 96, 8, 11, True).torch_threads,
            plan_cpus(4, 10, 96, 8, 11, True).loader_workers) == (4, 10)
    assert plan_cpus(2, AUTO, 96, 8, 11, True).loader_workers == 9  # 12 - 2 threads - 1
    assert plan_cpus(AUTO, 3, 96, 8, 11, True).torch_threads == 1
    assert plan_cpus(AUTO, 1, 8, 0, 8, False).torch_threads == 7  # the CPUs the loader leaves


def test_the_old_a100_settings_are_flagged_as_oversubscribed():
    """4 threads + 10 loaders per GPU on a p4d's 12 vCPUs per GPU: what issue 24 found."""
    plan = plan_cpus(4, 10, 96, 8, 11, trains_on_gpu=True)
    assert plan.oversubscribed and "more threads and processes than CPUs" in plan.line()


def test_the_demo_keeps_its_numbers_and_the_gpu_recipes_size_from_the_node():
    demo = load_config("demo")
    assert (demo.train.torch_threads, demo.data.loader_workers) == (1, 0)
    for recipe in ("imagenet_90ep", "imagenet_fast_88", "imagenet_tv2", "imagenet_h100",
                   "imagenet_a10g_spot", "imagenette"):
        config = load_config(recipe)
        assert (config.train.torch_threads, config.data.loader_workers) == (AUTO, AUTO), recipe


@pytest.mark.parametrize("override", ["train.torch_threads=0", "data.loader_workers=-1",
                                      "data.loader_workers=atuo", "train.torch_threads=many"])
def test_anything_but_a_count_or_auto_is_refused_with_the_key(override):
    with pytest.raises(ValueError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("demo", [override])
