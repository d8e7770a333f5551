"""Evaluation: leave-one-out retrieval over the test split (Song et al. protocol) for each embeddings set,
PCA fitted on train as in search; exact ranking as the reference, an approximate index scored beside it.

Metrics are computed from chunks of the similarity matrix with array operations only (no loop over
query x gallery), so 6,000 x 2,048 takes seconds and memory stays bounded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from . import CbirError
from .artifacts import atomic_path, record, require_run, write_json, write_table
from .data import load_split
from .embed import load_embeddings
from .search import reduce, set_search_params

log = logging.getLogger(__name__)

RECALL_KS = (1, 2, 4, 8)
PRECISION_KS = (1, 5, 10)
CHUNK = 512


@dataclass
class Gallery:
    """Test items as retrieval sees them: one query vector per image, and per gallery image the
    vectors of its instances (several for det) whose best match scores the image."""

    query: np.ndarray  # [n_images, d], the image's top-scoring instance
    instances: np.ndarray  # [n_instances, d], sorted by image
    starts: np.ndarray  # [n_images], first instance row of each image
    labels: np.ndarray  # [n_images]
    image_ids: np.ndarray  # [n_images]
    boxes: np.ndarray | None = None  # [n_instances, 4] x, y, w, h — for drawing results


def image_sims(q: np.ndarray, g: Gallery) -> np.ndarray:
    """[len(q), n_images]: each gallery image scored by its best-matching instance."""
    sims = q @ g.instances.T
    if len(g.starts) == len(g.instances):
        return sims
    return np.maximum.reduceat(sims, g.starts, axis=1)


@dataclass
class RankStats:
    """Per-query metric arrays, accumulated over chunks."""

    recall: dict[int, list] = field(default_factory=lambda: {k: [] for k in RECALL_KS})
    precision: dict[int, list] = field(default_factory=lambda: {k: [] for k in PRECISION_KS})
    ap: list = field(default_factory=list)
    r_precision: list = field(default_factory=list)
    map_at_r: list = field(default_factory=list)
    top: list = field(default_factory=list)  # each query's 10 best gallery columns (exact), all queries
    pr_hits: np.ndarray | None = None  # summed cumulative hits per rank, for the micro-averaged PR curve
    relevant_total: int = 0
    excluded: int = 0


def rank_metrics(sims: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray, self_index: np.ndarray,
                 stats: RankStats) -> None:
    """Add one chunk of queries to `stats`. `self_index[i]` is query i's own gallery column (-1: none);
    it is ranked last and never relevant. Queries with no relevant item are counted as excluded.

    AP follows sklearn's average_precision_score (tied scores form one threshold); rank metrics break
    ties by gallery order, as a stable sort would.
    """
    sims = sims.astype(np.float64, copy=True)
    rows = np.arange(len(sims))
    has_self = self_index >= 0
    sims[rows[has_self], self_index[has_self]] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")
    stats.top.append(order[:, :10])
    ranked = np.take_along_axis(sims, order, 1)
    rel = g_labels[order] == q_labels[:, None]
    rel[np.isneginf(ranked)] = False
    n_rel = rel.sum(1)
    valid = n_rel > 0
    stats.excluded += int((~valid).sum())
    rel, ranked, n_rel = rel[valid], ranked[valid], n_rel[valid]
    if not len(rel):
        return
    cum = np.cumsum(rel, 1)
    ranks = np.arange(1, rel.shape[1] + 1)
    for k in RECALL_KS:
        stats.recall[k].append(cum[:, min(k, rel.shape[1]) - 1] > 0)
    for k in PRECISION_KS:
        stats.precision[k].append(cum[:, min(k, rel.shape[1]) - 1] / k)
    r_idx = n_rel - 1
    stats.r_precision.append(cum[np.arange(len(rel)), r_idx] / n_rel)
    within_r = ranks[None, :] <= n_rel[:, None]
    stats.map_at_r.append((rel * within_r * cum / ranks).sum(1) / n_rel)
    block_end = np.ones_like(rel)
    block_end[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    ends_cum = np.where(block_end, cum, 0)
    prev = np.zeros_like(cum)
    prev[:, 1:] = np.maximum.accumulate(ends_cum, axis=1)[:, :-1]
    stats.ap.append((block_end * (cum - prev) * cum / ranks).sum(1) / n_rel)
    hits = cum.sum(0)
    stats.pr_hits = hits if stats.pr_hits is None else stats.pr_hits + hits
    stats.relevant_total += int(n_rel.sum())


def summarise(stats: RankStats) -> dict[str, float]:
    mean = lambda parts: float(np.concatenate(parts).mean()) if parts else float("nan")  # noqa: E731
    out = {f"R@{k}": mean(v) for k, v in stats.recall.items()}
    out.update({f"P@{k}": mean(v) for k, v in stats.precision.items()})
    out.update({"mAP": mean(stats.ap), "R-precision": mean(stats.r_precision), "MAP@R": mean(stats.map_at_r)})
    return out


def exact_metrics(g: Gallery) -> tuple[dict[str, float], RankStats]:
    """Every test image queries all others (itself excluded)."""
    stats = RankStats()
    for start in range(0, len(g.query), CHUNK):
        sl = slice(start, start + CHUNK)
        rank_metrics(image_sims(g.query[sl], g), g.labels[sl], g.labels, np.arange(len(g.query))[sl], stats)
    return summarise(stats), stats


def nmi(g: Gallery, seed: int = 0) -> float:
    """NMI of k-means (k = number of test classes) on the query vectors, as in Song et al."""
    k = len(np.unique(g.labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(g.query)
    return float(normalized_mutual_info_score(g.labels, clusters))


def first_occurrences(rows: np.ndarray) -> np.ndarray:
    """Mask of the first appearance of each value within each row (later duplicates False)."""
    order = np.argsort(rows, axis=1, kind="stable")
    sorted_rows = np.take_along_axis(rows, order, 1)
    dup_sorted = np.zeros(rows.shape, bool)
    dup_sorted[:, 1:] = sorted_rows[:, 1:] == sorted_rows[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, 1)
    return ~dup


def approximate_metrics(g: Gallery, train: np.ndarray, factory: str, exact_top: np.ndarray,
                        depth: int = 100) -> dict[str, float]:
    """R@K / P@K from a FAISS index over the test instances (trained on train vectors only), and its
    recall@10 against exact search's top 10: the price of approximation."""
    try:
        index = faiss.index_factory(g.instances.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise CbirError(f"--index {factory!r}: FAISS cannot build it ({str(e).splitlines()[-1][:100]})") from None
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.add(np.ascontiguousarray(g.instances, dtype=np.float32))
    set_search_params(index)
    _, ids = index.search(np.ascontiguousarray(g.query, dtype=np.float32), min(depth, len(g.instances)))
    instance_image = np.repeat(np.arange(len(g.starts)), np.diff(np.append(g.starts, len(g.instances))))
    images = np.where(ids >= 0, instance_image[np.maximum(ids, 0)], -1)
    q = np.arange(len(images))[:, None]
    valid = first_occurrences(images) & (images >= 0) & (images != q)
    rank = np.cumsum(valid, 1) - 1
    rel = valid & (g.labels[np.maximum(images, 0)] == g.labels[:, None])
    _, inverse, counts = np.unique(g.labels, return_inverse=True, return_counts=True)
    answerable = counts[inverse] > 1
    out = {f"R@{k}": float((rel & (rank < k)).any(1)[answerable].mean()) for k in RECALL_KS}
    out.update({f"P@{k}": float(((rel & (rank < k)).sum(1) / k)[answerable].mean()) for k in PRECISION_KS})
    in_exact = (images[:, :, None] == exact_top[:, None, :]).any(2)
    out["recall@10 vs exact"] = float(((valid & (rank < 10) & in_exact).sum(1) / exact_top.shape[1]).mean())
    return out


# ---------------------------------------------------------------- from a run's embeddings to a Gallery

def check_no_leak(run: Path, name: str, table: pd.DataFrame) -> None:
    """Refuse embeddings whose split labels disagree with split.csv: a train image among the test
    queries (or a test image used to fit PCA) would inflate every number."""
    split = load_split(run).set_index("image_id").split
    known = table.image_id.isin(split.index)
    if not known.all():
        raise CbirError(f"embeddings {name}: {int((~known).sum())} rows have image ids not in split.csv; "
                        f"re-run `cbir embed --force`")
    wrong = table.split.to_numpy() != split.loc[table.image_id].to_numpy()
    if wrong.any():
        r = table[wrong].iloc[0]
        raise CbirError(f"embeddings {name}: {int(wrong.sum())} rows disagree with split.csv (image {r.image_id} is "
                        f"'{r.split}' there, '{split.loc[r.image_id]}' in split.csv): train rows would leak into the "
                        f"test queries; re-run `cbir embed --force` after `cbir prepare`")


def gallery_from(name: str, vectors: np.ndarray, table: pd.DataFrame, split: str = "test") -> Gallery:
    """A split's rows → per-image query (top-scoring instance) and instance blocks grouped by image."""
    test = table[table.split == split].reset_index()
    test = test.sort_values(["image_id", "score", "instance"], ascending=[True, False, True], kind="stable")
    if test.empty:
        raise CbirError(f"embeddings {name}: no {split} rows to evaluate")
    rows = test["index"].to_numpy()
    image_ids = test.image_id.to_numpy()
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]])
    instances = vectors[rows]
    return Gallery(instances[starts], instances, starts, test.class_id.to_numpy()[starts], image_ids[starts],
                   test[["x", "y", "w", "h"]].to_numpy(float))


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


