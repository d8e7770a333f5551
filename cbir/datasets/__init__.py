"""Datasets: a reader turns a dataset on disk into two tables, the seam every later stage reads.

- images table: one row per image — image_id (the dataset's own id), path (relative to the image
  folder), class_id, class_name (the image-level label retrieval is scored on), split, width, height, mode;
- instances table: one row per ground-truth object — image_id, instance, category_id (COCO id),
  category, x, y, w, h in original pixels — so many boxes and categories per image fit.

A new dataset is one new module with a `DatasetReader`, registered in `READERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, read_table
from ..layout import RunLayout

IMAGE_COLUMNS = ["image_id", "path", "class_id", "class_name", "split", "width", "height", "mode"]
INSTANCE_COLUMNS = ["image_id", "instance", "category_id", "category", "x", "y", "w", "h"]


@dataclass
class Tables:
    """What a reader returns before splitting and checking: images (without split/size) and instances."""

    images: pd.DataFrame
    instances: pd.DataFrame
    categories: list[dict]  # COCO categories: {"id", "name", "supercategory"}


class DatasetReader(Protocol):
    name: str

    def read(self, root: Path) -> Tables: ...

    def assign_split(self, images: pd.DataFrame, split: str) -> pd.Series:
        """'train' / 'test' / '' (dropped) per image row."""

    def source_files(self, root: Path) -> list[Path]:
        """Annotation files whose content fingerprints the prepared dataset."""

    def image_dir(self, root: Path) -> Path: ...


def reader(name: str) -> DatasetReader:
    from .cub import CubReader

    readers = {"cub": CubReader()}
    if name not in readers:
        raise CbirError(f"unknown dataset kind {name!r}; known: {', '.join(readers)}")
    return readers[name]


@dataclass
class RunDataset:
    """The prepared dataset of a run, as later stages see it."""

    images: pd.DataFrame
    instances: pd.DataFrame
    image_dir: Path
    fingerprint: str
    meta: dict

    def image_path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.image_dir / p


def load_dataset(layout: RunLayout) -> RunDataset:
    """The run's prepared tables; a one-line error naming `cbir prepare` when there are none."""
    art = Artifact(layout, layout.dataset)
    folder, meta = art.open(f"not a prepared run; create it with `cbir prepare --cub DIR --out {layout.root}`")
    return RunDataset(read_table(folder / layout.IMAGES), read_table(folder / layout.INSTANCES),
                      Path(meta["inputs"]["image_dir"]), meta["fingerprint"], meta)
