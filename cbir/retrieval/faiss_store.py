"""The FAISS `VectorStore`: one `index_factory` string (reduction + index, with an IDMap2 unless the index keeps
ids itself as IVF does), CPU or GPU; layouts chosen for a memory budget (budget.py) are opened memory-mapped,
and an on-disk layout keeps its inverted lists in `lists.ivfdata` beside the index (FAISS OnDiskInvertedLists).

A saved version is never written to: an edit of a memory-mapped index first reads it into RAM (it fits the
budget it was chosen for), an edit of on-disk lists first copies them to a scratch folder of the run, and
the edited lists move into the new version when it is saved."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
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
LISTS_FILE = "lists.ivfdata"  # an on-disk layout's inverted lists


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


@contextmanager
def _chatter_to_stderr():
    """FAISS's on-disk lists report progress with C printf on stdout, where `search --json` answers go:
    C-level stdout points at stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _inner(index):
    """The searchable index below the transforms and the id map."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return inner


class FaissStore:
    kind = "faiss"
    filters = False  # `--filter` is evaluated on the index's table and searched as an id subset

    def __init__(self, index: faiss.Index, factory: str, params: dict | None = None, add_gpu: str = "off",
                 layout: dict | None = None, root: Path | None = None):
        self.index, self.factory, self.add_gpu = index, factory, add_gpu
        self.params = set_search_params(index, params if params is not None else SEARCH_PARAMS)
        self.layout = layout or {}  # budget.Layout.describe() when --memory-budget chose it
        self.root = root
        self._mapped_from: Path | None = None  # folder of a saved index searched memory-mapped (read-only)
        self._lists_dir: Path | None = None  # folder holding the on-disk lists that back the index
        self._owned = False  # whether that folder is this store's scratch (else a saved version's)
        self._shards: list[tuple[Path, int]] = []  # on-disk lists: added chunks, merged at the first use
        self._shard_dir: Path | None = None

    @property
    def on_disk(self) -> bool:
        return bool(self.layout.get("on_disk"))

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
    def build(cls, dim: int, factory: str, gpu: str = "off", layout: dict | None = None,
              root: Path | None = None) -> FaissStore:
        """An untrained index; `gpu` also adds the build's vectors on the GPU when one is there."""
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise CbirError(f"--factory: FAISS cannot build {factory!r} ({str(e).splitlines()[-1][:120]})") from None
        return cls(index, factory, add_gpu=gpu, layout=layout, root=root)

    @classmethod
    def for_index(cls, spec: str, root: Path, name: str, dim: int, reduction: str, body: str, gpu: str,
                  layout: dict | None = None) -> FaissStore:
        """One factory string: the reduction, an id map (unless the body keeps ids itself), the body."""
        keeps_ids = body.startswith(("IDMap", "IVF"))
        return cls.build(dim, reduction + ("" if keeps_ids else "IDMap2,") + body, gpu, layout, root)

    @property
    def description(self) -> dict:
        return {"store": self.kind, "factory": self.factory, "search_params": self.params, "dim_in": self.index.d,
                **({"layout": self.layout} if self.layout else {})}

    @property
    def count(self) -> int:
        return int(self.index.ntotal) + sum(n for _, n in self._shards)

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
        """`meta` (scalar fields) is unused: FAISS holds vectors only, the index's table holds the rest. On-disk
        lists are never grown in place (FAISS 1.15's OnDiskInvertedLists corrupts ids when a list outgrows its
        slot): each added chunk becomes a small shard file, and the shards are merged with the current lists
        into a new lists file at the first search, removal or save."""
        vectors, ids = np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, np.int64)
        if self.on_disk:
            shard = self._empty_copy()
            shard.add_with_ids(vectors, ids)
            self._shard_dir = self._shard_dir or self._scratch()
            path = self._shard_dir / f"shard{len(self._shards):05d}.faiss"
            faiss.write_index(shard, str(path))
            self._shards.append((path, len(ids)))
            return
        self._writable()
        work = to_gpu(self.index, self.add_gpu)
        work.add_with_ids(vectors, ids)
        if work is not self.index:
            self.index = faiss.index_gpu_to_cpu(work)
            set_search_params(self.index, self.params)

    def remove(self, ids: np.ndarray) -> int:
        self._writable()
        try:
            with _chatter_to_stderr():
                return int(self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64))))
        except RuntimeError:
            raise CbirError(f"index {self.factory} does not support removal (HNSW); rebuild it with `cbir index` "
                            f"or use a Flat/IVF factory") from None

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        return apply_chain(self.index, vectors)

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
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

    def _scratch(self) -> Path:
        """A folder for lists being written, in the run (the same file system as the version it moves into)."""
        base = Path(self.root or tempfile.gettempdir()) / ".staging"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="faiss-lists-", dir=base))

    def _empty_copy(self) -> faiss.Index:
        """The trained index without its lists (serialised with empty lists swapped in for a moment)."""
        ivf = faiss.extract_index_ivf(self.index)
        lists, owned = ivf.invlists, ivf.own_invlists
        ivf.own_invlists = False
        empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # kept referenced while the index points at it
        ivf.replace_invlists(empty, False)
        try:
            copy = faiss.deserialize_index(faiss.serialize_index(self.index))
        finally:
            ivf.replace_invlists(lists, owned)
        copy.ntotal = faiss.extract_index_ivf(copy).ntotal = 0
        return copy

    def _merge(self, copy: bool = False) -> None:
        """Pending shards and the current lists → one new lists file in scratch (FAISS's merge_from_multiple,
        the shards memory-mapped); with `copy`, also when nothing is pending but the lists are a saved
        version's (before a removal edits them in place)."""
        if not self._shards and not (copy and self._lists_dir is not None and not self._owned):
            return
        scratch, index = self._scratch(), self._empty_copy()
        ivf = faiss.extract_index_ivf(index)
        with _chatter_to_stderr():
            shards = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path, _ in self._shards]
        sources = faiss.InvertedListsPtrVector()
        if self._lists_dir is not None:
            sources.push_back(faiss.extract_index_ivf(self.index).invlists)
        for shard in shards:
            sources.push_back(faiss.extract_index_ivf(shard).invlists)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(scratch / LISTS_FILE))
        with _chatter_to_stderr():
            total = lists.merge_from_multiple(sources.data(), sources.size(), False)
        ivf.replace_invlists(lists, True)
        lists.this.disown()
        index.ntotal = ivf.ntotal = total
        set_search_params(index, self.params)
        previous = self._lists_dir if self._owned else None
        self.index, self._lists_dir, self._owned = index, scratch, True
        del shards
        for folder in (self._shard_dir, previous):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._shards, self._shard_dir = [], None

    def _writable(self) -> None:
        """Before an edit: never write a saved version's files (see the module's docstring)."""
        if self._mapped_from is not None:
            self.index = faiss.read_index(str(self._mapped_from / FILE))
            set_search_params(self.index, self.params)
            self._mapped_from = None
        if self.on_disk:
            self._merge(copy=True)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self._merge()
        if self._mapped_from is not None:
            self._writable()  # its lists are views of the saved file: written out whole, they would refer to it
        if self.on_disk and self._lists_dir is not None:
            if self._owned:  # edited or new: the lists move into the version (one rename in the run)
                os.replace(self._lists_dir / LISTS_FILE, folder / LISTS_FILE)
                _rename_lists(self.index, folder / LISTS_FILE)
                shutil.rmtree(self._lists_dir, ignore_errors=True)
            else:  # unchanged: the saved version's lists, shared (never written: an edit copies them first)
                _link_or_copy(self._lists_dir / LISTS_FILE, folder / LISTS_FILE)
            self._lists_dir, self._owned = folder, False
        faiss.write_index(self.index, str(folder / FILE))

    @classmethod
    def load(cls, folder: Path, gpu: str = "off", description: dict | None = None, root: Path | None = None) -> FaissStore:
        description = description or {}
        layout = description.get("layout") or {}
        path = Path(folder) / FILE
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if layout.get("on_disk") else faiss.IO_FLAG_MMAP if layout else 0
        try:
            with _chatter_to_stderr():
                index = faiss.read_index(str(path), flags)
        except RuntimeError:
            raise CbirError(f"{path}: not a readable FAISS index; rebuild it with `cbir index --force`") from None
        store = cls(index, description.get("factory", "?"), description.get("search_params"), layout=layout,
                    root=root)
        if layout.get("on_disk"):
            store._lists_dir = Path(folder)
        elif layout:
            store._mapped_from = Path(folder)
        if gpu != "off" and not layout:
            store.index = to_gpu(index, gpu)
        return store

    @classmethod
    def release(cls, description: dict, root: Path) -> None:
        """Nothing to drop: a FAISS index lives inside its artifact folder, which the run's versioning removes."""


def _rename_lists(index, path: Path) -> None:
    """Record the on-disk lists under the file's new place (the mapping itself survives the rename)."""
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = str(path)


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
