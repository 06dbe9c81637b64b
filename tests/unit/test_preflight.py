"""The data set checked before any worker starts (rn50/data/preflight.py), on tiny data sets in
their real layouts: the mistakes a first run makes get a message saying what was found and what
to set, and the right layouts pass with a summary."""
import pytest

from rn50.config import load_config
from rn50.data.common import DataError
from rn50.data.preflight import check_data
from tests.ilsvrc_fixture import make_hf_parquet, make_ilsvrc


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A 4-class ImageNet as class folders and as HF parquet shards."""
    root = tmp_path_factory.mktemp("imagenet")
    labels = make_ilsvrc(root / "folders", per_class=2, val_per_class=1)
    make_hf_parquet(root / "folders", labels, root / "parquet")
    return root


def _data(recipe: str, *overrides: str):
    return load_config(recipe, list(overrides)).data


def test_the_right_layouts_pass_with_what_was_found(imagenet):
    assert check_data(_data("imagenet_fast_16", f"data.root={imagenet / 'parquet'}",
                            "data.num_classes=4")) == "2 train and 2 val shards, 4 classes"
    # val/ here is flat + a CSV: the folder count comes from train/
    assert check_data(_data("imagenet_fast_16", "data.dataset=imagefolder",
                            f"data.root={imagenet / 'folders'}", "data.num_classes=4")) == \
        "4 class folders"


def test_shards_expected_where_class_folders_are_says_which_layout_it_found(imagenet):
    # Red if the message did not name the layout it found and the setting that would fit it.
    with pytest.raises(DataError, match=r"no parquet shards for split 'train'.*found there: "
                                        r"\[.*'train/'.*\]; it holds class folders: set "
                                        r"data\.dataset=imagefolder"):
        check_data(_data("imagenet_fast_16", f"data.root={imagenet / 'folders'}"))


def test_an_empty_or_missing_root_a_typo_and_the_wrong_class_count_are_named(imagenet, tmp_path):
    with pytest.raises(DataError, match="is empty or does not exist"):
        check_data(_data("imagenet_fast_16", f"data.root={tmp_path / 'imagenett'}"))
    with pytest.raises(DataError, match=r"4 classes but data\.num_classes is 1000: set "
                                        r"data\.num_classes=4"):
        check_data(_data("imagenet_fast_16", f"data.root={imagenet / 'parquet'}"))
    with pytest.raises(DataError, match=r"4 class folders but data\.num_classes is 1000"):
        check_data(_data("imagenet_fast_16", "data.dataset=imagefolder",
                         f"data.root={imagenet / 'folders'}"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"has no val/ folder \(found \['train/'\]\)"):
        check_data(_data("imagenet_fast_16", "data.dataset=imagefolder", f"data.root={tmp_path}"))


def test_data_sets_the_workers_prepare_are_left_to_them():
    assert check_data(_data("demo")) == "digits: prepared by the workers"
