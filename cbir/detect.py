"""Detection stage: images → RUN/detections.json (COCO results, every kept box) + meta + quality report.

Boxes come from a torchvision detector or from any detector's COCO results file (`--detections`);
both paths share the same filtering and fallback, so downstream stages cannot tell them apart
except through each instance's recorded `source`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.transforms.functional import pil_to_tensor
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from . import CbirError
from .artifacts import atomic_path, file_sha256, finish_shards, read_json, record, require_run, run_in_shards, write_json
from .data import cub_root, load_rgb, load_split
from .models import DetectorSpec, build_detector

log = logging.getLogger(__name__)

FALLBACKS = ("gt", "full", "none")
NATIVE_BOUNDS = (224, 1024)  # --min-size auto keeps the photo's own short side inside these bounds


def coco_category_ids(names: tuple[str, ...]) -> dict[int, str]:
    """COCO ids of category names, from torchvision's weights metadata (index == COCO id)."""
    categories = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    out = {}
    for name in names:
        if name not in categories:
            raise CbirError(f"--classes {name}: not a COCO category (e.g. bird, cat, dog, person)")
        out[categories.index(name)] = name
    return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CbirError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


@dataclass
class DetectConfig:
    run: Path
    detector: str = "fasterrcnn_resnet50_fpn"
    weights: str = "DEFAULT"
    splits: tuple[str, ...] = ("train", "test")
    score: float = 0.3
    max_per_image: int = 10
    min_size: str = "auto"  # 'auto' = native resolution, or a short-side size in pixels (torchvision: 800)
    batch_size: int = 4
    workers: int = 2
    fallback: str = "gt"
    classes: tuple[str, ...] = ("bird",)
    detections: Path | None = None  # import boxes from another detector instead of running one
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        if self.fallback not in FALLBACKS:
            raise CbirError(f"--fallback {self.fallback}: choose from {', '.join(FALLBACKS)}")
        if self.min_size != "auto" and not str(self.min_size).isdigit():
            raise CbirError(f"--min-size {self.min_size}: 'auto' or a number of pixels")
        if not 0 <= self.score <= 1:
            raise CbirError(f"--score {self.score}: must lie in [0, 1]")


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """Resize each photo to its own short side (clamped), not to a fixed 800 px: CUB photos are ~375 px,
    so the fixed size does ~4x the pixels for no gain in recall on birds this large."""

    def __init__(self, base: GeneralizedRCNNTransform, bounds: tuple[int, int] = NATIVE_BOUNDS):
        super().__init__(base.min_size, base.max_size, base.image_mean, base.image_std,
                         size_divisible=base.size_divisible, fixed_size=base.fixed_size)
        self.bounds, self.base_max_size = bounds, base.max_size

    def resize(self, image, target=None):
        """Set this photo's sizes from its own shape (never from earlier photos), then resize as torchvision does."""
        short, long = min(image.shape[-2:]), max(image.shape[-2:])
        target_short = int(min(max(short, self.bounds[0]), self.bounds[1]))
        self.min_size = (target_short,)
        self.max_size = max(self.base_max_size, math.ceil(long * target_short / short))
        return super().resize(image, target)


class _Photos(Dataset):
    """Decodes in worker processes; a bad photo yields its error instead of stopping the run."""

    def __init__(self, root: Path, rows: pd.DataFrame):
        self.root, self.rows = root, rows.reset_index(drop=True)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows.iloc[i]
        try:
            return int(row.image_id), pil_to_tensor(load_rgb(self.root / "images" / row.path)), None
        except CbirError as e:
            return int(row.image_id), None, str(e)


def _collate(batch):
    return batch


