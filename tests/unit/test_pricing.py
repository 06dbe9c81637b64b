"""Cost arithmetic without a Ray cluster: uptime overlap, the price table, unknown types, the
budget, node labels, and live spot prices from a fake EC2 API on loopback (a real HTTP server
speaking EC2's protocol)."""
import logging

import pytest

from rn50.config import ConfigError, load_config
from rn50.io import pricing
from rn50.io.pricing import CostBasis, NodeSpan, Prices
from tests.fake_ec2 import FakeEc2
from tests.fake_imds import FakeImds

HEAD = NodeSpan("h", "ray.head.default", "on-demand", start_s=0.0)
SPOT = NodeSpan("s", "gpu.a10g.spot", "spot", start_s=1800.0, end_s=5400.0)
TABLE = Prices({"ray.head.default": 0.4, "gpu.a10g.spot": 0.5, "gpu.a10g.ondemand": 1.2})


def test_each_node_costs_its_price_times_its_uptime_within_the_window():
    # Red if a node is counted outside the window, or after it died (the spot node, 1 h up).
    window = (3600.0, 7200.0)  # the head all of it, the spot node 3600..5400 = half an hour
    assert pricing.cost_usd([HEAD, SPOT], TABLE, *window) == pytest.approx(0.4 + 0.25)
    assert pricing.usd_per_hour([HEAD, SPOT], TABLE) == pytest.approx(0.4)  # the dead one is free
    unknown_start = NodeSpan("x", "", "", start_s=None)  # counted from the window's start
    assert pricing.cost_usd([unknown_start], Prices(local=3600.0), 10.0, 12.5) == pytest.approx(2.5)


def test_local_nodes_cost_nothing_unless_priced():
    laptop = NodeSpan("l", "", "", start_s=0.0)
    assert pricing.cost_usd([laptop], Prices.from_config(load_config("demo").cost), 0, 3600) == 0
    assert pricing.cost_usd([laptop], TABLE, 0, 3600) == 0  # a table prices typed nodes only


def test_an_unknown_node_type_is_a_clear_error_naming_the_key():
    # Red if the preflight let an unpriced node type through (its cost would be a guess), or
    # priced a typed node at $0 because the table is empty.
    with pytest.raises(pricing.PricingError, match=r"gpu\.a100x8\.spot.*cost\.usd_per_hour"):
        TABLE.require_known({"ray.head.default", "gpu.a100x8.spot"})
    with pytest.raises(pricing.PricingError, match=r"ray\.head\.default.*Nothing was started"):
        Prices().require_known({"ray.head.default", ""})
    Prices().require_known({""})  # a node without a type (a local Ray) costs local: 0
    # Mid-run (a node launched after the check) the dearest price: a budget must not overspend.
    assert TABLE.price(NodeSpan("p", "gpu.a100x8.spot", "spot", 0.0)) == 1.2


def test_one_table_prices_every_recipe_and_a_recipe_overrides_a_row(tmp_path):
    # Red if a recipe carried no prices (every node $0, budgets never stop: the old p4d
    # recipes), or the override replaced the table instead of changing one row.
    for recipe in ("imagenet_90ep", "imagenet_fast_16", "imagenet_a10g_spot", "demo"):
        prices = Prices.from_config(load_config(recipe).cost)
        assert prices.by_type["gpu.a100x8.ondemand"] == 21.96, recipe
        assert prices.instance_types["gpu.a100x8.spot"] == "p4d.24xlarge", recipe
    cost = load_config("demo", ["cost.usd_per_hour={gpu.a10g.spot: 0.6}"]).cost
    prices = Prices.from_config(cost)
    assert prices.by_type["gpu.a10g.spot"] == 0.6 and prices.by_type["cpu.spot"] == 1.36
    own = tmp_path / "prices.yaml"
    own.write_text("node_types:\n  gpu.x: {instance_type: g6.xlarge, market: spot, "
                   "on_demand_usd_per_hour: 0.8}\n")
    mine = Prices.from_config(load_config("demo", [f"cost.price_table={own}"]).cost)
    assert mine.by_type == {"gpu.x": 0.8} and mine.instance_types == {"gpu.x": "g6.xlarge"}
    assert Prices.from_config(load_config("demo", ["cost.price_table=none"]).cost).by_type == {}
    own.write_text("node_types:\n  gpu.x: {market: spot}\n")
    with pytest.raises(pricing.PricingError, match="cannot be read as a price table"):
        Prices.from_config(load_config("demo", [f"cost.price_table={own}"]).cost)


