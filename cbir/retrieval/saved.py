"""A saved index: the store, one metadata row per stored id, the raw vectors of added photos, and its
manifest (settings, embedding spec, and the replayable `--add` / `--remove` edits) — one artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, commit, read_table
from ..layout import RunLayout
from . import open_store


@dataclass
class SearchIndex:
    store: object  # a VectorStore
    table: pd.DataFrame  # indexed by store id
    manifest: dict
    added: np.ndarray  # raw vectors of the rows with split == "added", in id order
    image_dir: Path | None
    inputs: dict  # what the index was built from (its freshness record)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarity, id) per raw query vector; -1 ids pad short results."""
        if self.store.count == 0:
            raise CbirError(f"index {self.name} is empty; add vectors with `cbir index --add`")
        queries = np.atleast_2d(queries)
        if queries.shape[1] != self.manifest["dim_in"]:
            raise CbirError(f"query vectors have dim {queries.shape[1]}, index {self.name} expects "
                            f"{self.manifest['dim_in']} ({self.manifest['backbone']})")
        if k < 1:
            raise CbirError(f"--k {k}: must be at least 1")
        return self.store.search(queries, min(k, self.store.count), subset)

    def image_path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() or self.image_dir is None else self.image_dir / p


def load_index(run: Path | RunLayout, name: str, gpu: str = "auto") -> SearchIndex:
    layout = run if isinstance(run, RunLayout) else RunLayout(run)
    art = Artifact(layout, layout.index(name))
    folder, meta = art.open(f"build it with `cbir index --run {layout.root} --embeddings NAME --name {name}`")
    manifest = meta["summary"]
    store = open_store(manifest, folder, gpu)
    table = read_table(folder / layout.ROWS).set_index("id")
    if len(table) != store.count:
        raise CbirError(f"{art.link}: holds {store.count} vectors but its table {len(table)} rows; rebuild it "
                        f"with `cbir index --force`")
    added_path = folder / layout.ADDED_VECTORS
    added = np.load(added_path) if added_path.exists() else np.zeros((0, manifest["dim_in"]), np.float32)
    image_dir = Path(manifest["image_dir"]) if manifest.get("image_dir") else None
    return SearchIndex(store, table, manifest, added, image_dir, meta["inputs"])


def commit_index(layout: RunLayout, si: SearchIndex, upstream: dict) -> None:
    """Write the index as a new version of its artifact (the lock must be held)."""
    si.manifest.update(count=si.store.count, **si.store.description)
    with commit(Artifact(layout, layout.index(si.name)), si.inputs, upstream) as staged:
        si.store.save(staged.folder)
        staged.write_table(layout.ROWS, si.table.reset_index())
        if len(si.added):
            staged.write_npy(layout.ADDED_VECTORS, np.ascontiguousarray(si.added, np.float32))
        staged.summary.update(si.manifest)
