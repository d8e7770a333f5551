"""Retrieval methods side by side on the same vectors: brute-force nearest neighbours (scikit-learn), kNN
majority-vote classification, and FAISS exact, HNSW and IVF search — quality and queries per second.

Every test image queries all other test images (itself excluded), one vector per image (the top-scoring
instance for box sets), as in `evaluate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from ..artifacts import Artifact, commit, writing
from ..metrics.ranking import first_occurrences
from .retrieval import load_gallery, with_blanks

K = 10
KNN_VOTES = 5


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _quality(neighbours: np.ndarray, labels: np.ndarray, exact: np.ndarray | None) -> dict[str, float]:
    """R@1 and P@5 of neighbour lists (self already removed), and recall@10 against exact search."""
    hits = (neighbours >= 0) & (labels[np.maximum(neighbours, 0)] == labels[:, None])  # -1: fewer than K found
    out = {"R@1": float(hits[:, 0].mean()), "P@5": float(hits[:, :5].mean())}
    if exact is not None:
        out["recall@10 vs exact"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(neighbours, exact)]))
    return out


def _drop_self(ids: np.ndarray) -> np.ndarray:
    """Each query's list without itself (queries are the gallery), cut to K."""
    own = np.arange(len(ids))[:, None]
    keep = (ids != own) & (ids >= 0) & first_occurrences(ids)
    out = np.full((len(ids), K), -1, np.int64)
    for i, (row, mask) in enumerate(zip(ids, keep)):
        found = row[mask][:K]
        out[i, :len(found)] = found
    return out


def _faiss(index: faiss.Index, x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(neighbour ids, build seconds, search seconds) of a FAISS index trained on `train` (the train split,
    never the test vectors), holding `x` and queried with `x`."""
    _, build = _timed(lambda: (index.train(train), index.add(x)))
    (_, ids), search = _timed(lambda: index.search(x, K + 1))
    return ids, build, search


def method_rows(x: np.ndarray, labels: np.ndarray, train: np.ndarray) -> list[dict]:
    """One row per method over unit test vectors `x` [n, d] with image labels; `train`: train-split vectors in
    the same space, for the indexes that learn (IVF's coarse quantiser)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    train = np.ascontiguousarray(train, dtype=np.float32)
    n, d = x.shape
    rows = []
    nn = NearestNeighbors(n_neighbors=K + 1, metric="cosine", algorithm="brute")
    _, fit = _timed(lambda: nn.fit(x))
    ids, search = _timed(lambda: nn.kneighbors(x, return_distance=False))
    exact = _drop_self(ids)
    rows.append({"method": "NN (sklearn brute, cosine)", **_quality(exact, labels, None), "build s": fit,
                 "queries/s": n / search})
    votes = labels[exact[:, :KNN_VOTES]]
    predicted = np.array([np.bincount(v).argmax() for v in votes])  # ties: the smaller label; one loop over n
    rows.append({"method": f"kNN vote (k={KNN_VOTES}) accuracy", "R@1": float((predicted == labels).mean()),
                 "build s": fit, "queries/s": n / search})
    nlist = max(1, min(int(np.sqrt(n)), len(train) // 39))  # FAISS wants ~39 training points per list
    for name, factory, params in (("FAISS Flat (exact)", "Flat", ""), ("FAISS HNSW32 (efSearch 64)", "HNSW32",
                                                                       "efSearch=64"),
                                  (f"FAISS IVF{nlist},Flat (nprobe 8)", f"IVF{nlist},Flat", "nprobe=8")):
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
        ids, build, search = _faiss(index, x, train)
        rows.append({"method": name, **_quality(_drop_self(ids), labels, exact), "build s": build,
                     "queries/s": n / search})
    return rows


def compare_methods(run: Path, embeddings: tuple[str, ...], pca: int | str | None = "auto") -> pd.DataFrame:
    """NN, kNN vote, FAISS exact / HNSW / IVF on each set's test vectors (refit reduction) → reports/methods."""
    with writing(run) as layout:
        rows = []
        for name in embeddings:
            gallery, train, _ = load_gallery(layout, name, pca, False)
            rows += [{"embeddings": name, "pca": str(pca or "none"), "dim": gallery.query.shape[1],
                      "images": len(gallery.query), **r}
                     for r in method_rows(gallery.query, gallery.labels, train.instances)]
        table = pd.DataFrame(rows)
        upstream = {layout.embeddings(p): Artifact(layout, layout.embeddings(p)).fingerprint
                    for name in embeddings for p in name.split("+")}
        art = Artifact(layout, layout.report("methods"))
        with commit(art, {"embeddings": upstream, "pca": pca}, upstream) as staged:
            staged.write_json("methods.json", table.to_dict(orient="records"))
            staged.file("methods.md").write_text("\n".join([
                "# Retrieval methods on the same vectors", "",
                f"Run `{layout.root}`: each test image queries all other test images (one vector per image; PCA "
                "refitted on train). R@1 / P@5: same-class neighbours; the kNN row's R@1 column is its "
                "leave-one-out classification accuracy; recall@10 against the exact neighbours; times on this "
                "machine (queries/s over all test queries at once). — : not applicable to that method (P@5 of "
                "a vote; recall against exact search for the exact ones).", "",
                with_blanks(table, ["R@1", "P@5", "build s", "queries/s", "recall@10 vs exact"]).to_markdown(
                    index=False), ""]))
        return table