@pytest.mark.parametrize("env, expected", [
    ({"AWS_REGION": "eu-west-1"}, "eu-west-1"),
    ({"AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"),
    ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "ap-south-1"}, "eu-west-1"),
])
def test_the_spot_region_comes_from_the_config_or_the_aws_environment(monkeypatch, env, expected):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert pricing.spot_region(load_config("demo").cost) == expected
    assert pricing.spot_region(load_config("demo", ["cost.region=us-west-2"]).cost) == "us-west-2"


def test_the_spot_region_falls_back_to_the_instances_own_region(monkeypatch):
    # Red if a head with no region in its environment asked EC2 in no region (NoRegionError):
    # IMDS (a fake one on loopback, IMDSv2 tokens and all) knows where the instance runs.
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    imds = FakeImds().start()
    try:
        imds.values["/latest/meta-data/placement/region"] = "eu-central-1"
        monkeypatch.setenv("RN50_IMDS_URL", imds.url)
        assert pricing.spot_region(load_config("demo").cost) == "eu-central-1"
    finally:
        imds.stop()
    monkeypatch.setenv("RN50_IMDS_URL", imds.url)  # stopped: no region anywhere
    assert pricing.spot_region(load_config("demo").cost) == ""


def test_the_budget_stops_before_an_epoch_that_would_cross_it():
    basis = CostBasis(TABLE, since_s=100.0, spent_before_usd=2.0, run_s_before=50.0,
                      budget_usd=3.0)
    assert basis.total_usd([HEAD], now_s=100.0 + 3600) == pytest.approx(2.4)
    assert basis.run_s(100.0 + 10) == 60  # the step keeps counting over starts
    assert not basis.crosses_budget(2.4, rate_usd_per_h=3600.0, epoch_s=0.5)  # 2.9 <= 3
    assert basis.crosses_budget(2.4, rate_usd_per_h=3600.0, epoch_s=0.7)  # 3.1 > 3
    assert not CostBasis(TABLE, 0.0).crosses_budget(1e9, 1e9, 1e9)  # 0 = no budget


def test_a_budget_already_spent_is_refused_with_what_to_set():
    pricing.check_budget(0, 99.0, "r")  # no budget
    pricing.check_budget(100.0, 99.0, "r")
    with pytest.raises(pricing.BudgetError, match=r"already cost \$99\.00.*above 99\.00"):
        pricing.check_budget(50.0, 99.0, "r")


@pytest.mark.parametrize("override, fragment", [
    ("cost.usd_per_hour={gpu.a10g.spot: -1}", "cost.usd_per_hour[gpu.a10g.spot]"),
    ("cost.usd_per_hour=[0.5]", "expects a mapping"),
    ("train.budget_usd=-5", "train.budget_usd"),
    ("cost.ec2_instance_types={gpu.x: g5.xlarge}", "without a price"),
])
def test_bad_price_config_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        Prices.from_config(load_config("demo", [override]).cost)


def test_the_table_prices_every_node_type_of_cluster_yaml_as_it_launches_it():
    # Red if cluster.yaml gains a node type the table cannot price (every recipe's preflight
    # would fail on it), or the table's instance type or market disagree with cluster.yaml.
    import yaml
    from rn50.config import RECIPES_DIR
    cluster = yaml.safe_load((RECIPES_DIR.parents[1] / "cluster.yaml").read_text())
    table = pricing.read_price_table(load_config("demo").cost)
    assert set(cluster["available_node_types"]) == set(table)
    for name, spec in cluster["available_node_types"].items():
        config = spec["node_config"]
        assert table[name].instance_type == config["InstanceType"], name
        spot = config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        assert table[name].market == ("spot" if spot else "on-demand"), name


