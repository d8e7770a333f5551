"""`cbir evaluate-text`: how well words find images, on the test split only (unseen classes on CUB).

For every text bridge of the run (`train-text` models):
- CUB: each test class's description (its 5 most distinctive attributes against the train classes'
  average) queries the test images; for bridges over the attribute vocabulary also the class's whole
  attribute-share vector; mAP and P@10 against chance (a random ranking's mAP: the class's share);
- COCO: each held-out caption → its photo (R@1/5/10 against K/N), and each category word → the photos
  containing it (mAP against the category's share);
- image + colour word: every test image queries the others alone and with "a bird with C plumage"
  added at the search's default weight; how much C the top 10 show, by the attribute read-out and by
  their classes' own attribute shares.
Per base embeddings set (CUB): the attribute read-out — ridge regression from the frozen vectors to the
312 attribute shares, fitted on train classes — scored per attribute group (AUC, accuracy) on the test
classes, and the "oracle" attribute-vector query through it (what a query listing every attribute of the
class gets from a linear map; the number the text queries aim at).
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
from ..datasets.attributes import KINDS
from ..encoders.stage import load_embeddings
from ..layout import RunLayout
from ..metrics.ranking import Gallery, image_sims
from ..metrics.sets import ranking_metrics
from ..vectors import unit_rows as unit
from .retrieval import gallery_from

log = logging.getLogger(__name__)

DESCRIPTION_ATTRIBUTES = 5
TEXT_WEIGHTS = (0.3, 0.5)  # the search's default --text-weight, and an even mix
RECALL_KS = (1, 5, 10)


@dataclass(kw_only=True)
class TextEvalConfig:
    run: Path
    models: tuple[str, ...] = ()  # default: every text bridge of the run
    force: bool = False


def bridges(layout: RunLayout) -> list[str]:
    """The run's trained text bridges (models whose card says kind bridge), by name."""
    names = []
    for artifact in layout.artifact_names():
        if artifact.startswith("models/"):
            card = Artifact(layout, artifact).folder() / "card.json"
            if card.is_file() and read_json(card).get("kind") == "bridge":
                names.append(artifact.split("/", 1)[1])
    return names


def query_metrics(scores: np.ndarray, gains: np.ndarray) -> dict:
    """mAP, P@K and recall@K (share of queries with a relevant image in the top K) of [queries, images]
    scores; chance is a random ranking's: mAP ≈ the relevant share, R@K = 1 - C(n - r, K) / C(n, K)."""
    m = ranking_metrics(scores, gains, graded=False)
    hits = np.take_along_axis(gains, np.argsort(-scores, axis=1, kind="stable"), 1) > 0
    n, relevant = gains.shape[1], gains.sum(1)
    out = {"queries": m["queries"], "mAP": m["mAP"], "P@10": m["P@10"], "chance mAP": float((relevant / n).mean())}
    for k in RECALL_KS:
        out[f"R@{k}"] = float(hits[:, :k].any(1).mean())
        j = np.arange(k)
        misses = np.prod(np.clip((n - relevant[:, None] - j) / (n - j), 0, None), axis=1)  # C(n-r, K) / C(n, K)
        out[f"chance R@{k}"] = float((1 - misses).mean())
    return out


@dataclass
class ClassQueries:
    """The test classes' queries: each one's 5-attribute sentence and its whole share vector (the
    sentence names what stands out against the train classes' mean)."""

    classes: list[int]
    sentences: list[str]
    shares: np.ndarray

    @classmethod
    def of(cls, data: RunDataset) -> ClassQueries:
        a, split = data.attributes, data.images.split
        train, test = (sorted(set(data.images.class_id[split == s])) for s in ("train", "test"))
        usual, shares = a.class_matrix(train).mean(0), a.class_matrix(test)
        return cls(test, [a.strongest_sentence(s, DESCRIPTION_ATTRIBUTES, usual) for s in shares], shares)


def cub_rows(name: str, g: Gallery, query, classes: ClassQueries) -> list[dict]:
    gains = (np.array(classes.classes)[:, None] == g.labels[None]).astype(float)
    rows = [{"model": name, "query": f"{DESCRIPTION_ATTRIBUTES}-attribute sentence",
             **query_metrics(image_sims(query.vectors(classes.sentences), g), gains)}]
    if query.encoder.spec["text_encoder"] == "attributes":
        rows.append({"model": name, "query": "attribute vector",
                     **query_metrics(image_sims(query.from_encoded(classes.shares), g), gains)})
    return rows


