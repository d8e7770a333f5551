"""`cbir` command line: parses flags, calls one stage function, prints a short summary to stdout."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import CbirError, __version__

log = logging.getLogger("cbir")


def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (made by `cbir prepare`; stages read and write "
                   "their artifacts there: split.csv, detections.json, embeddings/, index/, reports/)")


DEFAULT_WORKERS = max(1, min(8, (os.cpu_count() or 2) - 1))  # leave a core to the model


def _workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"DataLoader worker processes for decoding (default: cores - 1, here {DEFAULT_WORKERS})")


def _weights(p: argparse.ArgumentParser, what: str, flag: str = "--weights") -> None:
    p.add_argument(flag, default="DEFAULT",
                   help=f"{what} weights: DEFAULT / a torchvision weights name (looked up in $CBIR_WEIGHTS_DIR, "
                        "the torch hub cache, then downloaded), a state_dict PATH, or 'none' (random, plumbing only)")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cub", required=True, help="CUB root: the folder holding images.txt and images/")
    p.add_argument("--out", required=True, help="run directory to create or update")
    p.add_argument("--split", default="song", help="song (classes 1-100 train / 101-200 test, Song et al. 2016), "
                   "official (train_test_split.txt), or classes:A-B/C-D (e.g. classes:1-10/11-20 for a subset)")
    p.add_argument("--skip-bad", action="store_true", help="drop undecodable images and empty boxes instead of "
                   "stopping; they are listed in RUN/bad_images.txt")


def _box_args(p: argparse.ArgumentParser, weights_flag: str = "--weights") -> None:
    p.add_argument("--detector", default="fasterrcnn_resnet50_fpn",
                   help="fasterrcnn_resnet50_fpn (default), fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn")
    _weights(p, "detector", weights_flag)
    p.add_argument("--detections", help="import boxes from FILE (COCO results of any detector) instead of running one")
    p.add_argument("--score", type=float, default=0.3, help="keep boxes scoring at least this (default 0.3)")
    p.add_argument("--fallback", default="gt", help="for an image with no box: gt (the GT box), full (whole image), "
                   "none (no instance); recorded per instance as its source")


def _embedding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="detector", help="detector (the ResNet-50 body of the run's Faster R-CNN, "
                   "default), resnet50, any torchvision classifier (mobilenet_v2, efficientnet_b0, ...), timm:NAME")
    _weights(p, "backbone")
    p.add_argument("--pool", default="gem", help="global pooling: gem (generalised mean, p=3; default, measured "
                   "better) or avg")
    p.add_argument("--crop-margin", type=float, default=0.0, help="grow each box by this fraction per side (default 0)")
    p.add_argument("--crop-resize", default="pad", help="box → square input: pad (letterbox, default), squash "
                   "(stretch) or center (resize short side + center crop, the ImageNet recipe); see benchmarks/results")
    p.add_argument("--batch-size", type=int, help="images per batch (default: 4 on CPU, 64 on CUDA — measured best)")


def cmd_prepare(a):
    from .data import PrepareConfig, prepare
    from .eda import eda

    result = prepare(PrepareConfig(Path(a.cub), Path(a.out), a.split, a.skip_bad, a.workers))
    counts = result.split.split.value_counts()
    print(f"{a.out}/split.csv: {len(result.split)} images ({counts.get('train', 0)} train, "
          f"{counts.get('test', 0)} test), {result.split.class_id.nunique()} classes; "
          f"{len(result.bad)} bad, {result.clipped} boxes clipped")
    if not a.no_eda:
        print(f"EDA report: {eda(Path(a.out))}")


def cmd_eda(a):
    from .eda import eda

    print(f"EDA report: {eda(Path(a.run))}")


def cmd_download(a):
    from .download import CUB_MD5, CUB_URL, download_cub

    print(download_cub(Path(a.out), a.url or CUB_URL, a.md5 or CUB_MD5))


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def cmd_detect(a):
    from .detect import DetectConfig, detect, write_detection_report

    if not a.evaluate_only:
        result = detect(DetectConfig(Path(a.run), a.detector, a.weights, _csv(a.splits), a.score, a.max_per_image,
                                     a.min_size, a.batch_size, a.workers, a.fallback, _csv(a.classes),
                                     Path(a.detections) if a.detections else None, a.device, a.force))
        m = result.meta
        print(f"{a.run}/detections.json: {m['instances']} instances on {m['images']} images "
              f"({m['sources']}), fallback rate {m['fallback_rate']:.1%}")
    if a.evaluate or a.evaluate_only:
        q = write_detection_report(Path(a.run))
        print(f"{a.run}/reports/detection.md: AP {q['AP']:.3f}, AP50 {q['AP50']:.3f}, "
              f"top box IoU>=0.5 {q['top_box_iou50_rate']:.1%}, median IoU {q['median_top_box_iou']:.3f}")


def _detect_parser(sub):
    p = sub.add_parser("detect", help="find the birds: torchvision detector or imported boxes → detections.json",
                       description="Run a torchvision detector over the run's images (or import another detector's "
                                   "COCO results with --detections) → RUN/detections.json (COCO results: every kept "
                                   "box, with its source) and RUN/detections.meta.json. Resumable; a finished run is "
                                   "a no-op unless --force.")
    _run_arg(p)
    _box_args(p)
    p.add_argument("--splits", default="test,train", help="comma-separated splits to detect on (default test,train)")
    p.add_argument("--max-per-image", type=int, default=10, help="keep at most this many boxes per image")
    p.add_argument("--min-size", default="auto", help="short side fed to the detector: auto = the photo's own "
                   "(clamped to 224-1024 px, ~2.5x faster on CUB), or pixels (torchvision's default is 800)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    p.add_argument("--classes", default="bird", help="comma-separated COCO category names to keep (default bird)")
    _device(p)
    p.add_argument("--force", action="store_true", help="redo a finished detection")
    p.add_argument("--evaluate", action="store_true", help="also score the boxes against gt_coco.json → reports/detection.md")
    p.add_argument("--evaluate-only", action="store_true", help="only write the quality report of existing detections")
    _workers(p)
    p.set_defaults(func=cmd_detect)


def cmd_embed(a):
    from .embed import EmbedConfig, embed

    vectors, table, spec = embed(EmbedConfig(Path(a.run), a.mode, a.backbone, a.weights, a.pool, a.crop_margin,
                                             a.crop_resize, a.size, a.roi, a.batch_size, a.workers, a.device,
                                             a.bf16, a.name, a.force))
    print(f"{a.run}/embeddings/{a.name or a.mode}.npy: {vectors.shape[0]} x {vectors.shape[1]} "
          f"({table.source.value_counts().to_dict()}), backbone {spec['backbone']} [{spec['weights_fingerprint']}]")


def _embed_parser(sub):
    p = sub.add_parser("embed", help="one vector per image, GT box or detected instance → embeddings/NAME.npy",
                       description="Embed whole images (full), ground-truth boxes (gt, the oracle) or every "
                                   "detected instance (det) with a CNN trunk → RUN/embeddings/NAME.npy (float32 "
                                   "[N, D]) + NAME.parquet (one row per vector) + NAME.json (the spec). Resumable.")
    _run_arg(p)
    p.add_argument("--mode", default="full", help="full | gt | det (default full)")
    _embedding_args(p)
    p.add_argument("--size", type=int, help="input side in pixels (default: the weights' own, e.g. 224)")
    p.add_argument("--roi", action="store_true", help="gt/det: one trunk pass per image, every box RoI-pooled "
                   "from the feature map (torchvision.ops.roi_align) instead of re-embedding each crop")
    _device(p)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA)")
    p.add_argument("--name", help="output name under embeddings/ (default: the mode)")
    p.add_argument("--force", action="store_true", help="replace an existing set made with another spec")
    _workers(p)
    p.set_defaults(func=cmd_embed)


def cmd_index(a):
    from .search import IndexConfig, add_photos, build_index, parse_ids, remove_images

    name = a.name or a.embeddings
    if a.add:
        added, errors = add_photos(Path(a.run), name, [Path(p) for p in a.add], not a.no_detector)
        print(f"index {name}: added {added} instance(s); {len(errors)} unreadable photo(s) skipped")
    elif a.remove:
        print(f"index {name}: removed {remove_images(Path(a.run), name, parse_ids(a.remove))} vector(s)")
    else:
        if not a.embeddings:
            raise CbirError("--embeddings NAME is required to build an index (e.g. --embeddings det)")
        si = build_index(IndexConfig(Path(a.run), a.embeddings, a.name, None if a.pca in ("none", "0") else int(a.pca),
                                     a.whiten, a.factory, a.gpu, _csv(a.gallery)))
        m = si.manifest
        print(f"{a.run}/index/{m['name']}.faiss: {m['count']} vectors, {m['factory']} (PCA fitted on "
              f"{m['train_rows']} train rows)")


def _index_parser(sub):
    p = sub.add_parser("index", help="PCA (fitted on train) + FAISS index over an embeddings set; --add / --remove",
                       description="Build RUN/index/NAME.faiss: L2-normalise, PCA fitted on the train split only, "
                                   "L2-normalise (inner product = cosine), then a FAISS index_factory index. With "
                                   "--add: detect → embed → add new photos; with --remove: drop images by id.")
    _run_arg(p)
    p.add_argument("--embeddings", help="embeddings set to index (e.g. full, gt, det)")
    p.add_argument("--name", help="index name (default: the embeddings name)")
    p.add_argument("--pca", default="256", help="PCA output dimension, or none (default 256)")
    p.add_argument("--whiten", action="store_true", help="PCA whitening")
    p.add_argument("--factory", default="auto", help="FAISS index_factory body: Flat, HNSW32, IVF1024,PQ32 ... or "
                   "auto (exact up to 100k vectors, IVF-SQ8 up to 50M, IVF-PQ beyond; see benchmarks/results/index_bench_cpu.md)")
    p.add_argument("--gpu", default="auto", help="auto (GPU when faiss-gpu sees one), off, or a GPU number")
    p.add_argument("--gallery", default="train,test", help="splits to put in the index (default train,test)")
    p.add_argument("--add", nargs="+", metavar="PATH", help="photos or folders of photos to add to an existing index")
    p.add_argument("--no-detector", action="store_true", help="with --add: embed whole photos, do not detect")
    p.add_argument("--remove", metavar="IDS", help="comma-separated image ids to remove from an existing index")
    p.set_defaults(func=cmd_index)


def cmd_search(a):
    import json

    from .data import load_rgb
    from .search import Querier, results_json

    q = Querier(Path(a.run), a.index, not a.no_detector)
    if a.image:
        boxes, merged = q.query(load_rgb(Path(a.image)), a.k)
    else:
        boxes, merged = q.query_id(a.query_id, a.k)
    doc = results_json(a.image or f"image_id {a.query_id}", boxes, merged)
    if a.json:
        print(json.dumps(doc, indent=1))
        return
    print(f"# {doc['query']} — {q.detector_note}")
    for i, b in enumerate(doc["boxes"], 1):
        print(f"\nbox {i} {b['box']} score {b['score']} ({b['source']})")
        print(_table(b["neighbours"]))
    print("\nimages (each ranked by its best instance):")
    print(_table(doc["images"]))


def _table(records: list[dict]) -> str:
    import pandas as pd

    if not records:
        return "(no results)"
    df = pd.DataFrame(records)[["similarity", "image_id", "instance", "class_name", "box", "path"]]
    return df.to_string(index=False)


def _search_parser(sub):
    p = sub.add_parser("search", help="nearest boxes and images for a new photo (--image) or a run image (--query-id)",
                       description="Detect the birds in a photo with the run's detector (whole photo when none is "
                                   "found or the boxes were imported), embed each box with the index's backbone and "
                                   "preprocessing, and list each box's nearest gallery instances and images.")
    _run_arg(p)
    p.add_argument("--index", required=True, help="index name under RUN/index/")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", help="a photo file")
    group.add_argument("--query-id", type=int, help="an image id already in the run (excluded from its own results)")
    p.add_argument("--k", type=int, default=10, help="neighbours per box (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--no-detector", action="store_true", help="query with the whole photo, no detection")
    p.set_defaults(func=cmd_search)


def cmd_evaluate(a):
    from .evaluate import SHOWN, EvalConfig, evaluate

    pcas = tuple(None if p.strip() in ("none", "0") else int(p) for p in a.pca.split(","))
    result = evaluate(EvalConfig(Path(a.run), _csv(a.embeddings), pcas, a.whiten, a.index, not a.no_plots))
    m = result.metrics
    print(m[["embeddings", "pca", "index"] + [c for c in SHOWN if c in m]].round(4).to_string(index=False))
    print(f"\nreports: {a.run}/reports/ (metrics.csv, comparison.md, pr_curves.png, embedding maps, grids)")


def _evaluate_parser(sub):
    p = sub.add_parser("evaluate", help="leave-one-out retrieval metrics on the test split → reports/",
                       description="Every test image queries all other test images (itself excluded), PCA fitted on "
                                   "train as in search. R@1/2/4/8, P@1/5/10, mAP, MAP@R, R-precision, NMI → "
                                   "reports/metrics.csv, comparison.md, pr_curves.png, embedding maps, top-10 grids.")
    _run_arg(p)
    p.add_argument("--embeddings", default="full,gt,det", help="comma-separated embeddings sets; A+B concatenates "
                   "per image (e.g. full+det). Missing sets are skipped with a warning (default full,gt,det)")
    p.add_argument("--pca", default="256", help="comma-separated PCA dims to compare, none = no PCA (default 256)")
    p.add_argument("--whiten", action="store_true", help="PCA whitening")
    p.add_argument("--index", default="exact", help="exact, or a FAISS factory body (e.g. HNSW32, IVF64,PQ16) "
                   "scored beside exact search with its recall@10 against exact")
    p.add_argument("--no-plots", action="store_true", help="metrics only, no pictures")
    p.set_defaults(func=cmd_evaluate)


def cmd_run(a):
    from .pipeline import RunConfig, run_all

    cfg = RunConfig(Path(a.cub), Path(a.out), a.split, a.skip_bad, a.detector, a.detector_weights,
                    Path(a.detections) if a.detections else None, a.score, a.fallback, a.backbone, a.weights,
                    _csv(a.modes), a.crop_resize, a.crop_margin, a.pool, None if a.pca in ("none", "0") else int(a.pca),
                    a.factory, a.index_mode, a.batch_size, a.workers, a.device)
    steps = run_all(cfg)
    print("stage                 seconds  result")
    for name, seconds, note in steps:
        print(f"{name:<21} {seconds:7.1f}  {note}")
    print(f"\n{a.out}/reports/comparison.md:\n")
    print((Path(a.out) / "reports" / "comparison.md").read_text())


def _run_parser(sub):
    p = sub.add_parser("run", help="the whole pipeline: prepare → detect → embed → index → evaluate",
                       description="Run every stage in order on a CUB folder, skipping stages already done with the "
                                   "same settings (rerun the same command to resume), then print the comparison.")
    _dataset_args(p)
    _box_args(p, "--detector-weights")
    _embedding_args(p)
    p.add_argument("--modes", default="full,gt,det", help="embedding modes to compare (default full,gt,det)")
    p.add_argument("--pca", default="256", help="PCA output dimension, or none (default 256)")
    p.add_argument("--factory", default="auto", help="FAISS factory of the saved index (see `cbir index -h`)")
    p.add_argument("--index-mode", default="det", help="which embeddings get a saved search index (default det)")
    _device(p)
    _workers(p)
    p.set_defaults(func=cmd_run)


def cmd_ui(a):
    from .ui import serve

    if a.share:
        log.warning("--share: the page will be reachable from the internet through a gradio.live link")
    serve(Path(a.run), a.index, a.host, a.port, a.share, a.detector != "none", a.device)


def _ui_parser(sub):
    p = sub.add_parser("ui", help="Gradio page: upload a photo, see the boxes and each box's neighbours",
                       description="Serve a page over `cbir search`: upload a photo (or click a test-split example), "
                                   "see every bird boxed with its score, and each box's nearest gallery images.")
    _run_arg(p)
    p.add_argument("--index", default="det", help="index name under RUN/index/ (default det)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also publish a public gradio.live link (off by default)")
    p.add_argument("--detector", default="run", help="run (the run's detector) or none (whole photo is the query)")
    _device(p)
    p.set_defaults(func=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description="Object-detection-based multi-instance image retrieval "
                                     "on CUB-200-2011 and your own photos. Stages: prepare → detect → embed → "
                                     "index → evaluate / search / ui; `run` chains them.")
    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read CUB, split it, check every image, write split.csv + gt_coco.json + EDA",
                       description="Read the official CUB layout, split it, decode every image and check every box; "
                                   "write RUN/split.csv, RUN/gt_coco.json (COCO instances, category 16 'bird') and "
                                   "RUN/eda/report.md.")
    _dataset_args(p)
    p.add_argument("--no-eda", action="store_true", help="skip the EDA report")
    _workers(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eda", help="(re)write the EDA report of a prepared run",
                       description="Plots and a summary table of the split, image sizes and GT boxes → RUN/eda/.")
    _run_arg(p)
    p.set_defaults(func=cmd_eda)

    p = sub.add_parser("download-cub", help="download and verify the official CUB_200_2011.tgz",
                       description="Download CUB_200_2011.tgz (resuming a partial download), check its md5, extract. "
                                   "Prints the CUB root to pass to `cbir prepare --cub`.")
    p.add_argument("--out", required=True, help="folder for the archive and the extracted data")
    p.add_argument("--url", help="mirror URL of the archive (default: CaltechDATA)")
    p.add_argument("--md5", help="expected md5 of the archive at --url")
    p.set_defaults(func=cmd_download)

    for register in _stage_parsers():
        register(sub)
    return parser


def _stage_parsers():
    """Subcommands of the later stages, each defined beside its own flags."""
    return [_detect_parser, _embed_parser, _index_parser, _search_parser, _evaluate_parser, _run_parser, _ui_parser]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        args.func(args)
    except CbirError as e:
        print(f"cbir {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbir {args.command}: interrupted; finished work is kept, run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
