"""What every dataset reader returns and the helpers readers share: the `DatasetReader` protocol, the
`Tables` it reads, the column names, and the checks of paths and numbers in annotation files. Readers
import this module, never the package, so the package can register them without a cycle."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from .. import CbirError
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