def coco_rows(name: str, g: Gallery, query, data: RunDataset) -> list[dict]:
    rows = []
    if data.captions is not None:
        captions = data.captions[data.captions.image_id.isin(g.image_ids)]
        if len(captions):
            gains = (captions.image_id.to_numpy()[:, None] == g.image_ids[None]).astype(float)
            rows.append({"model": name, "query": "caption → its photo",
                         **query_metrics(image_sims(query.vectors(list(captions.caption)), g), gains)})
    present = data.instances[data.instances.image_id.isin(g.image_ids)]
    if len(data.categories) > 1 and len(present):
        names = {int(c["id"]): c["name"] for c in data.categories}
        ids = sorted(set(present.category_id))
        holds = present.groupby("category_id").image_id.unique()
        gains = np.array([np.isin(g.image_ids, holds[c]) for c in ids], float)
        rows.append({"model": name, "query": "category word → photos with it",
                     **query_metrics(image_sims(query.vectors([names[c] for c in ids]), g), gains)})
    return rows


@dataclass
class Readout:
    """Ridge from a base set's vectors to attribute shares, fitted on train rows, applied to test rows."""

    base: str
    predicted: np.ndarray  # [test images, attributes], per gallery image (its top instance)
    truth: np.ndarray  # [test images, attributes] the image's labels or its class's shares
    alpha: float


def fit_readout(layout: RunLayout, data: RunDataset, base: str) -> tuple[Readout, Gallery]:
    from sklearn.linear_model import RidgeCV

    vectors, table, _ = load_embeddings(layout, base)
    a = data.attributes
    train = table[(table.split == "train") & (table.class_id > 0)]
    x = unit(np.asarray(vectors[train.index.to_numpy()], np.float32))
    ridge = RidgeCV(alphas=(0.1, 1.0, 10.0, 100.0)).fit(x, a.class_matrix(train.class_id))
    g = gallery_from(base, vectors, table, "test")
    truth = a.class_matrix(g.labels)
    return Readout(base, ridge.predict(unit(g.query)).astype(np.float32), truth, float(ridge.alpha_)), g


def readout_rows(r: Readout, names: pd.DataFrame) -> list[dict]:
    """Per attribute group kind: mean AUC over attributes both present and absent among test images,
    and accuracy of 'share ≥ 0.5' against the majority answer."""
    from sklearn.metrics import roc_auc_score

    present = r.truth >= 0.5
    rows = []
    for kind in KINDS:
        cols = np.flatnonzero((names.kind == kind).to_numpy())
        scored = [c for c in cols if 0 < present[:, c].sum() < len(present)]
        aucs = [roc_auc_score(present[:, c], r.predicted[:, c]) for c in scored]
        accuracy = ((r.predicted[:, cols] >= 0.5) == present[:, cols]).mean()
        majority = np.maximum(present[:, cols].mean(0), 1 - present[:, cols].mean(0)).mean()
        rows.append({"embeddings": r.base, "group": kind, "attributes": len(cols), "AUC attributes": len(scored),
                     "mean AUC": float(np.mean(aucs)) if aucs else float("nan"), "accuracy": float(accuracy),
                     "majority accuracy": float(majority), "ridge alpha": r.alpha})
    return rows


def oracle_row(r: Readout, g: Gallery, classes: ClassQueries) -> dict:
    """The class's share vector against each test image's predicted shares (cosine), as the issue's oracle."""
    gains = (np.array(classes.classes)[:, None] == g.labels[None]).astype(float)
    return {"model": f"ridge read-out of {r.base} (oracle)", "query": "attribute vector",
            **query_metrics(unit(classes.shares) @ unit(r.predicted).T, gains)}


def colour_rows(name: str, g: Gallery, query, r: Readout, names: pd.DataFrame) -> list[dict]:
    """Each test image queries the others, alone and with a colour phrase at each of TEXT_WEIGHTS: how much
    of that colour the top 10 show, by the read-out and by their classes' shares."""
    colours = names[names.group == "primary_color"]
    images = unit(g.query)
    exclude = np.eye(len(images), dtype=bool)

    def top10(q: np.ndarray) -> np.ndarray:
        return np.argsort(-np.where(exclude, -np.inf, image_sims(q, g)), axis=1)[:, :10]

    alone = top10(images)
    rows = []
    for c in colours.itertuples():
        words = unit(query.vectors([f"a bird with {c.phrase}"]))
        col = c.attribute_id - 1
        for weight in (0.0,) + TEXT_WEIGHTS:
            top = alone if weight == 0 else top10(unit((1 - weight) * images + weight * words))
            rows.append({"model": name, "colour": c.value, "weight": weight,
                         "read-out": float(r.predicted[top, col].mean()), "class share": float(r.truth[top, col].mean())})
    return rows


def colour_table(rows: list[dict]) -> pd.DataFrame:
    """Per model and weight, averaged over the colours: read-out and class share of the top 10."""
    frame = pd.DataFrame(rows)
    return frame.groupby(["model", "weight"], sort=False)[["read-out", "class share"]].mean().reset_index()


