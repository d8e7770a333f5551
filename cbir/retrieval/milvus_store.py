"""The Milvus `VectorStore` (pymilvus): Milvus Lite in one local file, or a Milvus server — one code path.

`cbir` keeps the reduction (L2 → PCA → L2, a FAISS transform chain saved in the index artifact) and
applies it before every insert and query, so FAISS and Milvus hold the very same vectors. The collection
holds, per stored instance id, the reduced vector and the scalar fields that `--filter` reads; each build
writes a new collection (``cbir_<index>_<token>``), so a failed build never touches the one being served,
and the collection two builds back is dropped once nothing refers to it. `--add` / `--remove` edit the
current collection in place with upserts and deletes keyed by the stable ids, so a retried edit is
idempotent, and `repair` re-syncs it to the run's record after an edit died half-way.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from .. import CbirError, error_chain
from .reduce import apply_chain, train_chain

log = logging.getLogger(__name__)

REDUCTION_FILE = "reduction.faiss"
CONNECT_TIMEOUT_S = 5.0  # a server that is down is reported within seconds
TOKEN_VARIABLE = "CBIR_MILVUS_TOKEN"  # USER:PASSWORD (or an API key) for a server with authentication on
INSERT_BATCH = 4096
HNSW_EF_CONSTRUCTION = 200
HNSW_EF = 128  # the same search-time effort as the FAISS store's defaults
IVF_NPROBE = 32
INDEX_WAIT_S = 3600  # a server built IVF-SQ8 over 10^6 256-d rows in about 9.5 min on 2 cores
DELETE_RETRIES = 3  # rounds of deleting rows the server brought back, before giving up with one line
ID_QUERY_BATCH = 16384  # ids per `id in [...]` expression
STRING_FIELDS = {"split": 32, "source": 32, "path": 4096}
INT_FIELDS = ("image_id", "instance", "class_id", "category_id")


def milvus_index(factory: str) -> tuple[str, dict, dict]:
    """A FAISS factory body as (Milvus index type, build params, search params)."""
    if factory == "Flat":
        return "FLAT", {}, {}
    if m := re.fullmatch(r"HNSW(\d+)(,Flat)?", factory):
        return "HNSW", {"M": int(m[1]), "efConstruction": HNSW_EF_CONSTRUCTION}, {"ef": HNSW_EF}
    if m := re.fullmatch(r"IVF(\d+),(Flat|SQ8|PQ(\d+))", factory):
        kind = {"Flat": "IVF_FLAT", "SQ8": "IVF_SQ8"}.get(m[2], "IVF_PQ")
        build = {"nlist": int(m[1])} | ({"m": int(m[3]), "nbits": 8} if m[3] else {})
        return kind, build, {"nprobe": IVF_NPROBE}
    raise CbirError(f"--factory {factory!r} has no Milvus equivalent; use Flat, HNSW<M>, IVF<n>,Flat, IVF<n>,SQ8 or "
                    f"IVF<n>,PQ<m>")


LITE_INDEXES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8")  # what Milvus Lite builds; a server builds all of them


def check_factory(factory: str, spec: str) -> None:
    """Refuse, before any work, a factory the chosen Milvus cannot index."""
    kind = milvus_index(factory)[0]
    if spec.startswith("milvus-lite:") and kind not in LITE_INDEXES:
        raise CbirError(f"--factory {factory}: Milvus Lite has no {kind} index (it builds {', '.join(LITE_INDEXES)}); "
                        f"use a Milvus server for {kind}, or another factory")


def client_uri(spec: str, root: Path) -> str:
    """`milvus-lite:PATH.db` (relative to the run) → a local file; `milvus://HOST:PORT` → a server URI."""
    if spec.startswith("milvus-lite:"):
        path = Path(spec.split(":", 1)[1]).expanduser()
        return str(path if path.is_absolute() else Path(root) / path)
    return "http://" + spec.split("://", 1)[1]


def connect(spec: str, root: Path):
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise CbirError(f"--store {spec}: needs pymilvus and milvus-lite (pip install 'cbir[milvus]')") from None
    uri = client_uri(spec, root)
    if spec.startswith("milvus-lite:"):
        _check_lite_free(spec, Path(uri))
    token = {} if spec.startswith("milvus-lite:") else {"token": os.environ.get(TOKEN_VARIABLE, "")}
    try:
        return MilvusClient(uri=uri, timeout=CONNECT_TIMEOUT_S, **token)
    except Exception as e:  # pymilvus raises MilvusException, milvus-lite its own I/O errors
        if _refused_credentials(e):
            given = "a wrong USER:PASSWORD in" if token.get("token") else "no credentials: set"
            raise CbirError(f"--store {spec}: the server refused the connection (authentication is on; {given} "
                            f"${TOKEN_VARIABLE})") from None
        raise CbirError(f"--store {spec}: cannot open {uri} ({_reason(e)})") from None


def _refused_credentials(e: BaseException) -> bool:
    """pymilvus reports a refused token as a failed connection; the gRPC status it wraps says which it was."""
    codes = (getattr(error, "code", None) for error in error_chain(e))
    return any(callable(code) and getattr(code(), "name", "") == "UNAUTHENTICATED" for code in codes)


def _reason(e: Exception) -> str:
    """One line from a pymilvus / milvus-lite exception (MilvusException keeps it in `.message`)."""
    text = str(getattr(e, "message", "") or e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _check_lite_free(spec: str, path: Path) -> None:
    """Milvus Lite opens a file in one process at a time; say so in one line (its own message is a traceback)."""
    from milvus_lite.server_manager import server_manager_instance

    lock = path / "LOCK"
    if str(path.absolute()) in server_manager_instance._servers or not lock.exists():
        return  # served by this process already, or a new file
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
        except BlockingIOError:
            raise CbirError(f"--store {spec}: {path} is open in another process (Milvus Lite serves one process at "
                            f"a time: is `cbir ui` running on it?); stop it, or use a Milvus server "
                            f"(milvus://HOST:PORT) for several processes") from None



def _schema(client, dim: int):
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    for name in INT_FIELDS:
        schema.add_field(name, DataType.INT64)
    for name, length in STRING_FIELDS.items():
        schema.add_field(name, DataType.VARCHAR, max_length=length)
    schema.add_field("score", DataType.FLOAT)
    schema.add_field("box", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=4)
    return schema


def _records(vectors: np.ndarray, ids: np.ndarray, meta: pd.DataFrame) -> list[dict]:
    meta = meta.reset_index(drop=True)
    ints = {c: meta[c].fillna(-1).astype(np.int64).tolist() if c in meta else [-1] * len(ids) for c in INT_FIELDS}
    strings = {c: meta[c].fillna("").astype(str).tolist() if c in meta else [""] * len(ids) for c in STRING_FIELDS}
    boxes = meta[["x", "y", "w", "h"]].astype(float).to_numpy().tolist()
    scores = meta["score"].fillna(0).astype(float).tolist()
    return [{"id": int(i), "vector": v, "score": scores[n], "box": boxes[n],
             **{c: ints[c][n] for c in INT_FIELDS}, **{c: strings[c][n] for c in STRING_FIELDS}}
            for n, (i, v) in enumerate(zip(ids, vectors))]


class MilvusStore:
    kind = "milvus"
    filters = True  # Milvus evaluates `--filter` expressions itself, on the scalar fields

    def __init__(self, client, spec: str, collection: str, reduction: faiss.Index, factory: str, root: Path):
        self.root, self.client, self.spec, self.collection = root, client, spec, collection
        self.reduction, self.factory = reduction, factory
        self.index_type, self.build_params, self.search_params = milvus_index(factory)
        self._removed: set[int] = set()  # ids this store deleted since it was opened, checked again by `save`

    @classmethod
    def for_index(cls, spec: str, root: Path, name: str, dim: int, reduction: str, factory: str,
                  gpu: str = "off") -> MilvusStore:
        """An untrained store; the collection is created by `train`, once the reduced dimension is known.
        (`gpu` is the server's business: Milvus chooses its own index devices.)"""
        prefix = re.sub(r"[^A-Za-z0-9_]", "_", name)
        collection = f"cbir_{prefix}_{uuid.uuid4().hex[:10]}"
        chain = faiss.index_factory(dim, reduction + "Flat", faiss.METRIC_INNER_PRODUCT)
        return cls(connect(spec, root), spec, collection, chain, factory, root)

    @property
    def dim(self) -> int:
        inner = faiss.downcast_index(self.reduction)
        return int(inner.index.d if isinstance(inner, faiss.IndexPreTransform) else inner.d)

    @property
    def description(self) -> dict:
        return {"store": self.kind, "uri": self.spec, "collection": self.collection, "factory": self.factory,
                "milvus_index": self.index_type, "index_params": self.build_params,
                "search_params": self.search_params, "dim_in": int(self.reduction.d), "dim": self.dim}

    @property
    def count(self) -> int:
        return self._count("")

    def _count(self, expression: str) -> int:
        return int(self._call("count", self.client.query, self.collection, filter=expression,
                              output_fields=["count(*)"])[0]["count(*)"])

    def matches(self, rows: int, next_id: int) -> bool:
        """Whether the collection holds the record's vectors: as many, and none at or past the next free id
        (what an interrupted `--add` leaves) — so a stray add and a half-done remove cannot cancel out."""
        return self.count == rows and self._count(f"id >= {int(next_id)}") == 0

    def _call(self, what: str, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except CbirError:
            raise
        except Exception as e:
            raise CbirError(f"Milvus {what} on {self.spec} / {self.collection} failed: {_reason(e)}") from None

    def train(self, vectors: np.ndarray, whiten: float | None = None) -> None:
        """Fit the reduction on training vectors, then create the collection and its vector index."""
        train_chain(self.reduction, vectors, whiten)
        params = self.client.prepare_index_params()
        # nested "params" is the form every Milvus reads (Milvus Lite reads no other: flat keys are ignored there)
        params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP",
                         params={"params": self.build_params})
        self._call("create_collection", self.client.create_collection, self.collection,
                   schema=_schema(self.client, self.dim), index_params=params, consistency_level="Strong")

    def add(self, vectors: np.ndarray, ids: np.ndarray, meta: pd.DataFrame) -> None:
        reduced = self.transform(vectors)
        ids = np.asarray(ids, np.int64)
        if self._removed:
            self._removed.difference_update(ids.tolist())
        for start in range(0, len(ids), INSERT_BATCH):
            part = slice(start, start + INSERT_BATCH)
            self._call("upsert", self.client.upsert, self.collection,
                       _records(reduced[part], ids[part], meta.iloc[part]))

    def remove(self, ids: np.ndarray) -> int:
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        before = self.count
        self._delete(ids)
        return before - self.count

    def _delete(self, ids: list[int]) -> None:
        self._call("delete", self.client.delete, self.collection, ids=ids)
        self._removed.update(ids)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        return apply_chain(self.reduction, vectors)

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None,
               expression: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        conditions = ([f"({expression})"] if expression else []) + \
                     ([f"id in [{','.join(str(int(i)) for i in subset)}]"] if subset is not None else [])
        reduced = self.transform(np.atleast_2d(queries))
        hits = self._call("search", self.client.search, self.collection, data=list(reduced), limit=k,
                          filter=" and ".join(conditions), output_fields=["id"],
                          search_params={"metric_type": "IP", "params": self.search_params})
        sims = np.full((len(reduced), k), -np.inf, np.float32)
        ids = np.full((len(reduced), k), -1, np.int64)
        for row, found in enumerate(hits):
            for col, hit in enumerate(found[:k]):
                sims[row, col], ids[row, col] = hit["distance"], hit["id"]
        return sims, ids

    def ids(self) -> np.ndarray:
        """Every id in the collection (for `repair`)."""
        out = []
        it = self._call("query", self.client.query_iterator, self.collection, batch_size=8192, filter="",
                        output_fields=["id"])
        while batch := it.next():
            out += [r["id"] for r in batch]
        it.close()
        return np.array(sorted(out), np.int64)

    def repair(self, expected: np.ndarray, raw_vectors, meta: pd.DataFrame) -> tuple[int, int]:
        """Make the collection hold exactly the `expected` ids (the run's record): delete extras, re-insert
        the missing from `raw_vectors(ids)`. Returns (deleted, inserted)."""
        held = self.ids()
        extra, missing = np.setdiff1d(held, expected), np.setdiff1d(expected, held)
        if len(extra):
            self._delete(extra.tolist())
        if len(missing):
            self.add(raw_vectors(missing), missing, meta.loc[missing].reset_index())
        return len(extra), len(missing)

    def save(self, folder: Path) -> None:
        """The reduction goes into the artifact; the collection is flushed, its index waited for, loaded again
        and searched once, so an index Milvus cannot build fails here, before the artifact is committed, and
        not at the first query. Loaded again: a 2.3 server kept searching the segments it had loaded before
        their index was built by brute force (at 10^5 rows of IVF1264,SQ8, every row indexed, recall@10 was
        1.0 at nprobe 1; after a release and a load, 0.80 at nprobe 1 and 0.97 at 32, as FAISS)."""
        faiss.write_index(self.reduction, str(Path(folder) / REDUCTION_FILE))
        self._call("flush", self.client.flush, self.collection)
        self._wait_for_index()
        self._call("release_collection", self.client.release_collection, self.collection)
        self._call("load_collection", self.client.load_collection, self.collection)
        self._delete_returned_rows()
        self._call("search", self.client.search, self.collection, data=[[0.0] * self.dim], limit=1,
                   output_fields=["id"], search_params={"metric_type": "IP", "params": self.search_params})

    def _delete_returned_rows(self) -> None:
        """Delete again the rows this store deleted that the server serves again after the flush and load. A
        2.3.5 server did so once in a full test run (a row deleted by `--remove` was counted again by the next
        process; 12 repeats of that test did not show it again). Deletes lost or undone across flush, compaction
        and reload are known in 2.3 and fixed in later 2.3.x (milvus-io/milvus#33015, #39201). The run's record
        is the truth, so the store follows it; a row that comes back later still is refused by readers and
        deleted by the next writer (`load_index(repair=True)`)."""
        for _ in range(DELETE_RETRIES):
            back = self._present(sorted(self._removed))
            if not back:
                self._removed.clear()
                return
            log.warning("Milvus %s / %s served %d deleted row(s) again after a reload (first id %d); deleting "
                        "them again", self.spec, self.collection, len(back), back[0])
            self._delete(back)
            self._call("flush", self.client.flush, self.collection)
        raise CbirError(f"Milvus {self.spec} / {self.collection}: {len(back)} deleted row(s) (first id {back[0]}) "
                        f"came back after {DELETE_RETRIES} deletes; upgrade the server (2.3.5 loses deletes), then "
                        f"rerun (the run's record is unchanged)")

    def _present(self, ids: list[int]) -> list[int]:
        """Which of `ids` the collection holds, asked in batches."""
        found = []
        for start in range(0, len(ids), ID_QUERY_BATCH):
            part = ",".join(map(str, ids[start:start + ID_QUERY_BATCH]))
            rows = self._call("query", self.client.query, self.collection, filter=f"id in [{part}]",
                              output_fields=["id"])
            found += [int(r["id"]) for r in rows]
        return sorted(found)

    def index_coverage(self) -> tuple[int, int, int]:
        """(rows the vector index covers, rows flushed, rows waiting for it). A server builds the index of a
        sealed segment in the background and searches the rows it does not cover yet by brute force."""
        info = self._call("describe_index", self.client.describe_index, self.collection, "vector")
        return info.get("indexed_rows", 0), info.get("total_rows", 0), info.get("pending_index_rows", 0)

    def _wait_for_index(self) -> None:
        """Until the vector index covers every flushed row: measured at 10^6 rows, 290,816 were indexed when
        the first queries ran, which were slower and more exact than the index the artifact records."""
        deadline = time.monotonic() + INDEX_WAIT_S
        while True:
            indexed, total, pending = self.index_coverage()
            if pending == 0 and indexed >= total:
                return
            if time.monotonic() > deadline:
                raise CbirError(f"Milvus {self.spec} / {self.collection}: the vector index covers {indexed} of "
                                f"{total} rows after {INDEX_WAIT_S} s; check the server's index nodes, then rerun "
                                f"(finished work is kept)")
            time.sleep(0.5)

    @classmethod
    def load(cls, folder: Path, gpu: str, description: dict, root: Path) -> MilvusStore:
        path = Path(folder) / REDUCTION_FILE
        try:
            reduction = faiss.read_index(str(path))
        except RuntimeError:
            raise CbirError(f"{path}: not a readable reduction; rebuild the index with `cbir index --force`") from None
        spec, collection = description["uri"], description["collection"]
        client = connect(spec, root)
        store = cls(client, spec, collection, reduction, description["factory"], root)
        if not store._call("has_collection", client.has_collection, collection):
            raise CbirError(f"--store {spec}: collection {collection} is gone; rebuild the index with "
                            f"`cbir index --force` (same --store)")
        store._call("load_collection", client.load_collection, collection)
        return store

    def close(self) -> None:
        """Disconnect; a Milvus Lite file is then free for another process (else it is released at exit)."""
        self.client.close()
        if self.spec.startswith("milvus-lite:"):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(client_uri(self.spec, self.root))

    @classmethod
    def release(cls, description: dict, root: Path) -> None:
        """Drop the collection an older index version held (once no kept version refers to it)."""
        client = connect(description["uri"], root)
        if client.has_collection(description["collection"]):
            client.drop_collection(description["collection"])
            log.info("dropped Milvus collection %s (an index version two builds old)", description["collection"])
