"""Retrieval: vector stores behind one `VectorStore` protocol, reduction, saved indexes, queries, ingest.

The store receives raw encoder vectors; its reduction (L2 → PCA → L2, fitted on training vectors)
belongs to the store so that queries, `--add` and evaluation see exactly the same space. A new store
(e.g. Milvus) is one new module implementing the protocol and registered in `open_store`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class VectorStore(Protocol):
    kind: str
    description: dict  # what it is (factory, reduction, search parameters), recorded with the index

    @property
    def count(self) -> int: ...

    def train(self, vectors: np.ndarray) -> None: ...

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarity, id) per raw query vector, optionally among `subset` ids only; -1 pads."""

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Raw vectors in the store's (reduced, normalised) space."""

    def save(self, folder: Path) -> None: ...


def open_store(description: dict, folder: Path, gpu: str = "auto") -> VectorStore:
    """The saved store an index's recorded description names."""
    from .faiss_store import FaissStore

    stores = {"faiss": FaissStore}
    return stores[description["store"]].load(folder, gpu, description)
