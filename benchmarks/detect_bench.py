"""Detector speed and top-box hit rate by input size on the same CUB test photos, and train-detector's cost
per training step by size and trained trunk stages.

    python benchmarks/detect_bench.py --run RUN --detector runs/det/models/detector-mobilenet_v2 \
        --detector onnx:../shared/weights/coco_ssd_mobilenet_v1_quant.onnx --sizes 256,320,416,512 --train-steps 8

A detector is a torchvision name (with --detector-weights), a train-detector model folder, or onnx:PATH
(fixed input size: measured once). `--min-size auto` is each torchvision detector's native policy, a trained
detector's own training size. Training steps use the trained detector's recipe (or the CPU default) on the
run's train photos, batch 4. Results → benchmarks/results/detect_bench_<device>.{md,json}.
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
from cbir.detection.report import top_box_iou
from cbir.detection.stage import DetectConfig, category_ids, detect_images
from cbir.device import resolve_device
from cbir.layout import RunLayout

OUT = Path(__file__).parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inference(a, data, rows, device) -> list[dict]:
    keep = set(category_ids(("bird",), data.categories))
    cfg = DetectConfig(run=Path(a.run), score=0.3, max_per_image=1, batch_size=a.batch_size, workers=a.workers)
    gt = data.instances[data.instances.category_id.isin(keep)]
    out = []
    for name in a.detector:
        labels = Path(name[5:]).with_suffix(".labels.txt") if name.startswith("onnx:") else None
        sizes = ["fixed"] if name.startswith("onnx:") else ["auto", *a.sizes.split(",")]
        for size in sizes:
            detector = build_detector(name, a.detector_weights, device=device, min_size="auto" if size == "fixed" else size,
                                      labels=str(labels) if labels and labels.is_file() else None)
            detect_images(detector, data, rows.head(a.batch_size), cfg, keep)  # warm-up
            _sync(device)
            t = time.perf_counter()
            dets, _ = detect_images(detector, data, rows, cfg, keep)
            _sync(device)
            seconds = time.perf_counter() - t
            iou, _ = top_box_iou(dets, gt, rows.image_id)
            shown = f"auto ({detector.build['eval_size']})" if size == "auto" and hasattr(detector, "build") else size
            out.append({"detector": name.split("/")[-1] if "/" in name else name, "size": shown,
                        "img_s": round(len(rows) / seconds, 2), "top_box_hit": round(float((iou >= 0.5).mean()), 3)})
            print(out[-1])
    return out


def training_steps(a, data, device) -> list[dict]:
    """Seconds per SGD step (batch 4, forward + backward + update) by size and trained trunk stages."""
    from cbir.detection.frcnn import build_model, read_checkpoint
    from cbir.detection.training import PROPOSALS, RECIPES, _Photos, run_boxes

    trained = [d for d in a.detector if Path(d).exists()]
    base = read_checkpoint(Path(trained[0]))["build"] if trained else {
        "trunk": "mobilenet_v2", "num_classes": 2, "proposals": PROPOSALS, "eval_size": RECIPES["cpu"]["size"]}
    boxes = run_boxes(RunLayout(a.run))
    ids = boxes.images.image_id.to_numpy()[:4 * (a.train_steps + 1)]
    photos = _Photos(boxes, ids)
    batches = [[photos[i] for i in range(k, k + 4)] for k in range(0, len(ids) - 3, 4)]
    out = []
    default_size = str(base["eval_size"])
    variants = [(layers, size, "cbir") for layers in (0, 3) for size in a.sizes.split(",")] + [(3, default_size, "torchvision")]
    for layers, size, proposals in variants:
        build = {**base, "trainable_layers": layers, "train_sizes": [int(size)], "eval_size": int(size),
                 "max_size": 2 * int(size), "proposals": PROPOSALS if proposals == "cbir" else {}}
        model = build_model(build).to(device).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        times = []
        for batch in batches:
            _sync(device)
            t = time.perf_counter()
            loss = sum(model([x[2].to(device) for x in batch],
                             [{k: v.to(device) for k, v in x[3].items()} for x in batch]).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t)
        out.append({"trunk": build["trunk"], "trainable_layers": layers, "size": int(size), "proposals": proposals,
                    "s_per_step": round(float(np.median(times[1:])), 3)})
        print(out[-1])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--detector", action="append", default=[])
    p.add_argument("--detector-weights", default="DEFAULT")
    p.add_argument("--sizes", default="256,320,416,512")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=6, help="0: no training measurement")
    p.add_argument("--device", default="auto")
    p.add_argument("--tag", default=platform.node())
    a = p.parse_args()
    a.detector = a.detector or ["fasterrcnn_resnet50_fpn"]
    device = resolve_device(a.device)
    data = load_dataset(RunLayout(a.run))
    rows = data.images.query("split == 'test'").head(a.images)
    results = {"machine": f"{a.tag}: {torch.get_num_threads()} threads, {device}", "images": len(rows),
               "median_short_side": int(np.median(np.minimum(rows.width, rows.height))),
               "inference": inference(a, data, rows, device),
               "training": training_steps(a, data, device) if a.train_steps else []}
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"detect_bench_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"# Detection benchmark ({results['machine']})", "",
             f"{len(rows)} CUB test photos (median short side {results['median_short_side']} px), batch {a.batch_size}, "
             "score >= 0.3; top-box hit: the best box's IoU >= 0.5 with the GT box.", "",
             "| detector | input short side | images/s | top-box hit |", "|---|---|---|---|",
             *[f"| {r['detector']} | {r['size']} | {r['img_s']} | {r['top_box_hit']:.1%} |" for r in results["inference"]]]
    if results["training"]:
        lines += ["", "Training: median seconds per SGD step of 4 photos (forward, backward, update).", "",
                  "Proposals: cbir = 600/300 RPN proposals, 128 RoIs per photo (train-detector's); torchvision = its "
                  "defaults (2,000/2,000, 512 RoIs).", "",
                  "| trunk | trained trunk stages | short side | proposals | s/step |", "|---|---|---|---|---|",
                  *[f"| {r['trunk']} | {r['trainable_layers']} | {r['size']} | {r['proposals']} | {r['s_per_step']} |"
                    for r in results["training"]]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
