"""The `evaluate-objects` stage: multi-object retrieval on the test split, judged by how much the GT object
sets overlap (`metrics.sets`), and reverse search for one object kind (e.g. person) → `reports/objects`.

Protocol: every test image with at least one GT object queries all other test images. Full-image
embeddings give one vector per image (no aggregation); `gt` (oracle) and `det` give one vector per box, and
the image score aggregates box-to-box similarities. Relevance always comes from the GT object sets, whatever
boxes were embedded. The reduction is refitted on the train split, as in `evaluate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, commit, is_fresh, read_json, writing
from ..datasets import RunDataset, load_dataset
from ..detection.report import box_iou_xywh
from ..layout import RunLayout
from ..metrics.sets import AGGREGATIONS, RELEVANCE, BoxSets, category_counts, image_scores, ranking_metrics, relevance
from .retrieval import refit_reduction

log = logging.getLogger(__name__)

REPORT = "objects"
BOXES = {"full": "whole image", "gt": "GT boxes (oracle)", "det": "detected boxes"}
NEIGHBOURS = 10
GRID_QUERIES = 5


@dataclass(kw_only=True)
class ObjectsConfig:
    run: Path
    embeddings: tuple[str, ...] = ("full", "gt", "det")
    pca: int | str | None = "auto"
    category: str | None = "person"  # reverse search for this kind; None: skip that part
    force: bool = False


@dataclass
class Reduced:
    """One embeddings set, reduced and restricted to the test split, grouped by image."""

    name: str
    table: pd.DataFrame  # test rows, sorted by image and instance
    vectors: np.ndarray  # aligned with `table`, unit length
    pca: str
    dim: int
    mode: str  # full | gt | det: what the vectors are of


def reduced_test_rows(layout: RunLayout, name: str, pca) -> Reduced:
    reduced, table, info = refit_reduction(layout, name, pca, False)
    test = table[table.split == "test"].sort_values(["image_id", "instance"], kind="stable")
    return Reduced(name, test.reset_index(drop=True), reduced[test.index.to_numpy()], str(pca or "none"),
                   reduced.shape[1], info["mode"])


def box_sets(part: Reduced, image_ids: np.ndarray) -> tuple[BoxSets, np.ndarray]:
    """The boxes of those images that have any in this set, and which of `image_ids` they are."""
    present = np.isin(image_ids, part.table.image_id.to_numpy())
    rows = part.table.image_id.isin(image_ids)
    ids = part.table.image_id.to_numpy()[rows.to_numpy()]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return BoxSets(part.vectors[rows.to_numpy()], starts), present


def set_rows(part: Reduced, data: RunDataset, gallery_ids: np.ndarray, counts: np.ndarray,
             query_mask: np.ndarray) -> list[dict]:
    """Rows of one embeddings set: every aggregation (one for whole images) x every relevance definition."""
    sets, present = box_sets(part, gallery_ids)
    queries = query_mask & present
    exclude = own_images(query_mask)
    kind = part.mode
    aggregations = ("image",) if kind == "full" else AGGREGATIONS
    gains = {r: relevance(counts[query_mask], counts, r) for r in RELEVANCE}
    if (~present[query_mask]).any():
        log.warning("embeddings %s: %d query images have no vector; they rank the gallery in id order",
                    part.name, int((~present[query_mask]).sum()))
    rows = []
    q_sets, _ = box_sets(part, gallery_ids[queries])
    for how in aggregations:
        scores = np.full(exclude.shape, -np.inf)
        inner = image_scores(q_sets, sets, "max" if how == "image" else how)
        scores[np.ix_(queries[query_mask], present)] = inner
        for r in RELEVANCE:
            rows.append({"embeddings": part.name, "boxes": BOXES[kind], "aggregation": how, "relevance": r,
                         "pca": part.pca, "dim": part.dim, "images": len(gallery_ids),
                         **ranking_metrics(scores, gains[r], r == "weighted", exclude)})
    return rows


def own_images(query_mask: np.ndarray) -> np.ndarray:
    """[n_queries, n_gallery] each query's own image: never ranked (leave-one-out)."""
    return np.flatnonzero(query_mask)[:, None] == np.arange(len(query_mask))[None, :]


