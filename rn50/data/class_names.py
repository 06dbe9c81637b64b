"""ImageNet-1k's class names: the one home of the wnid -> human-readable name mapping.

Data sources label ImageNet classes by WordNet id (`n01440764`: the ILSVRC tars and class folders)
or by Hugging Face's label names (`tench, Tinca tinca`); what a person reads is torchvision's
short name (`tench`). The 1000 wnids in class-index order come from `imagenet_wnids.txt` beside
this file (the ILSVRC2012 devkit's synsets; its header says where the copy comes from), the names
from torchvision's ImageNet metadata, which lists them in that same order.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

WNID_FILE = Path(__file__).with_name("imagenet_wnids.txt")
WNID = re.compile(r"^n\d{8}$")
# A readable list of 1000 names counts as ImageNet-1k's (Hugging Face's "tench, Tinca tinca"
# order) when nearly every first lemma is torchvision's name at the same index: torchvision
# renamed a few duplicates ("crane" -> "crane bird"), another data set matches almost none.
_HF_MATCH_MIN = 950


@lru_cache(maxsize=1)
def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index (sorted) order."""
    lines = WNID_FILE.read_text().splitlines()
    wnids = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(wnids) != 1000 or wnids != sorted(wnids) or not all(WNID.match(w) for w in wnids):
        raise RuntimeError(f"{WNID_FILE} must hold 1000 sorted wnids: reinstall rn50")
    return wnids


@lru_cache(maxsize=1)
def imagenet_names() -> list[str]:
    """ImageNet-1k's 1000 human-readable names in class-index order (torchvision's metadata)."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@lru_cache(maxsize=1)
def wnid_names() -> dict[str, str]:
    """wnid -> readable name for the 1000 ImageNet-1k classes."""
    return dict(zip(imagenet_wnids(), imagenet_names()))


def is_wnid(label: str) -> bool:
    """Whether `label` looks like a WordNet id (`n` and eight digits)."""
    return bool(WNID.match(label))


def _is_hf_imagenet(labels: list[str]) -> bool:
    if len(labels) != 1000:
        return False
    firsts = [label.split(",")[0].strip() for label in labels]
    return sum(a == b for a, b in zip(firsts, imagenet_names())) >= _HF_MATCH_MIN


def readable_classes(labels: list[str]) -> tuple[list[str], list[str] | None]:
    """(readable names, wnids or None) for a data set's class labels.

    ImageNet wnids (all 1000 or any subset, label by label) get torchvision's names; Hugging
    Face ImageNet-1k's 1000 label names become torchvision's names, with the wnids by index;
    other labels (digits, folder names, unknown wnids) are kept. The wnids are returned only
    when every label is one.
    """
    labels = [str(label) for label in labels]
    if _is_hf_imagenet(labels):
        return imagenet_names(), imagenet_wnids()
    table = wnid_names()
    wnids = labels if labels and all(is_wnid(label) for label in labels) else None
    return [table.get(label, label) for label in labels], wnids


def readable_names(labels: list[str]) -> list[str]:
    """The readable names of `readable_classes`."""
    return readable_classes(labels)[0]


def class_wnids(labels: list[str]) -> list[str] | None:
    """The wnids of `readable_classes` (None when the classes are not ImageNet wnids)."""
    return readable_classes(labels)[1]
