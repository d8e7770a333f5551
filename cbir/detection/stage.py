"""The `detect` stage: images → the `detections` artifact (COCO results of every kept box, with fallbacks).

Boxes come from a detector (`build_detector`) or from any detector's COCO results file (`--detections`);
both paths share the same filtering and fallback, so later stages cannot tell them apart except
through each instance's recorded `source`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import CbirError
from ..artifacts import (
    Artifact,
    commit,
    file_sha256,
    fingerprint,
    finish_shards,
    is_fresh,
    read_json,
    run_in_shards,
    to_json,
    writing,
)
from ..datasets import ImageFolder, RunDataset, check_splits, load_dataset
from ..datasets.base import coco_categories
from ..device import batches, resolve_device
from ..engines import LOCAL, EngineConfig, absolute, files_here
from ..images import open_photo
from . import Detector, build_detector
from .results import FALLBACKS, apply_fallback, clean_boxes, kept_boxes, read_external

log = logging.getLogger(__name__)

SHARD_IMAGES = 64


def category_ids(names: tuple[str, ...], dataset_categories: list[dict]) -> dict[int, str]:
    """COCO ids of the categories to keep: 'auto' = every category of the dataset (CUB: bird; COCO: its 80),
    else names looked up in the dataset's categories, then in COCO's (torchvision's metadata: index == id)."""
    if tuple(names) in (("auto",), ()):
        return {int(c["id"]): c["name"] for c in dataset_categories}
    known = {c["name"]: int(c["id"]) for c in dataset_categories}
    coco = coco_categories()
    out = {}
    for name in names:
        if name in known:
            out[known[name]] = name
        elif name in coco and name not in ("N/A", "__background__"):
            out[coco.index(name)] = name
        else:
            raise CbirError(f"--categories {name}: not a category of this dataset or of COCO (e.g. "
                            f"{', '.join(list(known)[:3] or ['bird', 'person'])})")
    return out


@dataclass(kw_only=True)
class DetectConfig:
    run: Path
    detector: str = "fasterrcnn_resnet50_fpn"  # or onnx:PATH
    weights: str = "DEFAULT"
    labels: str | None = None  # label file of an ONNX detector (names only; ids are COCO's)
    splits: tuple[str, ...] = ("train", "test")
    score: float = 0.3
    max_per_image: int = 10
    min_size: str = "auto"  # 'auto' = native resolution, or a short-side size in pixels (torchvision: 800)
    batch_size: int = 4
    workers: int = 2
    fallback: str = "auto"  # gt where the dataset has GT boxes, else full
    categories: tuple[str, ...] = ("auto",)  # names to keep; auto = the dataset's own categories
    detections: Path | None = None  # import boxes from another detector instead of running one
    skip_bad: bool = False  # imported boxes: drop unusable entries (listed in bad_detections.txt) instead of stopping
    device: str = "auto"
    engine: EngineConfig = LOCAL  # where the detector runs; the boxes are the same on every engine
    force: bool = False

    def __post_init__(self):
        if self.fallback not in FALLBACKS:
            raise CbirError(f"--fallback {self.fallback}: choose from {', '.join(FALLBACKS)}")
        if not 0 <= self.score <= 1:
            raise CbirError(f"--score {self.score}: must lie in [0, 1]")
        check_splits(self.splits, "--splits")
        if self.max_per_image < 1 or self.batch_size < 1 or self.workers < 0:
            raise CbirError("--max-per-image and --batch-size must be at least 1, --workers at least 0")


@dataclass
class DetectResult:
    detections: list[dict]
    meta: dict = field(default_factory=dict)


class _Photos(Dataset):
    """Decodes in worker processes; a bad photo yields its error instead of stopping the run."""

    def __init__(self, data: RunDataset | ImageFolder, rows: pd.DataFrame):
        self.data, self.rows = data, rows.reset_index(drop=True)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows.iloc[i]
        try:
            return int(row.image_id), open_photo(self.data.image_path(row.path)), None
        except CbirError as e:
            return int(row.image_id), None, str(e)


def _as_list(batch):
    return batch


def detect_batch(detector: Detector, batch: list[tuple], cfg: DetectConfig,
                 keep_ids: set[int]) -> tuple[list[dict], list[dict]]:
    """One batch of decoded photos (image_id, photo or None, error or None) → kept boxes, unreadable images.
    Every engine forms the same batches (a shard's photos, `batch_size` at a time): a batched detector pads
    its inputs together, so the batches are part of what makes the boxes identical."""
    good = [(iid, photo) for iid, photo, err in batch if err is None]
    errors = [{"image_id": iid, "error": err} for iid, _, err in batch if err is not None]
    results = []
    if good:
        for (iid, _), found in zip(good, detector.detect([p for _, p in good])):
            results += [{"image_id": iid, **d} for d in kept_boxes(found, keep_ids, cfg.score, cfg.max_per_image)]
    return results, errors


def detect_images(detector: Detector, data: RunDataset | ImageFolder, rows: pd.DataFrame, cfg: DetectConfig,
                  keep_ids: set[int], progress: tqdm | None = None) -> tuple[list[dict], list[dict]]:
    """Run the detector over `rows`; returns the kept boxes as COCO results and the unreadable images."""
    loader = DataLoader(_Photos(data, rows), batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_as_list)
    results, errors = [], []
    for batch in batches(loader):
        found, unread = detect_batch(detector, batch, cfg, keep_ids)
        results += found
        errors += unread
        if progress is not None:
            progress.update(len(batch))
    return results, errors


def build_stage_detector(cfg: DetectConfig) -> Detector:
    return build_detector(cfg.detector, cfg.weights, device=resolve_device(cfg.device), min_size=cfg.min_size,
                          score_floor=min(cfg.score, 0.05), labels=cfg.labels)


@dataclass
class DetectWork:
    """The detector's part of `detect` for an engine (`engines.ShardWork`): a shard is rows (image_id, path)
    of the run's photos; its result, the kept boxes and the unreadable photos."""

    cfg: DetectConfig
    photos: ImageFolder
    keep_ids: set[int]
    detector: Detector | None = None  # the driver's own, for the local engine; a cluster's actors build theirs

    def __getstate__(self):
        cfg = replace(self.cfg, detector=absolute(self.cfg.detector), weights=absolute(self.cfg.weights),
                      labels=absolute(self.cfg.labels), workers=0)
        return {**self.__dict__, "cfg": cfg, "detector": None}

    def load(self) -> Detector:
        return self.detector or build_stage_detector(self.cfg)

    def run(self, detector: Detector, rows: pd.DataFrame, progress=None):
        return detect_images(detector, self.photos, rows, self.cfg, self.keep_ids, progress)

    def decode(self, rows: pd.DataFrame) -> list[tuple]:
        photos = _Photos(self.photos, rows)
        return [photos[i] for i in range(len(photos))]

    def infer(self, detector: Detector, decoded: list[tuple]):
        results, errors, size = [], [], self.cfg.batch_size
        for start in range(0, len(decoded), size):
            found, unread = detect_batch(detector, decoded[start:start + size], self.cfg, self.keep_ids)
            results += found
            errors += unread
        return results, errors

    def size(self, rows: pd.DataFrame) -> int:
        return len(rows)

    def needs(self, rows: pd.DataFrame) -> list[str]:
        model = files_here(self.cfg.detector.removeprefix("onnx:"), self.cfg.weights, self.cfg.labels)
        return model + [str(self.photos.image_path(path)) for path in rows.path.unique()]


def detect(cfg: DetectConfig) -> DetectResult:
    """Run (or import) detection for the chosen splits; skipped when its inputs are unchanged."""
    with writing(cfg.run) as layout:
        data = load_dataset(layout)
        images = data.images[data.images.split.isin(cfg.splits)].reset_index(drop=True)
        keep_ids = category_ids(cfg.categories, data.categories)
        fallback = cfg.fallback if cfg.fallback != "auto" else "gt" if len(data.instances) else "full"
        detector = None
        if cfg.detections is not None:
            source = {"detector": "external", "file": str(Path(cfg.detections).absolute()),
                      "file_sha256": file_sha256(cfg.detections)[:16] if Path(cfg.detections).is_file() else "missing"}
        else:
            detector = build_stage_detector(cfg)
            source = {k: v for k, v in detector.spec.items() if k not in ("weights", "labels")}
        inputs = {"source": {k: v for k, v in source.items() if k != "file"}, "score": cfg.score,
                  "max_per_image": cfg.max_per_image, "fallback": fallback, "classes": sorted(keep_ids),
                  "splits": list(cfg.splits), "dataset": data.fingerprint, "skip_bad": cfg.skip_bad}
        art = Artifact(layout, layout.detections)
        if is_fresh(art, inputs, cfg.force):
            folder, meta = art.open()
            return DetectResult(read_json(folder / layout.DETECTIONS), meta["summary"])
        problems, run_ids = [], set(data.images.image_id)
        if detector is None:
            raw, problems = read_external(Path(cfg.detections), run_ids)
            errors = []
            if problems and not cfg.skip_bad:
                raise CbirError(f"{len(problems)} bad detection(s), first: {problems[0]} (use --skip-bad to continue "
                                f"without them)")
            if problems:
                log.warning("skipped %d bad detection(s); listed in %s", len(problems),
                            layout.path(f"{layout.detections}/{layout.BAD_DETECTIONS}"))
        else:
            kept = _reusable(art, inputs, data)
            answers, errors, reused = _run_detector(detector, data, images, cfg, set(keep_ids),
                                                    layout.partial(art.name), fingerprint(inputs), kept)
            raw = answers["boxes"]
        if errors:
            log.warning("%d unreadable image(s) skipped, first: %s", len(errors), errors[0]["error"])
        dets, counts = clean_boxes(raw, images, set(keep_ids), cfg.score, cfg.max_per_image, run_ids)
        if counts["not_in_run"]:
            log.warning("%d box(es) of %s are for images not in this run (another split range or dataset); left "
                        "out", counts["not_in_run"], cfg.detections)
        dropped = {k: v for k, v in counts.items() if k not in ("input", "clipped") and v}
        if dropped or counts["clipped"]:
            log.info("boxes: %d in, dropped %s, %d clipped to the image", counts["input"], dropped or "none",
                     counts["clipped"])
        gt = data.instances[data.instances.category_id.isin(keep_ids)]
        dets = apply_fallback(dets, images, gt, fallback, {e["image_id"] for e in errors})
        summary = _summary(dets, images, counts, errors, cfg, keep_ids, detector.spec if detector else source)
        summary.update(bad_detections=len(problems), fallback=fallback)
        with commit(art, inputs, {"dataset": data.fingerprint}) as staged:
            staged.file(layout.DETECTIONS).write_text(to_json(dets, indent=None))
            if detector is not None:
                staged.file(layout.RAW_DETECTIONS).write_text(to_json(answers, indent=None))
                summary.update(detected_images=len(images) - reused, reused_images=reused)
            if problems:
                staged.file(layout.BAD_DETECTIONS).write_text("\n".join(problems) + "\n")
            staged.summary.update(summary)
        finish_shards(layout.partial(art.name))
        return DetectResult(dets, summary)


def _reusable(art: Artifact, inputs: dict, data: RunDataset) -> dict[int, list[dict]] | None:
    """The previous version's raw boxes of every image it answered (an empty list for one with no box), when
    they hold for the new inputs: the same detector and settings, on a dataset whose image ids name content (a
    photo folder), so an image id that is still there is the same bytes. A sync then runs the detector on
    added and changed photos only, and its boxes equal a fresh run's."""
    meta = art.meta()
    if not (data.meta["summary"].get("content_ids") and meta and not art.check_files()
            and (art.folder() / art.layout.RAW_DETECTIONS).is_file()):
        return None
    drop = ("dataset",)
    if {k: v for k, v in meta["inputs"].items() if k not in drop} != \
            {k: v for k, v in json.loads(to_json(inputs)).items() if k not in drop}:
        return None
    raw = read_json(art.folder() / art.layout.RAW_DETECTIONS)
    kept: dict[int, list[dict]] = {iid: [] for iid in raw["answered"]}
    for d in raw["boxes"]:
        kept[d["image_id"]].append(d)
    return kept


def _run_detector(detector: Detector, data: RunDataset, images: pd.DataFrame, cfg: DetectConfig,
                  keep_ids: set[int], partial: Path, stamp: str,
                  kept: dict[int, list[dict]] | None = None) -> tuple[dict, list[dict], int]:
    """The raw boxes (the detector's kept ones) of every image in image order, with the images answered, and
    the unreadable images; with `kept` (see `_reusable`) only the images it has no answer for are detected.
    Returns how many images were reused."""
    kept = kept or {}
    todo = images[~images.image_id.isin(list(kept))][["image_id", "path"]]
    work = DetectWork(cfg=cfg, photos=data.photos, keep_ids=keep_ids, detector=detector)
    with tqdm(total=len(todo), desc=f"detect ({detector.spec['detector']})", unit="img") as bar:
        shards = run_in_shards(todo, SHARD_IMAGES, partial, stamp, work,
                               lambda p, res: p.write_text(json.dumps(res)), lambda p: json.loads(p.read_text()),
                               bar, engine=cfg.engine)
    errors = [e for _, errs in shards for e in errs]
    unread = {e["image_id"] for e in errors}
    found = {iid: kept.get(iid, []) for iid in images.image_id if iid not in unread}
    for dets, _ in shards:
        for d in dets:
            found[d["image_id"]].append(d)
    raw = {"answered": [int(i) for i in found], "boxes": [d for ds in found.values() for d in ds]}
    return raw, errors, len(images) - len(todo)


def _summary(dets: list[dict], images: pd.DataFrame, counts: dict, errors: list[dict], cfg: DetectConfig,
             keep_ids: dict[int, str], detector_spec: dict) -> dict:
    sources = pd.Series([d["source"] for d in dets]).value_counts().to_dict() if dets else {}
    per_image = pd.Series([d["image_id"] for d in dets]).value_counts() if dets else pd.Series(dtype=int)
    return {**detector_spec, "splits": list(cfg.splits), "score_threshold": cfg.score,
            "max_per_image": cfg.max_per_image, "classes": {str(k): v for k, v in keep_ids.items()},
            "fallback": cfg.fallback, "images": len(images), "instances": len(dets), "sources": sources,
            "box_counts": counts, "unreadable": errors,
            "images_with_several_instances": int((per_image > 1).sum()),
            "fallback_rate": round(sum(v for k, v in sources.items() if k != "detected") / max(1, len(images)), 4)}
