"""Flags every command group shares (the run folder, weights, devices, detector, embedding and index
settings) and the argparse types that check a value before any work, so a flag means the same thing in each
command and in `cbir run`."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace
from pathlib import Path

from .. import CbirError
from ..datasets import check_splits
from ..detection.results import FALLBACKS
from ..device import check_device
from ..engines import LOCAL, EngineConfig, parse_engine
from ..images import DEFAULT_MAX_PIXELS
from ..layout import check_name
from ..retrieval import check_store
from ..retrieval.budget import parse_budget
from ..retrieval.reduce import parse_pca, parse_shrinkage
from ..retrieval.rerank import METHODS, SERVED_DEFAULT, SHORTLIST

DEFAULT_WORKERS = max(1, min(8, (os.cpu_count() or 2) - 1))  # leave a core to the model


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error naming the flag and how to get help (no usage block), and help texts
    that show each default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelp)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class DefaultsHelp(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless its text already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def or_default(value, default):
    return default if value is None else value


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def bounded(kind, low=None, high=None):
    """An argparse type that also checks a range, so bad values fail before any work (`low` and `high`
    are kept on it for the flag tests)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' * (kind is int)} {kind.__name__}") from None
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} must lie in [{low}, {'∞' if high is None else high}]")
        return value
    parse.low, parse.high = low, high
    return parse


def text(value: str) -> str:
    """Any text, but not an empty one: an empty value is a slip (a shell variable that was not set)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty value; give one or leave the flag out")
    return value


def path(value: str) -> Path:
    """A file or folder: an empty value would silently mean the current folder."""
    return Path(text(value))


def name(value: str) -> str:
    """A name that becomes a folder inside the run (an embeddings set, an index, a model)."""
    return checked(lambda v: check_name(v, "name"))(value)


def names(value: str, *, empty: bool = False) -> str:
    """Comma-separated names (`A+B` fusions and `SET@MODEL` sets included), at least one unless `empty`."""
    items = csv_list(value)
    if not items and not empty:
        raise argparse.ArgumentTypeError(f"{value!r}: give at least one name, comma-separated")
    for item in items:
        for part in item.split("+"):
            name(part)
    return value


def some_of(*choices: str):
    """Comma-separated values, each one of `choices`, at least one (returned as given)."""
    def parse(value):
        items = csv_list(value)
        unknown = [i for i in items if i not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{value!r}: use {', '.join(choices)}, comma-separated")
        return value
    return parse


def auto_or(kind, low, high, *words: str):
    """'auto' (or another of `words`), else a number of `kind` in [low, high], kept as text."""
    number = bounded(kind, low, high)

    def parse(value):
        if value in ("auto", *words):
            return value
        try:
            number(value)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{value!r}: use {', '.join(('auto', *words))} or a number in "
                                             f"[{low}, {'∞' if high is None else high}]") from None
        return value
    return parse


def checked(check):
    """An argparse type from a checker that raises CbirError, so its one-line message is argparse's."""
    def parse(value):
        try:
            return check(text(value))
        except CbirError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


SPLIT = re.compile(r"song|official|coco_split|gallery|random:(0?\.\d+|[01](\.\d*)?)(:\d+)?|classes:[\d,\s-]+/[\d,\s-]+")


def split(value: str) -> str:
    """The spelling of --split (whether the dataset has that split is the reader's check)."""
    if not SPLIT.fullmatch(text(value)):
        raise argparse.ArgumentTypeError(f"{value!r}: CUB takes song, official or classes:A-B/C-D; COCO takes "
                                         f"random:F[:SEED] or coco_split")
    return value


def class_labels(value: str) -> str:
    """--class-labels: 'folders' or a CSV file of path,label that exists."""
    if text(value) != "folders" and not Path(value).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{value!r}: use folders (the first-level folder is the class) or a CSV "
                                         f"file of path,label")
    return value


def splits(value: str) -> str:
    """Split names, comma-separated: train and/or test."""
    checked(lambda v: check_splits(csv_list(v), "splits"))(value)
    return value


def filter_expression(value: str) -> str:
    """--filter, tried now on a row of every field, so a typo fails before any photo is read."""
    from ..retrieval.expression import check_expression

    return checked(check_expression)(value)


def optional_names(value: str) -> str:
    """Comma-separated names, or none at all (an empty value is the default)."""
    return names(value, empty=True)


def image_ids(value: str) -> str:
    from ..retrieval.ingest import parse_ids

    checked(parse_ids)(value)
    return value


def url(value: str) -> str:
    if not re.fullmatch(r"(https?|file)://\S+", text(value)):
        raise argparse.ArgumentTypeError(f"{value!r}: give an http://, https:// or file:// URL")
    return value


