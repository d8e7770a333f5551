"""`cbir run`: prepare → detect → embed (full, gt, det) → index → evaluate, skipping finished stages.

Each step is the stage function itself; a stage whose artifacts exist with the same settings is a
no-op, so an interrupted run is resumed by running the same command again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import CbirError
from .artifacts import load_manifest

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    cub: Path
    out: Path
    split: str = "song"
    skip_bad: bool = False
    detector: str = "fasterrcnn_resnet50_fpn"
    detector_weights: str = "DEFAULT"
    detections: Path | None = None
    score: float = 0.3
    fallback: str = "gt"
    backbone: str = "detector"
    weights: str = "DEFAULT"
    modes: tuple[str, ...] = ("full", "gt", "det")
    crop_resize: str = "pad"
    crop_margin: float = 0.0
    pool: str = "gem"
    pca: int | None = 256
    factory: str = "auto"
    index_mode: str = "det"
    batch_size: int | None = None
    workers: int = 2
    device: str = "auto"


def _prepared(cfg: RunConfig) -> bool:
    done = load_manifest(cfg.out)["artifacts"].get("split.csv")
    if done is None:
        return False
    if Path(done["cub_root"]) != Path(cfg.cub).resolve() or done["split"] != cfg.split:
        raise CbirError(f"{cfg.out} was prepared from {done['cub_root']} with split {done['split']}; "
                        f"use another --out or the same --cub/--split")
    return True


def run_all(cfg: RunConfig) -> list[tuple[str, float, str]]:
    """Run every stage in order; returns (stage, seconds, what happened) for the summary."""
    from .data import PrepareConfig, prepare
    from .detect import DetectConfig, detect, write_detection_report
    from .eda import eda
    from .embed import EmbedConfig, embed
    from .evaluate import EvalConfig, evaluate
    from .search import IndexConfig, build_index

    steps: list[tuple[str, float, str]] = []

    def step(name, fn):
        log.info("── %s", name)
        t = time.perf_counter()
        note = fn()
        steps.append((name, time.perf_counter() - t, note))

    if _prepared(cfg):
        steps.append(("prepare", 0.0, "done before; skipped"))
    else:
        step("prepare", lambda: f"{len(prepare(PrepareConfig(cfg.cub, cfg.out, cfg.split, cfg.skip_bad, cfg.workers)).split)} images")
        step("eda", lambda: str(eda(cfg.out)))
    needs_boxes = "det" in cfg.modes
    if needs_boxes:
        step("detect", lambda: "{instances} instances, fallback rate {fallback_rate:.1%}".format(**detect(DetectConfig(
            cfg.out, cfg.detector, cfg.detector_weights, score=cfg.score, fallback=cfg.fallback,
            detections=cfg.detections, workers=cfg.workers, device=cfg.device)).meta))
        step("detection report", lambda: "AP50 {AP50:.3f}, top-box IoU>=0.5 {top_box_iou50_rate:.1%}".format(
            **write_detection_report(cfg.out)))
    for mode in cfg.modes:
        step(f"embed {mode}", lambda mode=mode: "{} vectors".format(len(embed(EmbedConfig(
            cfg.out, mode, cfg.backbone, cfg.weights, cfg.pool, cfg.crop_margin, cfg.crop_resize,
            batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device))[1])))
    index_mode = cfg.index_mode if cfg.index_mode in cfg.modes else cfg.modes[-1]
    step(f"index {index_mode}", lambda: build_index(IndexConfig(cfg.out, index_mode, pca=cfg.pca,
                                                                factory=cfg.factory)).manifest["factory"])
    fused = [f"full+{m}" for m in ("det",) if {"full", m} <= set(cfg.modes)]
    step("evaluate", lambda: f"{len(evaluate(EvalConfig(cfg.out, tuple(cfg.modes) + tuple(fused), (cfg.pca,))).metrics)} rows")
    return steps
