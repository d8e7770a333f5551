"""Detection quality against the run's ground truth → the `reports/detection` artifact."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..artifacts import Artifact, commit, is_fresh, read_json, writing
from ..datasets import load_dataset
from ..layout import RunLayout

REPORT = "detection"


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of paired [x, y, w, h] boxes."""
    ax1, ay1, bx1, by1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)


def load_gt(gt_path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt_path))


def coco_ap(gt: COCO, dets: list[dict], image_ids: list[int], category_ids: list[int]) -> dict:
    """pycocotools' bbox AP / AP50 / AP75 over the given images and categories, and AP / AP50 / GT count per
    category (from COCOeval's precision array, area 'all', 100 detections; -1 where a category has no GT)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_category": {}}
        dt = gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets])
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds, ev.params.catIds = image_ids, category_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU thresholds, recall points, categories]
    per_category = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        gt_boxes = len(gt.getAnnIds(imgIds=image_ids, catIds=[cat], iscrowd=False))
        per_category[str(cat)] = {"name": gt.cats[cat]["name"] if cat in gt.cats else str(cat), "gt": gt_boxes,
                                  "AP": float(p[p > -1].mean()) if (p > -1).any() else -1.0,
                                  "AP50": float(p[0][p[0] > -1].mean()) if (p[0] > -1).any() else -1.0}
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2]),
            "per_category": per_category}


def detection_quality(layout: RunLayout) -> dict:
    """Numbers a user needs to trust the boxes: COCO AP of the detected boxes (fallbacks excluded) and
    how often the top box finds a GT object (its best IoU with the image's GT boxes)."""
    data = load_dataset(layout)
    folder, meta = Artifact(layout, layout.detections).open(f"run `cbir detect --run {layout.root}` first")
    dets, info = read_json(folder / layout.DETECTIONS), meta["summary"]
    images = data.images[data.images.split.isin(info["splits"])]
    detected = [d for d in dets if d.get("source", "detected") == "detected"]
    categories = [int(c) for c in info["classes"]]
    gt_coco = load_gt(Path(Artifact(layout, layout.dataset).folder()) / layout.GT_COCO)
    ap = coco_ap(gt_coco, detected, images.image_id.tolist(), categories)
    test_ids = images.image_id[images.split == "test"].tolist()
    test_set = set(test_ids)
    test_ap = coco_ap(gt_coco, [d for d in detected if d["image_id"] in test_set], test_ids, categories) \
        if test_ids and len(test_ids) < len(images) else None
    gt = data.instances[data.instances.category_id.isin(categories)]
    per_image, has_box = top_box_iou(detected, gt, images.image_id)
    if test_ap is not None:  # the held-out photos' own box rates (for a trained detector: its unseen classes)
        test = (images.split == "test").to_numpy()
        test_ap.update(top_box_iou50_rate=round(float((per_image[test] >= 0.5).mean()), 4),
                       share_with_box=round(float(has_box[test].mean()), 4))
    return {**ap, "test": test_ap, "images": len(images), "detector": info["detector"], "score_threshold": info["score_threshold"],
            "share_with_box": round(float(has_box.mean()), 4),
            "top_box_iou50_rate": round(float((per_image >= 0.5).mean()), 4),
            "median_top_box_iou": round(float(np.median(per_image[has_box])) if has_box.any() else 0.0, 4),
            "fallback_rate": info["fallback_rate"], "instances": info["instances"],
            "images_with_several_instances": info["images_with_several_instances"]}


def top_box_iou(detected: list[dict], gt: pd.DataFrame, image_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per image of `image_ids`: the best IoU of its top-scoring box with its GT boxes (0 without a box),
    and whether it has a box at all — the numbers that say how often the box we embed is the object."""
    top = pd.DataFrame(detected).sort_values("score", ascending=False, kind="stable").drop_duplicates("image_id") \
        if detected else pd.DataFrame(columns=["image_id", "bbox"])
    pairs = top[["image_id", "bbox"]].merge(gt, on="image_id")
    iou = pd.Series(dtype=float)
    if len(pairs):
        pairs["iou"] = box_iou_xywh(np.array(pairs.bbox.tolist(), float), pairs[["x", "y", "w", "h"]].to_numpy(float))
        iou = pairs.groupby("image_id").iou.max()
    return iou.reindex(image_ids).fillna(0.0).to_numpy(), image_ids.isin(top.image_id).to_numpy()


def category_markdown(per_category: dict, test: dict | None = None) -> str:
    """Per-category AP, most GT boxes first (categories without GT in these images are left out); with the
    test split's own AP beside it when the report covers several splits."""
    table = pd.DataFrame(per_category.values(), index=list(per_category)).query("gt > 0")
    columns = ["category", "GT boxes", "AP", "AP50"]
    if test:
        part = pd.DataFrame(test["per_category"].values(), index=list(test["per_category"]))
        table = table.join(part.rename(columns={"gt": "test GT boxes", "AP": "test AP", "AP50": "test AP50"})
                           .drop(columns="name"))
        columns += ["test GT boxes", "test AP", "test AP50"]
    table = table.sort_values("gt", ascending=False, kind="stable").rename(columns={"name": "category",
                                                                                  "gt": "GT boxes"})
    return "## Per category (COCOeval, area all; -1: no GT box of it there)\n\n" + \
        table[columns].to_markdown(index=False, floatfmt=".3f") + "\n"


def write_detection_report(run: Path | RunLayout, force: bool = False) -> dict:
    with writing(run) as layout:
        art = Artifact(layout, layout.report(REPORT))
        upstream = {"dataset": Artifact(layout, layout.dataset).fingerprint,
                    "detections": Artifact(layout, layout.detections).fingerprint}
        if is_fresh(art, upstream, force):
            return read_json(art.folder() / "detection.json")
        q = detection_quality(layout)
        rows = [("COCO AP (IoU .50:.95), detected boxes only", f"{q['AP']:.3f}"), ("AP50", f"{q['AP50']:.3f}"),
                ("AP75", f"{q['AP75']:.3f}"),
                *([("AP / AP50 on the test split only", f"{q['test']['AP']:.3f} / {q['test']['AP50']:.3f}"),
                   ("top box IoU >= 0.5 on the test split only", f"{q['test']['top_box_iou50_rate']:.1%}")]
                  if q.get("test") else []),
                ("images with at least one kept box", f"{q['share_with_box']:.1%}"),
                ("top box IoU >= 0.5 with a GT box (all images)", f"{q['top_box_iou50_rate']:.1%}"),
                ("median IoU of the top box (images with a box)", f"{q['median_top_box_iou']:.3f}"),
                ("fallback rate", f"{q['fallback_rate']:.1%}"), ("instances", str(q["instances"])),
                ("images with several instances", str(q["images_with_several_instances"]))]
        text = "\n".join([f"# Detection quality — {q['detector']}", "",
                          f"{q['images']} images, score threshold {q['score_threshold']}. AP counts only boxes the "
                          "detector kept (above the threshold), so it is a lower bound of the detector's full-curve AP.",
                          "", "| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]) + "\n"
        if len(q["per_category"]) > 1:
            text += "\n" + category_markdown(q["per_category"], q.get("test"))
        with commit(art, upstream, upstream) as staged:
            staged.write_json("detection.json", q)
            staged.file("detection.md").write_text(text)
            staged.summary.update({k: q[k] for k in ("AP", "AP50", "top_box_iou50_rate")})
        return q
