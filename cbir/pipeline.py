"""`cbir run`: prepare → eda → detect → embed (each mode) → index → evaluate (→ evaluate-objects when the
dataset has several categories), under one lock.

`RunConfig` holds the stage configs themselves (no copied fields); each stage decides by the
fingerprint of its inputs whether it has work to do, so rerunning the same command resumes or is a
no-op, and a changed setting redoes exactly the stages that depend on it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from . import CbirError
from .artifacts import Artifact, read_json, read_table, write_json, writing
from .datasets import load_dataset
from .datasets.photos import changes, describe
from .datasets.prepare import PrepareConfig, dataset_reader, prepare
from .detection.report import write_detection_report
from .detection.stage import DetectConfig, detect
from .encoders.stage import EmbedConfig, embed
from .evaluation.objects import ObjectsConfig, evaluate_objects
from .evaluation.retrieval import EvalConfig, evaluate
from .layout import RunLayout
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

    with writing(cfg.prepare.run) as layout:
        save_run_config(layout, cfg)
        prepared = {}
        step("prepare", lambda: "{images} images, {bad_images} bad".format(
            **prepared.setdefault("summary", prepare(cfg.prepare).dataset.meta["summary"])))
        step("eda", lambda: str(eda(cfg.prepare.run)))
        if cfg.detect is not None:
            step("detect", lambda: "{instances} instances, fallback rate {fallback_rate:.1%}".format(
                **detect(cfg.detect).meta))
        if cfg.detect is not None and prepared["summary"]["instances"]:  # scored against known boxes only
            step("detection report", lambda: "AP50 {AP50:.3f}, top-box IoU>=0.5 {top_box_iou50_rate:.1%}".format(
                **write_detection_report(cfg.detect.run)))
        for mode in cfg.modes:
            step(f"embed {mode}", lambda mode=mode: f"{len(embed(replace(cfg.embed, mode=mode))[1])} vectors")
        for train in cfg.train:
            step(f"train {train.model_name}", lambda train=train: _trained(train_embedder(train)))
        step(f"index {cfg.index.index_name}", lambda: "{factory} in {store}".format(
            factory=build_index(cfg.index).manifest["factory"], store=cfg.index.store))
        if load_dataset(layout).labelled:
            step("evaluate", lambda: f"{len(evaluate(cfg.evaluate).computed)} rows")
        else:
            steps.append(("evaluate", 0.0, "skipped: the photos have no labels (--class-labels), nothing to score"))
        if prepared["summary"].get("categories", 1) > 1:  # many kinds of object: score by object-set overlap
            modes = tuple(m for m in cfg.modes if "+" not in m) + tuple(t.model_name for t in cfg.train)
            objects = ObjectsConfig(run=cfg.prepare.run, embeddings=modes, pca=cfg.index.pca)
            step("evaluate objects", lambda: f"{len(evaluate_objects(objects))} rows")
    return steps


# ---------------------------------------------------------------- the settings of a run, for `cbir sync`

def _plain(value):
    """A config as JSON: paths absolute (a sync may run from another folder), tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value.expanduser().absolute())
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _typed(hint, value):
    """JSON back into the field's type: dataclasses, paths and tuples (anything else is JSON already)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        fields = typing.get_type_hints(hint)
        return hint(**{k: _typed(fields[k], v) for k, v in value.items() if k in fields})
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if (dataclasses.is_dataclass(arg) and isinstance(value, dict)) or (arg is Path and isinstance(value, str)):
                return _typed(arg, value)
        return value
    if origin is tuple:
        return tuple(_typed(args[0], v) for v in value)
    return Path(value) if hint is Path else value


def _moved_to(cfg, run: Path):
    """Every stage config pointed at `run` (the run folder may have been moved since)."""
    if isinstance(cfg, tuple):
        return tuple(_moved_to(c, run) for c in cfg)
    if not dataclasses.is_dataclass(cfg):
        return cfg
    fields = {f.name: _moved_to(getattr(cfg, f.name), run) for f in dataclasses.fields(cfg)}
    return replace(cfg, **{**fields, **({"run": run} if "run" in fields else {})})


def save_run_config(layout: RunLayout, cfg: RunConfig) -> None:
    write_json(layout.run_config, {"run_config": _plain(cfg)})


def load_run_config(layout: RunLayout) -> RunConfig | None:
    """The settings of the run's last `cbir run`, or None when its stages were run one by one."""
    if not layout.run_config.is_file():
        return None
    return _moved_to(_typed(RunConfig, read_json(layout.run_config)["run_config"]), layout.root)


