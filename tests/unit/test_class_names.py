"""ImageNet's readable names, from every source kind to the shard manifest, training's class names,
the checkpoint's model and its exports: `n01440764` reads `tench` everywhere, the wnid kept
beside."""
import json
import random

import pytest

from rn50.config import DataConfig, load_config
from rn50.data.class_names import imagenet_names, imagenet_wnids, readable_classes, wnid_names
from rn50.data.imagenet_shards import plan_shards, write_manifest, write_shard
from rn50.data.imagenet_sources import list_source
from rn50.data.loaders import build_datasets, dataset_classes
from rn50.serve.artifacts import class_labels_for, load_model
from rn50.serve.export import model_card
from tests.ilsvrc_fixture import WNIDS, make_hf_parquet, make_ilsvrc, make_tars
from tests.model_helpers import write_checkpoint

KNOWN = {"n01440764": "tench", "n02102040": "English springer", "n03000684": "chain saw",
         "n03888257": "parachute", "n04037443": "racer", "n02012849": "crane bird",
         "n03126707": "crane", "n15075141": "toilet tissue"}
NAMES = ["tench", "English springer", "chain saw", "parachute"]  # of the fixture's WNIDS


def test_the_wnid_list_is_imagenets_1000_in_sorted_order_with_known_names():
    wnids, names = imagenet_wnids(), imagenet_names()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert len(set(names)) == 1000  # unique, so a name identifies its class
    assert {w: wnid_names()[w] for w in KNOWN} == KNOWN
    assert wnids.index("n02102040") == 217 and wnids.index("n03000684") == 491


def test_labels_of_every_kind_get_readable_names():
    assert readable_classes(WNIDS) == (NAMES, WNIDS)
    assert readable_classes(["n09999999", "n01440764"]) == (["n09999999", "tench"],
                                                            ["n09999999", "n01440764"])
    hf_style = [f"{name}, {name.upper()}" for name in imagenet_names()]  # "tench, TENCH", ...
    assert readable_classes(hf_style) == (imagenet_names(), imagenet_wnids())
    assert readable_classes(imagenet_names()) == (imagenet_names(), imagenet_wnids())
    shuffled = random.Random(0).sample(hf_style, 1000)  # not ImageNet's order: kept as is
    assert readable_classes(shuffled) == (shuffled, None)
    assert readable_classes(["cats", "n01440764"]) == (["cats", "tench"], None)
    assert readable_classes([str(d) for d in range(10)]) == ([str(d) for d in range(10)], None)


@pytest.fixture(scope="module")
def sources(module_tmp):
    root = module_tmp
    labels = make_ilsvrc(root / "folders")
    make_tars(root / "folders", root / "tars")
    make_hf_parquet(root / "folders", labels, root / "hf")
    hf_names = [f"{name}, latin name" for name in imagenet_names()]  # HF lists all 1000
    make_hf_parquet(root / "folders", labels, root / "hf_named", label_names=hf_names,
                    label_wnids=imagenet_wnids())
    return root


def _prepare(source: str, out: str) -> dict:
    """prepare_imagenet without Ray: list, write every shard, write the manifest."""
    options = {"source": source, "max_px": 0, "images_per_shard": 16, "seed": 0}
    entries, classes = [], None
    for split in ("train", "val"):
        records, classes = list_source(source, split, classes)
        entries += [write_shard(item, out, classes, options)
                    for item in plan_shards(records, split, 16, 0)]
    return write_manifest(out, entries, classes, options)


@pytest.mark.parametrize("kind", ["folders", "tars", "hf", "hf_named"])
def test_each_source_carries_names_and_wnids_to_the_manifest_and_training(kind, sources, tmp_path):
    manifest = _prepare(str(sources / kind), str(tmp_path / "out"))
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    if kind == "hf_named":  # all 1000 classes, named by torchvision, wnids by index
        assert manifest["classes"] == imagenet_names()
        assert on_disk["class_wnids"] == imagenet_wnids()
        expected = (imagenet_names(), imagenet_wnids())
    else:
        assert on_disk["classes"] == NAMES and on_disk["class_wnids"] == WNIDS
        expected = (NAMES, WNIDS)
    data_cfg = DataConfig(dataset="parquet", root=str(tmp_path / "out"),
                          num_classes=len(expected[0]))
    train, val, names = build_datasets(data_cfg)  # what the worker saves as class_names
    assert (names, dataset_classes(train)[1]) == expected
    image_names = [n.split("_")[0] for n in _paths(train)]  # the wnid prefix of each train file
    assert [names[label] for _, label in (train[i] for i in range(4))] == \
        [wnid_names()[w] for w in image_names]


def _paths(dataset) -> list[str]:
    import pyarrow.parquet as pq
    table = pq.read_table(dataset.files[0], filesystem=dataset.fs, columns=["image"])
    return table.column("image").combine_chunks().field("path").to_pylist()[:4]


def test_class_folders_of_wnids_train_with_readable_names(sources):
    data_cfg = DataConfig(dataset="imagefolder", root=str(sources / "folders"), num_classes=4)
    train, _, names = build_datasets(data_cfg)
    assert names == NAMES and dataset_classes(train) == (NAMES, WNIDS)


def test_checkpoints_old_and_new_serve_names_with_wnids_beside(tmp_path):
    config = load_config("demo", [f"data.root={tmp_path}", "data.num_classes=4"])
    old = write_checkpoint(tmp_path / "old", config, extra={"class_names": WNIDS})
    new = write_checkpoint(tmp_path / "new", config,
                           extra={"class_names": NAMES, "class_wnids": WNIDS})
    for directory in (old, new):
        loaded = load_model(str(directory))
        assert loaded.classifier.class_names == NAMES and loaded.classifier.class_wnids == WNIDS
        card = model_card(loaded)  # every export and the Space carry this card
        assert card["class_names"] == NAMES and card["class_wnids"] == WNIDS
    digits = load_config("demo", [f"data.root={tmp_path}"])
    assert class_labels_for(digits) == ([str(d) for d in range(10)], None)
    imagenet = load_config("imagenet_90ep", [f"data.root={tmp_path / 'absent'}"])
    assert class_labels_for(imagenet) == (imagenet_names(), imagenet_wnids())
