"""Multi-object scoring at scale: seconds and peak memory of each box aggregation and of the ranking metrics
for COCO-sized splits (random unit box vectors; boxes per image drawn like COCO's, median ~6, up to 45).
What matters is that time and memory grow with queries x gallery, not with queries x gallery x boxes².

    python benchmarks/objects_bench.py [--images 1000,5000] [--dim 256]

Results → benchmarks/results/objects_bench_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from cbir.metrics.sets import AGGREGATIONS, BoxSets, category_counts, image_scores, ranking_metrics, relevance

OUT = Path(__file__).parent / "results"


def box_sets(n_images: int, dim: int, rng: np.random.Generator) -> tuple[BoxSets, list[list[int]]]:
    counts = np.clip(rng.geometric(1 / 7, n_images), 1, 45)
    vectors = rng.standard_normal((counts.sum(), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    categories = [list(rng.integers(1, 81, c)) for c in counts]
    return BoxSets(vectors, np.r_[0, np.cumsum(counts)[:-1]]), categories


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(n_images: int, dim: int) -> list[dict]:
    rng = np.random.default_rng(0)
    sets, cats = box_sets(n_images, dim, rng)
    counts = category_counts(cats, list(range(1, 81)))
    rows = []
    start = time.perf_counter()
    gains = relevance(counts, counts, "weighted")
    rows.append({"images": n_images, "boxes": len(sets.vectors), "step": "weighted relevance",
                 "seconds": round(time.perf_counter() - start, 2), "peak MiB": round(peak_mib())})
    exclude = np.eye(n_images, dtype=bool)
    for how in AGGREGATIONS:
        start = time.perf_counter()
        scores = image_scores(sets, sets, how)
        rows.append({"images": n_images, "boxes": len(sets.vectors), "step": f"scores: {how}",
                     "seconds": round(time.perf_counter() - start, 2), "peak MiB": round(peak_mib())})
    start = time.perf_counter()
    ranking_metrics(scores, gains, True, exclude)
    rows.append({"images": n_images, "boxes": len(sets.vectors), "step": "ranking metrics (graded)",
                 "seconds": round(time.perf_counter() - start, 2), "peak MiB": round(peak_mib())})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="1000,5000")
    p.add_argument("--dim", type=int, default=256)
    a = p.parse_args()
    rows = [r for n in map(int, a.images.split(",")) for r in run(n, a.dim)]
    OUT.mkdir(exist_ok=True)
    (OUT / "objects_bench_cpu.json").write_text(json.dumps(rows, indent=1))
    import pandas as pd

    text = "\n".join([
        "# Multi-object scoring at scale (CPU)", "",
        f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; random unit box vectors "
        f"of {a.dim} dims, boxes per image geometric (mean 7, at most 45); every image queries all images. "
        "Peak MiB is the process's high-water mark so far (it only grows down the table).", "",
        pd.DataFrame(rows).to_markdown(index=False), ""])
    (OUT / "objects_bench_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