def md5(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text(value)):
        raise argparse.ArgumentTypeError(f"{value!r}: an md5 is 32 hexadecimal digits")
    return value


def server_url(value: str) -> str:
    """http(s)://HOST[:PORT][/PREFIX] of a running service."""
    if not re.fullmatch(r"https?://[^\s/:]+(:\d{1,5})?(/\S*)?", text(value)):
        raise argparse.ArgumentTypeError(f"{value!r}: give the service's http:// or https:// URL, e.g. "
                                         f"http://127.0.0.1:8000")
    return value


def auth(value: str) -> str:
    """USER:PASS, both parts non-empty (the page's own check, made with the flags)."""
    from ..ui.app import parse_auth

    checked(parse_auth)(value)
    return value


FACTORY = re.compile(r"[A-Za-z][A-Za-z0-9_.]*(,[A-Za-z][A-Za-z0-9_.]*)*")


def factory(*words: str):
    """One of `words`, or the spelling of a FAISS `index_factory` body (FAISS itself judges it against the
    vectors' dimension when the index is built)."""
    def parse(value):
        if value in words or FACTORY.fullmatch(text(value)):
            return value
        raise argparse.ArgumentTypeError(f"{value!r}: use {' or '.join(words)} or a FAISS index_factory body such as "
                                         f"HNSW32 or IVF1024,PQ32")
    return parse


def detector(value: str) -> str:
    if value.startswith("onnx:") and not value[len("onnx:"):].strip():
        raise argparse.ArgumentTypeError(f"{value!r}: onnx:PATH needs the model's path")
    return text(value)


def run_arg(p):
    p.add_argument("--run", required=True, type=path, help="run directory (made by `cbir prepare`; every stage "
                   "reads and writes its artifacts there, see `cbir status`)")


def workers_arg(p):
    p.add_argument("--workers", type=bounded(int, 0, 64), default=None,
                   help=f"worker processes for decoding; 0 decodes in the main process (default: cores - 1, here "
                        f"{DEFAULT_WORKERS}; embedding on a CPU of 2 cores or fewer decodes inline, measured faster)")


def engine_args(p):
    p.add_argument("--engine", type=checked(parse_engine), default=LOCAL, metavar="local|ray|ray:HOST:PORT",
                   help="where the detector or encoder runs: this process (local, the default), a Ray instance "
                        "started on this machine (ray), or a running Ray cluster (ray:HOST:PORT); needs .[ray]; "
                        "the results are the same on every engine (docs/cluster.md)")
    p.add_argument("--actors", type=bounded(int, 1, 100000), help="--engine ray: model replicas (default: one per "
                   "CPU of the cluster, or per GPU with --gpus-per-actor)")
    p.add_argument("--gpus-per-actor", type=bounded(float, 0, 64), default=0.0,
                   help="--engine ray: GPUs each replica holds (0.5 puts two on a GPU)")
    p.add_argument("--cpus-per-actor", type=bounded(float, 0.01, 1024), default=1.0,
                   help="--engine ray: CPUs each replica holds (its torch threads)")


def engine_config(a) -> EngineConfig:
    return replace(a.engine, actors=a.actors, gpus_per_actor=a.gpus_per_actor, cpus_per_actor=a.cpus_per_actor)


def weights_arg(p, what: str, flag: str = "--weights"):
    p.add_argument(flag, type=text, default="DEFAULT",
                   help=f"{what} weights: DEFAULT / a torchvision weights name (looked up in $CBIR_WEIGHTS_DIR, "
                        "the torch hub cache, then downloaded), a state_dict PATH, or 'none' (random, plumbing only)")


def moved_weights_args(p):
    p.add_argument("--weights", type=text,
                   help="new place of the backbone weights file if it moved (checked against the "
                   "recorded fingerprint)")
    p.add_argument("--detector-weights", type=text, help="new place of the detector weights file if it moved")


def device_arg(p):
    p.add_argument("--device", default="auto", type=checked(check_device),
                   help="auto (CUDA when present), cpu, cuda, cuda:N")


def query_detector_arg(p):
    p.add_argument("--detector", type=detector, default="run",
                   help="what boxes new photos: run (the detector that boxed the run), "
                   "none (the whole photo is the query), a train-detector model folder, onnx:PATH (its .labels.txt "
                   "beside it) or a torchvision detector name — e.g. a trained detector for a run of imported boxes")


def force_arg(p, what: str):
    p.add_argument("--force", action="store_true", help=f"redo {what} even when its inputs are unchanged")


