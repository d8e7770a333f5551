"""The `evaluate` stage: leave-one-out retrieval over the test split (Song et al. protocol) for each
embeddings set → the `reports/retrieval` artifact.

Two kinds of rows, labelled in the `reduction` column:
- `refit`: the reduction is fitted here on the train split (PCA dims to compare), exact search as the
  reference, and an approximate FAISS factory scored beside it (`--index`);
- `served:NAME`: the saved index a user searches — its own reduction, and its own store searched among
  the test rows (recall@10 against exact search in that space).
A narrower evaluate replaces its own rows and keeps the others.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, commit, fingerprint, read_table, writing
from ..datasets import check_no_leak, load_dataset
from ..encoders.stage import load_embeddings
from ..layout import RunLayout
from ..metrics.ranking import Gallery, exact_metrics, nmi, ranked_metrics
from ..retrieval.faiss_store import set_search_params
from ..retrieval.reduce import reduce
from ..retrieval.rerank import SERVED_DEFAULT, Rerank, rerank_matrix
from ..retrieval.saved import load_index

log = logging.getLogger(__name__)

REPORT = "retrieval"
KEY = ["embeddings", "reduction", "pca", "index", "rerank"]
SHOWN = ["R@1", "P@1", "R@2", "R@4", "R@8", "P@5", "P@10", "mAP", "MAP@R", "R-precision", "NMI", "recall@10 vs exact"]
DEPTH = 100  # ranking depth of approximate searches


def gallery_from(name: str, vectors: np.ndarray, table: pd.DataFrame, split: str = "test") -> Gallery:
    """A split's rows → per-image query (top-scoring instance) and instance blocks grouped by image."""
    part = table[table.split == split].reset_index()
    part = part.sort_values(["image_id", "score", "instance"], ascending=[True, False, True], kind="stable")
    if part.empty:
        raise CbirError(f"embeddings {name}: no {split} rows to evaluate")
    rows = part["index"].to_numpy()
    image_ids = part.image_id.to_numpy()
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]])
    instances = np.asarray(vectors[rows])
    return Gallery(instances[starts], instances, starts, part.class_id.to_numpy()[starts], image_ids[starts],
                   part[["x", "y", "w", "h"]].to_numpy(float), rows)


def concat_galleries(parts: list[Gallery]) -> Gallery:
    """full+det style fusion: per image, the concatenation of each part's query vector / sqrt(parts)."""
    common = set(parts[0].image_ids)
    for p in parts[1:]:
        common &= set(p.image_ids)
    ids = np.array(sorted(common))
    vecs = [p.query[np.searchsorted(p.image_ids, ids)] for p in parts]
    query = np.concatenate(vecs, 1) / np.sqrt(len(parts))
    labels = parts[0].labels[np.searchsorted(parts[0].image_ids, ids)]
    return Gallery(query, query, np.arange(len(ids)), labels, ids)


