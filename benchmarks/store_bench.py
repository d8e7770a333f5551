"""FAISS against Milvus Lite and a real Milvus server through cbir's own `VectorStore`s, on the same clustered
vectors: build time, insert rate, queries/s (one at a time and batched), recall@10 against exact search, and
disk size.

    python benchmarks/store_bench.py [--sizes 10000,100000] [--dim 256] [--factories Flat,HNSW32,IVFSQ8]
                                     [--stores faiss,milvus,milvus-server]

`milvus-server` starts the PyPI `milvus` package's standalone server on loopback for the run (as the tests do,
tests/support/milvus_server.py) and stops it at the end.

Both stores get the same L2-normalised vectors (no PCA, so nothing but the store differs). Rows are
merged into benchmarks/results/store_bench_cpu.{md,json}, keyed by store, factory and size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cbir import CbirError
from cbir.retrieval import new_store
from cbir.retrieval.faiss_store import FaissStore
from index_bench import clustered, factory_for, timed_search

OUT = Path(__file__).parent / "results"
K = 10
SERVER = {}  # the running Milvus server, when --stores names milvus-server


def _meta(n: int) -> pd.DataFrame:
    """Scalar fields as an index carries them (Milvus stores them; FAISS ignores them)."""
    return pd.DataFrame({"image_id": np.arange(n), "instance": 0, "class_id": np.arange(n) % 200, "category_id": 16,
                         "split": "test", "source": "detected", "score": 0.9, "path": "a/b.jpg",
                         "x": 0.0, "y": 0.0, "w": 10.0, "h": 10.0})


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _store(kind: str, factory: str, dim: int, folder: Path):
    """The store `cbir index --store` would make, without PCA."""
    spec = {"faiss": "faiss", "milvus": "milvus-lite:bench.db"}.get(kind) or SERVER["server"].uri
    return new_store(spec, folder, "bench", dim, "L2norm,", factory, "off")


def _indexed(store) -> str:
    """Rows the Milvus vector index covered when the queries ran, of all rows (`MilvusStore.index_coverage`)."""
    try:
        indexed, total, _ = store.index_coverage()
    except CbirError as e:
        return f"unknown ({e})"
    return f"{indexed}/{total}"


def measure(kind: str, factory: str, x: np.ndarray, queries: np.ndarray, exact: np.ndarray, single: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="store_bench_"))
    try:
        store = _store(kind, factory, x.shape[1], folder)
        start = time.perf_counter()
        store.train(x[: min(len(x), 100_000)])
        trained = time.perf_counter()
        store.add(x, np.arange(len(x)), _meta(len(x)))
        added = time.perf_counter()
        store.save(folder)  # Milvus: flush, load and one search, so the index is built before timing queries
        built = time.perf_counter()
        ids, batched, one = timed_search(store, queries, K, single)  # the same timing as index_bench's
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, exact)]))
        indexed = _indexed(store) if kind != "faiss" else "-"
        disk = {"faiss": lambda: _size(folder / "index.faiss"), "milvus": lambda: _size(folder / "bench.db"),
                "milvus-server": lambda: _size(SERVER["server"].folder / "data") - SERVER["empty"]}[kind]()
        if kind != "faiss":
            store.close()
            if kind == "milvus-server":
                store.release(store.description, folder)
        return {"store": "milvus-lite" if kind == "milvus" else kind, "factory": factory, "n": len(x),
                "queries": len(queries), "single_queries": single,
                "build_s": round(built - start, 2), "train_s": round(trained - start, 2),
                "insert_per_s": round(len(x) / (added - trained)), "single_qps": round(one, 1),
                "batched_qps": round(batched, 1), "recall@10": round(recall, 4), "disk_mb": round(disk / 2**20, 1),
                "indexed_rows": indexed}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--factories", default="Flat,HNSW32,IVFSQ8")
    p.add_argument("--stores", default="faiss,milvus")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    a = p.parse_args()
    if "milvus-server" in a.stores.split(","):
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from support.milvus_server import MilvusServer

        SERVER["server"] = MilvusServer(Path(tempfile.mkdtemp(prefix="store_bench_server_"))).start()
        SERVER["empty"] = _size(SERVER["server"].folder / "data")
    try:
        run(a)
    finally:
        if SERVER:
            SERVER["server"].stop()
            shutil.rmtree(SERVER["server"].folder, ignore_errors=True)


def run(a) -> None:
    rng = np.random.default_rng(0)
    path = OUT / "store_bench_cpu.json"
    rows = {(r["store"], r["factory"], r["n"]): r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    for n in map(int, a.sizes.split(",")):
        x, centres = clustered(n, a.dim, max(10, n // 500), rng)
        queries, _ = clustered(a.queries, a.dim, 0, rng, centres)
        flat = FaissStore.build(a.dim, "IDMap2,Flat")  # exact inner product: the recall reference
        flat.add(x, np.arange(n))
        exact = flat.search(queries, K)[1]
        for name in a.factories.split(","):
            factory = factory_for(name, n, a.dim)
            for kind in a.stores.split(","):
                row = measure(kind, factory, x, queries, exact, a.single)
                rows[(row["store"], name, n)] = row | {"factory": name, "factory_string": factory}
                print(json.dumps(row), flush=True)
                write(path, rows, a)  # after every row: a long run that is stopped keeps what it measured


def write(path: Path, rows: dict, a) -> None:
    ordered = sorted(rows.values(), key=lambda r: (r["n"], r["factory"], r["store"]))
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores"
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "dim": a.dim, "queries": a.queries, "rows": ordered}, indent=1))
    header = ["n", "factory", "store", "build_s", "insert_per_s", "single_qps", "batched_qps", "recall@10", "disk_mb",
              "queries", "indexed_rows"]
    lines = [f"Store benchmark ({machine}; {a.dim}-d clustered vectors, k={K}; "
             f"`python benchmarks/store_bench.py`)", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{r[h]:,}" if isinstance(r.get(h), int) else str(r.get(h, "-")) for h in header)
              + " |" for r in ordered]
    (OUT / "store_bench_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
