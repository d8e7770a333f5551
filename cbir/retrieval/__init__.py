"""Retrieval: vector stores behind one `VectorStore` protocol, reduction, saved indexes, queries, ingest.

The store receives raw encoder vectors; its reduction (L2 → PCA → L2, fitted on training vectors)
belongs to the store so that queries, `--add` and evaluation see exactly the same space. A new store is
one new module implementing the protocol, registered in `STORES`; `--store` names it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from .. import CbirError


class VectorStore(Protocol):
    kind: str
    filters: bool  # evaluates `--filter` expressions itself (else SearchIndex searches the matching id subset)
    description: dict  # what it is (factory, reduction, search parameters, where it lives), recorded with the index

    @property
    def count(self) -> int: ...

    def matches(self, rows: int, next_id: int) -> bool:
        """Cheap check that the store holds exactly the saved record's `rows` vectors, all below `next_id`."""

    def repair(self, expected: np.ndarray, raw_vectors, meta: pd.DataFrame) -> tuple[int, int]:
        """Make the store hold exactly the `expected` ids again (after an interrupted edit), or refuse."""

    def train(self, vectors: np.ndarray, whiten: float | None = None) -> None:
        """Fit the reduction (whitening with this shrinkage, `reduce.train_chain`) and the index."""

    def add(self, vectors: np.ndarray, ids: np.ndarray, meta: pd.DataFrame) -> None:
        """Raw vectors under stable ids; `meta` holds their scalar fields (one row per id) for stores that filter."""

    def remove(self, ids: np.ndarray) -> int: ...

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarity, id) per raw query vector, optionally among `subset` ids only; -1 pads."""

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Raw vectors in the store's (reduced, normalised) space."""

    def save(self, folder: Path) -> None: ...

    @classmethod
    def load(cls, folder: Path, gpu: str, description: dict, root: Path) -> VectorStore: ...

    @classmethod
    def release(cls, description: dict, root: Path) -> None:
        """Free what an older index version holds outside the run (a Milvus collection; nothing for FAISS)."""


STORE_SPEC = re.compile(r"faiss|milvus-lite:.+\.db|milvus://[A-Za-z0-9_.-]+:\d{1,5}")


def check_store(spec: str) -> str:
    """--store: faiss, milvus-lite:PATH.db (relative to the run, or absolute) or milvus://HOST:PORT."""
    if not STORE_SPEC.fullmatch(spec or "") or (spec.startswith("milvus://") and not 0 < int(spec.rsplit(":", 1)[1]) < 65536):
        raise CbirError(f"--store {spec!r}: use faiss, milvus-lite:PATH.db (a local Milvus Lite file, relative to the "
                        f"run or absolute) or milvus://HOST:PORT (a Milvus server)")
    return spec


def store_class(kind: str):
    from .faiss_store import FaissStore
    from .milvus_store import MilvusStore

    stores = {"faiss": FaissStore, "milvus": MilvusStore}
    if kind not in stores:
        raise CbirError(f"index store {kind!r} is unknown to this cbir (known: {', '.join(stores)})")
    return stores[kind]


def new_store(spec: str, root: Path, name: str, dim: int, reduction: str, body: str, gpu: str,
              layout: dict | None = None) -> VectorStore:
    """An empty store of the kind `--store` names, for index `name`: raw vectors of `dim` go through
    `reduction` (a FAISS transform prefix) into an index of `body` (a FAISS factory body); `layout`: what
    `--memory-budget` chose (budget.Layout.describe(); FAISS only)."""
    kind = store_class("faiss" if spec == "faiss" else "milvus")
    extra = {"layout": layout} if layout else {}
    return kind.for_index(spec, root, name, dim, reduction, body, gpu, **extra)


def open_store(description: dict, folder: Path, root: Path, gpu: str = "auto") -> VectorStore:
    """The saved store an index's recorded description names (`root`: the run, for relative locations)."""
    return store_class(description["store"]).load(folder, gpu, description, root)


def release_store(description: dict | None, root: Path) -> None:
    if description:
        store_class(description["store"]).release(description, root)