def chance_rows(gallery_ids: np.ndarray, counts: np.ndarray, query_mask: np.ndarray) -> list[dict]:
    """What a random order scores (one fixed seed), so each number has its floor beside it."""
    exclude = own_images(query_mask)
    scores = np.random.default_rng(0).random(exclude.shape)
    return [{"embeddings": "random order", "boxes": "-", "aggregation": "-", "relevance": r, "pca": "-", "dim": "-",
             "images": len(gallery_ids),
             **ranking_metrics(scores, relevance(counts[query_mask], counts, r), r == "weighted", exclude)}
            for r in RELEVANCE]


def objects_markdown(metrics: pd.DataFrame, run: Path, n_queries: int) -> str:
    """One row per embeddings x aggregation; per relevance P@10, mAP (binary ones) and nDCG@10."""
    columns = {"selection": ["P@10", "mAP", "nDCG@10"], "aggregation": ["P@10", "mAP", "nDCG@10"],
               "weighted": ["P@10", "nDCG@10"]}
    wide = None
    for r, cols in columns.items():
        part = metrics[metrics.relevance == r].set_index(["embeddings", "boxes", "aggregation", "pca", "dim"])[cols]
        part.columns = [f"{r} {c}" for c in cols]
        wide = part if wide is None else wide.join(part)
    wide["aggregation queries"] = metrics[metrics.relevance == "aggregation"].set_index(
        ["embeddings", "boxes", "aggregation", "pca", "dim"]).queries
    return "\n".join([
        "# Multi-object retrieval", "",
        f"Run `{run}`: each of the {n_queries} test images with at least one GT object queries all other test "
        "images. Relevance from the GT object sets: **selection** = shares a category, **aggregation** = holds "
        "all the query's categories (queries for which no image does are left out: `aggregation queries`), "
        "**weighted** = multiset Jaccard of the category counts (graded; its P@10 is the mean gain of the top 10). "
        "Aggregation of box similarities into an image score: **max** (best pair), **mean-best** (each query box's "
        "best match, averaged), **symmetric** (mean-best both ways), **assignment** (greedy one-to-one matching, "
        "summed / query boxes, re-scoring each query's top 100 images by mean-best); whole-image vectors need none. PCA refitted on the train split; `random order` is "
        "the floor.", "", wide.reset_index().to_markdown(index=False, floatfmt=".3f"), ""])


# ---------------------------------------------------------------- reverse search for one object kind

def person_search(data: RunDataset, part: Reduced, category: int, name: str) -> tuple[dict, pd.DataFrame]:
    """Every test box of `category` queries all such boxes of the other test images. Two proxies of quality
    (COCO has no identities): the neighbour box is a real object of the kind (IoU >= 0.5 with a GT box of it),
    and the neighbour's image shares one of the query image's other GT categories (queries whose image holds
    no other category are left out of that one)."""
    rows = part.table[part.table.category_id == category].reset_index()
    if len(rows) < 2:
        raise CbirError(f"embeddings {part.name}: fewer than 2 test boxes of category {name!r}")
    vectors = part.vectors[rows["index"].to_numpy()]
    image = rows.image_id.to_numpy()
    sims = vectors @ vectors.T
    sims[image[:, None] == image[None, :]] = -np.inf  # neighbours come from other photos
    k = min(NEIGHBOURS, len(rows) - 1)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    gt = data.instances[data.instances.category_id == category]
    rows["true"] = _is_true(rows, gt) if part.mode != "gt" else True
    others = data.instances[data.instances.category_id != category].groupby("image_id").category_id.agg(set)
    context = [others.get(i, set()) for i in image]
    has_context = np.array([bool(c) for c in context])
    shares = np.array([[bool(context[q] & context[n]) for n in top[q]] for q in range(len(rows))])
    true_top = rows.true.to_numpy()[top]
    summary = {"embeddings": part.name, "category": name, "query boxes": len(rows),
               "queries that are real": float(rows.true.mean()),
               f"P@{k} neighbour is a real {name}": float(true_top.mean()),
               f"P@{k} shares another category (proxy)": float(shares[has_context].mean()) if has_context.any()
               else float("nan"),
               "queries with other categories": int(has_context.sum()),
               f"P@{k} shares another category, random order": _random_share(context, image, has_context, k)}
    rows["neighbours"] = list(top)
    rows["similarities"] = list(np.take_along_axis(sims, top, 1))
    return summary, rows


