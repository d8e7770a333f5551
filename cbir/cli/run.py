"""Whole-run commands: `run` (every stage in order, each skipped when fresh) and `status`."""

from __future__ import annotations

from .. import CbirError
from ..training.config import LOSSES
from .data import prepare_config
from .detection import detect_config
from .embedding import embed_config
from .evaluation import evaluate_config
from .flags import (
    box_args,
    csv_list,
    dataset_args,
    device_arg,
    embedding_args,
    factory,
    index_args,
    optional_names,
    path,
    run_arg,
    some_of,
    text,
    workers_arg,
)
from .search import index_config


def cmd_run(a):
    from dataclasses import replace

    from ..pipeline import RunConfig, run_all

    modes = csv_list(a.modes)
    fused = tuple(f"full+{m}" for m in ("det",) if {"full", m} <= set(modes))
    index_mode = a.index_mode or ("det" if "det" in modes else modes[-1])
    if index_mode not in modes + fused:
        raise CbirError(f"--index-mode {index_mode}: not among the vectors this run makes ({', '.join(modes + fused)})")
    from ..training.stage import TrainConfig

    train = tuple(TrainConfig(run=a.out, embeddings=m, loss=a.train_embedder) for m in modes) \
        if a.train_embedder else ()
    cfg = RunConfig(prepare=prepare_config(a, a.out),
                    detect=detect_config(a, a.out) if "det" in modes else None,
                    embed=embed_config(a, a.out, modes[0]), modes=modes,
                    index=index_config(a, a.out, index_mode),
                    evaluate=replace(evaluate_config(a, a.out, modes + fused + tuple(t.model_name for t in train)),
                                     served=tuple(dict.fromkeys((index_mode, *csv_list(a.served))))),
                    train=train)
    steps = run_all(cfg)
    print("stage                 seconds  result")
    for name, seconds, note in steps:
        print(f"{name:<21} {seconds:7.1f}  {note}")
    print(f"\n{a.out}/reports/retrieval/comparison.md:\n")
    print((a.out / "reports" / "retrieval" / "comparison.md").read_text())
    objects = a.out / "reports" / "objects" / "objects.md"
    if objects.exists():
        print(f"multi-object retrieval (object-set relevance, the table to read for COCO-like data): {objects}")


def add_run(sub):
    p = sub.add_parser("run", help="the whole pipeline: prepare → detect → embed → index → evaluate",
                       description="Run every stage in order on a CUB folder; each is skipped when its inputs are "
                                   "unchanged (rerun the same command to resume), redone when they changed, then "
                                   "print the comparison. Earlier --add/--remove edits of the index are replayed.")
    dataset_args(p)
    p.add_argument("--out", required=True, type=path, help="run directory to create or update")
    box_args(p)
    embedding_args(p)
    p.add_argument("--modes", type=some_of('full', 'gt', 'det'), default="full,gt,det",
                   help="embedding modes to compare (default full,gt,det)")
    index_args(p)
    p.add_argument("--index-mode", type=text, help="which embeddings get a saved search index: one of --modes, or "
                   "full+det (whole photo + detected box fused per image; default det, or the last of --modes "
                   "without det)")
    p.add_argument("--index", type=factory("exact"), default="exact",
                   help="approximate FAISS factory to score beside exact search")
    p.add_argument("--served", type=optional_names, default="",
                   help="more saved index names to evaluate as served (the run's own "
                   "index always is)")
    p.add_argument("--train-embedder", metavar="LOSS", choices=LOSSES,
                   help="after embedding, train a projection head on each mode "
                   "with this loss (see `cbir train-embedder`; defaults otherwise) and evaluate it beside the frozen "
                   "vectors")
    p.set_defaults(eval_pca=None, no_plots=False)
    device_arg(p)
    workers_arg(p)
    p.set_defaults(func=cmd_run)


def cmd_status(a):
    from ..status import run_status

    rows = run_status(a.run)
    width = max(len(r[0]) for r in rows)
    for name, state, detail in rows:
        print(f"{name:<{width}}  {state:<8}  {detail}")


def add_status(sub):
    p = sub.add_parser("status", help="each artifact of a run: done / stale (why) / missing / partial / damaged",
                       description="List every artifact of RUN with its state: done, stale (an input changed since, "
                                   "and which), missing, partial (an interrupted stage's kept shards) or damaged. "
                                   "Reads only.")
    run_arg(p)
    p.set_defaults(func=cmd_status)
