"""Detectors side by side on the same CUB photos: box quality on the test split (COCOeval AP, AP50, top-box
IoU >= 0.5 rate, fallback rate) and what the boxes do to retrieval (det-crop R@1 and MAP@R, with GT crops
as the ceiling), each detector in its own run prepared identically.

    python benchmarks/detectors.py --cub ../shared/data/cub_sample --out runs/detectors \
        --source trained=runs/det/models/detector-mobilenet_v2 \
        --source yolov5n=external:../shared/data/cub_sample/external_detections/yolov5n_coco_birds.json \
        --source ssd=onnx:../shared/weights/coco_ssd_mobilenet_v1_quant.onnx \
        --backbone mobilenet_v2 --weights ../shared/weights/torchvision_mobilenet_v2_features_imagenet.pth

A source is NAME=MODEL_FOLDER (a train-detector model), NAME=onnx:PATH (labels from PATH's .labels.txt
beside it when present) or NAME=external:RESULTS.json (imported boxes). With `--own-trunk`, a trained
detector's boxes are also embedded by its own trunk (`--backbone detector`). Every stage is the package's
own, so the numbers are what `cbir run` would print, and a rerun with one more source only does that source's work. Results → benchmarks/results/detectors_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from cbir.datasets.prepare import PrepareConfig, prepare
from cbir.detection.report import write_detection_report
from cbir.detection.stage import DetectConfig, detect
from cbir.device import resolve_device
from cbir.encoders.stage import EmbedConfig, embed
from cbir.evaluation.retrieval import EvalConfig, evaluate
from cbir.retrieval.rerank import Rerank

OUT = Path(__file__).parent / "results"


def detect_config(run: Path, source: str, score: float, device: str) -> DetectConfig:
    if source.startswith("external:"):
        return DetectConfig(run=run, detections=Path(source[9:]), score=score)
    if source.startswith("onnx:"):
        labels = Path(source[5:]).with_suffix(".labels.txt")
        return DetectConfig(run=run, detector=source, labels=str(labels) if labels.is_file() else None,
                            categories=("bird",), score=score, device=device)
    return DetectConfig(run=run, detector=source, score=score, device=device)


def retrieval(run: Path, names: tuple[str, ...]) -> dict:
    """R@1 and MAP@R of each embeddings set (PCA 'auto' fitted on train classes, exact search, no re-ranking)."""
    table = evaluate(EvalConfig(run=run, embeddings=names, rerank=(Rerank(),), plots=False)).metrics
    table = table[(table["index"] == "exact") & (table["rerank"] == "none") & (table["reduction"] == "refit")]
    return {r.embeddings: {"R@1": round(float(r["R@1"]), 4), "MAP@R": round(float(r["MAP@R"]), 4)}
            for _, r in table.iterrows()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cub", type=Path, required=True)
    p.add_argument("--split", default="classes:1-10/11-20")
    p.add_argument("--out", type=Path, required=True, help="one run per source is made under it")
    p.add_argument("--source", action="append", required=True, help="NAME=MODEL_DIR | NAME=onnx:PATH | NAME=external:FILE")
    p.add_argument("--own-trunk", action="append", default=[], help="NAME of a trained source whose boxes are also "
                   "embedded by its own trunk")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--score", type=float, default=0.3)
    p.add_argument("--device", default="auto")
    p.add_argument("--tag", default=platform.node())
    a = p.parse_args()
    device = resolve_device(a.device)
    results = {"machine": f"{a.tag}: {torch.get_num_threads()} threads, {device}", "cub": str(a.cub),
               "split": a.split, "backbone": a.backbone, "weights": a.weights, "score": a.score, "sources": {}}
    for entry in a.source:
        name, _, source = entry.partition("=")
        run = a.out / name
        prepare(PrepareConfig(run=run, root=a.cub, split=a.split, workers=2))
        meta = detect(detect_config(run, source, a.score, a.device)).meta  # speed: benchmarks/detect_bench.py
        quality = write_detection_report(run)
        test = quality["test"] or quality
        sets = ["gt", "det"]
        for mode in ("gt", "det"):
            embed(EmbedConfig(run=run, mode=mode, backbone=a.backbone, weights=a.weights, device=a.device))
        if name in a.own_trunk:
            embed(EmbedConfig(run=run, mode="det", backbone="detector", device=a.device, name="det-own-trunk"))
            sets.append("det-own-trunk")
        scores = retrieval(run, tuple(sets))
        results["sources"][name] = {
            "source": source, "detector": meta["detector"].split("/")[-1], "test_AP": round(test["AP"], 4),
            "test_AP50": round(test["AP50"], 4), "test_top_box_iou50_rate": test["top_box_iou50_rate"],
            "test_fallback_rate": round(1 - test["share_with_box"], 4), "images": meta["images"],
            "retrieval": scores}
        print(name, json.dumps(results["sources"][name]))
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"detectors_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {stem}.md")


def markdown(results: dict) -> str:
    rows = []
    for name, r in results["sources"].items():
        det, gt = r["retrieval"]["det"], r["retrieval"]["gt"]
        own = r["retrieval"].get("det-own-trunk")
        rows.append(f"| {name} | {r['detector']} | {r['test_AP']:.3f} | {r['test_AP50']:.3f} | "
                    f"{r['test_top_box_iou50_rate']:.1%} | {r['test_fallback_rate']:.1%} | {det['R@1']:.4f} | {det['MAP@R']:.4f} | "
                    f"{det['R@1'] - gt['R@1']:+.4f} | " + (f"{own['R@1']:.4f} / {own['MAP@R']:.4f}" if own else "—") + " |")
    gt = next(iter(results["sources"].values()))["retrieval"]["gt"]
    return "\n".join([
        f"# Detectors on the same photos ({results['machine']})", "",
        f"{results['cub']}, split {results['split']}; boxes kept at score >= {results['score']}, an image without one "
        f"falls back to its GT box (the fallback rate). AP, AP50, top-box hit (the best box's IoU >= 0.5 with a GT "
        f"box) and fallback rate: the test split (classes a trained detector never saw). Retrieval: {results['backbone']} crops, PCA fitted "
        f"on the train classes, exact search, test split queries.", "",
        "| source | detector | AP | AP50 | top-box hit | fallback | det R@1 | det MAP@R | det − GT R@1 | "
        "own trunk R@1 / MAP@R |", "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"GT crops (the ceiling): R@1 {gt['R@1']:.4f}, MAP@R {gt['MAP@R']:.4f}.", ""])


if __name__ == "__main__":
    main()