def _is_true(rows: pd.DataFrame, gt: pd.DataFrame) -> np.ndarray:
    """Whether each box overlaps a GT box of the kind in its image at IoU >= 0.5."""
    pairs = rows[["index", "image_id", "x", "y", "w", "h"]].merge(gt[["image_id", "x", "y", "w", "h"]],
                                                                  on="image_id", suffixes=("", "_gt"))
    if pairs.empty:
        return np.zeros(len(rows), bool)
    pairs["iou"] = box_iou_xywh(pairs[["x", "y", "w", "h"]].to_numpy(float),
                                pairs[["x_gt", "y_gt", "w_gt", "h_gt"]].to_numpy(float))
    best = pairs.groupby("index").iou.max()
    return (best.reindex(rows["index"]).fillna(0) >= 0.5).to_numpy()


def _random_share(context: list[set], image: np.ndarray, has_context: np.ndarray, k: int) -> float:
    """The context proxy's floor: a random pick of k boxes from other photos (fixed seed)."""
    rng = np.random.default_rng(0)
    picks = []
    for q in np.flatnonzero(has_context):
        pool = np.flatnonzero(image != image[q])
        picks.append(np.mean([bool(context[q] & context[n]) for n in rng.choice(pool, min(k, len(pool)), False)]))
    return float(np.mean(picks)) if picks else float("nan")


def grid_queries(rows: pd.DataFrame) -> list[int]:
    """The stated rule: queries spread over box sizes — the boxes at the 10/30/50/70/90 % quantiles of area."""
    order = (rows.w * rows.h).sort_values(kind="stable").index.to_numpy()
    picks = order[np.round(np.linspace(0.1, 0.9, GRID_QUERIES) * (len(order) - 1)).astype(int)]
    return list(dict.fromkeys(picks.tolist()))


