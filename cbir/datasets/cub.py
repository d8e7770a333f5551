"""CUB-200-2011 in its official layout: the reader and its splits (Song et al., official, class ranges);
its attribute files, where present, come along (`datasets.attributes`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CbirError
from ..artifacts import read_text
from .attributes import attribute_files, read_attributes
from .base import Tables, relative_image_path

COCO_BIRD_ID = 16  # COCO's own id for "bird", so detections score against the GT with pycocotools directly
ANNOTATION_FILES = {"images": "images.txt", "labels": "image_class_labels.txt", "boxes": "bounding_boxes.txt",
                    "classes": "classes.txt", "official": "train_test_split.txt"}


def _finite(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _size(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise ValueError(f"box size {text} is not positive")
    return value


def _flag(text: str) -> int:
    if text not in ("0", "1"):
        raise ValueError(f"{text!r} is not 0 or 1")
    return int(text)


def _read_lines(path: Path, columns: list[str], converters: list) -> tuple[pd.DataFrame, list[tuple]]:
    """Parse one whitespace-separated CUB file → (rows, problems); a problem is (the line's image id when
    it has one, "FILE:LINE: what is wrong") so `prepare --skip-bad` can drop that image everywhere."""
    if not path.exists():
        raise CbirError(f"{path}: missing CUB annotation file")
    text = read_text(path)
    rows, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=len(columns) - 1)
        try:
            if len(parts) != len(columns):
                raise ValueError(f"expected {len(columns)} fields, got {len(parts)}")
            rows.append([conv(p) for conv, p in zip(converters, parts)])
        except ValueError as e:
            key = int(parts[0]) if parts and parts[0].isdigit() else None
            problems.append((key, f"{path}:{lineno}: malformed line {line!r} ({e})"))
    if not rows:
        raise CbirError(f"{path}: empty file")
    return pd.DataFrame(rows, columns=columns), problems


def read_cub(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per listed image with class, official split flag and GT box (original image ids kept), and
    the problems: malformed lines and images missing from one of the files, each dropping its image."""
    root = Path(root)
    tables, problems = {}, []
    for name, columns, converters in [("images", ["image_id", "path"], [int, relative_image_path]),
                                      ("labels", ["image_id", "class_id"], [int, int]),
                                      ("boxes", ["image_id", "x", "y", "w", "h"], [int, _finite, _finite, _size, _size]),
                                      ("official", ["image_id", "is_training"], [int, _flag])]:
        path = root / ANNOTATION_FILES[name]
        tables[name], found = _read_lines(path, columns, converters)
        if any(key is None for key, _ in found):  # a line with no image id cannot be dropped alone
            raise CbirError(next(why for key, why in found if key is None))
        problems += found
        duplicated = tables[name].image_id[tables[name].image_id.duplicated()]
        if len(duplicated):
            raise CbirError(f"{path}: duplicate image id {duplicated.iloc[0]}")
    classes, found = _read_lines(root / ANNOTATION_FILES["classes"], ["class_id", "class_name"], [int, str])
    if found:
        raise CbirError(found[0][1])
    bad = {key for key, _ in problems}
    listed = set(tables["images"].image_id) | bad
    for name, table in tables.items():
        path, ids = root / ANNOTATION_FILES[name], set(table.image_id)
        problems += [(i, f"{path}: image id {i} is missing (images.txt lists it)") for i in sorted(listed - ids - bad)]
        problems += [(i, f"{path}: image id {i} is not in images.txt") for i in sorted(ids - listed)]
        bad |= listed - ids
    df = tables["images"]
    for name in ("labels", "boxes", "official"):
        df = df.merge(tables[name], on="image_id")
    df = df[~df.image_id.isin(bad)].merge(classes, on="class_id", how="left")
    if df.class_name.isna().any():
        raise CbirError(f"{root / ANNOTATION_FILES['classes']}: class id {df.class_id[df.class_name.isna()].iloc[0]} not listed")
    return df.sort_values("image_id", ignore_index=True), [why for _, why in problems]


def _parse_ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise CbirError(f"split: bad class range {part!r}; expected e.g. classes:1-100/101-200")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out.update(range(lo, hi + 1))
    return out


def assign_split(df: pd.DataFrame, split: str) -> pd.Series:
    """'song': classes 1-100 train / 101-200 test (Song et al. 2016, sec. 7.1); 'official': CUB's own;
    'classes:A-B/C-D': explicit class ranges (for subsets). Rows outside both ranges get '' (dropped)."""
    if split == "song":
        train, test = set(range(1, 101)), set(range(101, 201))
    elif split == "official":
        return pd.Series(np.where(df.is_training == 1, "train", "test"), index=df.index)
    elif split.startswith("classes:") and split.count("/") == 1:
        train_txt, test_txt = split[len("classes:"):].split("/")
        train, test = _parse_ranges(train_txt), _parse_ranges(test_txt)
        if train & test:
            raise CbirError(f"split {split!r}: classes {sorted(train & test)[:5]} are in both train and test")
    else:
        raise CbirError(f"unknown split {split!r}; use song, official or classes:A-B/C-D")
    out = pd.Series(np.where(df.class_id.isin(train), "train", np.where(df.class_id.isin(test), "test", "")),
                    index=df.index)
    counts = out.value_counts()
    for part in ("train", "test"):
        if counts.get(part, 0) == 0:
            present = f"{df.class_id.min()}-{df.class_id.max()}"
            raise CbirError(f"split {split!r} leaves {part} empty (the data has classes {present}); "
                            f"use --split classes:A-B/C-D with ranges inside {present}")
    return out


class CubReader:
    """CUB: one bird (COCO category 16) per image; the species is the image's class."""

    name = "cub"
    default_split = "song"

    def __init__(self, root: Path):
        self.root = root

    def read(self) -> Tables:
        df, problems = read_cub(self.root)
        images = df[["image_id", "path", "class_id", "class_name", "is_training"]]
        instances = df[["image_id", "x", "y", "w", "h"]].assign(instance=0, category_id=COCO_BIRD_ID,
                                                                category="bird")
        files = attribute_files(self.root)
        attributes = read_attributes(files, set(df.class_id)) if files else None
        return Tables(images, instances, [{"id": COCO_BIRD_ID, "name": "bird", "supercategory": "animal"}],
                      problems=problems, attributes=attributes)

    def assign_split(self, images: pd.DataFrame, split: str) -> pd.Series:
        return assign_split(images, split)

    def source_files(self) -> list[Path]:
        return [self.root / f for f in ANNOTATION_FILES.values()] + list(attribute_files(self.root).values())

    def image_dir(self) -> Path:
        return self.root / "images"
