"""Reduction: L2-normalise → PCA (fitted on training vectors only) → L2-normalise, as FAISS transforms,
so inner product is cosine similarity in the reduced space."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from .. import CbirError

log = logging.getLogger(__name__)


# `--pca auto`: PCA is fitted on the train split only, so with few train vectors per input dimension its
# directions are noise and it loses what unseen classes need (CUB sample, MobileNetV2 det: 560 train vectors
# of dim 1280, PCA-256 cost 3 R@1 points against none). Below AUTO_MIN_RATIO vectors per dimension, auto
# keeps the raw vectors; above, the smallest dimension keeping AUTO_VARIANCE of the train variance, unless
# that saves too little to be worth a lossy step.
AUTO_MIN_RATIO = 2
AUTO_VARIANCE = 0.99
AUTO_MAX_SHARE = 0.75


def parse_pca(text: str) -> int | str | None:
    """--pca: a dimension, auto, or none/0 for no reduction."""
    if str(text).strip().lower() in ("none", "0"):
        return None
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise CbirError(f"--pca {text!r}: a positive dimension, auto or none") from None
    if value < 1:
        raise CbirError(f"--pca {text!r}: a positive dimension, auto or none")
    return value


def transform_prefix(pca: int | None, whiten: float | None) -> str:
    """The FAISS factory prefix of the reduction; `whiten`: None (off) or its shrinkage (see `train_chain`)."""
    return f"L2norm,PCA{'W' if whiten is not None else ''}{pca},L2norm," if pca else "L2norm,"


def parse_shrinkage(text: str) -> float:
    """--whiten SHRINK: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise CbirError(f"--whiten {text!r}: the shrinkage is a number from 0 (plain whitening) to 1 (none)")
    return value


def train_chain(index: faiss.Index, train: np.ndarray, whiten: float | None) -> None:
    """Train an index and its reduction chain on `train`, whitening with shrinkage `whiten` = s: each
    eigenvalue λ is replaced by (1 − s)·λ + s·mean(λ) before dividing by its square root (Ledoit–Wolf's
    shrinkage toward the mean), so the noisy low-variance directions of a small training set are not blown
    up. s = 0 is FAISS's plain PCAW; s = 1 scales every direction alike (no whitening). It is FAISS's own
    PCAMatrix `epsilon` (λ + ε, the common factor 1 − s cancels in the final L2norm), set after a first fit."""
    x = np.ascontiguousarray(train, dtype=np.float32)
    pre = faiss.downcast_index(index)
    if whiten and isinstance(pre, faiss.IndexPreTransform):
        step = x
        for i in range(pre.chain.size()):
            transform = faiss.downcast_VectorTransform(pre.chain.at(i))
            if isinstance(transform, faiss.PCAMatrix) and transform.eigen_power != 0:
                transform.train(step)
                kept = faiss.vector_to_array(transform.eigenvalues)[:transform.d_out]
                if whiten >= 1:
                    transform.eigen_power = 0.0
                else:
                    transform.epsilon = float(whiten / (1 - whiten) * np.clip(kept, 0, None).mean())
                transform.prepare_Ab()
                break
            step = transform.apply(step)
    index.train(x)  # what is trained already (the shrunk PCA) is kept


def fit_pca_dim(pca: int | None, dim: int, n_train: int) -> int | None:
    """PCA needs at most min(dim, n_train) components. More than the vectors' dimension is a mistake (an
    error); more than the train vectors support is lowered with a warning (small samples) and recorded."""
    if not pca:
        return None
    if pca > dim:
        raise CbirError(f"--pca {pca}: more than the vectors' dimension ({dim}); use at most {dim}, auto or none")
    top = min(dim, n_train)
    if pca > top:
        log.warning("--pca %d > what %d train vectors of dim %d support; using %d", pca, n_train, dim, top)
    return min(pca, top)


def resolve_pca(pca: int | str | None, train: np.ndarray) -> tuple[int | None, str]:
    """The PCA dimension to fit on these train vectors, and why (recorded in the index and logged)."""
    n, dim = train.shape
    if pca is None:
        return None, "none requested"
    if pca != "auto":
        used = fit_pca_dim(pca, dim, n)
        return used, f"{pca} requested" + (f", lowered to {used} (dim {dim}, {n} train vectors)" if used != pca else "")
    if n < AUTO_MIN_RATIO * dim:
        return None, (f"auto: {n} train vectors < {AUTO_MIN_RATIO} x {dim} dims, too few for a stable fit; "
                      f"no reduction")
    x = np.asarray(train, np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the chain's first step
    eigen = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1], 0, None)
    used = int(np.searchsorted(np.cumsum(eigen) / eigen.sum(), AUTO_VARIANCE) + 1)
    if used > AUTO_MAX_SHARE * dim:
        return None, f"auto: {AUTO_VARIANCE:.0%} of the train variance needs {used} of {dim} dims; no reduction"
    return used, f"auto: {used} of {dim} dims keep {AUTO_VARIANCE:.0%} of the train variance"


def apply_chain(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """The transforms of an IndexPreTransform applied to raw vectors."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    pre = faiss.downcast_index(index)
    if not isinstance(pre, faiss.IndexPreTransform):
        return x
    for i in range(pre.chain.size()):
        x = faiss.downcast_VectorTransform(pre.chain.at(i)).apply(x)
    return x


def reduce(vectors: np.ndarray, train: np.ndarray, pca: int | str | None, whiten: float | None) -> np.ndarray:
    """Refit the reduction on `train` and apply it to `vectors` (evaluation's own fit)."""
    dim = vectors.shape[1]
    pca, why = resolve_pca(pca, train)
    log.info("PCA: %s", why)
    index = faiss.index_factory(dim, transform_prefix(pca, whiten) + "Flat", faiss.METRIC_INNER_PRODUCT)
    train_chain(index, train, whiten)
    return apply_chain(index, vectors)
