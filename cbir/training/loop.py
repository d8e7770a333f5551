"""The training loop every trained model shares — heads on frozen vectors, fine-tuned trunks and text
bridges: PML losses and miners from the flags, class-balanced epochs, validation by PML's
AccuracyCalculator, early stopping on validation MAP@R, per-epoch checkpoints for resuming, and the
refit on every train row once validation has chosen the epoch."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..checkpoints import load_checkpoint, save_checkpoint
from ..datasets.coco import hash_share
from ..layout import RunLayout
from .config import PROXY_LR_SCALE, TrainConfig

log = logging.getLogger(__name__)

VALIDATION_SHARE = 0.2
PER_CLASS = 4  # samples per class in each batch


def build_loss(cfg: TrainConfig, n_classes: int, dim: int):
    """PML loss, miner and distance from the flags (the library's own classes, nothing re-implemented)."""
    from pytorch_metric_learning import distances, losses, miners

    distance = distances.CosineSimilarity() if cfg.distance == "cosine" else distances.LpDistance(
        normalize_embeddings=True)
    m = cfg.used_margin
    loss = {"contrastive": lambda: losses.ContrastiveLoss(
                pos_margin=1.0 if cfg.distance == "cosine" else 0.0, neg_margin=m, distance=distance),
            "triplet": lambda: losses.TripletMarginLoss(margin=m, distance=distance),
            "multisimilarity": lambda: losses.MultiSimilarityLoss(distance=distance),
            "proxyanchor": lambda: losses.ProxyAnchorLoss(n_classes, dim, margin=m),
            "arcface": lambda: losses.ArcFaceLoss(n_classes, dim, margin=m)}[cfg.loss]()
    triplet = lambda kind: miners.TripletMarginMiner(margin=m or 0.1, type_of_triplets=kind, distance=distance)  # noqa: E731
    miner = {"none": lambda: None, "all": lambda: triplet("all"), "hard": lambda: triplet("hard"),
             "semihard": lambda: triplet("semihard"),
             "easy-positive": lambda: miners.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="semihard",
                                                                distance=distance),
             "multisimilarity": lambda: miners.MultiSimilarityMiner(epsilon=0.1, distance=distance)}[cfg.used_miner]()
    return loss, miner


def optimizer_for(model: torch.nn.Module, loss_fn: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the model and, at PROXY_LR_SCALE × its lr, the loss's own parameters (class proxies):
    randomly initialised, they must move far while the model moves little."""
    groups = [{"params": list(model.parameters())}]
    proxies = list(loss_fn.parameters())
    if proxies:
        groups.append({"params": proxies, "lr": cfg.lr * PROXY_LR_SCALE})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def hold_out(train: pd.DataFrame, test_labels: set, seed: int, labels_are: str) -> tuple[np.ndarray, str]:
    """The validation mask over train rows (columns label, image_id) and how it was drawn: whole labels
    when the test split's labels are unseen in training (so validation measures the same thing), else
    whole images. Drawn by a hash of (seed, id): the same rows whatever the order or subset."""
    classes = np.array(sorted(set(train.label)))
    if not test_labels & set(classes):
        n_val = max(1, round(VALIDATION_SHARE * len(classes)))
        held = classes[np.argsort(hash_share(pd.Series(classes), seed))[:n_val]]
        shown = ", ".join(map(str, held[:10])) + (", ..." if n_val > 10 else "")
        one = {"classes": "class", "categories": "category", "photos": "photo"}.get(labels_are, "label")
        return (train.label.isin(held).to_numpy(),
                f"{one}-disjoint: {n_val} of {len(classes)} train {labels_are} held out ({shown})")
    return (hash_share(train.image_id, seed) < VALIDATION_SHARE,
            f"image-disjoint: {VALIDATION_SHARE:.0%} of the train images held out ({labels_are} recur across splits)")


def validation_scores(vectors: np.ndarray, rows: pd.DataFrame) -> dict[str, float]:
    """The held-out rows (`rows.val`) query the validation gallery (`rows.gallery`, which holds them),
    themselves excluded. `vectors`: every train-split row through the model being trained."""
    val, labels = rows.val.to_numpy(), rows.label.to_numpy()
    others = rows.gallery.to_numpy() & ~val
    reference = np.concatenate([vectors[val], vectors[others]])  # PML: the queries first, then the rest
    return score_vectors(vectors[val], labels[val], reference, np.concatenate([labels[val], labels[others]]),
                         query_in_reference=True)


def score_vectors(vectors: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None,
                  reference_labels: np.ndarray | None = None, query_in_reference: bool = False) -> dict[str, float]:
    """PML's AccuracyCalculator: each item queries the others, or, given a `reference` set (a bridge's images
    for its texts; a validation gallery that holds the queries, `query_in_reference`), that set."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    def unit(x):
        return torch.nn.functional.normalize(torch.as_tensor(np.array(x, np.float32)), dim=1)

    z, y = unit(vectors), torch.as_tensor(labels)
    ref, ref_y = (z, y) if reference is None else (unit(reference), torch.as_tensor(reference_labels))
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count",
                              device=torch.device("cpu"))
    acc = calc.get_accuracy(z, y, ref, ref_y, ref_includes_query=reference is None or query_in_reference)
    return {"MAP@R": float(acc["mean_average_precision_at_r"]), "P@1": float(acc["precision_at_1"])}


