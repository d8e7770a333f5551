"""CUB-200-2011 in its official layout: reading, splitting, image decoding, and the `prepare` stage."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from . import CbirError
from .artifacts import entry, read_table, record, require_run, write_json, write_table

log = logging.getLogger(__name__)

COCO_BIRD_ID = 16  # COCO's own id for "bird", so detections score against the GT with pycocotools directly
SPLIT_COLUMNS = ["image_id", "path", "class_id", "class_name", "split", "width", "height", "x", "y", "w", "h"]
ANNOTATION_FILES = {"images": "images.txt", "labels": "image_class_labels.txt", "boxes": "bounding_boxes.txt",
                    "classes": "classes.txt", "official": "train_test_split.txt"}
MAX_PIXELS = 40_000_000  # decompression-bomb guard: larger photos are downscaled on load


def load_rgb(path: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode any photo to upright RGB: EXIF rotation applied, L/CMYK/RGBA/P converted, huge ones downscaled.

    Raises CbirError naming the file for anything unreadable or truncated.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CbirError(f"{path}: cannot decode image ({e})") from None
    if im.width * im.height > max_pixels:
        scale = (max_pixels / (im.width * im.height)) ** 0.5
        im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.BILINEAR)
    return im


def _read_lines(path: Path, columns: list[str], converters: list) -> pd.DataFrame:
    """Parse one whitespace-separated CUB file; a malformed line is an error naming file and line."""
    if not path.exists():
        raise CbirError(f"{path}: missing CUB annotation file")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=len(columns) - 1)
        try:
            if len(parts) != len(columns):
                raise ValueError(f"expected {len(columns)} fields, got {len(parts)}")
            rows.append([conv(p) for conv, p in zip(converters, parts)])
        except ValueError as e:
            raise CbirError(f"{path}:{lineno}: malformed line {line!r} ({e})") from None
    if not rows:
        raise CbirError(f"{path}: empty file")
    return pd.DataFrame(rows, columns=columns)


def read_cub(root: Path) -> pd.DataFrame:
    """One row per listed image with class, official split flag and GT box (original image ids kept)."""
    root = Path(root)
    images = _read_lines(root / ANNOTATION_FILES["images"], ["image_id", "path"], [int, str])
    labels = _read_lines(root / ANNOTATION_FILES["labels"], ["image_id", "class_id"], [int, int])
    boxes = _read_lines(root / ANNOTATION_FILES["boxes"], ["image_id", "x", "y", "w", "h"], [int] + [float] * 4)
    official = _read_lines(root / ANNOTATION_FILES["official"], ["image_id", "is_training"], [int, int])
    classes = _read_lines(root / ANNOTATION_FILES["classes"], ["class_id", "class_name"], [int, str])
    df = images
    for name, other in [("labels", labels), ("boxes", boxes), ("official", official)]:
        if set(other.image_id) != set(images.image_id):
            n = len(set(other.image_id) ^ set(images.image_id))
            raise CbirError(f"{root / ANNOTATION_FILES[name]}: lists a different set of image ids than images.txt "
                            f"({n} differ)")
        if other.image_id.duplicated().any():
            raise CbirError(f"{root / ANNOTATION_FILES[name]}: duplicate image id {other.image_id[other.image_id.duplicated()].iloc[0]}")
        df = df.merge(other, on="image_id")
    df = df.merge(classes, on="class_id", how="left")
    if df.class_name.isna().any():
        raise CbirError(f"{root / ANNOTATION_FILES['classes']}: class id {df.class_id[df.class_name.isna()].iloc[0]} not listed")
    return df.sort_values("image_id", ignore_index=True)


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
    'classes:A-B/C-D': explicit class ranges (for subsets). Rows outside both ranges are dropped by the caller."""
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


@dataclass
class ImageCheck:
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str = ""


