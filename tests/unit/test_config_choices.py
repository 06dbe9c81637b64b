"""Config choices are declared once, as `Literal[...]` fields, and the code that switches on a
field handles exactly its declared values (a choice added to one side only turns this red)."""
import pytest

from rn50.config import Config, ConfigError, coerce, load_config
from rn50.config_sections import (Arch, AutoAugment, Decay, ImagenetteSize, ScheduleConfig,
                                  choices)
from rn50.config_validation import choice_fields, validate
from rn50.core.model import ARCH_CHANGES
from rn50.core.schedule import lr_multiplier
from rn50.data.transforms import AUTO_AUGMENT_POLICIES, auto_augment_policy


def test_every_choice_field_is_found_from_its_annotation():
    fields = choice_fields(Config())
    assert fields["model.arch"] == ("resnet50", "resnet50d", "resnet50_blurpool")
    assert fields["data.imagenette_size_px"] == (160, 320, 0)
    assert {"data.dataset", "data.auto_augment", "schedule.decay", "train.amp_dtype",
            "train.ray_log_level", "checkpoint.keep_best_by"} <= set(fields)


def test_the_code_that_switches_on_a_choice_covers_exactly_its_values():
    assert tuple(ARCH_CHANGES) == choices(Arch)
    assert tuple(AUTO_AUGMENT_POLICIES) == choices(AutoAugment)
    for decay in choices(Decay):  # each one a schedule of its own, none refused
        assert lr_multiplier(5, 10, 2, ScheduleConfig(decay=decay, warmup_epochs=0)) > 0
    with pytest.raises(ValueError, match=r"must be one of \['step', 'cosine', 'linear'\]"):
        lr_multiplier(5, 10, 2, ScheduleConfig(decay="exp", warmup_epochs=0))
    with pytest.raises(ValueError, match="must be one of .*'randaugment'"):
        auto_augment_policy("randaug")


@pytest.mark.parametrize("text, value", [("320", 320), ("0", 0), (160.0, 160)])
def test_coerce_reads_a_numeric_choice_from_the_command_line(text, value):
    got = coerce("data.imagenette_size_px", text, ImagenetteSize)
    assert got == value and type(got) is int


@pytest.mark.parametrize("override", ["data.imagenette_size_px=false",
                                      "data.imagenette_size_px=100", "model.arch=resnet18"])
def test_a_value_outside_the_choices_is_refused_with_the_list(override):
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("demo", [override])


def test_validation_also_refuses_a_choice_set_in_code():
    config = Config()
    config.model.arch = "resnet18"
    with pytest.raises(ConfigError, match=r"'model.arch' must be one of \['resnet50'"):
        validate(config)