def load_gallery(run: Path, name: str, pca: int | None, whiten: bool) -> tuple[Gallery, Gallery, dict]:
    """Reduced test and train galleries (train: for training an approximate index) and the spec."""
    if "+" in name:
        parts = [load_gallery(run, n, pca, whiten) for n in name.split("+")]
        spec = {"backbone": "+".join(dict.fromkeys(p[2]["backbone"] for p in parts)), "mode": name}
        return concat_galleries([p[0] for p in parts]), concat_galleries([p[1] for p in parts]), spec
    vectors, table, spec = load_embeddings(run, name)
    check_no_leak(run, name, table)
    is_train = (table.split == "train").to_numpy()
    if not is_train.any():
        raise CbirError(f"embeddings {name}: no train rows to fit PCA on")
    reduced = reduce(np.asarray(vectors), np.asarray(vectors[is_train]), pca, whiten)
    return gallery_from(name, reduced, table), gallery_from(name, reduced, table, "train"), spec


@dataclass
class EvalConfig:
    run: Path
    embeddings: tuple[str, ...] = ("full", "gt", "det")
    pca: tuple[int | None, ...] = (256,)
    whiten: bool = False
    index: str = "exact"  # or a FAISS factory body (e.g. HNSW32) scored beside exact search
    plots: bool = True


