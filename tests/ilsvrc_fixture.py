"""A tiny ImageNet in the ILSVRC layouts: class folders, flat val + Kaggle CSV, and the tars."""
import csv
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.ilsvrc_tars import write_train_tar

# Sorted, as the ILSVRC class tars are; ImageNet calls them tench, English springer, chain saw
# and parachute (tests check the names the pipeline gives them).
WNIDS = ["n01440764", "n02102040", "n03000684", "n03888257"]


def _jpeg(rng, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def make_ilsvrc(root: Path, per_class: int = 6, val_per_class: int = 2, seed: int = 0) -> dict:
    """root/train/<wnid>/<wnid>_<i>.JPEG, root/val/ILSVRC2012_val_*.JPEG + LOC_val_solution.csv.

    Sizes vary from 40 to 120 px a side, so a 64 px cap resizes some images and not others.
    Returns {image name: wnid} for every image.
    """
    rng, labels = np.random.default_rng(seed), {}
    for wnid in WNIDS:
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            name = f"{wnid}_{i}.JPEG"
            (folder / name).write_bytes(_jpeg(rng, int(rng.integers(40, 121)),
                                              int(rng.integers(40, 121))))
            labels[name] = wnid
    (root / "val").mkdir()
    rows, number = [], 0
    for wnid in WNIDS:
        for _ in range(val_per_class):
            number += 1
            stem = f"ILSVRC2012_val_{number:08d}"
            (root / "val" / f"{stem}.JPEG").write_bytes(_jpeg(rng, 90, 70))
            rows.append({"ImageId": stem, "PredictionString": f"{wnid} 1 2 3 4"})
            labels[f"{stem}.JPEG"] = wnid
    with open(root / "LOC_val_solution.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ImageId", "PredictionString"])
        writer.writeheader()
        writer.writerows(rows)
    return labels


def make_tars(root: Path, out: Path) -> None:
    """The folder tree of `make_ilsvrc` as ILSVRC2012_img_{train,val}.tar (+ the CSV) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    classes = {wnid: [(p.name, p.read_bytes()) for p in sorted((root / "train" / wnid).iterdir())]
               for wnid in WNIDS}
    write_train_tar(out / "ILSVRC2012_img_train.tar", classes)
    with tarfile.open(out / "ILSVRC2012_img_val.tar", "w") as archive:
        for path in sorted((root / "val").iterdir()):
            archive.add(path, arcname=path.name)
    (out / "LOC_val_solution.csv").write_bytes((root / "LOC_val_solution.csv").read_bytes())


def make_hf_parquet(root: Path, labels: dict, out: Path, files_per_split: int = 2,
                    row_group_rows: int = 4, label_names: list[str] | None = None,
                    label_wnids: list[str] | None = None) -> None:
    """The images of `make_ilsvrc` as Hugging Face `ILSVRC/imagenet-1k` parquet: `out/data/
    {train,validation}-0000i-of-0000N.parquet`, `image` {bytes, path} + `label`, ClassLabel names
    in the schema metadata, train rows in class order as in the tars (a shuffle has to mix them).
    By default the ClassLabels are WNIDS; the real data set lists all 1000 classes by name
    ("tench, Tinca tinca", ...): pass those as `label_names` and their wnids as `label_wnids`
    (each row's label is then its wnid's index in `label_wnids`)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    label_wnids = label_wnids or WNIDS
    features = {"image": {"_type": "Image"},
                "label": {"names": label_names or label_wnids, "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, folder in (("train", "train"), ("validation", "val")):
        paths = sorted(p for p in (root / folder).rglob("*.JPEG"))
        per_file = -(-len(paths) // files_per_split)
        for index in range(files_per_split):
            chunk = paths[index * per_file:(index + 1) * per_file]
            table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in chunk],
                              "label": [label_wnids.index(labels[p.name]) for p in chunk]})
            pq.write_table(table.replace_schema_metadata(metadata),
                           out / "data" / f"{split}-{index:05d}-of-{files_per_split:05d}.parquet",
                           row_group_size=row_group_rows)
