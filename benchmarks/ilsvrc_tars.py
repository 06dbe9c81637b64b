"""ILSVRC-shaped tars from any JPEG bytes: the train tar (one class tar per wnid inside one tar),
the flat val tar and Kaggle's LOC_val_solution.csv. Shared by benchmarks/prepare_listing.py and
the tests' tiny ImageNet (tests/ilsvrc_fixture.py)."""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

from rn50.data.class_names import imagenet_wnids

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
VAL_CSV = "LOC_val_solution.csv"


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_train_tar(path: Path, classes: dict[str, list[tuple[str, bytes]]]) -> None:
    """`path` as ILSVRC2012_img_train.tar: `<wnid>.tar` per class, holding its (name, JPEG)s."""
    with tarfile.open(path, "w") as outer:
        for wnid, images in sorted(classes.items()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as archive:
                for name, data in images:
                    _add_bytes(archive, name, data)
            _add_bytes(outer, f"{wnid}.tar", inner.getvalue())


def write_val_tar(out: Path, images: list[tuple[str, bytes, str]]) -> None:
    """ILSVRC2012_img_val.tar (flat (name, JPEG)s) and LOC_val_solution.csv (name -> wnid)."""
    with tarfile.open(out / VAL_TAR, "w") as archive:
        for name, data, _ in images:
            _add_bytes(archive, name, data)
    with open(out / VAL_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ImageId", "PredictionString"])
        writer.writeheader()
        writer.writerows({"ImageId": Path(name).stem, "PredictionString": f"{wnid} 1 2 3 4"}
                         for name, _, wnid in images)


def synthetic_ilsvrc(out: Path, jpegs: list[bytes], classes: int, per_class: int,
                     val_per_class: int) -> dict:
    """The three ILSVRC files in `out` for the first `classes` ImageNet wnids, cycling through
    `jpegs` for the images; returns the image counts and the tars' sizes."""
    out.mkdir(parents=True, exist_ok=True)
    wnids, count = imagenet_wnids()[:classes], 0
    train: dict[str, list[tuple[str, bytes]]] = {}
    for wnid in wnids:
        train[wnid] = [(f"{wnid}_{i}.JPEG", jpegs[(count + i) % len(jpegs)])
                       for i in range(per_class)]
        count += per_class
    write_train_tar(out / TRAIN_TAR, train)
    val = [(f"ILSVRC2012_val_{n + 1:08d}.JPEG", jpegs[(count + n) % len(jpegs)],
            wnids[n % classes]) for n in range(classes * val_per_class)]
    write_val_tar(out, val)
    return {"train_images": classes * per_class, "val_images": len(val), "classes": classes,
            "train_tar_bytes": (out / TRAIN_TAR).stat().st_size,
            "val_tar_bytes": (out / VAL_TAR).stat().st_size}