def train_epoch(model, loss_fn, miner, optimizer, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epoch: int,
                bar: tqdm, augment=None) -> float:
    """One pass of class-balanced batches (`augment`: applied to each batch's inputs, e.g. flips of crops)."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    torch.manual_seed(cfg.seed + epoch)  # each epoch's batches and dropout depend on (seed, epoch) only:
    np.random.seed(cfg.seed + epoch)  # a resumed run repeats exactly what an unbroken one does
    n_classes = len(torch.unique(y))
    batch = max(PER_CLASS, min(cfg.batch_size, PER_CLASS * n_classes) // PER_CLASS * PER_CLASS)
    sampler = MPerClassSampler(y.numpy(), PER_CLASS, batch_size=batch, length_before_new_iter=len(y))
    order = torch.as_tensor(list(iter(sampler)))
    model.train()
    losses = []
    for start in range(0, len(order) - batch + 1, batch):
        idx = order[start:start + batch]
        z = model(x[idx] if augment is None else augment(x[idx]))
        labels = y[idx].to(z.device)
        pairs = miner(z, labels) if miner is not None else None
        losses.append(step(model, optimizer, loss_fn(z, labels, pairs) if pairs is not None else loss_fn(z, labels)))
        bar.update(len(idx))
    return float(np.mean(losses)) if losses else float("nan")


def step(model: torch.nn.Module, optimizer, loss: torch.Tensor, clip: float = 5.0) -> float:
    """One optimiser step on `loss`, gradients clipped (a bad batch cannot blow the weights up)."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def fit(cfg, layout: RunLayout, stamp: str, model, loss_fn, optimizer, run_epoch, items: int, validate,
        best_state, *, epochs: int | None = None, phase: str = "") -> tuple[list[dict], float]:
    """The loop every trained model shares (heads, fine-tuned trunks, text bridges): epoch 0 validates the
    untouched model, each epoch trains (`run_epoch(epoch, bar)` → mean loss, advancing the bar by `items`)
    then validates, the best epoch's `best_state()` and a full checkpoint are written atomically, and a
    rerun resumes from the last finished epoch. Stops at `epochs` (default `cfg.epochs`) or after
    `cfg.patience` epochs without a better validation MAP@R. With `validate` None (a refit on every train
    row) it runs all `epochs` and the last one is the best. `phase` prefixes the files of a second loop in
    the same model's folder. `cfg` needs model_name, epochs and patience."""
    epochs = cfg.epochs if epochs is None else epochs
    partial = layout.partial(layout.model(cfg.model_name))
    ckpt, best_file = partial / f"{phase}checkpoint.pt", partial / f"{phase}best.pt"
    scores = validate or dict
    state = load_checkpoint(ckpt, stamp)
    if state:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        history, seconds = state["history"], state["seconds"]
        log.info("resuming %s%s after epoch %d", phase, cfg.model_name, len(history) - 1)
    else:
        history, seconds = [{"epoch": 0, "loss": None, **scores()}], 0.0  # epoch 0 trains nothing
        save_checkpoint(best_file, best_state())
    with tqdm(total=epochs * items, initial=(len(history) - 1) * items, desc=f"{phase}train {cfg.model_name}",
              unit="item") as bar:
        while len(history) <= epochs and not (validate and _stalled(history, cfg.patience)):
            epoch, start = len(history), time.perf_counter()
            loss = run_epoch(epoch, bar)
            history.append({"epoch": epoch, "loss": loss, **scores()})
            seconds += time.perf_counter() - start
            if not validate or history[-1]["MAP@R"] > max(h["MAP@R"] for h in history[:-1]):
                save_checkpoint(best_file, best_state())
            save_checkpoint(ckpt, {"stamp": stamp, "model": model.state_dict(), "loss": loss_fn.state_dict(),
                                    "optimizer": optimizer.state_dict(), "history": history, "seconds": seconds})
            shown = ", ".join(f"validation {k} {v:.4f}" for k, v in history[-1].items() if k not in ("epoch", "loss"))
            log.info("%sepoch %d: loss %.4f%s (%.0f s)", phase, epoch, loss, f", {shown}" if shown else "",
                     time.perf_counter() - start)
    return history, seconds


