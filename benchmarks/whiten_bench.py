"""Whitening benchmark: PCA whitening with shrinkage (`--whiten SHRINK`) against plain PCA and no reduction,
on a run's stored embeddings, with the evaluation's own protocol (PCA refitted on the train split, each
test image querying the others, exact search).

    python benchmarks/whiten_bench.py --run RUN [--embeddings full,gt,det] [--pca 64,128,256] [--shrink 0,0.25,0.5,0.75,1]

Results → benchmarks/results/whiten_bench.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from cbir.evaluation.retrieval import load_gallery
from cbir.layout import RunLayout
from cbir.metrics.ranking import exact_metrics
from cbir.retrieval.reduce import parse_pca

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--embeddings", default="full,gt,det")
    ap.add_argument("--pca", default="64,128,256")
    ap.add_argument("--shrink", default="0,0.25,0.5,0.75,1")
    a = ap.parse_args()
    layout = RunLayout(a.run)
    settings = [(None, None)] + [(parse_pca(p), None) for p in a.pca.split(",")] + \
               [(parse_pca(p), float(s)) for p in a.pca.split(",") for s in a.shrink.split(",")]
    rows = []
    for name in a.embeddings.split(","):
        for pca, shrink in settings:
            gallery, train, _ = load_gallery(layout, name, pca, shrink)
            metrics, _ = exact_metrics(gallery)
            rows.append({"embeddings": name, "pca": pca or "none", "train vectors": len(train.instances),
                         "whiten": "off" if shrink is None else f"shrink {shrink:g}",
                         **{k: round(metrics[k], 4) for k in ("R@1", "MAP@R", "mAP")}})
    table = pd.DataFrame(rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "whiten_bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = "\n".join(["# PCA whitening with shrinkage", "", f"`{' '.join(['python', *sys.argv])}`", "",
                      "shrink s: eigenvalues λ → (1 − s)·λ + s·mean(λ) before whitening; s = 0 is plain PCAW, "
                      "s = 1 plain PCA. Test split, leave-one-out, exact search.", "",
                      table.to_markdown(index=False), ""])
    (OUT / "whiten_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
