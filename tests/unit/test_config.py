"""Config: recipes load, overrides coerce types, mistakes name the key."""
import pytest
import yaml

from rn50.config import RECIPES_DIR, Config, ConfigError, load_config


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_builtin_recipe_loads(recipe):
    config = load_config(recipe)
    assert config.train.epochs > 0


def test_overrides_coerce_types():
    config = load_config("demo", ["optim.lr=0.2", "train.epochs=3", "data.hflip=true",
                                  "schedule.step_milestones_epochs=[1, 2]",
                                  "optim.weight_decay=1e-4"])
    assert config.optim.lr == 0.2 and isinstance(config.optim.lr, float)
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.data.hflip is True
    assert config.schedule.step_milestones_epochs == [1, 2]
    assert config.optim.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.2", "unknown config key 'optim.lrr'"),
    ("optimizer.lr=0.2", "unknown config section 'optimizer'"),
    ("train.epochs=three", "'train.epochs' expects int"),
    ("train.epochs=2.5", "'train.epochs' expects int"),
    ("data.hflip=maybe", "'data.hflip' expects bool"),
    ("optim.lr=-1", "'optim.lr' must be > 0"),
    ("schedule.decay=exp", "'schedule.decay' must be one of"),
    ("optim.label_smoothing=1.5", "'optim.label_smoothing' must be in [0, 1)"),
    ("train.global_batch_size=63", "divisible by the most workers, 2 ('scaling.num_workers')"),
    ("scaling.num_workers=[2,1]", "[min, max] with 1 <= min <= max"),
    ("scaling.num_workers=two", "'scaling.num_workers' expects int or list[int]"),
    ("train.micro_batch_size=5", "'train.micro_batch_size' (5) must divide"),
    ("train.micro_batch_size=64", "too few for 2 workers"),
    ("lr=0.2", "must look like section.field=value"),
    ("data.auto_augment=randaug", "'data.auto_augment' must be one of"),
    ("data.random_erasing_prob=1.0", "'data.random_erasing_prob' must be in [0, 1)"),
    ("data.random_erasing_prob=-0.1", "'data.random_erasing_prob' must be in [0, 1)"),
    ("model.stochastic_depth_prob=1", "'model.stochastic_depth_prob' must be in [0, 1)"),
    ("train.mixup_alpha=-0.2", "'train.mixup_alpha' must be >= 0"),
    ("train.cutmix_alpha=.nan", "'train.cutmix_alpha' must be a finite number"),
    ("train.mixup_alpha=.inf", "'train.mixup_alpha' must be a finite number"),
    ("data.repeated_augmentations=0", "'data.repeated_augmentations' must be >= 1"),
    ("data.repeated_augmentations=2.5", "'data.repeated_augmentations' expects int"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert fragment in str(err.value)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(ConfigError, match="built-in recipes: .*demo"):
        load_config("no_such_recipe")


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config("imagenet_90ep", ["optim.lr=0.3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(str(path)) == config


def test_peak_lr_scales_with_global_batch():
    config = load_config("imagenet_90ep", ["train.global_batch_size=2048"])
    assert config.peak_lr == pytest.approx(0.1 * 2048 / 256)


def test_flat_keys_are_dotted():
    flat = Config().flat()
    assert flat["optim.lr"] == 0.1 and "scaling.num_workers" in flat


def test_invalid_yaml_recipe(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def _documented_fields() -> set[str]:
    """`section.field` for every dataclass field followed by a docstring in config_sections.py."""
    import ast
    tree = ast.parse((RECIPES_DIR.parent / "config_sections.py").read_text())
    documented = set()
    for section in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for field_node, following in zip(section.body, section.body[1:]):
            if isinstance(field_node, ast.AnnAssign) and isinstance(following, ast.Expr) and \
                    isinstance(following.value, ast.Constant) and following.value.value.strip():
                documented.add(f"{section.name}.{field_node.target.id}")
    return documented


def test_every_field_has_a_docstring():
    documented = _documented_fields()
    for name, section in vars(Config()).items():
        for key in vars(section):
            assert f"{type(section).__name__}.{key}" in documented, f"{name}.{key}"
    assert yaml.safe_load(Config().to_yaml())["optim"]["lr"] == 0.1


def test_a_recipe_builds_on_its_base():
    fast_24, fast_88 = load_config("imagenet_fast_24"), load_config("imagenet_fast_88")
    assert fast_24.train.epochs == 24 and fast_88.train.epochs == 88
    assert (fast_24.data.progressive_start_epoch, fast_24.data.progressive_end_epoch) == (17, 20)
    assert fast_24.optim == fast_88.optim and fast_24.schedule == fast_88.schedule
    assert fast_24.data.val_crop_px == 256 > fast_24.data.train_crop_px  # test res above train


def test_a_recipe_that_is_its_own_base_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(str(tmp_path / "a.yaml"))


def test_progressive_resizing_bounds_are_checked():
    with pytest.raises(ConfigError, match="progressive_min_px"):
        load_config("demo", ["data.progressive_min_px=64"])  # above the 32 px crop
    with pytest.raises(ConfigError, match="progressive_start_epoch"):
        load_config("demo", ["data.progressive_min_px=16", "data.progressive_start_epoch=5",
                             "data.progressive_end_epoch=2"])


def test_the_regularizers_are_off_by_default_and_in_the_demo():
    off = {"data.auto_augment": "none", "data.random_erasing_prob": 0.0,
           "data.repeated_augmentations": 1, "train.mixup_alpha": 0.0, "train.cutmix_alpha": 0.0,
           "model.stochastic_depth_prob": 0.0}
    for config in (Config(), load_config("demo")):
        assert {key: config.flat()[key] for key in off} == off


def test_the_regularizers_accept_their_documented_values():
    config = load_config("demo", ["data.auto_augment=trivialaugment_wide",
                                  "data.random_erasing_prob=0.25", "data.repeated_augmentations=4",
                                  "train.mixup_alpha=0.2", "train.cutmix_alpha=1",
                                  "model.stochastic_depth_prob=0.05"])
    assert config.data.repeated_augmentations == 4 and config.train.cutmix_alpha == 1.0