def dataset_args(p):
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--cub", type=path, help="CUB root: the folder holding images.txt and images/")
    source.add_argument("--coco", type=path, metavar="INSTANCES.json", help="a COCO instances file (with --images)")
    source.add_argument("--photos", type=path, metavar="DIR", help="any folder of photos, searched recursively; "
                        "files that are not usable photos are skipped and listed in RUN/dataset/skipped.csv")
    p.add_argument("--images", type=path, help="--coco: the folder its file_name entries are relative to")
    p.add_argument("--captions", type=path, help="--coco: a COCO captions file, kept as dataset/captions.parquet")
    p.add_argument("--split", type=split,
                   help="CUB: song (default; classes 1-100 train / 101-200 test, Song et al. 2016), "
                   "official (train_test_split.txt), or classes:A-B/C-D (e.g. classes:1-10/11-20 for a subset). "
                   "COCO: random:F[:SEED] (default random:0.5: a share F to train, by a hash of each image id) or "
                   "coco_split (train2017 → train, val2017 → test). Photos: gallery (default without labels: every "
                   "photo is gallery) or random:F[:SEED] (default random:0.5 with --class-labels; by a hash of the "
                   "photo's bytes, stable across rescans)")
    p.add_argument("--class-labels", type=class_labels, metavar="folders|FILE.csv",
                   help="--photos: the class of each photo, from its first-level folder (folders, torchvision's "
                   "ImageFolder convention) or a CSV of path,label (paths under DIR); default: no labels")
    p.add_argument("--boxes", type=path, metavar="COCO.json", help="--photos: known boxes, a COCO instances file "
                   "whose file_name entries are paths under DIR")
    p.add_argument("--strict", action="store_true", help="--photos: stop at the first file that is not a usable "
                   "photo instead of skipping it")
    p.add_argument("--skip-bad", action="store_true", help="drop bad annotation records, undecodable images and "
                   "empty boxes instead of stopping; they are listed in RUN/dataset/bad_images.txt (with `run`, also "
                   "bad entries of --detections, listed in RUN/detections/bad_detections.txt)")
    p.add_argument("--max-pixels", type=bounded(int, 1), default=DEFAULT_MAX_PIXELS,
                   help=f"refuse photos larger than this (default {DEFAULT_MAX_PIXELS:,}); larger-than-40-Mpx photos "
                        "are decoded reduced, boxes stay in original pixels")


def box_args(p):
    p.add_argument("--detector", type=detector, default="fasterrcnn_resnet50_fpn",
                   help="fasterrcnn_resnet50_fpn (default), fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn, "
                        "a `cbir train-detector` model folder (RUN/models/NAME), or onnx:PATH (a TF Object Detection "
                        "API SSD or torchvision export; needs onnxruntime)")
    weights_arg(p, "detector", "--detector-weights")  # --weights is always the backbone's
    p.add_argument("--labels", type=path, help="label file of an ONNX detector (for names; ids are COCO's)")
    p.add_argument("--detections", type=path, help="import boxes from FILE (COCO results of any detector) instead "
                   "of running one")
    p.add_argument("--score", type=bounded(float, 0, 1), default=0.3,
                   help="keep boxes scoring at least this (default 0.3)")
    p.add_argument("--fallback", default="auto", choices=FALLBACKS, help="for an image with no box: gt (its GT "
                   "boxes), full (whole image), none (no instance), auto (default: gt, or full for a photo folder "
                   "without known boxes); recorded per instance as its source")
    p.add_argument("--categories", "--classes", dest="categories", type=names, default="auto",
                   help="comma-separated category names to keep, e.g. person,dog (default auto: the dataset's own "
                        "categories — CUB: bird, COCO: all)")
    p.add_argument("--min-size", type=auto_or(int, 32, 4096), default="auto",
                   help="short side fed to a torchvision detector: auto = the photo's "
                   "own (clamped to 224-1024 px, ~2.5x faster on CUB; a trained detector: its training size), or "
                   "pixels (torchvision's default is 800)")


def embedding_args(p):
    p.add_argument("--backbone", type=text, default="detector",
                   help="detector (the ResNet-50 body of the run's Faster R-CNN, "
                   "default), resnet50, any torchvision classifier (mobilenet_v2, efficientnet_b0, ...), timm:NAME")
    weights_arg(p, "backbone")
    p.add_argument("--pool", default="gem", choices=("gem", "avg"), help="global pooling: gem (generalised mean, "
                   "p=3; default, measured better) or avg")
    p.add_argument("--crop-margin", type=bounded(float, 0, 2), default=0.0,
                   help="grow each box by this fraction per side (default 0)")
    p.add_argument("--crop-resize", default="pad", choices=("pad", "squash", "center"), help="box → square input: "
                   "pad (letterbox, default), squash (stretch) or center (ImageNet recipe); see benchmarks/results")
    p.add_argument("--batch-size", type=bounded(int, 1, 4096), help="model inputs (boxes, or photos with --roi) per "
                   "batch (default: the fastest batch and memory format, timed for this backbone and device at first "
                   "use and cached)")