def evaluate_text(cfg: TextEvalConfig) -> dict:
    with writing(cfg.run) as layout:
        data = load_dataset(layout)
        models = list(cfg.models) or bridges(layout)
        if not models:
            raise CbirError(f"{layout.root}: no text bridge to evaluate; train one with `cbir train-text`")
        cards = {m: read_json(Artifact(layout, layout.model(m)).folder("train it with `cbir train-text`") / "card.json")
                 for m in models}
        not_bridges = [m for m in models if cards[m].get("kind") != "bridge"]
        if not_bridges:
            raise CbirError(f"--models {not_bridges[0]}: not a text bridge (made by `cbir train-embedder`?); "
                            f"bridges of this run: {', '.join(bridges(layout)) or 'none'}")
        sets = {m: load_embeddings(layout, m) for m in models}
        art = Artifact(layout, layout.report("text"))
        upstream = {layout.embeddings(m): sets[m][2]["fingerprint"] for m in models}
        inputs = {"dataset": data.fingerprint, **upstream}
        if is_fresh(art, inputs, cfg.force):
            return read_json(art.folder() / "metrics.json")
        from ..training.bridge import TextQuery

        classes = ClassQueries.of(data) if data.attributes is not None else None
        metrics, readouts, colours, oracles = [], {}, [], []
        for m in models:
            vectors, table, info = sets[m]
            g = gallery_from(m, vectors, table, "test")
            query = TextQuery(info["spec"])
            if classes is not None:
                base = cards[m]["embeddings"]
                if base not in readouts:
                    readouts[base] = fit_readout(layout, data, base)
                    oracles.append(oracle_row(*readouts[base], classes))
                metrics += cub_rows(m, g, query, classes)
                colours += colour_rows(m, g, query, readouts[base][0], data.attributes.names)
            else:
                metrics += coco_rows(m, g, query, data)
        result = {"metrics": metrics + oracles, "colour": colours,
                  "readout": [row for r, _ in readouts.values() for row in readout_rows(r, data.attributes.names)],
                  "models": {m: {k: cards[m][k] for k in ("text", "pairs", "embeddings", "validation", "best_epoch",
                                                         "pairs_count", "examples")} for m in models}}
        if classes is not None:
            result["descriptions"] = dict(zip(map(int, classes.classes), classes.sentences))
        with commit(art, inputs, upstream) as staged:
            staged.write_json("metrics.json", result)
            pd.DataFrame(result["metrics"]).to_csv(staged.file(layout.METRICS), index=False)
            staged.file("text.md").write_text(text_markdown(result))
        return result


def _table(rows: list[dict], columns: list[str]) -> str:
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame]].to_markdown(index=False, floatfmt=".3f")


def text_markdown(result: dict) -> str:
    parts = ["# Text → image retrieval (test split)\n"]
    metrics = pd.DataFrame(result["metrics"])
    for query, columns in (("attribute", ["model", "query", "queries", "mAP", "chance mAP", "P@10"]),
                           ("caption", ["model", "query", "queries", "R@1", "chance R@1", "R@5", "chance R@5",
                                        "R@10", "chance R@10"]),
                           ("category", ["model", "query", "queries", "mAP", "chance mAP", "P@10"])):
        chosen = metrics[metrics["query"].str.contains(query)] if len(metrics) else metrics
        if len(chosen):
            parts.append(_table(chosen.to_dict("records"), columns) + "\n")
    if result.get("readout"):
        parts.append("## Attribute read-out (ridge on frozen vectors, test classes)\n")
        parts.append(_table(result["readout"], ["embeddings", "group", "attributes", "AUC attributes", "mean AUC",
                                               "accuracy", "majority accuracy"]) + "\n")
    if result.get("colour"):
        parts.append("## Image + colour word: how much of the colour the top 10 show (mean over the 15 colours)\n")
        parts.append("Each test image queries the others, alone (weight 0) and with \"a bird with C plumage\" at "
                     "the weight shown; *read-out*: the ridge read-out of C for the returned images; *class share*: "
                     "the share of their classes' images that show C (CUB's labels).\n")
        parts.append(colour_table(result["colour"]).to_markdown(index=False, floatfmt=".3f") + "\n")
        colour = pd.DataFrame(result["colour"])
        shown = next((m for m in colour.model.unique() if "minilm" in m), colour.model.iloc[0])
        first = colour[colour.model == shown].pivot(index="colour", columns="weight", values="class share")
        parts.append(f"Class share of C in the top 10, per colour ({shown}; columns: weight):\n")
        parts.append(first.reset_index().to_markdown(index=False, floatfmt=".3f") + "\n")
    if result.get("descriptions"):
        parts.append("## Class descriptions used as queries\n")
        parts.append("\n".join(f"- class {c}: {s}" for c, s in result["descriptions"].items()) + "\n")
    return "\n".join(parts)
