"""`cbir run`: prepare → eda → detect → embed (each mode) → index → evaluate (→ evaluate-objects when the
dataset has several categories), under one lock.

`RunConfig` holds the stage configs themselves (no copied fields); each stage decides by the
fingerprint of its inputs whether it has work to do, so rerunning the same command resumes or is a
no-op, and a changed setting redoes exactly the stages that depend on it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from .artifacts import writing
from .datasets.prepare import PrepareConfig, prepare
from .detection.report import write_detection_report
from .detection.stage import DetectConfig, detect
from .encoders.stage import EmbedConfig, embed
from .evaluation.objects import ObjectsConfig, evaluate_objects
from .evaluation.retrieval import EvalConfig, evaluate
from .metrics.eda import eda
from .retrieval.index import IndexConfig, build_index
from .training.stage import TrainConfig, train_embedder

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunConfig:
    prepare: PrepareConfig
    detect: DetectConfig | None  # None when no mode needs boxes
    embed: EmbedConfig  # the embedding settings; its mode is set per entry of `modes`
    modes: tuple[str, ...]
    index: IndexConfig
    evaluate: EvalConfig
    train: tuple[TrainConfig, ...] = ()  # heads trained after embedding (`--train-embedder LOSS`), one per mode


def _trained(card: dict) -> str:
    return f"validation MAP@R {card['baseline']['MAP@R']:.3f} → {card['best']['MAP@R']:.3f}"


def run_all(cfg: RunConfig) -> list[tuple[str, float, str]]:
    """Run every stage in order; returns (stage, seconds, what happened) for the summary."""
    steps: list[tuple[str, float, str]] = []

    def step(name, fn):
        log.info("── %s", name)
        t = time.perf_counter()
        note = fn()
        steps.append((name, time.perf_counter() - t, note))

    with writing(cfg.prepare.run):
        prepared = {}
        step("prepare", lambda: "{images} images, {bad_images} bad".format(
            **prepared.setdefault("summary", prepare(cfg.prepare).dataset.meta["summary"])))
        step("eda", lambda: str(eda(cfg.prepare.run)))
        if cfg.detect is not None:
            step("detect", lambda: "{instances} instances, fallback rate {fallback_rate:.1%}".format(
                **detect(cfg.detect).meta))
            step("detection report", lambda: "AP50 {AP50:.3f}, top-box IoU>=0.5 {top_box_iou50_rate:.1%}".format(
                **write_detection_report(cfg.detect.run)))
        for mode in cfg.modes:
            step(f"embed {mode}", lambda mode=mode: f"{len(embed(replace(cfg.embed, mode=mode))[1])} vectors")
        for train in cfg.train:
            step(f"train {train.model_name}", lambda train=train: _trained(train_embedder(train)))
        step(f"index {cfg.index.index_name}", lambda: "{factory} in {store}".format(
            factory=build_index(cfg.index).manifest["factory"], store=cfg.index.store))
        step("evaluate", lambda: f"{len(evaluate(cfg.evaluate).computed)} rows")
        if prepared["summary"].get("categories", 1) > 1:  # many kinds of object: score by object-set overlap
            modes = tuple(m for m in cfg.modes if "+" not in m) + tuple(t.model_name for t in cfg.train)
            objects = ObjectsConfig(run=cfg.prepare.run, embeddings=modes, pca=cfg.index.pca)
            step("evaluate objects", lambda: f"{len(evaluate_objects(objects))} rows")
    return steps
