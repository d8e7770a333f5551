"""Embedding benchmark: the stage's speed against the machine's limit for it (model alone, decode alone,
both measured in the same run), and retrieval quality of crop policies, RoI pooling and bf16 on a prepared run.

    python benchmarks/embed_bench.py --run RUN --weights W.pth [--backbone mobilenet_v2] [--images 256] [--resnet50]

RUN must be prepared and hold detections (e.g. `cbir prepare` + `cbir detect --detections`). Quality is
leave-one-out over the run's test split, no PCA (nothing fitted), so each row is a pure function of the
crop recipe. Results → benchmarks/results/embed_bench_<device>[_speed].{md,json} (_speed: --skip-quality).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cbir.datasets import load_dataset
from cbir.device import decode_workers, resolve_device
from cbir.encoders.backbones import build_backbone
from cbir.encoders.cnn import CnnEncoder
from cbir.encoders.stage import ImageCrops, embed_rows, instances
from cbir.encoders.tuning import data_parallel_images_per_second, images_per_second
from cbir.evaluation.retrieval import gallery_from
from cbir.layout import RunLayout
from cbir.metrics.ranking import exact_metrics

OUT = Path(__file__).parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_rate(encoder, rows, data, batch, workers, threads=None) -> float:
    embed_rows(rows.head(batch), data, encoder, batch, 0)  # warm-up
    _sync(encoder.device)
    t = time.perf_counter()
    embed_rows(rows, data, encoder, batch, workers, threads=threads)
    _sync(encoder.device)
    return len(rows) / (time.perf_counter() - t)


def decode_rate(dataset, n: int) -> float:
    """Images/s of decoding + cropping + resizing alone, in one process."""
    t = time.perf_counter()
    for i in range(min(n, len(dataset))):
        dataset[i]
    return min(n, len(dataset)) / (time.perf_counter() - t)


def speed_row(layout, data, backbone, device, mode: str, a) -> dict:
    """The stage's img/s against the machine's limit for it: the CPU time one image needs is the model's
    (all cores, tuned memory format and batch) plus its decode spread over every core."""
    encoder = CnnEncoder(backbone, device)
    tuning = encoder.tuning
    rows = instances(layout, data, mode)[0].head(a.images).reset_index(drop=True)
    items = ImageCrops(data, rows, encoder.recipe)
    cores = os.cpu_count() or 1
    per_box = len(rows) / len(items)  # crops per decoded image
    workers = decode_workers(device) if a.workers is None else a.workers
    batch = a.batch_size or tuning.batch
    inline = workers == 0 and tuning.data_parallel_rate is not None  # the stage may run batches side by side
    model = parallel_model = decode = stage = one_thread = side_by_side = 0.0
    for _ in range(a.repeats):  # interleaved, best of each: a shared machine slows runs, never speeds one up
        model = max(model, images_per_second(encoder.trunk, device, encoder.input_side, tuning.batch,
                                             tuning.torch_format))
        if inline:
            parallel_model = max(parallel_model, data_parallel_images_per_second(
                encoder.trunk, encoder.input_side, tuning.batch, tuning.torch_format, cores))
        decode = max(decode, decode_rate(items, 128))
        stage = max(stage, stage_rate(encoder, rows, data, batch, workers))
        if inline:  # both ways the stage can choose, forced: one batch at a time, or one per core side by side
            one_thread = max(one_thread, stage_rate(encoder, rows, data, batch, 0, threads=1))
            side_by_side = max(side_by_side, stage_rate(encoder, rows, data, batch, 0, threads=cores))
    fastest_model = max(model, parallel_model)  # the limit takes whichever way of running the model is faster
    limit = 1 / (1 / fastest_model + 1 / (decode * per_box * (cores if device.type == "cpu" else 1)))
    return {"backbone": backbone.name, "mode": mode, "boxes": len(rows), "memory_format": tuning.memory_format,
            "batch": tuning.batch, "workers": workers, "model_img_s": round(model, 1),
            "model_data_parallel_img_s": round(parallel_model, 1) if inline else None,
            "decode_img_s_per_process": round(decode, 1), "limit_img_s": round(limit, 1),
            "stage_img_s": round(stage, 1), "stage_share_of_limit": round(stage / limit, 3),
            "stage_batch_threads": tuning.batch_threads() if inline else None,
            "one_batch_at_a_time_img_s": round(one_thread, 1) if inline else None,
            "batches_side_by_side_img_s": round(side_by_side, 1) if inline else None}


def quality(vectors: np.ndarray, rows) -> dict:
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    metrics, _ = exact_metrics(gallery_from("bench", x, rows.reset_index(drop=True)))
    return {k: round(metrics[k], 4) for k in ("R@1", "MAP@R", "mAP")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", type=int, default=256, help="images for the speed runs")
    p.add_argument("--batch-size", type=int, help="default: the stage's per-device default")
    p.add_argument("--workers", type=int, help="decode processes (default: the stage's, device.decode_workers)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many interleaved measurements")
    p.add_argument("--resnet50", action="store_true", help="also time ResNet-50 (random weights: speed only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--tag", default=platform.node())
    a = p.parse_args()
    layout, device = RunLayout(a.run), resolve_device(a.device)
    data = load_dataset(layout)
    backbone = build_backbone(a.backbone, a.weights)
    results = {"machine": f"{a.tag}: {torch.get_num_threads()} threads, {device}", "backbone": backbone.name,
               "weights": backbone.weights.fingerprint, "torch": torch.__version__}

    # ---- speed: model alone, decode alone, their combined limit, and the stage, measured together
    results["speed"] = [speed_row(layout, data, backbone, device, mode, a) for mode in ("full", "det")]
    if a.resnet50:
        results["speed"].append(speed_row(layout, data, build_backbone("resnet50", "none"), device, "full", a))
    print(json.dumps(results["speed"], indent=1))

    # ---- quality: crop policies, RoI, bf16, GeM (test split, no PCA)
    if not a.skip_quality:
        test = data.images.query("split == 'test'").image_id
        table = []
        for mode in ("full", "gt", "det"):
            rows = instances(layout, data, mode)[0]
            rows = rows[rows.image_id.isin(test)].reset_index(drop=True)
            variants = [("squash", 0.0, False, "avg", False)] if mode == "full" else [
                (r, m, False, "avg", False) for r in ("squash", "pad", "center") for m in (0.0, 0.1, 0.2)]
            variants += [("squash", 0.0, False, "gem", False)] + ([] if mode == "full" else [("pad", 0.0, False, "gem", False)])
            if mode == "det":
                variants += [("squash", 0.0, True, "avg", False), ("squash", 0.0, False, "avg", True)]
            for resize, margin, roi, pool, bf16 in variants:
                emb = CnnEncoder(backbone, device, pool=pool, crop_margin=margin, crop_resize=resize, roi=roi, bf16=bf16)
                t = time.perf_counter()
                vectors = embed_rows(rows, data, emb, a.batch_size, a.workers)
                seconds = time.perf_counter() - t
                row = {"mode": mode, "crop_resize": resize, "margin": margin, "roi": roi, "pool": pool, "bf16": bf16,
                       "boxes": len(rows), "boxes_s": round(len(rows) / seconds, 1), **quality(vectors, rows)}
                print(row)
                table.append(row)
        results["quality"] = table
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"embed_bench_{device.type}{'_speed' if a.skip_quality else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    import pandas as pd

    lines = [f"# Embedding benchmark ({results['machine']})", "", f"backbone {results['backbone']} "
             f"[{results['weights']}], torch {results['torch']}", "",
             "Speed (limit: per image, the model's time on all cores plus its decode time spread over all cores; "
             "model: the tuned memory format and batch, on torch's threads or data-parallel, whichever is faster):",
             "", pd.DataFrame(results["speed"]).to_markdown(index=False)]
    if "quality" in results:
        lines += ["", "Leave-one-out on the run's test split, no PCA:", "",
                  pd.DataFrame(results["quality"]).to_markdown(index=False)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