def _stalled(history: list[dict], patience: int) -> bool:
    best = max(range(len(history)), key=lambda i: (history[i]["MAP@R"], -i))
    return len(history) - 1 - best >= patience


def summary_card(history: list[dict], seconds: float, val: np.ndarray, classes: np.ndarray) -> dict:
    best = max(history, key=lambda h: (h["MAP@R"], -h["epoch"]))
    return {"history": history, "best_epoch": best["epoch"], "baseline": history[0], "best": best,
            "helps": best["epoch"] > 0, "seconds": round(seconds, 1), "train_vectors": int((~val).sum()),
            "validation_vectors": int(val.sum()), "classes": len(classes)}


def train_then_refit(cfg: TrainConfig, layout: RunLayout, rows: pd.DataFrame, train) -> tuple[dict, dict]:
    """The card and the kept weights. `train(seen, validated, epochs, phase)` trains a model from its start on the
    rows `seen` (a mask) → (history, seconds), validating each epoch when `validated`. Validation (the held-out
    rows) picks the epoch; with `cfg.refit` the model is then trained again from its start on every train row —
    the validation classes too, so it learns from all of them — for that many epochs, and that model is kept.
    When no epoch beat epoch 0, nothing is refitted: the untouched model is kept."""
    val, labels = rows.val.to_numpy(), rows.label.to_numpy()
    history, seconds = train(~val, True, None, "")
    card = {**summary_card(history, seconds, val, np.unique(labels[~val])), "refit": None}
    phase = "refit-" if cfg.refit and card["helps"] else ""
    if phase:
        refit, refit_seconds = train(np.ones(len(rows), bool), False, card["best_epoch"], phase)
        card["refit"] = {"epochs": card["best_epoch"], "train_vectors": len(rows), "classes": int(len(set(labels))),
                         "seconds": round(refit_seconds, 1), "losses": [h["loss"] for h in refit[1:]]}
        card["seconds"] = round(seconds + refit_seconds, 1)
    best = layout.partial(layout.model(cfg.model_name)) / f"{phase}best.pt"
    return card, torch.load(best, map_location="cpu", weights_only=True)


def plot_curves(history: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(h.epoch, h.loss, marker="o")
    axes[0].set(xlabel="epoch", ylabel="training loss", title=name)
    axes[1].plot(h.epoch, h["MAP@R"], marker="o", label="MAP@R")
    axes[1].plot(h.epoch, h["P@1"], marker="o", label="P@1")
    axes[1].set(xlabel="epoch (0 = no training)", title="validation")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
