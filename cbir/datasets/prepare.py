"""The `prepare` stage: read a dataset, split it, check every image and box → the run's `dataset` artifact."""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import CbirError
from ..artifacts import (
    Artifact,
    commit,
    file_sha256,
    fingerprint,
    finish_shards,
    is_fresh,
    read_table,
    to_json,
    writing,
)
from ..images import DEFAULT_MAX_PIXELS, open_photo, upright_size
from ..layout import RunLayout
from . import IMAGE_COLUMNS, INSTANCE_COLUMNS, RunDataset, image_file, load_dataset, reader

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PrepareConfig:
    run: Path
    root: Path  # CUB: the folder holding images.txt and images/; COCO: the instances JSON; photos: the folder
    dataset: str = "cub"  # or coco, photos
    images: Path | None = None  # COCO: the image folder
    captions: Path | None = None  # COCO: a captions JSON (kept as dataset/captions.parquet)
    class_labels: str | None = None  # photos: "folders" or a CSV of path,label; None: unlabelled
    boxes: Path | None = None  # photos: known boxes, a COCO instances file with paths under the folder
    split: str | None = None  # default: the reader's own (CUB song, COCO random:0.5, photos gallery/random:0.5)
    skip_bad: bool = False
    strict: bool = False  # photos: the first file that is not a usable photo stops the stage
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 2
    force: bool = False

    def __post_init__(self):
        if self.max_pixels < 1:
            raise CbirError(f"--max-pixels {self.max_pixels}: must be at least 1")
        if self.dataset != "photos" and (self.class_labels or self.boxes or self.strict):
            raise CbirError("--class-labels, --boxes and --strict go with --photos")


@dataclass
class PrepareResult:
    dataset: RunDataset
    bad: list[str] = field(default_factory=list)
    clipped: int = 0


def check_image(path: Path, max_pixels: int) -> tuple[int, int, str, str]:
    """(width, height, mode, error): the upright original size, and any reason the photo is unusable
    (decoded fully, reduced when huge, so truncation is caught)."""
    try:
        width, height, mode = upright_size(path, max_pixels)
        open_photo(path, max_pixels)
    except CbirError as e:
        return 0, 0, "", str(e)
    return width, height, mode, ""


def clip_instances(instances: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, int, pd.Series]:
    """Clip GT boxes to their image; returns (instances, how many were clipped, mask of empty boxes)."""
    size = instances[["image_id"]].merge(images[["image_id", "width", "height"]], on="image_id", how="left")
    x0, y0 = instances.x.clip(lower=0), instances.y.clip(lower=0)
    x1 = np.minimum(instances.x + instances.w, size.width.to_numpy())
    y1 = np.minimum(instances.y + instances.h, size.height.to_numpy())
    clipped = (x0 != instances.x) | (y0 != instances.y) | (x1 != instances.x + instances.w) | \
        (y1 != instances.y + instances.h)
    out = instances.assign(x=x0, y=y0, w=x1 - x0, h=y1 - y0)
    finite = np.isfinite(out[["x", "y", "w", "h"]].to_numpy(float)).all(1)
    return out, int(clipped.sum()), (~finite) | (out.w < 1) | (out.h < 1)


def gt_coco(images: pd.DataFrame, instances: pd.DataFrame, categories: list[dict],
            crowd: pd.DataFrame | None = None) -> dict:
    """Ground truth as COCO instances (pycocotools reads it as is); the image class is kept as extra fields.
    Crowd regions follow the objects with iscrowd 1, so COCOeval ignores detections on them."""
    classes = images.set_index("image_id")[["class_id", "class_name"]]
    crowd = crowd[crowd.image_id.isin(classes.index)] if crowd is not None else instances.iloc[:0]
    boxes = [(r, 0) for r in instances.itertuples()] + [(r, 1) for r in crowd.itertuples()]
    return {"info": {"description": "ground truth boxes (cbir prepare)"},
            "images": [{"id": int(r.image_id), "file_name": r.path, "width": int(r.width), "height": int(r.height)}
                       for r in images.itertuples()],
            "annotations": [{"id": i, "image_id": int(r.image_id), "category_id": int(r.category_id),
                             "bbox": [float(r.x), float(r.y), float(r.w), float(r.h)], "area": float(r.w * r.h),
                             "iscrowd": crowded, "class_id": int(classes.class_id[r.image_id]),
                             "class_name": classes.class_name[r.image_id]}
                            for i, (r, crowded) in enumerate(boxes, 1)],
            "categories": categories}


