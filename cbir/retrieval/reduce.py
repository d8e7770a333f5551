"""Reduction: L2-normalise → PCA (fitted on training vectors only) → L2-normalise, as FAISS transforms,
so inner product is cosine similarity in the reduced space."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from .. import CbirError

log = logging.getLogger(__name__)


def parse_pca(text: str) -> int | None:
    """--pca: a dimension, or none/0 for no reduction."""
    if str(text).strip().lower() in ("none", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise CbirError(f"--pca {text!r}: a positive dimension or none") from None
    if value < 1:
        raise CbirError(f"--pca {text!r}: a positive dimension or none")
    return value


def transform_prefix(pca: int | None, whiten: bool) -> str:
    return f"L2norm,PCA{'W' if whiten else ''}{pca},L2norm," if pca else "L2norm,"


def fit_pca_dim(pca: int | None, dim: int, n_train: int) -> int | None:
    """PCA needs at most min(dim, n_train) components; larger requests are lowered with a warning."""
    if not pca:
        return None
    top = min(dim, n_train)
    if pca > top:
        log.warning("--pca %d > what %d train vectors of dim %d support; using %d", pca, n_train, dim, top)
    return min(pca, top)


def apply_chain(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """The transforms of an IndexPreTransform applied to raw vectors."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    pre = faiss.downcast_index(index)
    if not isinstance(pre, faiss.IndexPreTransform):
        return x
    for i in range(pre.chain.size()):
        x = faiss.downcast_VectorTransform(pre.chain.at(i)).apply(x)
    return x


def reduce(vectors: np.ndarray, train: np.ndarray, pca: int | None, whiten: bool) -> np.ndarray:
    """Refit the reduction on `train` and apply it to `vectors` (evaluation's own fit)."""
    dim = vectors.shape[1]
    pca = fit_pca_dim(pca, dim, len(train))
    index = faiss.index_factory(dim, transform_prefix(pca, whiten) + "Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    return apply_chain(index, vectors)