HISTORY = [  # two zones, two times each: the newest of each zone, the dearer zone wins
    {"InstanceType": "g5.2xlarge", "ProductDescription": "Linux/UNIX", "SpotPrice": "0.4000",
     "Timestamp": "2026-12-01T08:00:00.000Z", "AvailabilityZone": "us-east-1a"},
    {"InstanceType": "g5.2xlarge", "ProductDescription": "Linux/UNIX", "SpotPrice": "0.9000",
     "Timestamp": "2026-12-01T06:00:00.000Z", "AvailabilityZone": "us-east-1a"},
    {"InstanceType": "g5.2xlarge", "ProductDescription": "Linux/UNIX", "SpotPrice": "0.4500",
     "Timestamp": "2026-12-01T07:00:00.000Z", "AvailabilityZone": "us-east-1b"},
    {"InstanceType": "p4d.24xlarge", "ProductDescription": "Linux/UNIX", "SpotPrice": "9.0",
     "Timestamp": "2026-12-01T07:00:00.000Z", "AvailabilityZone": "us-east-1b"},
]


def _cost(url: str, *extra: str):
    return load_config("demo", [
        "cost.price_table=none", "cost.usd_per_hour={gpu.a10g.spot: 0.6, gpu.a10g.ondemand: 1.2}",
        "cost.ec2_instance_types={gpu.a10g.spot: g5.2xlarge, gpu.a10g.ondemand: g5.2xlarge}",
        f"cost.ec2_endpoint_url={url}", *extra]).cost


def test_spot_nodes_get_the_live_spot_price_from_ec2_with_only_aws_region_set(monkeypatch):
    # Red if the request is not what EC2 expects, the XML is misread, an on-demand node of the
    # same instance type is priced as spot, or the lookup needs AWS_DEFAULT_REGION (botocore's
    # variable) while cluster.yaml sets AWS_REGION (NoRegionError: spot priced from the table).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with FakeEc2(HISTORY) as ec2:
        cost = _cost(ec2.url)
        live = pricing.spot_prices(cost)
    assert live == {"g5.2xlarge": 0.45}
    form = ec2.requests[0]
    assert form["Action"] == ["DescribeSpotPriceHistory"]
    assert form["InstanceType.1"] == ["g5.2xlarge"] and "InstanceType.2" not in form
    assert form["ProductDescription.1"] == ["Linux/UNIX"] and form["StartTime"]
    assert ec2.regions == ["us-east-1"]  # the request was signed for the cluster's region
    prices = pricing.with_spot_prices(Prices.from_config(cost), live)
    assert prices.price(NodeSpan("s", "gpu.a10g.spot", "spot", 0.0)) == 0.45
    assert prices.price(NodeSpan("o", "gpu.a10g.ondemand", "on-demand", 0.0)) == 1.2


def test_when_ec2_refuses_the_table_prices_spot_nodes(monkeypatch, caplog):
    # Red if a refused key (or any EC2 error) crashed the run instead of falling back to the
    # table; the same path catches botocore's NoCredentialsError.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with FakeEc2(HISTORY, refuse=True) as ec2, caplog.at_level(logging.WARNING):
        assert pricing.spot_prices(_cost(ec2.url, "cost.region=us-east-1")) == {}
    assert ec2.requests and "AuthFailure" in caplog.text
    assert "priced from the price table" in caplog.text


def test_a_node_is_typed_by_its_node_group_label_and_market_label():
    # Red if the labels the autoscaler sets (ray.io/node-group from RAY_NODE_TYPE_NAME, verified
    # on the fake cluster's head) or cluster.yaml's rn50/market were misread.
    from rn50.distributed.cost import _span
    node = _span("n1", {"ray.io/node-group": "gpu.a10g.spot", "rn50/market": "spot"},
                 1_000_000, None)
    assert node == NodeSpan("n1", "gpu.a10g.spot", "spot", 1000.0, None)
    assert _span("n2", {"ray.io/market-type": "ON-DEMAND"}, 0, 2000).market == "on-demand"
    assert _span("n3", None, None, None) == NodeSpan("n3", "", "", None, None)