def dataset_reader(cfg: PrepareConfig, layout: RunLayout | None = None, resumable: bool = True):
    """The reader of `cfg`; a photo folder's is given the run's previous scan (to rehash only changed files)
    and, when `resumable`, a folder in the run for its shards."""
    if cfg.dataset != "photos":
        return reader(cfg.dataset, cfg.root, cfg.images, cfg.captions)
    previous = Artifact(layout, layout.dataset) if layout is not None else None
    return reader("photos", cfg.root, class_labels=cfg.class_labels,
                  boxes=Path(cfg.boxes).expanduser().absolute() if cfg.boxes else None, max_pixels=cfg.max_pixels,
                  workers=cfg.workers,
                  previous=previous.link / layout.FILES if previous is not None and previous.exists() else None,
                  partial=layout.partial(layout.dataset) if layout is not None and resumable else None)


def prepare_inputs(cfg: PrepareConfig) -> dict:
    """What the prepared tables depend on: annotation contents, the image files' sizes, the settings."""
    kind = dataset_reader(cfg)
    sources = {}
    for f in kind.source_files():
        if not f.is_file():
            raise CbirError(f"{f}: missing annotation file")
        # names relative to root where they can be (CUB runs keep their fingerprint), else absolute
        sources[str(f.relative_to(kind.root)) if f.is_relative_to(kind.root) else str(f)] = file_sha256(f)[:16]
    image_dir = kind.image_dir()
    if not image_dir.is_dir():
        raise CbirError(f"{image_dir}: image folder not found")
    inputs = {"dataset": kind.name, "root": str(kind.root), "image_dir": str(image_dir),
              "split": cfg.split or kind.default_split, "skip_bad": cfg.skip_bad, "max_pixels": cfg.max_pixels,
              "annotations": sources}
    if cfg.dataset == "photos":  # (other datasets' fingerprints stay what they were)
        inputs["class_labels"] = "folders" if cfg.class_labels == "folders" else bool(cfg.class_labels)
    return inputs


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Read, split, check every image and box; write images/instances tables + gt_coco.json atomically."""
    with writing(cfg.run) as layout:
        art = Artifact(layout, layout.dataset)
        inputs = prepare_inputs(cfg)
        kind = dataset_reader(cfg, layout)
        tables = kind.read()
        if tables.problems and not cfg.skip_bad:
            raise CbirError(f"{len(tables.problems)} bad record(s), first: {tables.problems[0]} (use --skip-bad to "
                            f"continue without them)")
        if cfg.strict and tables.skipped is not None and len(tables.skipped):
            first = tables.skipped.iloc[0]
            raise CbirError(f"{image_file(kind.image_dir(), first.path)}: {first.reason} (--strict; without it such "
                            f"files are skipped and listed in {layout.dataset}/{layout.SKIPPED})")
        images = tables.images.assign(split=kind.assign_split(tables.images, inputs["split"]))
        images = images[images.split != ""].reset_index(drop=True)
        image_dir = Path(inputs["image_dir"])
        files = [image_dir / p for p in images.path]
        if tables.files is not None:  # a scanning reader: the photos' bytes and the files left out decide
            inputs["image_files"] = fingerprint(tables.files[["path", "sha256", "reason"]].to_numpy().tolist())
        else:
            inputs["image_files"] = fingerprint([[p, f.stat().st_size if f.exists() else -1]
                                                 for p, f in zip(images.path, files)])
        if is_fresh(art, inputs, cfg.force) and not _scan_moved_on(art, tables):
            data = load_dataset(layout)
            bad_file = art.folder() / layout.BAD_IMAGES
            return PrepareResult(data, bad_file.read_text().splitlines() if bad_file.exists() else [],
                                 data.meta["summary"]["clipped_boxes"])
        if tables.files is not None:
            instances, clipped, empty = clip_instances(tables.instances, images)
            instances, bad = instances[~empty].reset_index(drop=True), []
            if empty.any():
                log.warning("%d known box(es) are empty after clipping to their photo; dropped", int(empty.sum()))
        else:
            images, instances, bad, clipped = _checked(cfg, images, tables.instances, files)
        bad = tables.problems + bad
        if tables.problems:
            log.warning("skipped %d bad record(s); listed in %s", len(tables.problems),
                        layout.path(f"{layout.dataset}/{layout.BAD_IMAGES}"))
        if tables.skipped is not None and len(tables.skipped):
            log.warning("skipped %d file(s) that are not usable photos; listed in %s", len(tables.skipped),
                        layout.path(f"{layout.dataset}/{layout.SKIPPED}"))
        counts = images.split.value_counts().to_dict()
        with commit(art, inputs) as staged:
            staged.write_table(layout.IMAGES, images[IMAGE_COLUMNS])
            staged.write_table(layout.INSTANCES, instances[INSTANCE_COLUMNS])
            staged.write_json(layout.GT_COCO, gt_coco(images, instances, tables.categories, tables.crowd))
            if tables.captions is not None:
                staged.write_table(layout.CAPTIONS, tables.captions[tables.captions.image_id.isin(images.image_id)])
            if tables.attributes is not None:
                staged.write_table(layout.ATTRIBUTES, tables.attributes.names)
                staged.write_table(layout.CLASS_ATTRIBUTES, tables.attributes.classes)
                if tables.attributes.images is not None:
                    kept = tables.attributes.images.image_id.isin(images.image_id)
                    staged.write_table(layout.IMAGE_ATTRIBUTES, tables.attributes.images[kept])
            if bad:
                staged.file(layout.BAD_IMAGES).write_text("\n".join(bad) + "\n")
            if tables.files is not None:
                staged.write_table(layout.FILES, tables.files)
                staged.write_table(layout.SKIPPED, tables.skipped)
                staged.write_table(layout.DUPLICATES, tables.duplicates)
            staged.summary.update(images=len(images), instances=len(instances), train=counts.get("train", 0),
                                  test=counts.get("test", 0), classes=int(images.class_id.nunique()),
                                  categories=int(instances.category_id.nunique()), bad_images=len(bad),
                                  clipped_boxes=clipped, dataset=kind.name, **tables.counts)
            if tables.files is not None:  # what `cbir sync` rescans with, when no `cbir run` recorded its settings
                absolute = {k: str(Path(v).expanduser().absolute()) for k, v in (("root", cfg.root), ("boxes", cfg.boxes),
                            ("class_labels", cfg.class_labels)) if v not in (None, "folders")}
                staged.summary["config"] = {**json.loads(to_json(dataclasses.asdict(cfg))), **absolute, "run": None,
                                            "force": False}
        finish_shards(layout.partial(layout.dataset))
        return PrepareResult(load_dataset(layout), bad, clipped)


def _scan_moved_on(art: Artifact, tables) -> bool:
    """A photo folder whose content is unchanged but whose files were touched or re-saved with the same bytes:
    the scan's cache (sizes, times) is recommitted under the same fingerprint, so later stages stay fresh
    and the next scan does not hash those files again."""
    if tables.files is None:
        return False
    kept = read_table(art.folder() / art.layout.FILES)
    return not kept[["path", "size", "mtime_ns"]].equals(tables.files[["path", "size", "mtime_ns"]])


def _checked(cfg: PrepareConfig, images: pd.DataFrame, instances: pd.DataFrame, files: list[Path]):
    """Decode every image and clip every box; bad ones stop the stage unless --skip-bad."""
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        checks = list(tqdm(pool.map(lambda f: check_image(f, cfg.max_pixels), files), total=len(files),
                           desc="checking images", unit="img"))
    images = images.assign(width=[c[0] for c in checks], height=[c[1] for c in checks], mode=[c[2] for c in checks])
    bad = [c[3] for c in checks if c[3]]
    if bad and not cfg.skip_bad:
        raise CbirError(f"{len(bad)} bad image(s), first: {bad[0]} (use --skip-bad to continue without them)")
    if bad:
        log.warning("skipped %d bad image(s); listed in %s", len(bad), RunLayout(cfg.run).path("dataset/bad_images.txt"))
        images = images[images.width > 0].reset_index(drop=True)
    instances = instances[instances.image_id.isin(images.image_id)].reset_index(drop=True)
    instances, clipped, empty = clip_instances(instances, images)
    if clipped:
        log.warning("%d GT box(es) reached outside their image and were clipped to it", clipped)
    if empty.any():
        first = instances[empty].iloc[0]
        path = images.set_index("image_id").path[first.image_id]
        msg = f"{int(empty.sum())} GT box(es) are empty after clipping, first: image {first.image_id} ({path})"
        if not cfg.skip_bad:
            raise CbirError(msg + " (use --skip-bad to drop them)")
        log.warning(msg + "; dropped")
        bad += [f"{dataset_reader(cfg).image_dir() / p}: GT box outside the image"
                for p in images.set_index("image_id").path[instances[empty].image_id]]
        instances = instances[~empty].reset_index(drop=True)
    return images, instances, bad, clipped
