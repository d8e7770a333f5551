"""The `index` stage: an embeddings set → a saved index (reduction fitted on the train split only, then a
store), rebuilt only when its inputs change, with earlier `--add` / `--remove` edits replayed."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import CbirError
from ..artifacts import Artifact, is_fresh, writing
from ..datasets import check_splits, load_dataset
from ..encoders.stage import load_embeddings
from ..layout import RunLayout, check_name
from ..vectors import take_rows
from . import check_store, new_store, release_store
from .budget import choose_layout, human, train_sample_size
from .faiss_store import FaissStore
from .ingest import replay_edits
from .milvus_store import check_factory
from .reduce import resolve_pca, transform_prefix
from .saved import SearchIndex, commit_index, load_index

log = logging.getLogger(__name__)

# From benchmarks/results/index_bench_cpu.md (2 CPU cores, 256-d clustered vectors): exact search takes
# 12 ms a query at 10^5 but 125 ms at 10^6; IVF-SQ8 keeps recall@10 0.96-0.99 up to 10^6 at a quarter of
# the memory with ~1,900 queries/s, beating HNSW32 there (recall 0.92, 5x the memory) and, unlike HNSW,
# supports removal; IVF-PQ compresses 4x more but recall fell to 0.49, so it is only the choice past ~5*10^7.
AUTO_EXACT_MAX = 100_000
ADD_CHUNK = 65_536  # vectors read from disk and added at a time
AUTO_SQ8_MAX = 50_000_000


def auto_factory(n: int, dim: int, n_train: int) -> str:
    """Exact for small galleries, then IVF (4·sqrt(n) lists, at most one per 39 train vectors)."""
    if n <= AUTO_EXACT_MAX:
        return "Flat"
    lists = max(1, min(int(4 * np.sqrt(n)), n_train // 39))
    if n <= AUTO_SQ8_MAX:
        return f"IVF{lists},SQ8"
    return f"IVF{lists},PQ{max(m for m in (64, 32, 16, 8) if dim % m == 0)}"


@dataclass(kw_only=True)
class IndexConfig:
    run: Path
    embeddings: str
    name: str | None = None
    pca: int | str | None = "auto"  # a dimension, "auto" (see reduce.resolve_pca) or None
    whiten: float | None = None  # PCA whitening with this shrinkage (reduce.train_chain); None: off
    factory: str = "auto"
    gpu: str = "auto"
    gallery: tuple[str, ...] = ("train", "test")
    store: str = "faiss"  # faiss | milvus-lite:PATH.db | milvus://HOST:PORT
    memory_budget: int | None = None  # bytes: the FAISS layout is chosen to fit (budget.choose_layout)
    refine: int = 0  # re-score each query's top `refine` exactly from the float vectors on disk (0: off)
    force: bool = False

    def __post_init__(self):
        check_name(self.index_name)
        check_store(self.store)
        check_splits(self.gallery, "--gallery")
        if self.factory != "auto" and self.store == "faiss":
            FaissStore.check_factory(self.factory)
        elif self.factory != "auto":
            check_factory(self.factory, self.store)
        if self.pca is not None and self.pca != "auto" and (not isinstance(self.pca, int) or self.pca < 1):
            raise CbirError(f"--pca {self.pca}: a positive dimension, auto or none")
        if self.memory_budget is not None and self.store != "faiss":
            raise CbirError(f"--memory-budget chooses a FAISS layout; with --store {self.store} the Milvus server "
                            f"sizes its own memory (choose its index with --factory)")
        if self.memory_budget is not None and self.factory != "auto":
            raise CbirError(f"--memory-budget and --factory {self.factory}: give one of them (the budget chooses "
                            f"the factory)")
        if self.refine < 0:
            raise CbirError(f"--refine {self.refine}: a shortlist length (e.g. 100), or 0 for off")

    @property
    def index_name(self) -> str:
        return self.name or self.embeddings


def build_index(cfg: IndexConfig) -> SearchIndex:
    """Train the reduction (and any index parameters) on train rows, add the gallery splits, replay the
    previous version's edits, save. Skipped when embeddings and settings are unchanged."""
    with writing(cfg.run) as layout:
        vectors, table, emb = load_embeddings(layout, cfg.embeddings)
        inputs = {"embeddings": emb["fingerprint"], "pca": cfg.pca, "whiten": cfg.whiten, "factory": cfg.factory,
                  "gallery": list(cfg.gallery), "store": cfg.store,
                  **({"memory_budget": cfg.memory_budget} if cfg.memory_budget else {}),
                  **({"refine": cfg.refine} if cfg.refine else {})}
        art = Artifact(layout, layout.index(cfg.index_name))
        if is_fresh(art, inputs, cfg.force):
            return load_index(layout, cfg.index_name, cfg.gpu)
        # the previous version's record (not its store: that may be what failed) carries its edits
        old = load_index(layout, cfg.index_name, "off", open_store=False) \
            if art.exists() and not art.check_files() else None
        si = _build(layout, cfg, vectors, table, emb, inputs)
        with _dropped_on_failure(si.store, layout):
            if old is not None:
                replay_edits(layout, si, old)
                si.manifest["previous_store"] = {k: old.manifest[k] for k in ("store", "uri", "collection")
                                                 if k in old.manifest}
            commit_index(layout, si, si.manifest["upstream"])
        # the artifact keeps one previous version (old); what the version before it held outside the run goes
        release_store(old.manifest.get("previous_store") if old else None, layout.root)
        return si


