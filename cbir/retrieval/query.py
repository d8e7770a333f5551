"""Queries: a photo (or a run image) → boxes → vectors → nearest instances and images.

`Querier` loads the index, its encoder and (optionally) the run's detector once, and answers photos
the way the run was built; the CLI's `search`, the page and `index --add` all use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CbirError
from ..artifacts import Artifact
from ..datasets import load_dataset
from ..detection import build_detector
from ..detection.results import kept_boxes
from ..device import resolve_device
from ..encoders.stage import load_embeddings
from ..images import Photo
from ..layout import RunLayout
from ..training.encoders import encoder_from_spec
from ..vectors import unit_rows as _unit
from ..weights import relocate
from .rerank import Rerank
from .saved import SearchIndex, load_index


def neighbours(si: SearchIndex, sims: np.ndarray, ids: np.ndarray, exclude_image: int | None = None) -> pd.DataFrame:
    """Instance-level result rows of one query, best first."""
    keep = ids >= 0
    rows = si.table.loc[ids[keep]].reset_index().assign(similarity=sims[keep])
    if exclude_image is not None:
        rows = rows[rows.image_id != exclude_image]
    return rows.reset_index(drop=True)


def image_level(rows: pd.DataFrame) -> pd.DataFrame:
    """Each gallery image once, ranked by its best-matching instance (rows must be best first)."""
    best = rows.sort_values("similarity", ascending=False, kind="stable").drop_duplicates("image_id")
    return best.reset_index(drop=True)


def result_records(table: pd.DataFrame, categories: dict[int, str], itself: int | None = None) -> list[dict]:
    """Gallery rows as JSON; `itself` marks the rows of the query photo's own image (a gallery photo given
    as a query finds itself first, and says so). Built from whole columns: row-by-row pandas access was a
    sixth of the page's time per query on 2 cores."""
    if table.empty:
        return []
    image_ids, instances, class_ids, category_ids = (table[c].astype(int).tolist() for c in
                                                     ("image_id", "instance", "class_id", "category_id"))
    text = [[v if isinstance(v, str) else "" for v in table[c].tolist()] for c in ("class_name", "path", "source")]
    boxes, sims = table[["x", "y", "w", "h"]].to_numpy(float).tolist(), table.similarity.astype(float).tolist()
    return [{"image_id": i, "itself": i == itself, "instance": n, "class_id": c, "class_name": name,
             "category": categories.get(cat, ""), "path": path, "box": [round(v, 1) for v in box], "source": source,
             "similarity": round(sim, 5)}
            for i, n, c, cat, name, path, source, box, sim in zip(image_ids, instances, class_ids, category_ids, *text,
                                                                  boxes, sims)]


@dataclass
class QueryBox:
    box: list[float]
    score: float
    source: str
    category_id: int = 0  # the detector's category (0: none, e.g. a whole-photo fallback)
    neighbours: pd.DataFrame = field(default_factory=pd.DataFrame)
    images: pd.DataFrame = field(default_factory=pd.DataFrame)


def query_vectors(si: SearchIndex, vectors: np.ndarray, boxes: list[dict], k: int,
                  exclude_image: int | None = None, filter: str | None = None,
                  rerank: Rerank = Rerank()) -> list[QueryBox]:
    """Search every query box (among the rows matching `filter`, re-ranked on its shortlist) in one call;
    over-fetch so the image-level lists still hold k distinct images."""
    if k > len(si.table):
        raise CbirError(f"--k {k} exceeds the gallery ({len(si.table)} vectors in index {si.name})")
    sims, ids = si.search(vectors, min(len(si.table), 4 * k + 8), filter=filter, rerank=rerank)
    out = []
    for i, b in enumerate(boxes):
        rows = neighbours(si, sims[i], ids[i], exclude_image)
        out.append(QueryBox(b["bbox"], b["score"], b["source"], int(b.get("category_id", 0)), rows.head(k),
                            image_level(rows).head(k)))
    return out


