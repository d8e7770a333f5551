"""CUDA path check: the same stages on CPU and GPU must agree, and bf16 must keep retrieval within 0.5 point.

    python benchmarks/gpu_check.py --cub CUB --detections DETS.json --weights MOBILENET.pth --out DIR

Runs prepare, then detection (random weights: device placement only) and full/gt/det embedding with a
real backbone on CPU, CUDA fp32 and CUDA bf16, and compares vectors and leave-one-out metrics.
Results → benchmarks/results/gpu_check.json (and printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from cbir.datasets.prepare import PrepareConfig, prepare
from cbir.detection.report import box_iou_xywh
from cbir.detection.stage import DetectConfig, detect
from cbir.encoders.stage import EmbedConfig, embed
from cbir.evaluation.retrieval import EvalConfig, evaluate

OUT = Path(__file__).parent / "results"


def cosine(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cub", required=True)
    p.add_argument("--split", default="classes:11-11/12-15")
    p.add_argument("--detections", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = Path(a.out)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    runs = {}
    for device in ("cpu", "cuda"):
        run = out / device
        shutil.rmtree(run, ignore_errors=True)
        prepare(PrepareConfig(run=run, root=Path(a.cub), split=a.split))
        runs[device] = run
    # detector: random weights, 16 images — device placement and CPU/GPU agreement of the boxes
    for device, run in runs.items():
        detect(DetectConfig(run=run, weights="none", splits=("train",), score=0.0, max_per_image=1, device=device,
                            classes=("sports ball", "remote", "bird", "person")))
    tops = [{d["image_id"]: d["bbox"] for d in json.loads((r / "detections" / "detections.json").read_text())} for r in runs.values()]
    common = sorted(set(tops[0]) & set(tops[1]))
    iou = box_iou_xywh(np.array([tops[0][i] for i in common]), np.array([tops[1][i] for i in common]))
    report["detector_top_box_iou_cpu_vs_cuda_median"] = round(float(np.median(iou)), 4)
    # embeddings: real backbone, CPU fp32 vs CUDA fp32 vs CUDA bf16
    metrics = {}
    for device, run in runs.items():
        detect(DetectConfig(run=run, detections=Path(a.detections)))
        for bf16 in ((False,) if device == "cpu" else (False, True)):
            tag = f"{device}{'_bf16' if bf16 else ''}"
            for mode in ("full", "gt", "det"):
                embed(EmbedConfig(run=run, mode=mode, backbone=a.backbone, weights=a.weights, device=device,
                                  bf16=bf16, name=f"{mode}_{tag}", workers=4))
            result = evaluate(EvalConfig(run=run, embeddings=tuple(f"{m}_{tag}" for m in ("full", "gt", "det")),
                                         pca=(None,), plots=False))
            metrics[tag] = result.computed.set_index("embeddings")[["R@1", "MAP@R", "mAP"]].round(4).to_dict("index")
    report["metrics"] = metrics
    for mode in ("full", "gt", "det"):
        cpu = np.load(runs["cpu"] / "embeddings" / f"{mode}_cpu" / "vectors.npy")
        gpu = np.load(runs["cuda"] / "embeddings" / f"{mode}_cuda" / "vectors.npy")
        bf = np.load(runs["cuda"] / "embeddings" / f"{mode}_cuda_bf16" / "vectors.npy")
        report[f"{mode}_cosine_cpu_vs_cuda_min"] = round(float(cosine(cpu, gpu).min()), 5)
        report[f"{mode}_cosine_fp32_vs_bf16_min"] = round(float(cosine(gpu, bf).min()), 5)
        for metric in ("R@1", "MAP@R"):
            report[f"{mode}_{metric}_bf16_minus_fp32_points"] = round(
                100 * (metrics["cuda_bf16"][f"{mode}_cuda_bf16"][metric] - metrics["cuda"][f"{mode}_cuda"][metric]), 2)
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
