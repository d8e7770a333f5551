"""Embedding benchmark: speed of the stage vs a naive loop, the compute bound, and retrieval quality of
crop policies, RoI pooling and bf16 on a prepared run.

    python benchmarks/embed_bench.py --run RUN --weights W.pth [--backbone mobilenet_v2] [--images 256]

RUN must be prepared and hold detections (e.g. `cbir prepare` + `cbir detect --detections`). Quality is
leave-one-out over the run's test split, no PCA (nothing fitted), so each row is a pure function of the
crop recipe. Results → benchmarks/results/embed_bench_<device>[_speed].{md,json} (_speed: --skip-quality).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from cbir.datasets import load_dataset
from cbir.device import resolve_device
from cbir.encoders.backbones import build_backbone
from cbir.encoders.cnn import CnnEncoder
from cbir.encoders.stage import embed_rows, instances
from cbir.encoders.weights import weights_enum
from cbir.evaluate import gallery_from
from cbir.images import load_rgb
from cbir.layout import RunLayout
from cbir.metrics.ranking import exact_metrics

OUT = Path(__file__).parent / "results"


def measured_flops(device: torch.device, n: int = 4096, repeats: int = 10) -> float:
    """Sustained fp32 matmul FLOP/s: the machine's practical peak for the compute bound."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_rate(backbone_name, weights, rows, data, device) -> float:
    """What one writes first: PIL + the weights' transforms + the full classifier, one image at a time."""
    model = torchvision.models.get_model(backbone_name, weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    model.eval().to(device)
    transform = weights_enum(backbone_name).DEFAULT.transforms()
    t = time.perf_counter()
    with torch.no_grad():
        for path in rows.path:
            model(transform(load_rgb(data.image_path(path)))[None].to(device))
    _sync(device)
    return len(rows) / (time.perf_counter() - t)


def stage_rate(encoder, rows, data, batch, workers) -> float:
    embed_rows(rows.head(batch), data, encoder, batch, 0)  # warm-up
    _sync(encoder.device)
    t = time.perf_counter()
    embed_rows(rows, data, encoder, batch, workers)
    _sync(encoder.device)
    return len(rows) / (time.perf_counter() - t)


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
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--tag", default=platform.node())
    a = p.parse_args()
    layout, device = RunLayout(a.run), resolve_device(a.device)
    data = load_dataset(layout)
    backbone = build_backbone(a.backbone, a.weights)
    results = {"machine": f"{a.tag}: {torch.get_num_threads()} threads, {device}", "backbone": backbone.name,
               "weights": backbone.weights.fingerprint, "torch": torch.__version__}

    # ---- speed: full-image embedding
    full = instances(layout, data, "full")[0].head(a.images).reset_index(drop=True)
    encoder = CnnEncoder(backbone, device, pool="avg")
    a.batch_size = a.batch_size or encoder.default_batch
    gmacs = weights_enum(a.backbone).DEFAULT.meta["_ops"] if weights_enum(a.backbone) else float("nan")
    flops = measured_flops(device)
    bound = flops / (2 * gmacs * 1e9)
    stage = stage_rate(encoder, full, data, a.batch_size, a.workers)
    results["speed"] = {"images": len(full), "naive_img_s": round(naive_rate(a.backbone, a.weights, full.head(64), data, device), 1),
                        "stage_img_s": round(stage, 1), "model_gmacs": gmacs, "matmul_gflop_s": round(flops / 1e9, 1),
                        "compute_bound_img_s": round(bound, 1), "stage_share_of_bound": round(stage / bound, 3)}
    results["speed"]["stage_bf16_img_s"] = round(
        stage_rate(CnnEncoder(backbone, device, pool="avg", bf16=True), full, data, a.batch_size, a.workers), 1)
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
    lines = [f"# Embedding benchmark ({results['machine']})", "", f"backbone {results['backbone']} "
             f"[{results['weights']}], torch {results['torch']}", "", "| speed | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["speed"].items()]
    if "quality" in results:
        import pandas as pd

        lines += ["", "Leave-one-out on the run's test split, no PCA:", "",
                  pd.DataFrame(results["quality"]).to_markdown(index=False)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