def refit_reduction(layout: RunLayout, name: str, pca: int | str | None, whiten: float | None
                    ) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Every vector of a set through a reduction fitted here on its train rows only (leaks refused)."""
    vectors, table, emb = load_embeddings(layout, name)
    check_no_leak(layout, name, table)
    is_train = (table.split == "train").to_numpy()
    if not is_train.any():
        raise CbirError(f"embeddings {name}: no train rows to fit PCA on")
    return reduce(np.asarray(vectors), np.asarray(vectors[is_train]), pca, whiten), table, emb


def load_gallery(layout: RunLayout, name: str, pca: int | str | None, whiten: float | None) -> tuple[Gallery, Gallery, dict]:
    """Refit reduction: reduced test and train galleries (train: for training an approximate index)."""
    if "+" in name:
        parts = [load_gallery(layout, n, pca, whiten) for n in name.split("+")]
        info = {"backbone": "+".join(dict.fromkeys(p[2]["backbone"] for p in parts)),
                "fingerprints": {k: v for p in parts for k, v in p[2]["fingerprints"].items()}}
        return concat_galleries([p[0] for p in parts]), concat_galleries([p[1] for p in parts]), info
    reduced, table, emb = refit_reduction(layout, name, pca, whiten)
    info = {"backbone": emb["spec"]["backbone"], "fingerprints": {layout.embeddings(name): emb["fingerprint"]}}
    return gallery_from(name, reduced, table), gallery_from(name, reduced, table, "train"), info


def refit_approximate(g: Gallery, train: np.ndarray, factory: str, exact_top: np.ndarray) -> dict[str, float]:
    """An approximate FAISS index over the test instances, trained on train vectors only."""
    try:
        index = faiss.index_factory(g.instances.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise CbirError(f"--index {factory!r}: FAISS cannot build it ({str(e).splitlines()[-1][:100]})") from None
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.add(np.ascontiguousarray(g.instances, dtype=np.float32))
    set_search_params(index)
    _, ids = index.search(np.ascontiguousarray(g.query, dtype=np.float32), min(DEPTH, len(g.instances)))
    return ranked_metrics(g, ids, exact_top)


@dataclass(kw_only=True)
class EvalConfig:
    run: Path
    embeddings: tuple[str, ...] = ("full", "gt", "det")
    pca: tuple[int | str | None, ...] = ("auto",)
    whiten: float | None = None  # PCA whitening with this shrinkage; None: off
    index: str = "exact"  # or a FAISS factory body (e.g. HNSW32) scored beside exact search
    served: tuple[str, ...] = ()  # saved indexes to score as served
    # re-ranking methods side by side (served rows: on each shortlist); by default plain and the served default
    rerank: tuple[Rerank, ...] = (Rerank(), Rerank(method=SERVED_DEFAULT))
    plots: bool = True
    maps: tuple[str, ...] = ("pca", "tsne")  # 2-D maps of each set (metrics.plots.MAPS)
    force: bool = False

    def __post_init__(self):
        from ..metrics.plots import MAPS

        unknown = set(self.maps) - set(MAPS)
        if unknown:
            raise CbirError(f"--maps {','.join(sorted(unknown))}: choose from {', '.join(MAPS)}")
        if "umap" in self.maps and self.plots and importlib.util.find_spec("umap") is None:
            raise CbirError("--maps umap needs umap-learn: pip install 'cbir[metric]'")


@dataclass
class Evaluation:
    metrics: pd.DataFrame  # every row of the report (earlier ones kept)
    computed: pd.DataFrame = field(default_factory=pd.DataFrame)  # the rows of this call
    galleries: dict[str, Gallery] = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _score(result: Evaluation, key: str, gallery: Gallery, base: dict, approximate,
           rerank: Rerank = Rerank()) -> list[dict]:
    """Exact rows (and the approximate one) of a gallery; a re-ranked row scores the re-ranked similarities
    (NMI and the pictures belong to the embedding itself, so only the plain row has them)."""
    reranked = None if rerank.method == "none" else \
        rerank_matrix(rerank, gallery.query, gallery.instances, query_rows=gallery.starts)
    metrics, stats = exact_metrics(gallery, reranked)
    row = {**base, "index": "exact", "rerank": rerank.label, **metrics, "excluded queries": stats.excluded}
    if reranked is not None:
        row["fingerprint"] = fingerprint([base["fingerprint"], rerank.label])
    rows = [row | ({"NMI": nmi(gallery)} if reranked is None else {})]
    if approximate is not None and reranked is None:
        rows.append({**base, "rerank": rerank.label, **approximate(np.concatenate(stats.top))})
    if reranked is None:
        result.galleries[key] = gallery
    else:
        key = f"{key} + {rerank.method}"
    ranks = np.arange(1, len(stats.pr_hits) + 1)
    n_queries = len(gallery.query) - stats.excluded
    result.curves[key] = (stats.pr_hits / stats.relevant_total, stats.pr_hits / (ranks * n_queries))
    return rows


def _refit_rows(layout: RunLayout, cfg: EvalConfig, name: str, pca: int | str | None, result: Evaluation) -> list[dict]:
    gallery, train, info = load_gallery(layout, name, pca, cfg.whiten)
    base = {"embeddings": name, "reduction": "refit", "backbone": info["backbone"], "pca": str(pca or "none"),
            "dim": gallery.query.shape[1], "images": len(gallery.query), "instances": len(gallery.instances),
            "fingerprint": fingerprint([info["fingerprints"], pca, cfg.whiten, cfg.index])}
    approximate = None if cfg.index == "exact" else \
        (lambda top: {"index": cfg.index, **refit_approximate(gallery, train.instances, cfg.index, top)})
    return [r for rerank in cfg.rerank
            for r in _score(result, f"{name} (PCA {pca or 'none'})", gallery, base, approximate, rerank)]


def _served_rows(layout: RunLayout, name: str, result: Evaluation, rerank: tuple[Rerank, ...]) -> list[dict]:
    """Score a saved index as served: its reduction and its store, searched among the test rows."""
    si = load_index(layout, name, gpu="auto")
    emb_name = si.manifest["embeddings"]
    vectors, table, emb = load_embeddings(layout, emb_name)
    if emb["spec"]["fingerprint"] != si.manifest["embedding_spec"]["fingerprint"]:
        raise CbirError(f"index {name} was built from other {emb_name} vectors than the run holds now; rebuild it "
                        f"with `cbir index --embeddings {emb_name} --name {name}`")
    check_no_leak(layout, emb_name, table)
    gallery = gallery_from(emb_name, si.store.transform(np.asarray(vectors)), table)
    test_ids = si.table.index[si.table.split == "test"].to_numpy(np.int64)
    position = np.full(len(table), -1, np.int64)
    position[gallery.rows] = np.arange(len(gallery.rows))

    def approximate(top, rerank: Rerank = Rerank()):
        queries = np.asarray(vectors[gallery.rows[gallery.starts]])
        _, ids = si.search(queries, min(DEPTH, len(test_ids)), subset=test_ids, rerank=rerank)
        return {"index": _served_label(si.manifest),
                **ranked_metrics(gallery, np.where(ids >= 0, position[np.maximum(ids, 0)], -1), top)}

    base = {"embeddings": emb_name, "reduction": f"served:{name}", "rerank": "none",
            "backbone": si.manifest["backbone"],
            "pca": str(si.manifest["pca"] or "none"), "dim": gallery.query.shape[1], "images": len(gallery.query),
            "instances": len(gallery.instances),
            "fingerprint": fingerprint([Artifact(layout, layout.index(name)).meta()["files"], emb["fingerprint"]])}
    rows = _score(result, f"{emb_name} (served {name})", gallery, base, approximate)
    # re-ranking as served: each query's shortlist from the store, re-ranked among itself
    return rows + [{**base, "rerank": r.label, "fingerprint": fingerprint([base["fingerprint"], r.label]),
                    **approximate(None, r)} for r in rerank if r.method != "none"]


def _served_label(manifest: dict) -> str:
    """What the served index is: its FAISS body, or the Milvus index type it was mapped to."""
    body = _body(manifest["factory"])
    return f"milvus:{manifest['milvus_index']}" if manifest.get("store") == "milvus" else body


def _body(factory: str) -> str:
    """The index part of a factory string, without the reduction and the id map."""
    parts = [p for p in factory.split(",") if not p.startswith(("L2norm", "PCA", "IDMap"))]
    return ",".join(parts) or "Flat"


def check_labelled(layout) -> None:
    """Retrieval is scored on image labels: a photo folder prepared without them has nothing to score."""
    if not load_dataset(layout).labelled:
        raise CbirError(f"{layout.root}: the photos have no labels (prepared without --class-labels), so there is "
                        f"nothing to score; search, the page and --add work without them")


def evaluate(cfg: EvalConfig) -> Evaluation:
    """Score every embeddings set x PCA setting (and each served index) → reports/retrieval."""
    with writing(cfg.run) as layout:
        check_labelled(layout)
        present = [n for n in cfg.embeddings
                   if all(Artifact(layout, layout.embeddings(p)).exists() for p in n.split("+"))]
        missing = sorted(set(cfg.embeddings) - set(present))
        if missing:
            log.warning("skipping embeddings not found in %s/embeddings: %s", layout.root, ", ".join(missing))
        if not present and not cfg.served:
            raise CbirError(f"{layout.root}/embeddings: none of {', '.join(cfg.embeddings)} exist; run `cbir embed` first")
        result = Evaluation(pd.DataFrame())
        rows = [r for name in present for pca in cfg.pca for r in _refit_rows(layout, cfg, name, pca, result)]
        rows += [r for name in cfg.served for r in _served_rows(layout, name, result, cfg.rerank)]
        result.computed = pd.DataFrame(rows)
        art = Artifact(layout, layout.report(REPORT))
        previous = read_table(art.folder() / layout.METRICS) if art.exists() else pd.DataFrame(columns=KEY)
        previous = previous.reindex(columns=list(dict.fromkeys([*previous.columns, "rerank"]))).fillna(
            {"rerank": "none"}).astype({k: str for k in KEY})  # rows from before re-ranking existed
        computed = result.computed.astype({k: str for k in KEY})
        kept = previous[~previous.set_index(KEY).index.isin(computed.set_index(KEY).index)]
        result.metrics = pd.concat([kept, computed], ignore_index=True).sort_values(KEY, kind="stable",
                                                                                   ignore_index=True)
        upstream = _upstream(layout, result.metrics)
        with commit(art, {"rows": sorted(result.metrics.fingerprint)}, upstream) as staged:
            if art.exists():  # pictures of rows that were not recomputed stay
                folder = art.folder()
                staged.copy_from(folder, [p.name for p in folder.glob("*.png")])
            staged.write_table(layout.METRICS, result.metrics)
            staged.write_json("metrics.json", result.metrics.to_dict(orient="records"))
            if cfg.plots:
                from ..metrics.plots import write_plots

                write_plots(load_dataset(layout), result, staged.folder, cfg.maps)
            plots = sorted(p.name for p in staged.folder.glob("*.png"))
            from .trained import training_table

            trained = training_table(layout, result.metrics)
            if len(trained):
                staged.write_table("trained.csv", trained)
            staged.file(layout.COMPARISON).write_text(comparison_markdown(result.metrics, layout.root, plots, trained))
            staged.summary.update(rows=len(result.metrics), computed=len(result.computed))
        return result


def _upstream(layout: RunLayout, metrics: pd.DataFrame) -> dict[str, str]:
    """Current fingerprints of every artifact the report's rows were computed from."""
    names = {layout.embeddings(p) for e in metrics.embeddings for p in e.split("+")}
    names |= {layout.index(r.split(":", 1)[1]) for r in metrics.reduction if r.startswith("served:")}
    return {n: Artifact(layout, n).fingerprint for n in sorted(names) if Artifact(layout, n).exists()}