@contextmanager
def _dropped_on_failure(store, layout: RunLayout):
    """A failed build leaves nothing behind outside the run either (a half-filled Milvus collection)."""
    try:
        yield
    except BaseException:
        release_store(store.description, layout.root)
        raise


def _build(layout: RunLayout, cfg: IndexConfig, vectors: np.ndarray, table: pd.DataFrame, emb: dict,
           inputs: dict) -> SearchIndex:
    is_train = (table.split == "train").to_numpy()
    if not is_train.any():
        raise CbirError(f"embeddings {cfg.embeddings}: no train-split rows to fit PCA on")
    gallery = table.split.isin(cfg.gallery).to_numpy()
    if not gallery.any():
        raise CbirError(f"embeddings {cfg.embeddings}: no rows in gallery splits {cfg.gallery}")
    dim, n, train_rows = emb["dim"], int(gallery.sum()), np.flatnonzero(is_train)
    if cfg.memory_budget:  # a 10^7 train split is not read whole: a sample fits the PCA and the codebooks
        size = train_sample_size(choose_layout(n, dim, cfg.memory_budget, len(train_rows)).factory, len(train_rows))
        train_rows = np.sort(np.random.default_rng(0).choice(train_rows, size, replace=False))
    train = np.asarray(take_rows(vectors, train_rows), np.float32)  # read, not mapped (vectors.take_rows)
    pca, pca_reason = resolve_pca(cfg.pca, train)
    log.info("index %s: PCA %s", cfg.index_name, pca_reason)
    if cfg.whiten is not None and not pca:
        log.warning("index %s: --whiten needs a PCA (%s); not whitened", cfg.index_name, pca_reason)
    chosen = choose_layout(n, pca or dim, cfg.memory_budget, len(train_rows)) if cfg.memory_budget else None
    if chosen:
        log.info("index %s: --memory-budget %s: %s → %s", cfg.index_name, human(cfg.memory_budget), chosen.reason,
                 chosen.factory)
    body = chosen.factory if chosen else \
        auto_factory(n, pca or dim, int(is_train.sum())) if cfg.factory == "auto" else cfg.factory
    store = new_store(cfg.store, layout.root, cfg.index_name, dim, transform_prefix(pca, cfg.whiten), body, cfg.gpu,
                      chosen.describe() | {"budget": cfg.memory_budget} if chosen else None)
    ids = np.flatnonzero(gallery).astype(np.int64)
    data = load_dataset(layout)
    meta = table[gallery].merge(data.images[["image_id", "path", "class_name"]], on="image_id", how="left")
    with _dropped_on_failure(store, layout):
        store.train(train, cfg.whiten)
        for start in tqdm(range(0, len(ids), ADD_CHUNK), desc=f"index {cfg.index_name}", unit="chunk",
                          disable=len(ids) <= ADD_CHUNK):  # the vectors stay on disk: one chunk in RAM at a time
            part = slice(start, start + ADD_CHUNK)
            store.add(np.asarray(take_rows(vectors, ids[part]), np.float32), ids[part], meta.iloc[part])
    manifest = {"name": cfg.index_name, "embeddings": cfg.embeddings, "mode": emb["mode"],
                "backbone": emb["spec"]["backbone"], "embedding_spec": emb["spec"], "pca": pca, "pca_reason": pca_reason,
                "whiten": cfg.whiten, "refine": cfg.refine,
                "gallery": list(cfg.gallery), "trained_on": "train split" if len(train_rows) == is_train.sum() else
                f"{len(train_rows)} train rows drawn at random (seed 0)", "train_rows": int(is_train.sum()),
                "next_id": len(table), "next_image_id": int(data.images.image_id.max()) + 1, "edits": [],
                "image_dir": str(data.image_dir), "upstream": emb["upstream"]}
    return SearchIndex(store, meta.assign(id=ids).set_index("id"), manifest, np.zeros((0, dim), np.float32),
                       data.image_dir, inputs, layout)
