"""COCO results in and out: validating any detector's results file, filtering, clipping, fallbacks,
and reading the run's `detections` artifact back as one row per instance."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, read_json
from ..datasets import finite_number
from ..layout import RunLayout

FALLBACKS = ("auto", "gt", "full", "none")  # auto: gt where the dataset has GT boxes, else full


def _entry_problem(d) -> str | None:
    """Why one COCO result is unusable, or None."""
    if not (isinstance(d, dict) and {"image_id", "category_id", "bbox", "score"} <= d.keys()):
        return f"is not {{image_id, category_id, bbox, score}}: {str(d)[:80]}"
    if not all(isinstance(d[k], int) and not isinstance(d[k], bool) for k in ("image_id", "category_id")):
        return f"image_id {d['image_id']!r} / category_id {d['category_id']!r} are not integers"
    box, score = d["bbox"], d["score"]
    if not (isinstance(box, list) and len(box) == 4 and all(finite_number(v) for v in box)):
        return f"bbox {str(box)[:60]} is not [x, y, w, h] of finite numbers"
    if box[2] <= 0 or box[3] <= 0:
        return f"bbox {box} has a zero or negative size"
    if not (finite_number(score) and 0 <= score <= 1):
        return f"score {score!r} is not a number in [0, 1]"
    return None


def read_external(path: Path, image_ids: set[int]) -> tuple[list[dict], list[str]]:
    """A COCO results file checked entry by entry: the usable entries, and one line per unusable one
    (malformed, non-finite, empty box, score outside [0, 1], a duplicate). Boxes of images outside the run
    are usable elsewhere — a file for all of CUB imported into a run of some classes — so they are counted
    and logged by `clean_boxes`, not refused; a file with none of the run's images is refused."""
    data = read_json(path)
    if not isinstance(data, list):
        raise CbirError(f"{path}: expected a JSON list of COCO results, got {type(data).__name__}")
    good, problems, seen = [], [], set()
    for i, d in enumerate(data):
        why = _entry_problem(d)
        key = None if why else (d["image_id"], d["category_id"], *d["bbox"], d["score"])
        if key in seen:
            why = "duplicates an earlier entry"
        if why:
            problems.append(f"{path}: entry {i}: {why}")
        else:
            seen.add(key)
            good.append(d)
    if data and not any(isinstance(d, dict) and d.get("image_id") in image_ids for d in data):
        raise CbirError(f"{path}: none of its image ids belong to this run; were these boxes made for another "
                        f"dataset?")
    return good, problems


def clean_boxes(dets: list[dict], images: pd.DataFrame, keep_ids: set[int], score: float,
                max_per_image: int, run_ids: set[int]) -> tuple[list[dict], dict]:
    """Keep the chosen splits' images and categories, clip to the image, drop NaN/degenerate boxes; counted.
    (An imported file was checked by `read_external`; a detector's own output comes here directly.)"""
    sizes = images.set_index("image_id")[["width", "height"]]
    counts = {"input": len(dets), "not_in_run": 0, "other_split": 0, "other_category": 0, "below_score": 0,
              "non_finite": 0, "degenerate": 0, "clipped": 0, "over_max_per_image": 0}
    kept = []
    for d in dets:
        iid = d["image_id"]
        if iid not in sizes.index:
            counts["other_split" if iid in run_ids else "not_in_run"] += 1
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
    return out, counts


def apply_fallback(dets: list[dict], images: pd.DataFrame, gt: pd.DataFrame, fallback: str,
                   unreadable: set[int] = frozenset()) -> list[dict]:
    """Give every image without a kept box fallback instances (its GT boxes, or the whole image), marked so."""
    for d in dets:
        d.setdefault("source", "detected")
    if fallback == "none":
        return dets
    have = {d["image_id"] for d in dets}
    missing = images[~images.image_id.isin(have) & ~images.image_id.isin(unreadable)]
    if fallback == "gt":
        rows = gt[gt.image_id.isin(missing.image_id)]
        extra = [{"image_id": int(r.image_id), "category_id": int(r.category_id), "score": 0.0,
                  "bbox": [float(r.x), float(r.y), float(r.w), float(r.h)], "source": "fallback-gt"}
                 for r in rows.itertuples()]
    else:
        extra = [{"image_id": int(r.image_id), "category_id": 0, "score": 0.0,
                  "bbox": [0.0, 0.0, float(r.width), float(r.height)], "source": "fallback-full"}
                 for r in missing.itertuples()]
    return sorted(dets + extra, key=lambda d: (d["image_id"], d["source"] != "detected", -d["score"]))


def kept_boxes(found: list[dict], keep_ids: set[int], score: float, max_per_image: int) -> list[dict]:
    """One photo's detector output → the boxes of the kept categories at or above `score`, best first."""
    kept = [d for d in found if d["category_id"] in keep_ids and d["score"] >= score]
    return sorted(kept, key=lambda d: -d["score"])[:max_per_image]


def load_detections(layout: RunLayout) -> tuple[pd.DataFrame, str]:
    """The run's detections as rows (image_id, instance, x, y, w, h, source, score, category_id) and
    the artifact's fingerprint."""
    art = Artifact(layout, layout.detections)
    folder, meta = art.open(f"run `cbir detect --run {layout.root}` (or import boxes with --detections) first")
    dets = pd.DataFrame(read_json(folder / layout.DETECTIONS),
                        columns=["image_id", "category_id", "bbox", "score", "source"])
    box = pd.DataFrame(dets.bbox.tolist(), index=dets.index, columns=["x", "y", "w", "h"]) if len(dets) else \
        pd.DataFrame(columns=["x", "y", "w", "h"], dtype=float)
    dets = pd.concat([dets.drop(columns="bbox"), box], axis=1)
    dets["instance"] = dets.groupby("image_id").cumcount()
    return dets, meta["fingerprint"]
