"""10^7 boxes on one machine within a memory budget: `cbir index --memory-budget`'s layout, built from vectors
on disk in chunks, searched memory-mapped, with and without `--refine`.

    python benchmarks/scale_bench.py [--n 10000000] [--dim 256] [--budget 2G] [--refine 100] [--data /tmp/scale]

The vectors are clustered like the other benchmarks' (index_bench.clustered), written once to DATA/vectors.npy
(n x dim float32) and read back memory-mapped, as `cbir index` reads an embeddings set. The build and the
search each run in a process of their own, so each peak RSS is its own (VmHWM counts the file pages a
process maps; the anonymous part is sampled beside it). Exact top-10 of 1,000 queries is computed in chunks.
Results → benchmarks/results/scale_bench_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from cbir.retrieval.budget import choose_layout, human, parse_budget, train_sample_size
from cbir.retrieval.faiss_store import FaissStore
from cbir.retrieval.index import ADD_CHUNK
from cbir.retrieval.saved import exact_rescore
from cbir.vectors import take_rows
from index_bench import clustered
from report import write_report

K = 10
CHUNK = 1_000_000
EXACT_CHUNK = 100_000


class PeakMemory:
    """VmHWM at the end, and the highest RssAnon seen by a sampler thread (file-backed pages excluded)."""

    def __init__(self):
        self.anon, self._stop = 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _status() -> dict:
        return {k: int(v.split()[0]) * 1024 for k, v in
                (line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
                if k in ("VmHWM", "RssAnon", "RssFile")}

    def _sample(self):
        while not self._stop.wait(0.1):
            self.anon = max(self.anon, self._status()["RssAnon"])

    def report(self) -> dict:
        self._stop.set()
        status = self._status()
        return {"peak_rss_mb": round(status["VmHWM"] / 2**20), "peak_anon_mb": round(max(self.anon, status["RssAnon"]) / 2**20)}


def make_data(folder: Path, n: int, dim: int, queries: int) -> None:
    """Vectors written in chunks (never all in RAM), queries from the same centres, exact top-10 in chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "truth.npy").exists():
        return
    rng = np.random.default_rng(0)
    _, centres = clustered(1, dim, max(100, n // 1000), rng)
    path = folder / "vectors.npy"
    if path.exists() and np.load(path, mmap_mode="r").shape == (n, dim):  # an interrupted run's vectors
        vectors = np.load(path, mmap_mode="r")
    else:
        vectors = np.lib.format.open_memmap(path, "w+", np.float32, (n, dim))
        for start in range(0, n, CHUNK):
            vectors[start:start + CHUNK] = clustered(min(CHUNK, n - start), dim, 0, rng, centres)[0]
        vectors.flush()
    q = clustered(queries, dim, 0, np.random.default_rng(1), centres)[0]
    best_sims, best_ids = np.full((queries, K), -np.inf, np.float32), np.zeros((queries, K), np.int64)
    for start in range(0, n, EXACT_CHUNK):  # 1,000 x 10^5 similarities at a time: 400 MB
        sims = q @ np.asarray(vectors[start:start + EXACT_CHUNK]).T
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        cand_s = np.concatenate([best_sims, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_ids, top + start], 1)
        order = np.argsort(-cand_s, axis=1)[:, :K]
        best_sims, best_ids = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    np.save(folder / "queries.npy", q)
    np.save(folder / "truth.npy", best_ids)


def build(folder: Path, budget: int) -> dict:
    memory = PeakMemory()
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    n, dim = vectors.shape
    layout = choose_layout(n, dim, budget, n)
    index_dir = folder / f"index_{budget}"
    index_dir.mkdir(exist_ok=True)
    store = FaissStore.for_index("faiss", folder, "bench", dim, "L2norm,", layout.factory, "off",
                                 layout.describe() | {"budget": budget})
    started = time.perf_counter()
    sample = np.sort(np.random.default_rng(0).choice(n, train_sample_size(layout.factory, n), replace=False))
    store.train(take_rows(vectors, sample))
    trained = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        rows = np.arange(start, min(n, start + ADD_CHUNK))
        store.add(take_rows(vectors, rows), rows)  # as `cbir index` reads them: not mapped
    store.save(index_dir)
    built = time.perf_counter()
    (index_dir / "description.json").write_text(json.dumps(store.description))
    disk = sum(p.stat().st_size for p in index_dir.iterdir() if p.name != "description.json")
    return {"n": n, "dim": dim, "budget": human(budget), "factory": layout.factory, "on_disk": layout.on_disk,
            "reason": layout.reason, "train_vectors": len(sample), "train_s": round(trained - started, 1),
            "build_s": round(built - started, 1), "index_disk_mb": round(disk / 2**20), **{
                f"build_{k}": v for k, v in memory.report().items()}}


def search(folder: Path, budget: int, refine: int, single: int) -> dict:
    memory = PeakMemory()
    index_dir = folder / f"index_{budget}"
    store = FaissStore.load(index_dir, "off", json.loads((index_dir / "description.json").read_text()), folder)
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    queries, truth = np.load(folder / "queries.npy"), np.load(folder / "truth.npy")

    def answer(q: np.ndarray) -> np.ndarray:
        if not refine:
            return store.search(q, K)[1]
        ids = store.search(q, refine)[1]
        return exact_rescore(store, q, ids, lambda i: take_rows(vectors, i), K)[1]

    started = time.perf_counter()
    ids = answer(queries)
    batched = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for q in queries[:single]:
        answer(q[None])
    one = single / (time.perf_counter() - started)
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth)]))
    return {"refine": refine, "recall@10": round(recall, 4), "batched_qps": round(batched), "single_qps": round(one),
            "queries": len(queries), **{f"search_{k}": v for k, v in memory.report().items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--budget", default="2G", help="comma-separated budgets, e.g. 2G,512M")
    p.add_argument("--refine", type=int, default=100)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=200)
    p.add_argument("--data", type=Path, default=Path("/tmp/cbir_scale_bench"))
    p.add_argument("--step", choices=("build", "search"), help=argparse.SUPPRESS)  # one phase, in a child process
    p.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step == "build":
        return print(json.dumps(build(a.data, a.budget_bytes)))
    if a.step == "search":
        return print(json.dumps(search(a.data, a.budget_bytes, a.refine, a.single)))
    started = time.perf_counter()
    make_data(a.data, a.n, a.dim, a.queries)
    print(f"data ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for budget in map(parse_budget, a.budget.split(",")):
        def child(*extra):
            out = subprocess.run([sys.executable, __file__, "--data", str(a.data), "--budget-bytes", str(budget),
                                  "--single", str(a.single), *extra], check=True, capture_output=True, text=True,
                                 cwd=Path(__file__).parent)
            return json.loads(out.stdout.strip().splitlines()[-1])
        built = child("--step", "build")
        print(json.dumps(built), file=sys.stderr, flush=True)
        for refine in (0, a.refine):
            rows.append(built | child("--step", "search", "--refine", str(refine)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}"
    columns = ["n", "budget", "factory", "on_disk", "refine", "build_s", "build_peak_rss_mb", "index_disk_mb",
               "search_peak_rss_mb", "search_peak_anon_mb", "recall@10", "batched_qps", "single_qps"]
    lines = [f"# 10^7 boxes within a memory budget ({machine})", "",
             f"{a.dim}-d clustered vectors on disk, {a.queries} queries, exact top-{K} computed in chunks; "
             f"IVF nprobe 32. `python benchmarks/scale_bench.py`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) and not isinstance(r[c], bool) else str(r[c])
                                for c in columns) + " |" for r in rows]
    lines += ["", "Why each layout: " + "; ".join(sorted({f"{r['budget']}: {r['reason']}" for r in rows})), ""]
    write_report("scale_bench_cpu", {"machine": machine, "rows": rows}, lines)


if __name__ == "__main__":
    main()
