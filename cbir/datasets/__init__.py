"""Datasets: a reader turns a dataset on disk into two tables, the seam every later stage reads.

- images table: one row per image — image_id (the dataset's own id), path (relative to the image
  folder), class_id, class_name (the image-level label retrieval is scored on), split, width, height, mode;
- instances table: one row per ground-truth object — image_id, instance, category_id (COCO id),
  category, x, y, w, h in original pixels — so many boxes and categories per image fit.

A new dataset is one new module with a `DatasetReader`, registered in `READERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, read_json, read_table
from ..layout import RunLayout
from .attributes import Attributes

IMAGE_COLUMNS = ["image_id", "path", "class_id", "class_name", "split", "width", "height", "mode"]
INSTANCE_COLUMNS = ["image_id", "instance", "category_id", "category", "x", "y", "w", "h"]
SPLITS = ("train", "test")


def finite_number(v) -> bool:
    """A JSON number that is a real value: not a bool, not NaN or infinite (COCO files and results)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def relative_image_path(text: str) -> str:
    """An image path under the image folder, never outside it (absolute, or with `..`); ValueError else."""
    if Path(text).is_absolute() or ".." in Path(text).parts:
        raise ValueError(f"{text!r} leaves the image folder")
    return text


def short_name(class_name: str) -> str:
    """A class name as people read it: '017.Cardinal' → 'Cardinal', 'Black_footed_Albatross' → 'Black footed
    Albatross' (CUB's folder-style names; others pass unchanged)."""
    return class_name.split(".", 1)[-1].replace("_", " ")


def check_splits(splits: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """Split names given on the command line: each one of SPLITS, at least one."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise CbirError(f"{flag} {','.join(splits) or '(empty)'}: use {' and/or '.join(SPLITS)}, comma-separated")
    return splits


@dataclass
class Tables:
    """What a reader returns before splitting and checking: images (without split/size) and instances."""

    images: pd.DataFrame
    instances: pd.DataFrame
    categories: list[dict]  # COCO categories: {"id", "name", "supercategory"}
    captions: pd.DataFrame | None = None  # image_id, caption (datasets with human captions)
    problems: list[str] = field(default_factory=list)  # records the reader left out, one line each (--skip-bad)
    counts: dict = field(default_factory=dict)  # what the reader skipped by rule (e.g. crowd regions)
    crowd: pd.DataFrame | None = None  # crowd regions (image_id, category_id, x, y, w, h): not objects, but
    # COCOeval must see them so a detection on a crowd is neither a hit nor a false positive
    attributes: Attributes | None = None  # an attribute vocabulary with per-class (and per-image) values


class DatasetReader(Protocol):
    name: str
    root: Path  # annotation file names are recorded relative to it
    default_split: str

    def read(self) -> Tables: ...

    def assign_split(self, images: pd.DataFrame, split: str) -> pd.Series:
        """'train' / 'test' / '' (dropped) per image row."""

    def source_files(self) -> list[Path]:
        """Annotation files whose content fingerprints the prepared dataset."""

    def image_dir(self) -> Path: ...


def reader(name: str, root: Path, images: Path | None = None, captions: Path | None = None) -> DatasetReader:
    """CUB: `root` is the folder holding images.txt; COCO: `root` is the instances JSON, `images` its folder."""
    root = Path(root).expanduser().absolute()
    if name == "cub":
        from .cub import CubReader

        return CubReader(root)
    if name == "coco":
        from .coco import CocoReader

        if images is None:
            raise CbirError("--coco needs --images DIR (the folder of the JSON's file_name entries)")
        return CocoReader(root, Path(images).expanduser().absolute(),
                          Path(captions).expanduser().absolute() if captions else None)
    raise CbirError(f"unknown dataset kind {name!r}; known: cub, coco")


@dataclass
class RunDataset:
    """The prepared dataset of a run, as later stages see it."""

    images: pd.DataFrame
    instances: pd.DataFrame
    image_dir: Path
    fingerprint: str
    meta: dict
    folder: Path  # the committed dataset artifact (gt_coco.json, captions)

    @cached_property
    def categories(self) -> list[dict]:
        """The dataset's COCO categories, as written into gt_coco.json (read once: the file is MBs on COCO)."""
        return read_json(self.folder / RunLayout.GT_COCO)["categories"]

    @cached_property
    def captions(self) -> pd.DataFrame | None:
        """image_id, caption of a dataset prepared with captions (COCO --captions), else None."""
        path = self.folder / RunLayout.CAPTIONS
        return read_table(path) if path.is_file() else None

    @cached_property
    def attributes(self) -> Attributes | None:
        """The attribute vocabulary and values of a dataset that has them (CUB), else None."""
        names = self.folder / RunLayout.ATTRIBUTES
        if not names.is_file():
            return None
        images = self.folder / RunLayout.IMAGE_ATTRIBUTES
        return Attributes(read_table(names), read_table(self.folder / RunLayout.CLASS_ATTRIBUTES),
                          read_table(images) if images.is_file() else None)

    def image_path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.image_dir / p


def load_dataset(layout: RunLayout) -> RunDataset:
    """The run's prepared tables; a one-line error naming `cbir prepare` when there are none."""
    art = Artifact(layout, layout.dataset)
    folder, meta = art.open(f"not a prepared run; create it with `cbir prepare --cub DIR --out {layout.root}`")
    return RunDataset(read_table(folder / layout.IMAGES), read_table(folder / layout.INSTANCES),
                      Path(meta["inputs"]["image_dir"]), meta["fingerprint"], meta, Path(folder))
