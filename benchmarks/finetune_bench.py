"""Fine-tuning benchmark: does the default `train-embedder --mode finetune` fit its time bound here?

    python benchmarks/finetune_bench.py --run RUN [--embeddings gt] [--loss multisimilarity] [--budget-minutes 30]

Runs the real stage with this device's defaults (epochs, lr, batch, the refit on every train crop), from
scratch (--force), as the model `bench-finetune-<loss>` of RUN, and records the crops, the epochs run,
seconds per epoch, the refit, the whole wall time (decoding, training, validation, refit, re-embedding the
set) and whether it stayed within the budget.
Results → benchmarks/results/finetune_bench_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from cbir.device import resolve_device
from cbir.training.stage import TrainConfig, train_embedder

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--embeddings", default="gt")
    ap.add_argument("--loss", default="multisimilarity")
    ap.add_argument("--budget-minutes", type=float, default=30)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    device = resolve_device(a.device)
    cfg = TrainConfig(run=a.run, embeddings=a.embeddings, loss=a.loss, mode="finetune", device=a.device,
                      name=f"bench-finetune-{a.loss}", force=True)
    start = time.perf_counter()
    card = train_embedder(cfg)
    wall = time.perf_counter() - start
    epochs = len(card["history"]) - 1
    refit = card["refit"] or {"epochs": 0, "seconds": 0.0, "train_vectors": 0}
    validated_s = card["seconds"] - refit["seconds"]
    row = {"run": str(a.run), "embeddings": a.embeddings, "loss": a.loss, "backbone": card["backbone"],
           "input side": card["input_side"], "train crops": card["train_vectors"],
           "validation crops": card["validation_vectors"], "labels": card["label"], "validation": card["validation"],
           "default epochs": cfg.epochs, "epochs run": epochs, "lr": cfg.lr, "batch": cfg.batch_size,
           "training s (validated epochs + refit)": card["seconds"],
           "s per validated epoch": round(validated_s / max(epochs, 1), 1),
           "crops/s (train + validation)": round(epochs * card["train_vectors"] / max(validated_s, 1e-9), 1),
           "refit epochs (every train crop)": refit["epochs"], "refit crops": refit["train_vectors"],
           "refit s": refit["seconds"],
           "refit crops/s": round(refit["epochs"] * refit["train_vectors"] / max(refit["seconds"], 1e-9), 1),
           "wall s (decode, train, refit, re-embed the set)": round(wall, 1), "budget s": a.budget_minutes * 60,
           "within budget": wall <= a.budget_minutes * 60,
           "validation MAP@R": f"{card['baseline']['MAP@R']:.3f} → {card['best']['MAP@R']:.3f} (epoch "
                               f"{card['best_epoch']})",
           "device": str(device), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
           "machine": platform.processor() or platform.machine()}
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"finetune_bench_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(row, indent=1) + "\n")
    lines = ["# Fine-tuning with the default recipe", "", f"`{' '.join(['python', *sys.argv])}`", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in row.items()], ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
