"""FAISS scale benchmark on clustered synthetic vectors (the shape of real embeddings, not uniform noise):
build time, memory, queries/s (batched and one at a time) and recall@10 against exact search, for
Flat, HNSW32, IVF-PQ and IVF-SQ8, at each size; rows are merged into the results file. `cbir index --factory auto` follows from this table.

    python benchmarks/index_bench.py [--sizes 10000,100000,1000000] [--dim 256] [--factories Flat,HNSW32,IVFPQ]

A GPU column is added when faiss has GPU support and sees a GPU. Results →
benchmarks/results/index_bench_<cpu|gpu>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from cbir.retrieval.faiss_store import set_search_params

OUT = Path(__file__).parent / "results"


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator, centres: np.ndarray | None = None):
    """Points around `clusters` centres with per-cluster spread, L2-normalised (cosine geometry)."""
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * rng.uniform(0.3, 0.8, (n, 1)).astype(np.float32)
    faiss.normalize_L2(x)
    return x, centres


def factory_for(name: str, n: int, dim: int) -> str:
    """IVFPQ / IVFSQ8 get the usual 4·sqrt(n) lists; PQ with 4-d subquantizers."""
    if name == "IVFPQ":
        return f"IVF{int(4 * np.sqrt(n))},PQ{dim // 4}"
    if name == "IVFSQ8":
        return f"IVF{int(4 * np.sqrt(n))},SQ8"
    return name


def timed_search(index, queries, k, single: int):
    t = time.perf_counter()
    _, ids = index.search(queries, k)
    batch_qps = len(queries) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in queries[:single]:
        index.search(q[None], k)
    return ids, batch_qps, single / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--factories", default="Flat,HNSW32,IVFPQ,IVFSQ8")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--skip", default="", help="comma-separated size:factory pairs to leave out (e.g. 1000000:HNSW32)")
    p.add_argument("--tag", default=platform.node())
    a = p.parse_args()
    rng = np.random.default_rng(0)
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    resources = faiss.StandardGpuResources() if gpu else None
    rows = []
    skip = set(a.skip.split(",")) if a.skip else set()
    for n in map(int, a.sizes.split(",")):
        data, centres = clustered(n, a.dim, max(100, n // 1000), rng)
        queries, _ = clustered(a.queries, a.dim, 0, rng, centres)
        exact = faiss.IndexFlatIP(a.dim)
        exact.add(data)
        _, truth = exact.search(queries, 10)
        for name in a.factories.split(","):
            if f"{n}:{name}" in skip:
                continue
            factory = factory_for(name, n, a.dim)
            index = faiss.index_factory(a.dim, factory, faiss.METRIC_INNER_PRODUCT)
            t = time.perf_counter()
            if not index.is_trained:
                index.train(data[rng.choice(n, min(n, 256 * int(4 * np.sqrt(n))), replace=False)])
            index.add(data)
            build = time.perf_counter() - t
            set_search_params(index)
            ids, batch_qps, single_qps = timed_search(index, queries, 10, a.single)
            row = {"n": n, "factory": factory, "build_s": round(build, 2),
                   "memory_mb": round(faiss.serialize_index(index).nbytes / 2 ** 20, 1),
                   "batch_qps": round(batch_qps), "single_qps": round(single_qps),
                   "recall@10": round(float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ids, truth)])), 4)}
            if gpu and not name.startswith("HNSW"):
                on_gpu = faiss.index_cpu_to_gpu(resources, 0, index)
                set_search_params(on_gpu)
                ids, row["gpu_batch_qps"], row["gpu_single_qps"] = timed_search(on_gpu, queries, 10, a.single)
                row["gpu_batch_qps"], row["gpu_single_qps"] = round(row["gpu_batch_qps"]), round(row["gpu_single_qps"])
            print(row, flush=True)
            rows.append(row)
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"index_bench_{'gpu' if gpu else 'cpu'}"
    meta = {"machine": f"{a.tag}: {faiss.omp_get_max_threads()} threads", "faiss": faiss.__version__, "dim": a.dim,
            "queries": a.queries, "params": "HNSW efSearch=128, IVF nprobe=32"}
    if stem.with_suffix(".json").exists():  # merge: a run of some sizes/factories updates only its own rows
        done = {(r["n"], r["factory"]) for r in rows}
        rows = [r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]
                if (r["n"], r["factory"]) not in done] + rows
        rows.sort(key=lambda r: (r["n"], r["factory"]))
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    import pandas as pd

    stem.with_suffix(".md").write_text(f"# FAISS scale benchmark ({meta['machine']}, faiss {meta['faiss']})\n\n"
                                       f"{a.dim}-d clustered vectors, {a.queries} queries, {meta['params']}.\n\n"
                                       + pd.DataFrame(rows).to_markdown(index=False) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
