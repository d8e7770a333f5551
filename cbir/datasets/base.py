"""What every dataset reader returns and the helpers readers share: the `DatasetReader` protocol, the
`Tables` it reads, the column names, and the checks of paths and numbers in annotation files. Readers
import this module, never the package, so the package can register them without a cycle."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote_from_bytes, unquote_to_bytes

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


def coco_categories() -> list[str]:
    """COCO category names by COCO id (index == id; 'N/A' for unused ids), from torchvision's metadata: the ids
    every COCO-trained detector here (torchvision's, the ONNX SSD, YOLO results) reports."""
    import torchvision

    return list(torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])


ESCAPED = "%"  # a table path starting with this holds its file name's bytes percent-encoded


def path_text(relative: str) -> str:
    """A relative file name as table text. Names that are not UTF-8 (bytes from another system's encoding,
    which Python holds as surrogate escapes) cannot go into parquet or JSON: they are kept as their bytes,
    percent-encoded after a leading '%', as are names that start with '%' themselves, so the text is always
    valid and always leads back to the file (`image_file`). Control characters (a newline in a name) are
    escaped too, so a listing stays one line per file."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        if not relative.startswith(ESCAPED) and not any(ord(c) < 32 or ord(c) == 127 for c in relative):
            return relative
    return ESCAPED + quote_from_bytes(os.fsencode(relative), safe="/")


def text_path(text: str) -> str:
    """`path_text` undone: the file name itself (with surrogate escapes for bytes that are not UTF-8)."""
    return os.fsdecode(unquote_to_bytes(text[len(ESCAPED):])) if text.startswith(ESCAPED) else text


def image_file(image_dir: Path | None, text: str) -> Path:
    """The file a table path names: absolute paths as they are, others under `image_dir`, with `path_text`'s
    escaping undone (only when no file has the escaped text as its literal name: CUB or COCO names)."""
    p = Path(text)
    if p.is_absolute() or image_dir is None:
        return p
    literal = image_dir / p
    if text.startswith(ESCAPED) and not literal.exists():
        return image_dir / text_path(text)
    return literal


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
    files: pd.DataFrame | None = None  # a reader that scans a folder itself: every file it saw (its cache of
    # sizes, times and hashes, kept as dataset/files.parquet) — its images are then already decoded and checked
    skipped: pd.DataFrame | None = None  # path, reason of every file the scan left out (dataset/skipped.csv)
    duplicates: pd.DataFrame | None = None  # image_id, path of files with the same bytes as an image's own


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