# ---------------------------------------------------------------- keeping a photo-folder run in sync

@dataclass
class SyncResult:
    found: dict  # added / changed / moved / removed / unchanged / skipped / duplicates
    steps: list[tuple[str, float, str]]  # empty for a dry run or a folder with nothing new


def sync(run: Path, dry_run: bool = False) -> SyncResult:
    """Rescan a photo-folder run's folder, say what changed, then bring every artifact up to date: `cbir run`
    again with its recorded settings (each stage redoes only the photos that are new or changed), or the
    dataset alone when the stages were run one by one. A dry run only reports, writing nothing."""
    layout = RunLayout(run)
    data = load_dataset(layout)
    if data.meta["inputs"]["dataset"] != "photos":
        raise CbirError(f"{layout.root}: prepared from {data.meta['inputs']['dataset']}, not from a folder of photos; "
                        f"sync rescans photo folders (`cbir prepare --photos DIR`)")
    cfg = load_run_config(layout)
    prepared = cfg.prepare if cfg else _moved_to(_typed(PrepareConfig, data.meta["summary"]["config"]), layout.root)
    tables = dataset_reader(prepared, layout, resumable=not dry_run).read()
    duplicates = data.folder / layout.DUPLICATES
    found = changes(data.images, read_table(duplicates) if duplicates.is_file() else None, tables)
    log.info("sync %s: %s", prepared.root, describe(found))
    if dry_run:
        return SyncResult(found, [])
    with writing(layout):
        if cfg is None:
            prepare(prepared)
            log.warning("%s: the dataset is synced; its later stages were run one by one, so redo them the same way "
                        "(`cbir status --run %s` lists the stale ones)", layout.root, layout.root)
            return SyncResult(found, [])
        return SyncResult(found, run_all(cfg) + refresh_indexes(layout, cfg))


def refresh_indexes(layout: RunLayout, cfg: RunConfig) -> list[tuple[str, float, str]]:
    """Rebuild the run's other saved indexes over embeddings the run remakes, with their own recorded
    settings and edits, so a removed photo leaves every index; indexes over other embeddings are named."""
    made = set(cfg.modes) | {f"full+{m}" for m in cfg.modes if m != "full"} | {t.model_name for t in cfg.train}
    steps = []
    for name in layout.artifact_names():
        if not name.startswith("index/") or name == layout.index(cfg.index.index_name):
            continue
        meta = Artifact(layout, name).meta()
        embeddings = meta["summary"].get("embeddings") if meta else None
        if embeddings not in made:
            log.warning("%s: built over embeddings %s, which `cbir run` does not remake; rebuild it by hand", name,
                        embeddings)
            continue
        inputs = meta["inputs"]
        index = IndexConfig(run=layout.root, embeddings=embeddings, name=name.split("/", 1)[1], pca=inputs["pca"],
                            whiten=inputs.get("whiten"), factory=inputs["factory"], gallery=tuple(inputs["gallery"]),
                            store=inputs["store"], memory_budget=inputs.get("memory_budget"),
                            refine=inputs.get("refine", 0), gpu=cfg.index.gpu)
        started = time.perf_counter()
        build_index(index)
        steps.append((f"index {index.index_name}", time.perf_counter() - started, "rebuilt over the synced vectors"))
    return steps