def check_image(path: Path) -> ImageCheck:
    """Decode fully (catches truncation) and report the upright size and original mode."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except (UnidentifiedImageError, OSError) as e:
        return ImageCheck(error=f"{path}: cannot decode image ({e})")
    try:
        im = load_rgb(path)
    except CbirError as e:
        return ImageCheck(error=str(e))
    return ImageCheck(im.width, im.height, mode)


def _check_all(root: Path, paths: list[str], workers: int) -> list[ImageCheck]:
    from concurrent.futures import ThreadPoolExecutor

    files = [root / "images" / p for p in paths]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(check_image, files), total=len(files), desc="checking images", unit="img"))


def clip_boxes(df: pd.DataFrame) -> tuple[pd.DataFrame, int, pd.Series]:
    """Clip GT boxes to the image; returns (df, how many were clipped, mask of degenerate boxes)."""
    x0, y0 = df.x.clip(lower=0), df.y.clip(lower=0)
    x1, y1 = np.minimum(df.x + df.w, df.width), np.minimum(df.y + df.h, df.height)
    clipped = ((x0 != df.x) | (y0 != df.y) | (x1 != df.x + df.w) | (y1 != df.y + df.h))
    out = df.assign(x=x0, y=y0, w=x1 - x0, h=y1 - y0)
    degenerate = (out.w < 1) | (out.h < 1)
    return out, int(clipped.sum()), degenerate


def gt_coco(df: pd.DataFrame) -> dict:
    """Ground truth as COCO instances: one 'bird' box per image, species kept as an extra field."""
    images = [{"id": int(r.image_id), "file_name": r.path, "width": int(r.width), "height": int(r.height)}
              for r in df.itertuples()]
    annotations = [{"id": int(r.image_id), "image_id": int(r.image_id), "category_id": COCO_BIRD_ID,
                    "bbox": [float(r.x), float(r.y), float(r.w), float(r.h)], "area": float(r.w * r.h),
                    "iscrowd": 0, "species_id": int(r.class_id), "species": r.class_name}
                   for r in df.itertuples()]
    return {"info": {"description": "CUB-200-2011 ground truth boxes (cbir prepare)"},
            "images": images, "annotations": annotations,
            "categories": [{"id": COCO_BIRD_ID, "name": "bird", "supercategory": "animal"}]}


@dataclass
class PrepareConfig:
    cub: Path
    out: Path
    split: str = "song"
    skip_bad: bool = False
    workers: int = 4


@dataclass
class PrepareResult:
    split: pd.DataFrame
    bad: list[str] = field(default_factory=list)
    clipped: int = 0


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Read CUB, split it, check every image and box, write split.csv + gt_coco.json + manifest."""
    root, out = Path(cfg.cub), Path(cfg.out)
    df = read_cub(root)
    df["split"] = assign_split(df, cfg.split)
    df = df[df.split != ""].reset_index(drop=True)
    checks = _check_all(root, df.path.tolist(), cfg.workers)
    bad = [c.error for c in checks if c.error]
    df["width"] = [c.width for c in checks]
    df["height"] = [c.height for c in checks]
    df["mode"] = [c.mode for c in checks]
    if bad and not cfg.skip_bad:
        raise CbirError(f"{len(bad)} bad image(s), first: {bad[0]} (use --skip-bad to continue without them)")
    if bad:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bad_images.txt").write_text("\n".join(bad) + "\n")
        log.warning("skipped %d bad image(s); listed in %s", len(bad), out / "bad_images.txt")
        df = df[df.width > 0].reset_index(drop=True)
    df, clipped, degenerate = clip_boxes(df)
    if clipped:
        log.warning("%d GT box(es) reached outside their image and were clipped to it", clipped)
    if degenerate.any():
        first = df[degenerate].iloc[0]
        msg = f"{int(degenerate.sum())} GT box(es) are empty after clipping, first: image {first.image_id} ({first.path})"
        if not cfg.skip_bad:
            raise CbirError(msg + " (use --skip-bad to drop them)")
        log.warning(msg + "; dropped")
        bad += [f"{root / 'images' / p}: GT box outside the image" for p in df[degenerate].path]
        (out / "bad_images.txt").write_text("\n".join(bad) + "\n")
        df = df[~degenerate].reset_index(drop=True)
    split_df = df[SPLIT_COLUMNS + ["mode"]]
    write_table(out / "split.csv", split_df)
    write_json(out / "gt_coco.json", gt_coco(split_df))
    counts = split_df.split.value_counts().to_dict()
    record(out, "split.csv", cub_root=str(root.resolve()), split=cfg.split, images=len(split_df),
           train=counts.get("train", 0), test=counts.get("test", 0), bad_images=len(bad), clipped_boxes=clipped)
    record(out, "gt_coco.json", source="split.csv", annotations=len(split_df))
    return PrepareResult(split_df, bad, clipped)


def load_split(run: Path) -> pd.DataFrame:
    return read_table(require_run(run) / "split.csv")


def cub_root(run: Path) -> Path:
    """Where the run's images live (recorded by prepare, so later stages need no --cub)."""
    return Path(entry(run, "split.csv")["cub_root"])