def category_filter(category_id: int | None, filter: str | None) -> str | None:
    """The user's filter, narrowed to one category's gallery rows."""
    if category_id is None:
        return filter
    return f"category_id == {category_id}" + (f" and ({filter})" if filter else "")


def merged_images(boxes: list[QueryBox], k: int) -> pd.DataFrame:
    """All boxes of one photo merged: each gallery image once, by its best match."""
    return image_level(pd.concat([q.neighbours for q in boxes], ignore_index=True)).head(k) if boxes else pd.DataFrame()


def results_json(query: str, boxes: list[QueryBox], merged: pd.DataFrame, categories: dict[int, str],
                 itself: int | None = None) -> dict:
    """One JSON-able document per query photo; `categories` names the COCO ids of boxes and results;
    `itself`: the run's image id of the query photo when it is one of the run's (else None)."""
    records = partial(result_records, categories=categories, itself=itself)
    return {"query": query, "itself": itself, "boxes": [
        {"box": [round(float(v), 1) for v in q.box], "score": round(float(q.score), 4), "source": q.source,
         "category": categories.get(q.category_id, ""), "neighbours": records(q.neighbours),
         "images": records(q.images)} for q in boxes], "images": records(merged)}


def run_detector(layout: RunLayout, device, weights: str | None = None):
    """The run's own detector rebuilt from its recorded spec (weights checked against their fingerprint);
    (None, summary) when its boxes were imported."""
    art = Artifact(layout, layout.detections)
    meta = art.meta()
    if meta is None:
        return None, {}
    info = meta["summary"]
    if info["detector"] == "external":
        return None, info
    path = relocate(info["weights"], info["weights_fingerprint"], weights)
    kind = info["detector"].partition(":")[0]
    name = {"onnx": f"onnx:{path}", "trained": path}.get(kind, info["detector"])  # a model file, or a torchvision name
    detector = build_detector(name, path, device=device, min_size=info.get("min_size", "auto"),
                              score_floor=min(info["score_threshold"], 0.05), labels=info.get("labels"))
    if detector.spec["weights_fingerprint"] != info["weights_fingerprint"]:
        raise CbirError(f"detector weights {detector.spec['weights']} differ from the run's "
                        f"({info['weights_fingerprint']}); supply the same file with --detector-weights")
    return detector, info


def other_detector(layout: RunLayout, name: str, device, weights: str | None, categories: list[dict]):
    """A detector for new photos other than the one that boxed the gallery (e.g. a trained one in a run of
    imported boxes): the run's score threshold and box limit, the run's categories; an ONNX model's label file
    is the `.labels.txt` beside it."""
    meta = Artifact(layout, layout.detections).meta()
    run = meta["summary"] if meta else {}
    labels = Path(name[5:]).with_suffix(".labels.txt") if name.startswith("onnx:") else None
    detector = build_detector(name, weights or "DEFAULT", device=device, score_floor=0.05,
                              labels=str(labels) if labels and labels.is_file() else None)
    return detector, {"score_threshold": run.get("score_threshold", 0.3), "max_per_image": run.get("max_per_image", 10),
                      "classes": run.get("classes", {str(c["id"]): c["name"] for c in categories}), **detector.spec}


