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
  the number of q's boxes — one box of d cannot answer for several of q's. It re-scores each query's top
  100 images by mean-best (every image when the gallery is smaller), so its cost does not grow with
  queries x gallery x boxes².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RELEVANCE = ("selection", "aggregation", "weighted")
AGGREGATIONS = ("max", "mean-best", "symmetric", "assignment")
KS = (1, 5, 10)
PAD_BUDGET = 20_000_000  # floats per chunk of the gathered [queries, images, boxes, dims] block
BOX_CHUNK = 2048  # query boxes per block of the box-to-box similarity matrix
SHORTLIST = 100  # images per query that the one-to-one assignment re-scores


@dataclass
class BoxSets:
    """Boxes grouped by image: vectors sorted by image, `starts[i]` the first row of image i (every image has
    at least one box)."""

    vectors: np.ndarray  # [n_boxes, d], unit length
    starts: np.ndarray  # [n_images]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(np.r_[self.starts, len(self.vectors)])

    def padded_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """[n_images, max_boxes] row numbers of each image's boxes (row 0 past its last box) and the mask of
        real ones: vectors are gathered only for the pairs being compared."""
        counts, width = self.counts, int(self.counts.max())
        valid = np.arange(width)[None, :] < counts[:, None]
        rows = np.where(valid, self.starts[:, None] + np.arange(width)[None, :], 0)
        return rows, valid


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
    if kind == "weighted":  # over chunks of queries: [chunk, gallery, categories] stays small
        out = np.zeros((len(query), len(gallery)), np.float32)
        step = max(1, PAD_BUDGET // max(1, gallery.size))
        for s in range(0, len(query), step):
            inter = np.minimum(query[s:s + step, None, :], gallery[None]).sum(-1)
            union = np.maximum(query[s:s + step, None, :], gallery[None]).sum(-1)
            out[s:s + step] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        return out
    raise ValueError(f"unknown relevance {kind!r}; choose from {', '.join(RELEVANCE)}")


def _greedy_assignment(sims: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[cq, s] sum of a greedy one-to-one matching (best pair first) of each [Bq, Bd] block of `sims`
    [cq, s, Bq, Bd]; `valid` marks real (not padded) box pairs."""
    block = np.where(valid, sims, -np.inf)
    total = np.zeros(block.shape[:2], np.float64)
    cq, ns, bq, bd = block.shape
    flat = block.reshape(cq, ns, bq * bd)
    ii, jj = np.meshgrid(np.arange(cq), np.arange(ns), indexing="ij")
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


def _slice(sets: BoxSets, a: int, b: int) -> BoxSets:
    """Images a..b-1 of `sets` as a BoxSets of their own."""
    end = sets.starts[b] if b < len(sets.starts) else len(sets.vectors)
    return BoxSets(sets.vectors[sets.starts[a]:end], sets.starts[a:b] - sets.starts[a])


def _assignment(query: BoxSets, gallery: BoxSets, shortlist: int) -> np.ndarray:
    """Assignment scores of each query's `shortlist` best images by mean-best; the others keep their mean-best
    order, shifted below every re-scored one."""
    forward = _block_scores(query, gallery, "mean-best", shortlist)
    top = np.argsort(-forward, axis=1, kind="stable")[:, :shortlist]
    short = np.empty(top.shape, np.float64)
    q_rows, q_valid = query.padded_rows()
    g_rows, g_valid = gallery.padded_rows()
    per_query = top.shape[1] * q_rows.shape[1] * g_rows.shape[1] * query.vectors.shape[1]
    chunk = max(1, PAD_BUDGET // max(1, per_query))
    for s in range(0, len(top), chunk):
        qs, ts = slice(s, s + chunk), top[s:s + chunk]
        qv = query.vectors[q_rows[qs]] * q_valid[qs, :, None]  # [cq, Bq, d]
        gv = gallery.vectors[g_rows[ts]] * g_valid[ts][..., None]  # [cq, S, Bd, d]
        sims = np.einsum("qad,qsbd->qsab", qv, gv, optimize=True)
        valid = q_valid[qs, None, :, None] & g_valid[ts][:, :, None, :]
        short[qs] = _greedy_assignment(sims, valid) / query.counts[qs, None]
    out = forward - forward.max() + short.min() - 1.0
    np.put_along_axis(out, top, short, 1)
    return out


def _block_scores(query: BoxSets, gallery: BoxSets, how: str, shortlist: int) -> np.ndarray:
    if how == "assignment":
        return _assignment(query, gallery, shortlist)
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


def image_scores(query: BoxSets, gallery: BoxSets, how: str, box_chunk: int = BOX_CHUNK,
                 shortlist: int = SHORTLIST) -> np.ndarray:
    """[n_query_images, n_gallery_images] image scores aggregated from box-to-box inner products, over blocks
    of about `box_chunk` query boxes (memory stays bounded on a 5,000-image COCO split). `assignment`
    re-scores each query's top `shortlist` images by mean-best (exact when the gallery is no larger)."""
    out = np.empty((len(query.starts), len(gallery.starts)), np.float64)
    _, firsts = np.unique(query.starts // box_chunk, return_index=True)
    bounds = np.r_[firsts, len(query.starts)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out[a:b] = _block_scores(_slice(query, a, b), gallery, how, shortlist)
    return out


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
