"""Ranking metrics of leave-one-out retrieval, computed from chunks of the similarity matrix with array
operations only (no loop over query x gallery), so 6,000 x 2,048 takes seconds and memory stays bounded.

P@1, R-precision and MAP@R match pytorch-metric-learning's AccuracyCalculator; mAP matches sklearn's
average_precision_score per query (ties form one threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

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
    rows: np.ndarray | None = None  # [n_instances] the instances' rows in their embeddings set


def image_sims(q: np.ndarray, g: Gallery, instance_sims: np.ndarray | None = None) -> np.ndarray:
    """[len(q), n_images]: each gallery image scored by its best-matching instance (`instance_sims`: the
    query x instance similarities when they are not plain inner products, e.g. after re-ranking)."""
    sims = q @ g.instances.T if instance_sims is None else instance_sims
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


def exact_metrics(g: Gallery, instance_sims: np.ndarray | None = None) -> tuple[dict[str, float], RankStats]:
    """Every test image queries all others (itself excluded); `instance_sims` [n_images, n_instances]
    replaces the inner products (re-ranked similarities)."""
    stats = RankStats()
    for start in range(0, len(g.query), CHUNK):
        sl = slice(start, start + CHUNK)
        given = None if instance_sims is None else instance_sims[sl]
        rank_metrics(image_sims(g.query[sl], g, given), g.labels[sl], g.labels, np.arange(len(g.query))[sl], stats)
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


def ranked_metrics(g: Gallery, ids: np.ndarray, exact_top: np.ndarray | None) -> dict[str, float]:
    """R@K / P@K (and MAP@R when every list reaches R) of rankings given as instance rows of `g` per query
    (-1 pads), and their recall@10 against exact search's top 10 (the price of approximation) when given."""
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
    relevant = counts[inverse] - 1  # R: the other images of the query's class
    if np.all(valid.sum(1)[answerable] >= relevant[answerable]):  # the lists reach R: MAP@R is exact
        cum = np.cumsum(rel, 1)
        hits = rel & (rank < relevant[:, None])
        precision = np.where(hits, cum / np.maximum(rank + 1, 1), 0)
        out["MAP@R"] = float((precision.sum(1) / np.maximum(relevant, 1))[answerable].mean())
    if exact_top is not None:
        in_exact = (images[:, :, None] == exact_top[:, None, :]).any(2)
        out["recall@10 vs exact"] = float(((valid & (rank < 10) & in_exact).sum(1) / exact_top.shape[1]).mean())
    return out