@dataclass
class Evaluation:
    metrics: pd.DataFrame
    galleries: dict[str, Gallery] = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def evaluate(cfg: EvalConfig) -> Evaluation:
    """Score every embeddings set x PCA setting → reports/metrics.csv, comparison.md and the plots."""
    run = require_run(cfg.run)
    names = [n for n in cfg.embeddings if all((run / "embeddings" / f"{p}.npy").exists() for p in n.split("+"))]
    missing = sorted(set(cfg.embeddings) - set(names))
    if missing:
        log.warning("skipping embeddings not found in %s/embeddings: %s", run, ", ".join(missing))
    if not names:
        raise CbirError(f"{run}/embeddings: none of {', '.join(cfg.embeddings)} exist; run `cbir embed` first")
    rows, result = [], Evaluation(pd.DataFrame())
    for name in names:
        for pca in cfg.pca:
            gallery, train, spec = load_gallery(run, name, pca, cfg.whiten)
            metrics, stats = exact_metrics(gallery)
            base = {"embeddings": name, "backbone": spec["backbone"], "pca": pca or "none",
                    "dim": gallery.query.shape[1], "images": len(gallery.query),
                    "instances": len(gallery.instances), "excluded queries": stats.excluded}
            rows.append({**base, "index": "exact", **metrics, "NMI": nmi(gallery)})
            if cfg.index != "exact":
                rows.append({**base, "index": cfg.index,
                             **approximate_metrics(gallery, train.instances, cfg.index, np.concatenate(stats.top))})
            key = f"{name} (PCA {pca or 'none'})"
            result.galleries[key] = gallery
            ranks = np.arange(1, len(stats.pr_hits) + 1)
            n_queries = len(gallery.query) - stats.excluded
            result.curves[key] = (stats.pr_hits / stats.relevant_total, stats.pr_hits / (ranks * n_queries))
    result.metrics = pd.DataFrame(rows)
    reports = run / "reports"
    write_table(reports / "metrics.csv", result.metrics)
    with atomic_path(reports / "comparison.md") as tmp:
        tmp.write_text(comparison_markdown(result.metrics, run))
    if cfg.plots:
        from .plots import write_plots

        write_plots(run, result)
    record(run, "reports/metrics.csv", embeddings=names, pca=[p or "none" for p in cfg.pca], index=cfg.index,
           rows=len(rows))
    write_json(reports / "metrics.json", result.metrics.to_dict(orient="records"))
    return result


SHOWN = ["R@1", "R@2", "R@4", "R@8", "P@5", "P@10", "mAP", "MAP@R", "R-precision", "NMI", "recall@10 vs exact"]


def comparison_markdown(metrics: pd.DataFrame, run: Path) -> str:
    shown = [c for c in SHOWN if c in metrics]
    table = metrics[["embeddings", "backbone", "pca", "dim", "index", "images"] + shown].copy()
    for c in shown:
        table[c] = table[c].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    return "\n".join(["# Retrieval comparison", "",
                      f"Run `{run}`: each test image queries all other test images (itself excluded); PCA fitted "
                      "on the train split only (`dim`: the dimension used — PCA is capped by the number of train vectors). `det` scores each gallery image by its best instance and queries "
                      "with the image's top-scoring instance.", "", table.to_markdown(index=False), ""])
