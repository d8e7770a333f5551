"""Multi-object retrieval: relevance between object sets, image scores aggregated from box similarities,
and the ranking metrics over them — array operations over chunks of queries, no loop over query x gallery.

Relevance of a database image d to a query image q, from their GT category multisets:
- `selection`: d shares at least one category with q (binary);
- `aggregation`: d holds every category of q (binary);
- `weighted`: multiset Jaccard, sum_c min(q_c, d_c) / sum_c max(q_c, d_c), graded in [0, 1].

Image score of d for q, from the similarities of q's boxes to d's boxes:
- `max`: the best single pair;
- `mean-best`: each query box's best match in d, averaged over q's boxes (ranks as the sum does);
- `symmetric`: the mean of mean-best both ways, so unrelated extra objects in d cost;
- `assignment`: a one-to-one greedy matching (best pair first, each box used once), summed and divided by
  the number of q's boxes — one box of d cannot answer for several of q's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RELEVANCE = ("selection", "aggregation", "weighted")
AGGREGATIONS = ("max", "mean-best", "symmetric", "assignment")
KS = (1, 5, 10)
PAD_BUDGET = 20_000_000  # floats per chunk of the padded [queries, images, boxes, boxes] block


@dataclass
class BoxSets:
    """Boxes grouped by image: vectors sorted by image, `starts[i]` the first row of image i (every image has
    at least one box)."""

    vectors: np.ndarray  # [n_boxes, d], unit length
    starts: np.ndarray  # [n_images]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(np.r_[self.starts, len(self.vectors)])

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """[n_images, max_boxes, d] with zero rows past each image's boxes, and the matching validity mask."""
        counts, width = self.counts, int(self.counts.max())
        valid = np.arange(width)[None, :] < counts[:, None]
        out = np.zeros((len(counts), width, self.vectors.shape[1]), np.float32)
        out[valid] = self.vectors
        return out, valid


def category_counts(image_categories: list[list[int]], categories: list[int]) -> np.ndarray:
    """[n_images, n_categories] how many objects of each category each image holds."""
    column = {c: j for j, c in enumerate(categories)}
    out = np.zeros((len(image_categories), len(categories)), np.float32)
    for i, cats in enumerate(image_categories):
        np.add.at(out[i], [column[c] for c in cats], 1)
    return out


def relevance(query: np.ndarray, gallery: np.ndarray, kind: str) -> np.ndarray:
    """[n_q, n_g] relevance (binary as 0/1, `weighted` graded) from category count matrices."""
    q, g = query > 0, gallery > 0
    if kind == "selection":
        return (q.astype(np.float32) @ g.T.astype(np.float32) > 0).astype(np.float32)
    if kind == "aggregation":
        return (q.astype(np.float32) @ (~g).T.astype(np.float32) == 0).astype(np.float32) * q.any(1)[:, None]
    if kind == "weighted":
        inter = np.minimum(query[:, None, :], gallery[None]).sum(-1)
        union = np.maximum(query[:, None, :], gallery[None]).sum(-1)
        return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)
    raise ValueError(f"unknown relevance {kind!r}; choose from {', '.join(RELEVANCE)}")


def _greedy_assignment(sims: np.ndarray, q_valid: np.ndarray, g_valid: np.ndarray) -> np.ndarray:
    """[cq, ng] sum of a greedy one-to-one matching of each [Bq, Bd] block of `sims` [cq, ng, Bq, Bd]."""
    block = np.where(q_valid[:, None, :, None] & g_valid[None, :, None, :], sims, -np.inf)
    total = np.zeros(block.shape[:2], np.float64)
    cq, ng, bq, bd = block.shape
    flat = block.reshape(cq, ng, bq * bd)
    ii, jj = np.meshgrid(np.arange(cq), np.arange(ng), indexing="ij")
    for _ in range(min(bq, bd)):
        best = flat.argmax(-1)
        value = np.take_along_axis(flat, best[..., None], -1)[..., 0]
        matched = np.isfinite(value)
        if not matched.any():
            break
        total += np.where(matched, value, 0.0)
        row, col = best // bd, best % bd
        block[ii, jj, row, :] = -np.inf  # each box is used once
        block[ii, jj, :, col] = -np.inf
    return total


def image_scores(query: BoxSets, gallery: BoxSets, how: str) -> np.ndarray:
    """[n_query_images, n_gallery_images] image scores aggregated from box-to-box inner products."""
    if how == "assignment":
        qp, qv = query.padded()
        gp, gv = gallery.padded()
        chunk = max(1, PAD_BUDGET // max(1, len(gp) * qp.shape[1] * gp.shape[1]))
        out = np.empty((len(qp), len(gp)), np.float64)
        for s in range(0, len(qp), chunk):
            sims = np.einsum("qad,gbd->qgab", qp[s:s + chunk], gp, optimize=True)
            out[s:s + chunk] = _greedy_assignment(sims, qv[s:s + chunk], gv) / query.counts[s:s + chunk, None]
        return out
    sims = query.vectors @ gallery.vectors.T  # [query boxes, gallery boxes]
    if how == "max":
        return np.maximum.reduceat(np.maximum.reduceat(sims, gallery.starts, 1), query.starts, 0)
    forward = np.add.reduceat(np.maximum.reduceat(sims, gallery.starts, 1), query.starts, 0) / query.counts[:, None]
    if how == "mean-best":
        return forward
    if how == "symmetric":
        backward = np.add.reduceat(np.maximum.reduceat(sims, query.starts, 0), gallery.starts, 1) / gallery.counts
        return (forward + backward) / 2
    raise ValueError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")


def ranking_metrics(scores: np.ndarray, gains: np.ndarray, graded: bool, exclude: np.ndarray | None = None,
                    ks: tuple[int, ...] = KS) -> dict[str, float]:
    """P@K, mAP (binary relevance; not for graded gains) and nDCG@10 / nDCG over the whole ranking, averaged
    over queries that have at least one relevant item. `exclude` [n_q, n_g] marks items never ranked (a
    query's own image). Ties keep gallery order (stable sort). Graded P@K is the mean gain of the top K."""
    scores = np.where(exclude, -np.inf, scores) if exclude is not None else scores
    gains = np.where(exclude, 0.0, gains) if exclude is not None else gains
    valid = gains.max(1) > 0
    scores, gains = scores[valid], gains[valid]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(gains, order, 1).astype(np.float64)
    n = ranked.shape[1]
    out = {"queries": int(valid.sum()), "excluded queries": int((~valid).sum())}
    for k in ks:
        out[f"P@{k}"] = float(ranked[:, :k].sum(1).mean() / min(k, n)) if len(ranked) else float("nan")
    if not graded:
        hits = np.cumsum(ranked, 1)
        precision = hits / np.arange(1, n + 1)
        out["mAP"] = float(((precision * ranked).sum(1) / ranked.sum(1)).mean()) if len(ranked) else float("nan")
    discount = 1 / np.log2(np.arange(2, n + 2))
    ideal = -np.sort(-gains.astype(np.float64), axis=1)
    for name, depth in (("nDCG@10", 10), ("nDCG", n)):
        dcg = (ranked[:, :depth] * discount[:depth]).sum(1)
        idcg = (ideal[:, :depth] * discount[:depth]).sum(1)
        out[name] = float((dcg / idcg).mean()) if len(ranked) else float("nan")
    return out