BLANKS = ("— : not computed for that row. Approximate-index rows (`index` other than exact) score the top of "
          "each ranking (R@K, P@K, MAP@R) and its recall@10 against exact search; mAP, R-precision and NMI need the "
          "whole ranking or the vectors themselves and are on the row's exact twin. `recall@10 vs exact` is left "
          "out on exact rows (1 by definition). Re-ranking reorders each ranking but not the vectors, so re-ranked "
          "rows have no NMI. P@1 equals R@1: at K=1 both ask whether the first result is relevant.")


def with_blanks(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`columns` as 3-decimal text, "—" where nothing was computed (NaN in the frame, null in the JSON)."""
    table = table.copy()
    for c in columns:
        table[c] = table[c].map(lambda v: "—" if pd.isna(v) else f"{v:.3f}")
    return table


def comparison_markdown(metrics: pd.DataFrame, run: Path, plots: list[str] = (),
                        trained: pd.DataFrame | None = None) -> str:
    """Two tables: the embeddings and reductions without re-ranking, then each re-ranking beside the row it
    re-ranks (same embeddings, reduction, PCA and index); trained sets against their source (when any);
    what a blank means; links to the plots."""
    shown = [c for c in SHOWN if c in metrics]
    table = with_blanks(metrics[["embeddings", "reduction", "backbone", "pca", "dim", "index", "rerank", "images"]
                                + shown], shown)
    plain = table.rerank == "none"
    reranked_keys = table.loc[~plain, ["embeddings", "reduction", "pca", "index"]].drop_duplicates()
    with_base = table.merge(reranked_keys, on=["embeddings", "reduction", "pca", "index"])  # plain + re-ranked
    group = ["embeddings", "reduction", "pca", "index"]
    with_base = with_base.assign(reranked=with_base.rerank != "none").sort_values(
        [*group, "reranked"], kind="stable").drop(columns="reranked")  # each plain row first, its re-rankings after
    parts = ["# Retrieval comparison", "",
             f"Run `{run}`: each test image queries all other test images (itself excluded). "
             "`reduction` refit: PCA fitted here on the train split only (`dim`: the dimension used — PCA is "
             "capped by the number of train vectors; `auto` keeps the raw vectors when there are fewer than 2 train "
             "vectors per dimension); served:NAME: the saved index NAME as searched, its own reduction and store. "
             "`det` scores each gallery image by its best instance and queries with the image's top-scoring "
             "instance.", "", table[plain].drop(columns="rerank").to_markdown(index=False), ""]
    if len(reranked_keys):
        parts += ["## Re-ranking", "",
                  "Each re-ranked row below the row it re-ranks. `refit` rows re-rank the whole test gallery; "
                  "`served` rows re-rank each query's shortlist from the store (its top 100), as `search` and the "
                  "page do.", "", with_base.to_markdown(index=False), ""]
    if trained is not None and len(trained):
        from .trained import training_markdown

        parts += [training_markdown(trained)]
    parts += [BLANKS, ""]
    if plots:
        parts += ["## Plots", "", *[f"- [{name}]({name})" for name in plots], ""]
    return "\n".join(parts)