def whiten_arg(p):
    p.add_argument("--whiten", nargs="?", const=0.0, default=None, metavar="SHRINK",
                   type=checked(parse_shrinkage),
                   help="PCA whitening (needs a PCA), its eigenvalues shrunk toward their mean by SHRINK in [0, 1]: "
                        "0 plain whitening (the flag alone), 1 none; e.g. --whiten 0.5 (default: off)")


def index_args(p):
    p.add_argument("--pca", default="auto", type=parse_pca_arg, help="PCA output dimension, none, or auto (default: "
                   "none with fewer than 2 train vectors per dimension, else the dimension keeping 99%% of the "
                   "train variance; the choice and why are in the index's meta.json)")
    whiten_arg(p)
    p.add_argument("--factory", type=factory("auto"), default="auto",
                   help="FAISS index_factory body: Flat, HNSW32, IVF1024,PQ32 ... or "
                   "auto (exact up to 100k vectors, IVF-SQ8 up to 50M, IVF-PQ beyond; "
                   "benchmarks/results/index_bench_cpu.md)")
    p.add_argument("--gpu", type=auto_or(int, 0, 1024, 'off'), default="auto",
                   help="auto (GPU when faiss-gpu sees one), off, or a GPU number")
    p.add_argument("--memory-budget", type=checked(parse_budget), metavar="SIZE",
                   help="choose the FAISS layout for this RAM budget and the vector count, as autofaiss does: exact, "
                        "IVF-SQ8, IVF-PQ, or IVF-SQ8 with its inverted lists on disk (memory-mapped); e.g. 4G, 512M. "
                        "The choice and its reason go into the index's meta.json (default: --factory)")
    p.add_argument("--refine", type=bounded(int, 0, 100_000), default=0, metavar="K",
                   help="re-score each query's top K exactly from the float vectors on disk, to win back the "
                        "recall that compressed codes lose (e.g. 100; default 0: off)")
    p.add_argument("--store", default="faiss", type=checked(check_store),
                   help="where the vectors live: faiss (default, files in the run), milvus-lite:PATH.db (Milvus Lite, "
                        "one local file; relative paths are inside the run) or milvus://HOST:PORT (a Milvus server)")

parse_pca_arg = checked(parse_pca)


def pca_list(value: str):
    """Comma-separated PCA settings, at least one."""
    if not csv_list(value):
        raise argparse.ArgumentTypeError(f"{value!r}: give dims, none or auto, comma-separated")
    return tuple(parse_pca_arg(p) for p in csv_list(value))


def serving_args(p, port: int) -> None:
    """What the page and the service share: the run, its index, where to listen, and how queries are answered."""
    run_arg(p)
    p.add_argument("--index", type=name, default="det", help="index name under RUN/index/ (default det)")
    p.add_argument("--host", type=text, default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=bounded(int, 1, 65535), default=port, help=f"port (default {port})")
    query_detector_arg(p)
    rerank_arg(p)
    device_arg(p)
    moved_weights_args(p)


def rerank_arg(p):
    p.add_argument("--rerank", default=SERVED_DEFAULT, choices=METHODS,
                   help=f"re-rank each box's top {SHORTLIST} among themselves: none, aqe, dba or kreciprocal "
                        f"(default {SERVED_DEFAULT}: +16 MAP@R points on the CUB sample, R@1 not lower; README)")


def training_loop_args(p, epochs: int | str, patience: int, batch: int, min_batch: int, default_name: str):
    """The flags of the shared training loop (`training.stage.fit`), with each trainer's own defaults
    (`epochs`: a number, or the text saying how the trainer chooses it)."""
    p.add_argument("--epochs", type=bounded(int, 1, 10000), default=epochs if isinstance(epochs, int) else None,
                   help=f"default {epochs}")
    p.add_argument("--patience", type=bounded(int, 1, 10000), default=patience, help="stop after this many epochs "
                   f"without a better validation MAP@R (default {patience})")
    p.add_argument("--batch-size", type=bounded(int, min_batch, 65536), default=batch, help=f"default {batch}")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 31), default=0)
    p.add_argument("--name", type=name, help=f"model and output embeddings name (default {default_name})")
    force_arg(p, "the training")