def person_grid(data: RunDataset, rows: pd.DataFrame, path: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..images import load_rgb

    picks = grid_queries(rows)
    k = len(rows.neighbours.iloc[0])
    fig, axes = plt.subplots(len(picks), k + 1, figsize=(1.6 * (k + 1), 1.9 * len(picks)), squeeze=False)
    paths = data.images.set_index("image_id").path
    for r, q in enumerate(picks):
        panels = [(q, f"query #{rows.image_id[q]}\n{int(rows.w[q])}x{int(rows.h[q])} px")] + \
            [(n, f"{s:.3f}{'' if rows.true[n] else ' (no GT)'}\n#{rows.image_id[n]}")
             for n, s in zip(rows.neighbours[q], rows.similarities[q])]
        for c, (i, title) in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            photo = load_rgb(data.image_path(paths[rows.image_id[i]]))
            x, y, w, h = (float(rows[v][i]) for v in "xywh")
            pad = 0.25 * max(w, h)
            ax.imshow(photo.crop((int(max(0, x - pad)), int(max(0, y - pad)), int(min(photo.width, x + w + pad)),
                                  int(min(photo.height, y + h + pad)))))
            ax.add_patch(plt.Rectangle((x - max(0, x - pad), y - max(0, y - pad)), w, h, fill=False,
                                       color="red" if c == 0 else "lime", lw=1.5))
            ax.set_title(title, fontsize=6)
    fig.suptitle(f"Reverse {name} search: {len(picks)} queries spread over box sizes (10-90 % area quantiles), "
                 f"each with its {k} nearest {name} boxes from other photos (cosine similarity)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def person_markdown(summaries: list[dict], grid: str | None, name: str) -> str:
    table = pd.DataFrame(summaries)
    lines = [f"# Reverse {name} search", "",
             f"Every test-split `{name}` box of an embeddings set queries the `{name}` boxes of all other test "
             "photos. COCO has no identities, so two proxies, stated honestly: whether a neighbour is a real "
             f"{name} (its box overlaps a GT {name} at IoU >= 0.5; always true for GT boxes), and whether the "
             f"neighbour's photo shares one of the query photo's other GT categories (a rough scene-context "
             "proxy, beside its random-order floor).", "", table.to_markdown(index=False, floatfmt=".3f"), ""]
    if grid:
        lines += [f"![{name} grid]({grid})", ""]
    return "\n".join(lines)


def _category_id(data: RunDataset, name: str) -> int | None:
    ids = {c["name"]: int(c["id"]) for c in data.categories}
    return ids.get(name)


def evaluate_objects(cfg: ObjectsConfig) -> pd.DataFrame:
    """Score every embeddings set x aggregation x relevance (and the reverse search) → reports/objects."""
    with writing(cfg.run) as layout:
        data = load_dataset(layout)
        present = [n for n in cfg.embeddings if Artifact(layout, layout.embeddings(n)).exists()]
        if not present:
            raise CbirError(f"{layout.root}/embeddings: none of {', '.join(cfg.embeddings)} exist; run `cbir embed`")
        upstream = {layout.embeddings(n): Artifact(layout, layout.embeddings(n)).fingerprint for n in present}
        inputs = {"embeddings": upstream, "pca": cfg.pca, "category": cfg.category, "dataset": data.fingerprint}
        art = Artifact(layout, layout.report(REPORT))
        if is_fresh(art, inputs, cfg.force):
            return pd.DataFrame(read_json(art.folder() / "metrics.json"))
        test = data.images[data.images.split == "test"].sort_values("image_id")
        gallery_ids = test.image_id.to_numpy()
        objects = data.instances[data.instances.image_id.isin(gallery_ids)].groupby("image_id").category_id.agg(list)
        categories = sorted({int(c["id"]) for c in data.categories})
        counts = category_counts([objects.get(i, []) for i in gallery_ids], categories)
        query_mask = counts.sum(1) > 0
        parts = {n: reduced_test_rows(layout, n, cfg.pca) for n in present}
        rows = [r for part in parts.values() for r in set_rows(part, data, gallery_ids, counts, query_mask)]
        metrics = pd.DataFrame(rows + chance_rows(gallery_ids, counts, query_mask))
        category = _category_id(data, cfg.category) if cfg.category else None
        if cfg.category and category is None:
            log.warning("no category %r in this dataset: reverse search skipped", cfg.category)
        boxed = [p for p in parts.values() if p.mode != "full"]
        searches = [person_search(data, p, category, cfg.category) for p in boxed] if category else []
        with commit(art, inputs, {**upstream, "dataset": data.fingerprint}) as staged:
            staged.write_table("metrics.csv", metrics)
            staged.write_json("metrics.json", metrics.to_dict(orient="records"))
            staged.file("objects.md").write_text(objects_markdown(metrics, layout.root, int(query_mask.sum())))
            if searches:
                shown = next((rows for s, rows in searches if s["embeddings"] == "det"), searches[0][1])
                grid = person_grid(data, shown, staged.file(f"{cfg.category}_grid.png"), cfg.category)
                staged.write_json(f"{cfg.category}.json", [s for s, _ in searches])
                staged.file(f"{cfg.category}.md").write_text(person_markdown([s for s, _ in searches], grid,
                                                                             cfg.category))
            staged.summary.update(rows=len(metrics), queries=int(query_mask.sum()))
        return metrics
