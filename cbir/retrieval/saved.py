"""A saved index: the store, one metadata row per stored id, the raw vectors of added photos, and its
manifest (settings, embedding spec, and the replayable `--add` / `--remove` edits) — one artifact."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, commit, read_table
from ..datasets.base import image_file
from ..layout import RunLayout
from ..vectors import take_rows
from . import open_store as _open_store
from .expression import matching_ids, to_pandas
from .rerank import SHORTLIST, Rerank, rerank_shortlist

log = logging.getLogger(__name__)


@dataclass
class SearchIndex:
    store: object  # a VectorStore
    table: pd.DataFrame  # indexed by store id
    manifest: dict
    added: np.ndarray  # raw vectors of the rows with split == "added", in id order
    image_dir: Path | None
    inputs: dict  # what the index was built from (its freshness record)
    layout: RunLayout  # the run it belongs to (its embeddings hold the base rows' raw vectors)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None,
               filter: str | None = None, rerank: Rerank = Rerank()) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarity, id) per raw query vector, among `subset` ids and rows matching `filter` (a
        Milvus-style expression: evaluated by a store that filters, else on the table); -1 ids pad.
        With `rerank`, each query's top `SHORTLIST` is re-ranked among itself and the top k returned."""
        if rerank.method != "none":
            _, ids = self.search(queries, max(k, SHORTLIST), subset, filter)
            reduced = self.store.transform(np.atleast_2d(queries))
            shortlist = np.zeros((*ids.shape, reduced.shape[1]), np.float32)
            shortlist[ids >= 0] = self.store.transform(self.raw_vectors(ids[ids >= 0]))
            sims, ids = rerank_shortlist(rerank, reduced, shortlist, ids)
            return sims[:, :k], ids[:, :k]
        if self.store.count == 0:
            raise CbirError(f"index {self.name} is empty; add vectors with `cbir index --add`")
        queries = np.atleast_2d(queries)
        if queries.shape[1] != self.manifest["dim_in"]:
            raise CbirError(f"query vectors have dim {queries.shape[1]}, index {self.name} expects "
                            f"{self.manifest['dim_in']} ({self.manifest['backbone']})")
        if k < 1:
            raise CbirError(f"--k {k}: must be at least 1")
        k = min(k, self.store.count)
        refine = self.manifest.get("refine") or 0
        shortlist = min(max(k, refine), self.store.count)
        if filter and self.store.filters:
            to_pandas(filter)  # the same checked subset as for any other store
            found = self.store.search(queries, shortlist, subset, expression=filter)
        else:
            if filter:
                matching = matching_ids(self.table, filter)
                subset = matching if subset is None else np.intersect1d(matching, subset)
            found = self.store.search(queries, shortlist, subset)
        return exact_rescore(self.store, queries, found[1], self.raw_vectors, k) if refine else found

    @cached_property
    def base_vectors(self) -> np.ndarray:
        """The embeddings the index was built from (id = row), opened once, memory-mapped: re-ranking and
        --refine read every query's shortlist from here, row by row (`take_rows`), never the whole set."""
        from ..encoders.stage import load_embeddings

        return load_embeddings(self.layout, self.manifest["embeddings"])[0]

    def raw_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Encoder vectors of stored ids: base rows from the embeddings (id = row), added ones from the index."""
        ids = np.asarray(ids, np.int64)
        base = self.base_vectors
        added_ids = self.table.index[self.table.split == "added"].sort_values().to_numpy()
        is_added = np.isin(ids, added_ids)
        out = np.zeros((len(ids), self.manifest["dim_in"]), np.float32)
        out[~is_added] = take_rows(base, ids[~is_added])
        out[is_added] = self.added[np.searchsorted(added_ids, ids[is_added])]
        return out

    def image_path(self, path: str) -> Path:
        return image_file(self.image_dir, path)


def exact_rescore(store, queries: np.ndarray, ids: np.ndarray, raw_vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`--refine`: each query's shortlist `ids` re-scored with its float vectors (`raw_vectors(ids)`, read from
    the memory-mapped embeddings, so RAM holds one batch of shortlists), exact in the store's reduced space;
    the top k by exact similarity. What compressed codes (PQ, SQ8) lose in the ranking comes back."""
    queries = store.transform(np.atleast_2d(queries))
    valid = ids >= 0
    sims = np.full(ids.shape, -np.inf, np.float32)
    if valid.any():
        vectors = store.transform(raw_vectors(ids[valid]))
        sims[valid] = np.einsum("ij,ij->i", vectors, queries[np.nonzero(valid)[0]])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def load_index(run: Path | RunLayout, name: str, gpu: str = "auto", repair: bool = False,
               open_store: bool = True) -> SearchIndex:
    """A saved index. A store living outside the run (Milvus) that disagrees with the run's record after an
    interrupted `--add` / `--remove` is re-synced when `repair` (writers, under the run lock), else refused.
    Without `open_store`, only the record (table, manifest, added vectors; store None)."""
    layout = run if isinstance(run, RunLayout) else RunLayout(run)
    art = Artifact(layout, layout.index(name))
    folder, meta = art.open(f"build it with `cbir index --run {layout.root} --embeddings NAME --name {name}`")
    manifest = meta["summary"]
    store = _open_store(manifest, folder, layout.root, gpu) if open_store else None
    table = read_table(folder / layout.ROWS).set_index("id")
    added_path = folder / layout.ADDED_VECTORS
    added = np.load(added_path) if added_path.exists() else np.zeros((0, manifest["dim_in"]), np.float32)
    image_dir = Path(manifest["image_dir"]) if manifest.get("image_dir") else None
    si = SearchIndex(store, table, manifest, added, image_dir, meta["inputs"], layout)
    if store is not None and not store.matches(len(table), manifest["next_id"]):
        if not repair:
            raise CbirError(f"{art.link}: its store does not match its record ({store.count} vectors, {len(table)} rows; an "
                            f"interrupted --add/--remove? rerun it) — or rebuild with `cbir index --force`")
        deleted, inserted = store.repair(table.index.to_numpy(np.int64), si.raw_vectors, table)
        log.warning("index %s: store re-synced to the run's record (%d stray vector(s) deleted, %d re-inserted)",
                    name, deleted, inserted)
    return si


def commit_index(layout: RunLayout, si: SearchIndex, upstream: dict) -> None:
    """Write the index as a new version of its artifact (the lock must be held)."""
    si.manifest.update(count=si.store.count, **si.store.description)
    with commit(Artifact(layout, layout.index(si.name)), si.inputs, upstream) as staged:
        si.store.save(staged.folder)
        staged.write_table(layout.ROWS, si.table.reset_index())
        if len(si.added):
            staged.write_npy(layout.ADDED_VECTORS, np.ascontiguousarray(si.added, np.float32))
        staged.summary.update(si.manifest)
