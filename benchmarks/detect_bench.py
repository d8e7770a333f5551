"""Detector speed at torchvision's default 800-px short side vs native resolution (--min-size auto), and
the top-box IoU >= 0.5 hit rate of each, on the same CUB images.

    python benchmarks/detect_bench.py --run RUN [--weights DEFAULT|PATH|none] [--images 32]

With `--weights none` (all these machines have) the hit rates are meaningless and only the speed
counts; the output says which weights were used. Results → benchmarks/results/detect_bench_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cbir.datasets import load_dataset
from cbir.detection import build_detector
from cbir.detection.report import box_iou_xywh
from cbir.detection.stage import DetectConfig, coco_category_ids, detect_images
from cbir.device import resolve_device
from cbir.layout import RunLayout

OUT = Path(__file__).parent / "results"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--detector", default="fasterrcnn_resnet50_fpn")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--tag", default=platform.node())
    a = p.parse_args()
    device = resolve_device(a.device)
    data = load_dataset(RunLayout(a.run))
    rows = data.images.query("split == 'test'").head(a.images)
    keep = set(coco_category_ids(("bird",)))
    cfg = DetectConfig(run=Path(a.run), score=0.0, max_per_image=1, batch_size=a.batch_size, workers=a.workers)
    results = {"machine": f"{a.tag}: {torch.get_num_threads()} threads, {device}", "detector": a.detector,
               "images": len(rows), "median_short_side": int(np.median(np.minimum(rows.width, rows.height)))}
    for min_size in ("800", "auto"):
        detector = build_detector(a.detector, a.weights, device=device, min_size=min_size)
        detect_images(detector, data, rows.head(a.batch_size), cfg, keep)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dets, _ = detect_images(detector, data, rows, cfg, keep)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        top = {d["image_id"]: d["bbox"] for d in dets}
        gt = data.instances.drop_duplicates("image_id").set_index("image_id").loc[rows.image_id, ["x", "y", "w", "h"]]
        have = [i for i in gt.index if i in top]
        iou = box_iou_xywh(np.array([top[i] for i in have]), gt.loc[have].to_numpy(float)) if have else np.array([])
        results[f"min_size_{min_size}"] = {"img_s": round(len(rows) / seconds, 2),
                                           "top_box_iou50_rate": round(float((iou >= 0.5).sum() / len(rows)), 3)}
        results["weights"] = f"{detector.spec['weights']} [{detector.spec['weights_fingerprint']}]"
        print(min_size, results[f"min_size_{min_size}"])
    results["speedup"] = round(results["min_size_auto"]["img_s"] / results["min_size_800"]["img_s"], 2)
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"detect_bench_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text("\n".join([
        f"# Detection benchmark ({results['machine']})", "",
        f"{a.detector}, weights {results['weights']}, {len(rows)} CUB test images (median short side "
        f"{results['median_short_side']} px), batch {a.batch_size}", "",
        "| input short side | images/s | top box IoU >= 0.5 |", "|---|---|---|",
        *[f"| {k[9:]} | {v['img_s']} | {v['top_box_iou50_rate']} |" for k, v in results.items() if k.startswith("min_size_")],
        "", f"native resolution speed-up: {results['speedup']}x", ""]))
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
