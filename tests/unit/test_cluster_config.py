"""cluster.yaml is right by construction: Ray's own validation, spot + IAM on every worker type,
recipes that fit the node types, and setup_commands pinned exactly like pyproject.toml.

Nothing here reaches AWS: `prepare_config` + `validate_config` are what `ray up` runs first.
"""
import copy
import math
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from rn50.config import RECIPES_DIR, load_config

REPO = Path(__file__).resolve().parents[2]
HEAD_RESOURCE = "head_driver"
ACCELERATOR_PREFIX = "accelerator_type:"  # what ScalingConfig(accelerator_type=X) requests


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def cluster(raw):
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _workers(cluster) -> dict:
    head = cluster["head_node_type"]
    return {name: t for name, t in cluster["available_node_types"].items() if name != head}


def _is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def _pinned(requirements) -> dict:
    """{name: Requirement} with names normalised, for comparing pins from two places."""
    return {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in map(Requirement, requirements)}


def test_ray_accepts_the_config(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert cluster["idle_timeout_minutes"] > 0 and cluster["max_workers"] > 0
    for name, node_type in cluster["available_node_types"].items():
        disks = node_type["node_config"]["BlockDeviceMappings"]
        assert disks[0]["Ebs"]["VolumeSize"] >= 200, f"{name}: the GPU image + torch need >= 200 GB"


def test_every_node_type_has_an_instance_profile(cluster):
    # Ray attaches its default profile to the head only: a worker without one cannot write
    # checkpoints to S3 (ray-project/ray#3115).
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name} has no instance profile"


def test_worker_types_are_spot_with_an_on_demand_fallback(cluster):
    workers = _workers(cluster)
    for name, node_type in workers.items():
        if name.endswith(".ondemand"):
            assert not _is_spot(node_type), f"{name} is named on-demand but asks for spot"
            twin = workers.get(name.replace(".ondemand", ".spot"))
            assert twin is not None, f"{name} is an on-demand fallback without a spot twin"
            assert twin["resources"] == node_type["resources"]
            assert twin["node_config"]["InstanceType"] == node_type["node_config"]["InstanceType"]
            # Autoscaler v2 tries the higher priority first and backs off from failed launches.
            assert twin["priority"] > node_type.get("priority", 0)
        else:
            assert _is_spot(node_type), f"{name} is not spot and not a named on-demand fallback"
    assert any(_is_spot(t) and t["resources"].get("GPU") for t in workers.values())
    # Only autoscaler v2 honours `priority`; spot instances cannot be stopped and cached.
    assert any("RAY_enable_autoscaler_v2=1" in c for c in cluster["head_start_ray_commands"])
    assert cluster["provider"]["cache_stopped_nodes"] is False


