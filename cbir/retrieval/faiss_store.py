"""The FAISS `VectorStore`: one `index_factory` string (reduction + IDMap2 + index), CPU or GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from .. import CbirError
from .reduce import apply_chain, train_chain

log = logging.getLogger(__name__)

HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
SEARCH_PARAMS = {"efSearch": HNSW_EF_SEARCH, "nprobe": IVF_NPROBE}
FILE = "index.faiss"


PROBE_DIMS = (128, 256, 512, 768, 1024, 1280, 2048)  # a body must build at one of these (PQ needs a divisor)


def set_search_params(index, params: dict = SEARCH_PARAMS) -> dict:
    """Apply the search-time knobs the index has (through wrappers); returns those that applied."""
    space, applied = faiss.ParameterSpace(), {}
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
            applied[name] = value
        except RuntimeError:
            pass
    return applied


def to_gpu(index, gpu: str):
    """A GPU copy of the index when faiss-gpu and a GPU are present and the index type supports it."""
    if gpu == "off" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        if gpu not in ("off", "auto"):
            raise CbirError(f"--gpu {gpu}: faiss has no GPU support here (install faiss-gpu) or no GPU is visible")
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0 if gpu == "auto" else int(gpu), index)
    except RuntimeError as e:  # e.g. HNSW has no GPU implementation
        log.info("index stays on CPU (%s)", str(e).splitlines()[0][:100])
        return index


def _inner(index):
    """The searchable index below the transforms and the id map."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return inner


class FaissStore:
    kind = "faiss"
    filters = False  # `--filter` is evaluated on the index's table and searched as an id subset

    def __init__(self, index: faiss.Index, factory: str, params: dict | None = None, add_gpu: str = "off"):
        self.index, self.factory, self.add_gpu = index, factory, add_gpu
        self.params = set_search_params(index, params if params is not None else SEARCH_PARAMS)

    @staticmethod
    def check_factory(body: str) -> None:
        """Refuse, before any work, a factory body FAISS cannot parse at any usual dimension (the vectors'
        own dimension is known only later; whether it trains is known at the index stage)."""
        for dim in PROBE_DIMS:
            try:
                faiss.index_factory(dim, "IDMap2," + body if not body.startswith("IDMap") else body)
                return
            except RuntimeError as e:
                reason = str(e).splitlines()[-1][:120]
        raise CbirError(f"--factory {body}: FAISS cannot build it ({reason}); e.g. Flat, HNSW32, IVF1024,SQ8")

    @classmethod
    def build(cls, dim: int, factory: str, gpu: str = "off") -> FaissStore:
        """An untrained index; `gpu` also adds the build's vectors on the GPU when one is there."""
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise CbirError(f"--factory: FAISS cannot build {factory!r} ({str(e).splitlines()[-1][:120]})") from None
        return cls(index, factory, add_gpu=gpu)

    @classmethod
    def for_index(cls, spec: str, root: Path, name: str, dim: int, reduction: str, body: str, gpu: str) -> FaissStore:
        """One factory string: the reduction, an id map (unless the body brings one), the body."""
        return cls.build(dim, reduction + ("" if body.startswith("IDMap") else "IDMap2,") + body, gpu)

    @property
    def description(self) -> dict:
        return {"store": self.kind, "factory": self.factory, "search_params": self.params, "dim_in": self.index.d}

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def matches(self, rows: int, next_id: int) -> bool:
        """Whether the index holds the record's vectors (it is saved with its table, so a count suffices)."""
        return self.count == rows

    def repair(self, expected: np.ndarray, raw_vectors, meta) -> tuple[int, int]:
        """A FAISS index is saved with its table, so a mismatch means a damaged file, not a half-done edit."""
        raise CbirError(f"index.faiss holds {self.count} vectors but its record {len(expected)}: the file is "
                        f"damaged; rebuild it with `cbir index --force`")

    def train(self, vectors: np.ndarray, whiten: float | None = None) -> None:
        try:
            train_chain(self.index, vectors, whiten)
        except RuntimeError as e:  # e.g. IVF4096 on 500 train vectors: FAISS needs one per list at least
            reason = str(e).splitlines()[-1].split("failed: ")[-1][:160]
            raise CbirError(f"--factory {self.factory}: FAISS cannot train it on {len(vectors)} train vectors "
                            f"({reason}); use a smaller one (fewer IVF lists, Flat, HNSW32)") from None

    def add(self, vectors: np.ndarray, ids: np.ndarray, meta=None) -> None:
        """`meta` (scalar fields) is unused: FAISS holds vectors only, the index's table holds the rest."""
        work = to_gpu(self.index, self.add_gpu)
        work.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, np.int64))
        if work is not self.index:
            self.index = faiss.index_gpu_to_cpu(work)
            set_search_params(self.index, self.params)

    def remove(self, ids: np.ndarray) -> int:
        try:
            return int(self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64))))
        except RuntimeError:
            raise CbirError(f"index {self.factory} does not support removal (HNSW); rebuild it with `cbir index` "
                            f"or use a Flat/IVF factory") from None

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        return apply_chain(self.index, vectors)

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if subset is None:
            return self.index.search(queries, k)
        inner = _inner(self.index)
        selector = faiss.IDSelectorBatch(np.asarray(subset, np.int64))
        if isinstance(inner, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.params.get("nprobe", inner.nprobe))
        elif isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.params.get("efSearch", 16))
        else:
            params = faiss.SearchParameters(sel=selector)
        below = faiss.downcast_index(self.index)
        if isinstance(below, faiss.IndexPreTransform):
            queries, below = self.transform(queries), faiss.downcast_index(below.index)
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces `search` with a version
        # without `params`; the numpy original stays reachable as search_numpy
        search = getattr(below, "search_numpy", below.search)
        return search(queries, k, params=params)

    def save(self, folder: Path) -> None:
        faiss.write_index(self.index, str(Path(folder) / FILE))

    @classmethod
    def load(cls, folder: Path, gpu: str = "off", description: dict | None = None, root: Path | None = None) -> FaissStore:
        path = Path(folder) / FILE
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            raise CbirError(f"{path}: not a readable FAISS index; rebuild it with `cbir index --force`") from None
        store = cls(index, (description or {}).get("factory", "?"), (description or {}).get("search_params"))
        if gpu != "off":
            store.index = to_gpu(index, gpu)
        return store

    @classmethod
    def release(cls, description: dict, root: Path) -> None:
        """Nothing to drop: a FAISS index lives inside its artifact folder, which the run's versioning removes."""