class Querier:
    """Index, encoder and (optionally) detector loaded once; answers photos the way the run was built."""

    def __init__(self, run: Path | RunLayout, index_name: str, detector: str = "run", device: str = "auto",
                 gpu: str = "auto", weights: str | None = None, detector_weights: str | None = None,
                 repair: bool = False):
        self.layout = run if isinstance(run, RunLayout) else RunLayout(run)
        self.settings = {"detector": detector, "device": device, "gpu": gpu, "weights": weights,
                         "detector_weights": detector_weights}
        self.si = load_index(self.layout, index_name, gpu, repair)
        self.spec = self.si.manifest["embedding_spec"]
        self.device = resolve_device(device)
        self.encoder = encoder_from_spec(self.spec, self.device, weights)
        self.detector, self.detect_meta = None, {}
        self._detections = Artifact(self.layout, self.layout.detections).fingerprint  # what the detector boxed
        data = self._read_dataset()
        if detector == "run" and self.si.manifest["mode"] != "full":
            self.detector, self.detect_meta = run_detector(self.layout, self.device, detector_weights)
        elif detector != "none" and self.si.manifest["mode"] != "full":
            self.detector, self.detect_meta = other_detector(self.layout, detector, self.device, detector_weights,
                                                             data.categories)

    def _read_dataset(self):
        """What the answers name from the run's dataset: categories, whether it is a photo folder, and the
        run's own photos (to recognise one given as a query)."""
        data = load_dataset(self.layout)
        self.categories = {int(c["id"]): c["name"] for c in data.categories}
        self.photo_folder = data.meta["inputs"]["dataset"] == "photos"  # results are named by their path there
        gt = data.instances.merge(data.images[["image_id", "path", "width", "height"]], on="image_id")
        self.run_photos = {Path(r.path).name: (r.width, r.height, [r.x, r.y, r.w, r.h], int(r.image_id))
                           for r in gt.drop_duplicates("image_id").itertuples()}
        return data

    def reloaded(self, repair: bool = False) -> Querier:
        """This querier over the index's committed version now (after an --add, --remove, rebuild or sync by
        any process): the loaded models are kept while the index's embedding spec and detections are the
        ones they were loaded for, and loaded again when not. The old querier is left as it was, so a batch
        that holds it finishes on the version it started with."""
        si = load_index(self.layout, self.si.name, self.settings["gpu"], repair)
        detections = Artifact(self.layout, self.layout.detections).fingerprint
        if si.manifest["embedding_spec"]["fingerprint"] != self.spec["fingerprint"] or \
                detections != self._detections:
            return Querier(self.layout, self.si.name, repair=repair, **self.settings)
        fresh = copy.copy(self)
        fresh.si = si
        fresh._read_dataset()
        return fresh

    def own_image(self, photo: Photo, name: str | None) -> int | None:
        """The run's image id of a photo that is one of the run's own (same file name and size), else None."""
        width, height, _, image_id = self.run_photos.get(name, (None, None, None, None))
        return image_id if (width, height) == (photo.width, photo.height) else None

    @cached_property
    def text(self):
        """Words → this index's space (a bridged set's text side); a one-line error for other indexes."""
        from ..training.bridge import TextQuery

        return TextQuery(self.spec, f"index {self.si.manifest['name']}")

    @property
    def has_text(self) -> bool:
        return bool(self.spec.get("text"))

    def words(self, text: str, weight: float) -> dict:
        """What a results document says of its words: them, their weight, and which the text encoder
        understood and which not (the CLI prints it, the page shows it)."""
        known, unknown = self.text.encoder.understood(text)
        return {"text": text, "text_weight": weight, "understood": known, "not_understood": unknown}

    def with_text(self, vectors: np.ndarray, text: str | None, weight: float) -> np.ndarray:
        """Each query vector moved towards the words: unit((1 - w) · unit(v) + w · unit(t)), so w = 0 is the
        photo alone and w = 1 the words alone, whatever the two vectors' lengths."""
        if not text:
            return vectors
        if not 0 <= weight <= 1:
            raise CbirError(f"--text-weight {weight}: must lie in [0, 1]")
        words = _unit(self.text.vectors([text]))
        return _unit((1 - weight) * _unit(vectors) + weight * words).astype(np.float32)

    def query_text(self, text: str, k: int, filter: str | None = None, rerank: Rerank = Rerank(),
                   category: str | None = None) -> tuple[list[QueryBox], pd.DataFrame]:
        """Words alone as the query: one 'box' (source text) whose neighbours are the nearest gallery rows."""
        if not text.strip():
            raise CbirError("--text is empty")
        found = query_vectors(self.si, self.text.vectors([text]), [{"bbox": [], "score": 1.0, "source": "text"}], k,
                              filter=category_filter(self.category_id(category), filter), rerank=rerank)
        return found, merged_images(found, k)

    @property
    def multi_category(self) -> bool:
        """Whether boxes need their category named (COCO-like runs), or all share one (CUB: bird)."""
        return len(self.categories) > 1

    @property
    def detector_note(self) -> str:
        if self.si.manifest["mode"] == "full":
            return "index of whole images: the whole photo is the query"
        if self.detector is None:
            how = ("" if self.detect_meta.get("detector") != "external" else
                   f"; to box new photos, train one (`cbir train-detector --run {self.layout.root}`) or take an ONNX "
                   f"one, redo `cbir detect --run {self.layout.root} --detector MODEL --force`, embed and index")
            return ("no detector for new photos (imported boxes or --detector none): the whole photo is the query, "
                    "plus its GT box when the photo is one of the run's" + how)
        weights = Path(self.detect_meta["weights"])
        shown = weights.parent.name if self.detect_meta["detector"].startswith("trained:") else weights.name
        kind = "onnx" if self.detect_meta["detector"].startswith("onnx:") else self.detect_meta["detector"]
        return f"boxes from {kind} ({shown})"  # a file name, never a path of the serving machine

    def category_id(self, name: str | None) -> int | None:
        """The COCO id of a category name of this run (None for None); a one-line error for others."""
        if name is None:
            return None
        ids = {v: k for k, v in self.categories.items()}
        if name not in ids:
            raise CbirError(f"--category {name}: not a category of this run ({', '.join(list(ids)[:8])}"
                            f"{', ...' if len(ids) > 8 else ''})")
        return ids[name]

    def boxes(self, photos: list[Photo], score: float | None = None, names: list[str | None] | None = None,
              category: int | None = None) -> list[list[dict]]:
        """Per photo, the detected boxes of the run's categories (or of `category` alone; original pixels; one
        detector pass for all photos), or else the whole photo as a fallback instance plus, for a photo of the
        run itself (matched by file name and size), its GT box. With `category` and a detector, a photo
        without a box of it gets no boxes: there is nothing of that kind to search with."""
        names = names or [None] * len(photos)
        found = [[] for _ in photos]
        if self.detector is not None:
            m = self.detect_meta
            keep = {int(c) for c in m["classes"]} if category is None else {category}
            found = [kept_boxes(f, keep, m["score_threshold"] if score is None else score,
                                m["max_per_image"]) for f in self.detector.detect(photos)]
            for d in (d for boxes in found for d in boxes):
                d["source"] = "detected"
            if category is not None:
                return found
        return [boxes or self._fallback(photo, name) for photo, boxes, name in zip(photos, found, names)]

    def _fallback(self, photo: Photo, name: str | None) -> list[dict]:
        whole = [{"bbox": [0.0, 0.0, float(photo.width), float(photo.height)], "score": 0.0, "source": "fallback-full"}]
        if self.si.manifest["mode"] != "full" and self.own_image(photo, name) is not None:
            gt = self.run_photos[name][2]
            whole.append({"bbox": [float(v) for v in gt], "score": 1.0, "source": "gt"})
        return whole

    def vectors(self, photos: list[Photo], boxes: list[list[dict]]) -> list[np.ndarray]:
        return self.encoder.encode_batch(photos, [np.array([b["bbox"] for b in bs], float) for bs in boxes])

    def query(self, photos: list[Photo], k: int, score: float | None = None, names: list[str | None] | None = None,
              filter: str | None = None, rerank: Rerank = Rerank(), category: str | None = None,
              text: str | None = None, text_weight: float = 0.3) -> list[tuple[list[QueryBox], pd.DataFrame]]:
        """Several photos answered together: one detector pass, one encoder pass, one search for all their
        boxes (what concurrent page users and `search --image A B ...` share); per photo (boxes, merged).
        `category` (a name): query with that kind's boxes only, among that kind's gallery boxes. `text`: every
        box's vector moved towards those words by `text_weight` (`with_text`)."""
        category_id = self.category_id(category)
        boxes = self.boxes(photos, score, names, category_id)
        if not any(boxes):
            return [([], pd.DataFrame()) for _ in photos]
        with_boxes = [i for i, bs in enumerate(boxes) if bs]
        vectors = self.vectors([photos[i] for i in with_boxes], [boxes[i] for i in with_boxes])
        found = query_vectors(self.si, self.with_text(np.concatenate(vectors), text, text_weight),
                              [b for bs in boxes for b in bs], k, None,
                              category_filter(category_id, filter), rerank)
        per_photo = np.split(np.arange(len(found)), np.cumsum([len(bs) for bs in boxes])[:-1])
        return [([found[i] for i in part], merged_images([found[i] for i in part], k)) for part in per_photo]

    def query_id(self, image_id: int, k: int, filter: str | None = None, rerank: Rerank = Rerank(),
                 category: str | None = None, text: str | None = None, text_weight: float = 0.3):
        """Query with an image already in the run: its stored vectors (of `category` only, when given), itself
        excluded from the results."""
        category_id = self.category_id(category)
        vectors, table, _ = load_embeddings(self.layout, self.si.manifest["embeddings"])
        chosen = (table.image_id == image_id) & (table.category_id == category_id if category_id else True)
        rows = table.index[chosen].to_numpy()
        if len(rows) == 0:
            raise CbirError(f"--query-id {image_id}: no {category or ''} rows in embeddings "
                            f"{self.si.manifest['embeddings']}".replace("no  rows", "no rows"))
        boxes = [{"bbox": [r.x, r.y, r.w, r.h], "score": r.score, "source": r.source, "category_id": r.category_id}
                 for r in table.loc[rows].itertuples()]
        found = query_vectors(self.si, self.with_text(np.asarray(vectors[rows]), text, text_weight), boxes, k,
                              exclude_image=image_id,
                              filter=category_filter(category_id, filter), rerank=rerank)
        return found, merged_images(found, k)

    def photo_documents(self, photos: list[Photo], queries: list[str], names: list[str | None], k: int,
                        score: float | None = None, filter: str | None = None, rerank: Rerank = Rerank(),
                        category: str | None = None, text: str | None = None,
                        text_weight: float = 0.3) -> list[dict]:
        """`query`'s answers as the results documents `search --json` prints (and the service sends): one per
        photo, named by `queries`; with words, what was understood of them."""
        answers = self.query(photos, k, score=score, names=names, filter=filter, rerank=rerank, category=category,
                             text=text, text_weight=text_weight)
        return [self._with_words(results_json(query, boxes, merged, self.categories, self.own_image(photo, name)),
                                 text, text_weight)
                for query, photo, name, (boxes, merged) in zip(queries, photos, names, answers)]

    def id_document(self, image_id: int, k: int, filter: str | None = None, rerank: Rerank = Rerank(),
                    category: str | None = None, text: str | None = None, text_weight: float = 0.3) -> dict:
        """`query_id`'s answer as a results document."""
        found = self.query_id(image_id, k, filter, rerank, category, text, text_weight)
        return self._with_words(results_json(f"image_id {image_id}", *found, self.categories), text, text_weight)

    def text_document(self, text: str, k: int, filter: str | None = None, rerank: Rerank = Rerank(),
                      category: str | None = None) -> dict:
        """`query_text`'s answer as a results document (the words at weight 1: they are the whole query)."""
        found = self.query_text(text, k, filter, rerank, category)
        return self._with_words(results_json(f"text {text!r}", *found, self.categories), text, 1.0)

    def _with_words(self, doc: dict, text: str | None, weight: float) -> dict:
        if text:
            doc.update(self.words(text, weight))
        return doc