def test_driver_work_is_pinned_to_an_on_demand_head_without_cpus(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert not _is_spot(head)
    assert head["resources"].get(HEAD_RESOURCE, 0) >= 1
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    for name, node_type in _workers(cluster).items():
        assert HEAD_RESOURCE not in node_type["resources"], f"{name} could take a driver"
    assert '--entrypoint-resources \'{"head_driver": 1}\'' in (REPO / "docs/aws.md").read_text()


def _bundle(scaling) -> dict:
    """One training worker's resource request, as ScalingConfig builds it."""
    bundle = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        bundle["GPU"] = 1
    if scaling.accelerator_type:
        bundle[ACCELERATOR_PREFIX + scaling.accelerator_type] = 0.001
    return bundle


def _capacity(node_type: dict, bundle: dict) -> int:
    """How many workers of `bundle` all nodes of this type together can hold."""
    per_node = min(math.floor(node_type["resources"].get(k, 0) / v) for k, v in bundle.items())
    return per_node * node_type["max_workers"]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_can_be_scheduled_on_spot_and_on_the_fallback(cluster, recipe):
    scaling = load_config(recipe).scaling
    bundle, workers = _bundle(scaling), _workers(cluster)
    if scaling.use_gpu:
        assert scaling.accelerator_type, (
            f"{recipe}: a GPU recipe must name scaling.accelerator_type, or it may land on "
            "whichever GPU type is cheapest to fill")
    for market in ("spot", "ondemand"):
        fitting = {n: _capacity(t, bundle) for n, t in workers.items()
                   if n.endswith(f".{market}") and _capacity(t, bundle) > 0}
        if market == "ondemand" and not scaling.use_gpu:
            continue  # CPU work is cheap to retry: it has no on-demand fallback
        assert fitting, f"{recipe}: no {market} worker type fits one worker {bundle}"
        # Placement groups are gang-scheduled: all workers must fit one type's nodes at once.
        assert max(fitting.values()) >= scaling.num_workers, (
            f"{recipe}: {scaling.num_workers} workers of {bundle} exceed every {market} type "
            f"({fitting})")


def test_setup_commands_install_exactly_the_pyproject_pins(cluster):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    expected = _pinned(project["dependencies"])
    installs = [shlex.split(c) for c in cluster["setup_commands"] if c.startswith("pip install")]
    # The project itself, with its dependencies: pip resolves pyproject.toml's pins.
    assert any("/home/ray/rn50" in args and "--no-deps" not in args for args in installs)
    assert cluster["file_mounts"]["/home/ray/rn50"] == "."
    # Anything also named explicitly must carry the same pin.
    named = [a for args in installs for a in args[2:] if not a.startswith(("-", "/"))]
    for name, requirement in _pinned(named).items():
        assert name in expected, f"setup_commands install {name}, which pyproject.toml lacks"
        assert requirement.specifier == expected[name].specifier, (requirement, expected[name])
    # The image must already hold the pinned Ray, for the Python the project supports.
    image = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", cluster["docker"]["image"])
    assert image, cluster["docker"]["image"]
    assert expected["ray"].specifier.contains(image.group(1)), (image.group(1), expected["ray"])
    assert Requirement(f"python{project['requires-python']}").specifier.contains(
        f"{image.group(2)}.{image.group(3)}")


def test_mlflow_and_dashboard_are_not_opened_to_the_internet(raw, cluster):
    # Ray's default security group admits SSH from outside and everything from inside the
    # cluster; adding rules here would publish the unauthenticated MLflow server.
    assert "security_group" not in raw["provider"]
    mlflow = next(c for c in cluster["head_start_ray_commands"] if "mlflow server" in c)
    assert "--port 5000" in mlflow and "sqlite:////home/ray/mlflow/mlflow.db" in mlflow
    assert "--artifacts-destination s3://" in mlflow


def test_one_bucket_one_ami_and_one_region_everywhere(raw):
    text = (REPO / "cluster.yaml").read_text()
    regions = set(re.findall(r"AWS_REGION=(\S+)", text))
    assert regions == {raw["provider"]["region"]}, f"AWS_REGION {regions} vs the provider's"
    assert text.count("AWS_REGION=") >= 5, "every start command that touches S3 sets the region"
    buckets = set(re.findall(r"s3://([^/\s]+)/", text))
    assert len(buckets) == 1, f"one bucket everywhere (docs/aws.md edits it once), got {buckets}"
    images = {t["node_config"]["ImageId"] for t in raw["available_node_types"].values()}
    assert len(images) == 1, f"every node type uses the one GPU AMI, got {images}"


def test_the_local_rehearsal_has_the_same_node_types(cluster):
    local = prepare_config(yaml.safe_load((REPO / "cluster.local.yaml").read_text()))
    validate_config(local)
    provider = local["provider"]["module"]
    assert provider == "rn50.distributed.rehearsal_provider.RehearsalNodeProvider", provider
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from rn50.distributed.rehearsal_provider import RehearsalNodeProvider
    assert issubclass(RehearsalNodeProvider, FakeMultiNodeProvider)
    assert local["available_node_types"].keys() == cluster["available_node_types"].keys()
    assert local["head_node_type"] == cluster["head_node_type"] == "ray.head.default"
    for name, node_type in cluster["available_node_types"].items():
        fake = local["available_node_types"][name]
        labels = {k for k, v in node_type["resources"].items() if k != "CPU" and v}
        assert labels <= set(fake["resources"]), f"{name}: the rehearsal lacks {labels}"
        assert fake.get("priority", 0) == node_type.get("priority", 0)
    head = local["available_node_types"][local["head_node_type"]]["resources"]
    assert head == cluster["available_node_types"][cluster["head_node_type"]]["resources"]


MARKET = "rn50/market"


def test_worker_types_carry_the_market_label_that_label_selectors_ask_for(cluster):
    # The start policy asks for {rn50/market: spot}, then {rn50/market: on-demand}; v2
    # launches only a node type whose `labels` match a pending request's selector.
    for name, node_type in _workers(cluster).items():
        expected = "spot" if _is_spot(node_type) else "on-demand"
        assert node_type.get("labels", {}).get(MARKET) == expected, f"{name}: {MARKET} label"
        assert node_type["node_config"]["MetadataOptions"]["HttpTokens"] == "required", (
            f"{name}: IMDSv2, as the spot watcher speaks it")
    local = yaml.safe_load((REPO / "cluster.local.yaml").read_text())["available_node_types"]
    for name, node_type in cluster["available_node_types"].items():
        assert local[name].get("labels") == node_type.get("labels"), f"{name}: rehearsal labels"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_gpu_recipes_prefer_spot_and_bound_their_waits(recipe):
    scaling = load_config(recipe).scaling
    if scaling.use_gpu:
        assert scaling.prefer_spot, f"{recipe}: GPU recipes ask for spot first, then on-demand"
        # A cold node's launch + image pull + installs takes ~5-10 minutes on AWS: waited for by
        # its state up to node_start_timeout_s; a start with nothing launching ends in an hour.
        assert 600 <= scaling.node_start_timeout_s and 600 <= scaling.start_timeout_s <= 3600


def test_every_worker_starts_the_spot_watcher_after_ray_once(cluster):
    from rn50.distributed import spot_watcher
    commands = cluster["worker_start_ray_commands"]
    start = next(i for i, c in enumerate(commands) if "ray start" in c)
    watcher = next(i for i, c in enumerate(commands) if "rn50.distributed.spot_watcher" in c)
    assert watcher > start, "the node must be registered before the watcher looks it up"
    command = commands[watcher]
    # Kept alive like the head's backup loop, and never started twice by a re-run of `ray up`.
    assert command.startswith('kill -0 "$(cat /tmp/rn50-spot-watcher.pid') and "nohup" in command
    assert "echo $! > /tmp/rn50-spot-watcher.pid" in command
    assert ">> /tmp/ray/session_latest/logs/" in command, "logs where `ray logs` finds them"
    assert "RAY_AUTH_MODE=token" in command, "the drain must send the cluster's token"
    words = shlex.split(command.split("-m rn50.distributed.spot_watcher", 1)[1].split(">>")[0])
    args = spot_watcher.parser().parse_args(words)
    assert args.address == "$RAY_HEAD_IP:6379" and args.imds_url == spot_watcher.DEFAULT_IMDS_URL
    assert 0 < args.poll_s <= 10, "the notice comes 120 s ahead: poll well inside that"


def test_a_bare_job_trains_the_recipe_the_head_names(cluster):
    # `ray job submit -- python ray_jobs/train_full.py` with no --recipe trains $RN50_RECIPE
    # (rn50/io/job_defaults.py). Red if the head names none (the GPU cluster would train the
    # digits demo on two CPUs), a recipe that does not load, or one reading another bucket.
    start = next(c for c in cluster["head_start_ray_commands"] if "ray start --head" in c)
    named = dict(re.findall(r"\b(RN50_RECIPE|RN50_STORAGE)=(\S+)", start))
    assert named.keys() == {"RN50_RECIPE", "RN50_STORAGE"}, start
    config = load_config(named["RN50_RECIPE"])
    assert config.scaling.use_gpu, f"{named['RN50_RECIPE']}: the cluster is for GPU training"
    # docs/aws.md's one sed fills the bucket in cluster.yaml and the recipes alike.
    bucket = re.match(r"s3://([^/]+)/", named["RN50_STORAGE"]).group(1)
    assert config.data.root.startswith(f"s3://{bucket}/"), config.data.root
    fill_in = next(line for line in (REPO / "docs/aws.md").read_text().splitlines()
                   if line.startswith("sed -i") and "YOUR-BUCKET" in line)
    assert fill_in.endswith("cluster.yaml rn50/recipes/*.yaml"), fill_in


def test_the_heads_mlflow_folder_is_the_hosts_so_a_new_container_keeps_it(cluster):
    # Red if the sqlite database (or the backup status a job reads) lives in the container's own
    # filesystem, which a re-created container loses, or if a pid file is kept where it outlives
    # its process (a new container would trust a pid that names another process, or none).
    folder = "/home/ray/mlflow"
    mounts = [option.split()[1].split(":") for option in cluster["docker"]["head_run_options"]
              if option.startswith("-v ")]
    hosts = [host for host, inside in mounts if inside == folder]
    assert len(hosts) == 1 and hosts[0].startswith("/") and not hosts[0].startswith("/tmp"), \
        mounts  # /tmp is emptied at boot
    assert not any(folder in o for o in cluster["docker"]["run_options"] +
                   cluster["docker"].get("worker_run_options", [])), "the head's alone"
    commands = cluster["head_start_ray_commands"]
    server = next(c for c in commands if "mlflow server" in c)
    assert f"sqlite:///{folder}/mlflow.db" in server and f">> {folder}/server.log" in server
    start = next(c for c in commands if "ray start --head" in c)
    assert f"RN50_MLFLOW_BACKUP_STATUS={folder}/mlflow.db.backup-status.json" in start
    restore, loop = (next(c for c in commands if f"mlflow_backup {action}" in c)
                     for action in ("restore", "loop"))
    assert f"--db {folder}/mlflow.db" in restore and f"--db {folder}/mlflow.db" in loop
    assert commands.index(restore) < commands.index(server), "restore before the server opens it"
    pid_files = re.findall(r"echo \$! > (\S+)\)", " ".join(commands))
    assert pid_files and not any(p.startswith(folder) for p in pid_files), pid_files
    # Docker creates a missing host folder as root: the container's user must own it.
    assert any("chown" in c and folder in c for c in cluster["head_setup_commands"])
