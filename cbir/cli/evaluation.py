"""Evaluation commands, one per report: `evaluate`, `evaluate-objects`, `compare-methods`, `evaluate-text`."""

from __future__ import annotations

from pathlib import Path

from ..metrics.plots import MAPS
from ..retrieval.rerank import SERVED_DEFAULT, parse_methods
from .flags import (
    checked,
    csv_list,
    factory,
    force_arg,
    names,
    optional_names,
    parse_pca_arg,
    pca_list,
    run_arg,
    some_of,
    text,
    whiten_arg,
)


def evaluate_config(a, run: Path, embeddings: tuple[str, ...]):
    from ..evaluation.retrieval import EvalConfig

    return EvalConfig(run=run, embeddings=embeddings, pca=a.eval_pca, whiten=a.whiten, index=a.index,
                      served=csv_list(a.served), rerank=getattr(a, "rerank_list", parse_methods(f"none,{SERVED_DEFAULT}")),
                      plots=not a.no_plots, maps=csv_list(getattr(a, "maps", "pca,tsne")),
                      force=getattr(a, "force", False))


def cmd_evaluate(a):
    from ..evaluation.retrieval import SHOWN, evaluate

    result = evaluate(evaluate_config(a, a.run, csv_list(a.embeddings)))
    m = result.computed
    print(m[["embeddings", "reduction", "pca", "index", "rerank"] + [c for c in SHOWN if c in m]].round(4)
          .to_string(index=False))
    print(f"\nreport: {a.run}/reports/retrieval/ (metrics.csv, comparison.md — earlier rows kept —, plots)")


def add_evaluate(sub):
    p = sub.add_parser("evaluate", help="leave-one-out retrieval metrics on the test split → reports/retrieval",
                       description="Every test image queries all other test images (itself excluded). Rows per "
                                   "embeddings set x PCA (refit on train here) and per served index (--served: the "
                                   "saved index as users search it). R@K, P@K, mAP, MAP@R, R-precision, NMI → "
                                   "RUN/reports/retrieval; rows of earlier calls are kept.")
    run_arg(p)
    p.add_argument("--embeddings", type=names, default="full,gt,det",
                   help="comma-separated embeddings sets; A+B concatenates "
                   "per image (e.g. full+det). Missing sets are skipped with a warning (default full,gt,det)")
    p.add_argument("--pca", dest="eval_pca", default="auto", type=pca_list,
                   help="comma-separated PCA settings to compare: dims, none, auto (default auto)")
    whiten_arg(p)
    p.add_argument("--index", type=factory("exact"), default="exact",
                   help="exact, or a FAISS factory body (e.g. HNSW32, IVF64,PQ16) "
                   "scored beside exact search with its recall@10 against exact")
    p.add_argument("--served", type=optional_names, default="",
                   help="comma-separated saved index names to score as served")
    p.add_argument("--rerank", dest="rerank_list", default=f"none,{SERVED_DEFAULT}", type=checked(parse_methods),
                   help="comma-separated re-ranking methods scored side by side: none, aqe (α-query expansion), dba "
                        f"(database-side augmentation), kreciprocal (default none,{SERVED_DEFAULT}: plain and what "
                        "search and the page use)")
    p.add_argument("--no-plots", action="store_true", help="metrics only, no pictures")
    p.add_argument("--maps", type=some_of(*MAPS), default="pca,tsne",
                   help="comma-separated 2-D maps of each set: pca, tsne, umap "
                   "(umap-learn, `pip install 'cbir[metric]'`; ~20 s of compilation per call)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate_objects(a):
    from ..evaluation.objects import ObjectsConfig, evaluate_objects

    category = None if a.category == "none" else a.category
    metrics = evaluate_objects(ObjectsConfig(run=a.run, embeddings=csv_list(a.embeddings), pca=a.pca, category=category,
                                             force=a.force))
    shown = metrics[metrics.relevance != "weighted"]
    print(shown[["embeddings", "aggregation", "relevance", "P@10", "mAP", "nDCG@10", "queries"]].round(4)
          .to_string(index=False))
    print(f"\nreport: {a.run}/reports/objects/ (objects.md, metrics.csv" +
          (f", {category}.md, {category}_grid.png)" if category else ")"))


def add_evaluate_objects(sub):
    p = sub.add_parser("evaluate-objects", help="multi-object retrieval by object-set overlap (COCO) and reverse "
                       "search for one kind → reports/objects",
                       description="Every test image with GT objects queries all other test images. Relevance from "
                                   "the GT object sets (selection: shares a category; aggregation: holds all of the "
                                   "query's; weighted: multiset Jaccard, graded); box similarities aggregated into "
                                   "image scores (max, mean-best, symmetric, one-to-one assignment); P@K, mAP, nDCG. "
                                   "Plus reverse search for --category (every test box of it queries the others): "
                                   "proxy precisions and a picture grid. Redone only when its inputs change.")
    run_arg(p)
    p.add_argument("--embeddings", type=names, default="full,gt,det",
                   help="comma-separated embeddings sets (default full,gt,det)")
    p.add_argument("--pca", default="auto", type=parse_pca_arg, help="PCA refitted on the train split: a dimension, "
                   "none or auto (default)")
    p.add_argument("--category", type=text, default="person",
                   help="the kind for reverse search (default person; none: skip)")
    force_arg(p, "the report")
    p.set_defaults(func=cmd_evaluate_objects)


def cmd_compare_methods(a):
    from ..evaluation.methods import compare_methods

    table = compare_methods(a.run, csv_list(a.embeddings), a.pca)
    print(table.round(4).to_string(index=False))
    print(f"\nreport: {a.run}/reports/methods/methods.md")


def add_compare_methods(sub):
    p = sub.add_parser("compare-methods", help="NN, kNN vote and FAISS exact/HNSW/IVF on the same vectors → "
                       "reports/methods", description="Scikit-learn brute-force nearest neighbours, kNN majority-vote "
                       "classification and FAISS exact, HNSW32 and IVF search over each embeddings set's test vectors "
                       "(leave-one-out, PCA refitted on train): R@1, P@5, recall@10 vs exact, build time, queries/s.")
    run_arg(p)
    p.add_argument("--embeddings", type=names, default="det", help="comma-separated embeddings sets (default det)")
    p.add_argument("--pca", default="auto", type=parse_pca_arg, help="a dimension, none or auto (default)")
    p.set_defaults(func=cmd_compare_methods)


def cmd_evaluate_text(a):
    from ..evaluation.text import TextEvalConfig, evaluate_text

    result = evaluate_text(TextEvalConfig(run=a.run, models=csv_list(a.models or ""), force=a.force))
    print((Path(a.run) / "reports" / "text" / "text.md").read_text())
    print(f"report: {a.run}/reports/text/ (text.md, metrics.csv, metrics.json; {len(result['metrics'])} rows)")


def add_evaluate_text(sub):
    p = sub.add_parser("evaluate-text", help="text → image retrieval, attribute read-out and image + word queries "
                       "on the test split → reports/text",
                       description="For every text bridge of the run (or --models): CUB class descriptions and "
                                   "attribute vectors → test images (mAP, P@10 against chance), the ridge attribute "
                                   "read-out per attribute group and its attribute-vector query (the oracle), and "
                                   "image + colour-word queries; COCO captions → their photo (R@K) and category "
                                   "words → photos (mAP). Redone only when its inputs change.")
    run_arg(p)
    p.add_argument("--models", type=names,
                   help="comma-separated bridges (default: every `train-text` model of the run)")
    force_arg(p, "the report")
    p.set_defaults(func=cmd_evaluate_text)
