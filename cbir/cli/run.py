"""Whole-run commands: `run` (every stage in order, each skipped when fresh) and `status`."""

from __future__ import annotations

from .. import CbirError
from ..training.config import LOSSES
from .data import prepare_config
from .detection import detect_config
from .embedding import embed_config
from .evaluation import evaluate_config
from .flags import (
    bounded,
    box_args,
    csv_list,
    dataset_args,
    device_arg,
    embedding_args,
    engine_args,
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

    modes = csv_list(a.modes or ("full,det" if a.photos and not a.boxes else "full,gt,det"))  # gt needs known boxes
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
    print_steps(run_all(cfg))
    comparison = a.out / "reports" / "retrieval" / "comparison.md"
    if comparison.exists():
        print(f"\n{comparison}:\n")
        print(comparison.read_text())
    objects = a.out / "reports" / "objects" / "objects.md"
    if objects.exists():
        print(f"multi-object retrieval (object-set relevance, the table to read for COCO-like data): {objects}")


def print_steps(steps: list[tuple[str, float, str]]) -> None:
    print("stage                 seconds  result")
    for name, seconds, note in steps:
        print(f"{name:<21} {seconds:7.1f}  {note}")


def add_run(sub):
    p = sub.add_parser("run", help="the whole pipeline: prepare → detect → embed → index → evaluate",
                       description="Run every stage in order on CUB, COCO or a folder of photos; each is skipped when "
                                   "its inputs are unchanged (rerun the same command to resume), redone when they "
                                   "changed, then print the comparison. On a photo folder a rerun is a sync: only "
                                   "added or changed photos are detected and embedded. Earlier --add/--remove "
                                   "edits of the index are replayed. The settings are kept in RUN/run.json for "
                                   "`cbir sync`.")
    dataset_args(p)
    p.add_argument("--out", required=True, type=path, help="run directory to create or update")
    box_args(p)
    embedding_args(p)
    p.add_argument("--modes", type=some_of('full', 'gt', 'det'),
                   help="embedding modes to compare (default full,gt,det; full,det for photos without --boxes)")
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
    engine_args(p)
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


def cmd_sync(a):
    from ..datasets.photos import describe
    from ..pipeline import sync

    if a.watch:
        return watch(a)
    result = sync(a.run, a.dry_run)
    print(f"{a.run}: {describe(result.found)}" + (" (dry run: nothing changed)" if a.dry_run else ""))
    if result.steps:
        print_steps(result.steps)


def watch(a):
    """Sync once the watcher is listening (so nothing changed meanwhile is missed), then after every batch of
    changes in the folder once they settle, until Ctrl-C."""
    from watchfiles import watch as changes_in

    from ..datasets import load_dataset
    from ..datasets.photos import describe
    from ..layout import RunLayout
    from ..pipeline import sync

    folder = load_dataset(RunLayout(a.run)).image_dir
    quiet = int(a.settle * 1000)  # watchfiles: a batch is yielded after `step` ms without a new change
    listening = False
    try:
        for batch in changes_in(folder, step=quiet, debounce=max(1600, 10 * quiet), rust_timeout=quiet,
                                yield_on_timeout=True, raise_interrupt=True):
            if not listening:  # the first (empty) answer: the watcher runs and queues what changes from now on
                listening = True
                print(f"{a.run}: {describe(sync(a.run).found)}; watching {folder} (Ctrl-C stops)", flush=True)
            elif batch:
                print(f"{len(batch)} change(s) in {folder}: {describe(sync(a.run).found)}", flush=True)
    except KeyboardInterrupt:
        print(f"stopped watching {folder}; {a.run} holds every sync that finished", flush=True)


def add_sync(sub):
    p = sub.add_parser("sync", help="rescan a photo folder run and update every artifact incrementally",
                       description="Rescan the folder of a run prepared with --photos; report what was added, "
                                   "changed, moved, removed and skipped; then bring every artifact up to date: only "
                                   "added or changed photos are detected and embedded, moved ones keep their "
                                   "vectors, removed ones leave every index, --add edits stay. Reruns the settings "
                                   "of the run's last `cbir run` (RUN/run.json); a run made stage by stage gets "
                                   "its dataset synced.")
    run_arg(p)
    p.add_argument("--dry-run", action="store_true", help="only report what changed; write nothing")
    p.add_argument("--watch", action="store_true", help="keep watching the folder and sync after each batch of "
                   "changes has settled; Ctrl-C stops")
    p.add_argument("--settle", type=bounded(float, 0.1, 3600), default=2.0,
                   help="--watch: seconds without a new change before a batch is synced")
    p.set_defaults(func=cmd_sync)