def detect_images(model, rows: pd.DataFrame, root: Path, keep_ids: dict[int, str], device: torch.device,
                  batch_size: int, workers: int, max_per_image: int, score: float,
                  progress: tqdm | None = None) -> tuple[list[dict], list[dict]]:
    """Run the detector over `rows`; returns COCO results of the kept categories and the unreadable images."""
    loader = DataLoader(_Photos(root, rows), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    results, errors = [], []
    with torch.inference_mode():
        for batch in loader:
            good = [(iid, img) for iid, img, err in batch if err is None]
            errors += [{"image_id": iid, "error": err} for iid, _, err in batch if err is not None]
            if progress is not None:
                progress.update(len(batch))
            if not good:
                continue
            outputs = model([img.to(device, non_blocking=True).float().div_(255) for _, img in good])
            for (iid, _), out in zip(good, outputs):
                results += [{"image_id": iid, **d} for d in kept_boxes(out, keep_ids, score, max_per_image)]
    return results, errors


def kept_boxes(output: dict, keep_ids: dict[int, str], score: float, max_per_image: int) -> list[dict]:
    """One image's detector output → COCO result dicts of the kept categories, best first."""
    labels, scores, boxes = output["labels"].cpu(), output["scores"].cpu(), output["boxes"].cpu()
    mask = torch.isin(labels, torch.tensor(sorted(keep_ids))) & (scores >= score)
    out = []
    for b, lab, s in list(zip(boxes[mask].tolist(), labels[mask].tolist(), scores[mask].tolist()))[:max_per_image]:
        out.append({"category_id": int(lab), "score": round(float(s), 5),
                    "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)]})
    return out


def load_run_detector(run: Path, device: torch.device):
    """The run's own torchvision detector, rebuilt from detections.meta.json; None when boxes were imported."""
    meta = read_json(Path(run) / "detections.meta.json")
    if meta["detector"] == "external":
        return None, meta
    model, resolved, _ = build_detector(DetectorSpec(meta["detector"], meta["weights"]),
                                        box_score_thresh=min(meta["score_threshold"], 0.05))
    if resolved.fingerprint != meta["weights_fingerprint"]:
        raise CbirError(f"detector weights {resolved.spec} ({resolved.fingerprint}) differ from the run's "
                        f"({meta['weights_fingerprint']}); supply the same file")
    set_resolution(model, meta.get("min_size", "auto"))
    return model.to(device), meta


def set_resolution(model, min_size: str) -> None:
    if str(min_size) == "auto":
        model.transform = NativeResolutionTransform(model.transform)
    else:
        model.transform.min_size = (int(min_size),)


def _run_detector(cfg: DetectConfig, rows: pd.DataFrame, keep_ids: dict[int, str]) -> tuple[list[dict], list[dict], dict]:
    device = resolve_device(cfg.device)
    model, resolved, _ = build_detector(DetectorSpec(cfg.detector, cfg.weights), box_score_thresh=min(cfg.score, 0.05))
    set_resolution(model, cfg.min_size)
    model.to(device)
    info = {"detector": cfg.detector, "weights": resolved.spec, "weights_fingerprint": resolved.fingerprint,
            "min_size": cfg.min_size, "device": str(device)}
    shard_config = {**info, "score": cfg.score, "max_per_image": cfg.max_per_image, "classes": sorted(keep_ids),
                    "ids": rows.image_id.tolist()}
    bar = tqdm(total=len(rows), desc=f"detect ({cfg.detector})", unit="img")

    def compute(shard_rows):
        return detect_images(model, shard_rows, cub_root(cfg.run), keep_ids, device, cfg.batch_size, cfg.workers,
                             cfg.max_per_image, cfg.score, bar)

    shards = run_in_shards(rows, 64, Path(cfg.run) / "detections.partial", shard_config, compute,
                           lambda p, res: p.write_text(json.dumps(res)), lambda p: json.loads(p.read_text()), bar)
    bar.close()
    results = [d for dets, _ in shards for d in dets]
    errors = [e for _, errs in shards for e in errs]
    return results, errors, info


def read_external(path: Path) -> list[dict]:
    """Load a COCO results file, refusing anything that is not a list of {image_id, category_id, bbox, score}."""
    data = read_json(path)
    if not isinstance(data, list):
        raise CbirError(f"{path}: expected a JSON list of COCO results, got {type(data).__name__}")
    for i, d in enumerate(data):
        if not (isinstance(d, dict) and {"image_id", "category_id", "bbox", "score"} <= d.keys()
                and isinstance(d["bbox"], list) and len(d["bbox"]) == 4):
            raise CbirError(f"{path}: entry {i} is not {{image_id, category_id, bbox: [x, y, w, h], score}}: {str(d)[:80]}")
    return data


def clean_boxes(dets: list[dict], split: pd.DataFrame, keep_ids: dict[int, str], score: float,
                max_per_image: int) -> tuple[list[dict], dict]:
    """Keep known images and chosen categories, clip to the image, drop NaN/degenerate boxes; counted."""
    sizes = split.set_index("image_id")[["width", "height"]]
    counts = {"input": len(dets), "unknown_image": 0, "other_category": 0, "below_score": 0, "non_finite": 0,
              "degenerate": 0, "clipped": 0, "over_max_per_image": 0}
    kept = []
    for d in dets:
        iid = d["image_id"]
        if iid not in sizes.index:
            counts["unknown_image"] += 1
            continue
        if d["category_id"] not in keep_ids:
            counts["other_category"] += 1
            continue
        x, y, w, h = (float(v) for v in d["bbox"])
        s = float(d["score"])
        if not all(math.isfinite(v) for v in (x, y, w, h, s)):
            counts["non_finite"] += 1
            continue
        if s < score:
            counts["below_score"] += 1
            continue
        W, H = sizes.loc[iid]
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
        if x1 - x0 < 1 or y1 - y0 < 1:
            counts["degenerate"] += 1
            continue
        counts["clipped"] += (x0, y0, x1, y1) != (x, y, x + w, y + h)
        kept.append({"image_id": int(iid), "category_id": int(d["category_id"]), "score": s,
                     "bbox": [x0, y0, x1 - x0, y1 - y0]})
    kept.sort(key=lambda d: (d["image_id"], -d["score"]))
    per_image: dict[int, int] = {}
    out = []
    for d in kept:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        if per_image[d["image_id"]] > max_per_image:
            counts["over_max_per_image"] += 1
        else:
            out.append(d)
    if counts["input"] and counts["unknown_image"] == counts["input"]:
        raise CbirError("none of the detections' image ids belong to this run; were they made for another dataset?")
    return out, counts


def apply_fallback(dets: list[dict], split: pd.DataFrame, fallback: str, category_id: int,
                   unreadable: set[int] = frozenset()) -> list[dict]:
    """Give every image without a kept box a fallback instance (GT box or whole image), marked as such."""
    for d in dets:
        d.setdefault("source", "detected")
    if fallback == "none":
        return dets
    have = {d["image_id"] for d in dets}
    extra = []
    for r in split[~split.image_id.isin(have) & ~split.image_id.isin(unreadable)].itertuples():
        box = [float(r.x), float(r.y), float(r.w), float(r.h)] if fallback == "gt" else [0.0, 0.0, float(r.width), float(r.height)]
        extra.append({"image_id": int(r.image_id), "category_id": category_id, "bbox": box, "score": 0.0,
                      "source": f"fallback-{fallback}"})
    return sorted(dets + extra, key=lambda d: (d["image_id"], d["source"] != "detected", -d["score"]))


@dataclass
class DetectResult:
    detections: list[dict]
    meta: dict = field(default_factory=dict)


def detect(cfg: DetectConfig) -> DetectResult:
    """Run (or import) detection for the chosen splits; a finished run is a no-op unless force."""
    run = require_run(cfg.run)
    out, meta_path = run / "detections.json", run / "detections.meta.json"
    if out.exists() and meta_path.exists() and not cfg.force:
        log.info("%s exists; nothing to do (use --force to redo)", out)
        return DetectResult(read_json(out), read_json(meta_path))
    split = load_split(run)
    split = split[split.split.isin(cfg.splits)].reset_index(drop=True)
    keep_ids = coco_category_ids(cfg.classes)
    if cfg.detections is not None:
        raw, errors = read_external(Path(cfg.detections)), []
        info = {"detector": "external", "source_file": str(Path(cfg.detections).resolve()),
                "weights_fingerprint": "external:" + file_sha256(Path(cfg.detections))[:16]}
    else:
        raw, errors, info = _run_detector(cfg, split, keep_ids)
    if errors:
        log.warning("%d unreadable image(s) skipped, first: %s", len(errors), errors[0]["error"])
    dets, counts = clean_boxes(raw, split, keep_ids, cfg.score, cfg.max_per_image)
    dropped = {k: v for k, v in counts.items() if k not in ("input", "clipped") and v}
    if dropped or counts["clipped"]:
        log.info("boxes: %d in, dropped %s, %d clipped to the image", counts["input"], dropped or "none", counts["clipped"])
    dets = apply_fallback(dets, split, cfg.fallback, next(iter(keep_ids)), {e["image_id"] for e in errors})
    sources = pd.Series([d["source"] for d in dets]).value_counts().to_dict() if dets else {}
    per_image = pd.Series([d["image_id"] for d in dets]).value_counts() if dets else pd.Series(dtype=int)
    meta = {**info, "splits": list(cfg.splits), "score_threshold": cfg.score, "max_per_image": cfg.max_per_image,
            "classes": {str(k): v for k, v in keep_ids.items()}, "fallback": cfg.fallback, "images": len(split),
            "instances": len(dets), "sources": sources, "box_counts": counts, "unreadable": errors,
            "images_with_several_instances": int((per_image > 1).sum()),
            "fallback_rate": round(sum(v for k, v in sources.items() if k != "detected") / max(1, len(split)), 4)}
    write_json(out, dets)
    write_json(meta_path, meta)
    finish_shards(run / "detections.partial")
    record(run, "detections.json", **{k: meta[k] for k in ("detector", "weights_fingerprint", "score_threshold",
                                                            "fallback", "instances", "splits")})
    return DetectResult(dets, meta)


# ---------------------------------------------------------------- quality report

def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of paired [x, y, w, h] boxes."""
    ax1, ay1, bx1, by1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)


def coco_ap(gt_path: Path, dets: list[dict], image_ids: list[int], category_id: int) -> dict[str, float]:
    """pycocotools' bbox AP / AP50 / AP75 for one category over the given images."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        dt = gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets])
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds, ev.params.catIds = image_ids, [category_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


def detection_quality(run: Path) -> dict:
    """Numbers a user needs to trust the boxes: COCO AP of the detected boxes (fallbacks excluded) and
    how often the top box finds the GT bird."""
    run = require_run(run)
    dets, meta, split = read_json(run / "detections.json"), read_json(run / "detections.meta.json"), load_split(run)
    split = split[split.split.isin(meta["splits"])]
    detected = [d for d in dets if d.get("source", "detected") == "detected"]
    category = int(next(iter(meta["classes"])))
    ap = coco_ap(run / "gt_coco.json", detected, split.image_id.tolist(), category)
    top = pd.DataFrame(detected).sort_values("score", ascending=False).drop_duplicates("image_id") if detected else \
        pd.DataFrame(columns=["image_id", "bbox"])
    joined = split.merge(top[["image_id", "bbox"]], on="image_id", how="left")
    has_box = joined.bbox.notna()
    iou = np.zeros(len(joined))
    if has_box.any():
        iou[has_box.values] = box_iou_xywh(np.array(joined.bbox[has_box].tolist(), dtype=float),
                                           joined.loc[has_box, ["x", "y", "w", "h"]].to_numpy(float))
    return {**ap, "images": len(split), "detector": meta["detector"], "score_threshold": meta["score_threshold"],
            "share_with_box": round(float(has_box.mean()), 4),
            "top_box_iou50_rate": round(float((iou >= 0.5).mean()), 4),
            "median_top_box_iou": round(float(np.median(iou[has_box.values])) if has_box.any() else 0.0, 4),
            "fallback_rate": meta["fallback_rate"], "instances": meta["instances"],
            "images_with_several_instances": meta["images_with_several_instances"]}


def write_detection_report(run: Path) -> dict:
    q = detection_quality(run)
    reports = Path(run) / "reports"
    write_json(reports / "detection.json", q)
    rows = [("COCO AP (IoU .50:.95), detected boxes only", f"{q['AP']:.3f}"), ("AP50", f"{q['AP50']:.3f}"),
            ("AP75", f"{q['AP75']:.3f}"), ("images with at least one bird box", f"{q['share_with_box']:.1%}"),
            ("top box IoU >= 0.5 with the GT box (all images)", f"{q['top_box_iou50_rate']:.1%}"),
            ("median IoU of the top box (images with a box)", f"{q['median_top_box_iou']:.3f}"),
            ("fallback rate", f"{q['fallback_rate']:.1%}"), ("instances", str(q["instances"])),
            ("images with several instances", str(q["images_with_several_instances"]))]
    text = "\n".join([f"# Detection quality — {q['detector']}", "",
                      f"{q['images']} images, score threshold {q['score_threshold']}. AP counts only boxes the "
                      "detector kept (above the threshold), so it is a lower bound of the detector's full-curve AP.",
                      "", "| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]) + "\n"
    with atomic_path(reports / "detection.md") as tmp:
        tmp.write_text(text)
    record(run, "reports/detection.md", **{k: q[k] for k in ("AP", "AP50", "top_box_iou50_rate")})
    return q

