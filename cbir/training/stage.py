"""The `train-embedder` stage: metric learning with pytorch-metric-learning — a head on a run's frozen
embeddings, or the trunk fine-tuned (`finetune.py`) — → the `models/NAME` artifact (weights, card.json,
curves.png) and the new vectors as `embeddings/NAME`, which index, search, evaluate and the page use like
any other set; `apply_model` (`cbir embed --head`) puts another set through a trained model.

Data discipline: only train-split rows are seen. Part of them is held out for validation — whole classes
when the train and test splits share no label (CUB's protocol: validation classes are unseen, like the
test classes, each searched for among the whole train split), else whole images (COCO, where the
categories recur in every split) — and validation MAP@R chooses the epoch; epoch 0 is the untouched head
(identity), so a head that does not help is kept as "no change", and the card says so. Then, by default
(`refit`), the model is trained again from its start on every train row for the chosen number of epochs,
as scikit-learn's searches refit on all the data: the validation classes are a fifth of what little there
is to learn from. Class-balanced batches come from PML's `MPerClassSampler`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import CbirError
from ..artifacts import Artifact, commit, file_sha256, fingerprint, is_fresh, read_json, writing
from ..datasets import load_dataset
from ..datasets.coco import hash_share
from ..device import resolve_device
from ..encoders.stage import load_embeddings
from ..evaluate import check_no_leak
from ..layout import RunLayout, check_name
from .head import ProjectionHead, apply_head

log = logging.getLogger(__name__)

LOSSES = ("contrastive", "triplet", "multisimilarity", "proxyanchor", "arcface")
MINERS = ("auto", "none", "all", "hard", "semihard", "easy-positive", "multisimilarity")
AUTO_MINER = {"contrastive": "none", "triplet": "semihard", "multisimilarity": "multisimilarity",
              "proxyanchor": "none", "arcface": "none"}
# margins in the distance's own units: cosine similarity, or L2 distance of unit vectors
DEFAULT_MARGIN = {("contrastive", "cosine"): 0.5, ("contrastive", "euclidean"): 1.0, ("triplet", "cosine"): 0.1,
                  ("triplet", "euclidean"): 0.2, ("proxyanchor", "cosine"): 0.1, ("arcface", "cosine"): 28.6}
VALIDATION_SHARE = 0.2
PER_CLASS = 4  # samples per class in each batch
# defaults by mode and device: a head trains in seconds anywhere; a fine-tuned trunk is bounded on a CPU —
# MobileNetV2 at 224 px runs ~20 crops/s forward and backward on 2 cores, so 10 epochs of ~1,500 train
# crops fit in 30 minutes with validation (benchmarks/results/finetune_cpu.md) — and longer on a GPU
EPOCHS = {("head", "cpu"): 30, ("head", "cuda"): 30, ("finetune", "cpu"): 10, ("finetune", "cuda"): 30}
LEARNING_RATE = {"head": 1e-4, "finetune": 1e-5}
AUGMENTATIONS = ("flip", "crop")  # what a fine-tune sees of each crop (finetune.augment)


@dataclass(kw_only=True)
class TrainConfig:
    run: Path
    embeddings: str = "det"
    loss: str = "multisimilarity"
    miner: str = "auto"
    distance: str = "cosine"
    margin: float | None = None
    dim: int | None = None  # default: the input's (identity start)
    label: str = "auto"  # class | category | auto (category for boxes of a many-category dataset)
    epochs: int | None = None  # default: EPOCHS for the mode and device
    patience: int = 5
    batch_size: int = 64
    lr: float | None = None  # default: LEARNING_RATE of the mode
    weight_decay: float = 1e-4
    seed: int = 0
    mode: str = "head"  # or finetune: the trunk itself, end to end on the set's crops
    augment: str = "flip"  # finetune: flip, or crop (random resized crops, then flips); AUGMENTATIONS
    refit: bool = True  # after validation picks the epoch, train again on every train row for that many epochs
    device: str = "auto"  # finetune only (heads train on the CPU in seconds)
    name: str | None = None
    force: bool = False

    def __post_init__(self):
        if self.mode not in ("head", "finetune"):
            raise CbirError(f"--mode {self.mode}: choose head or finetune")
        if self.loss not in LOSSES:
            raise CbirError(f"--loss {self.loss}: choose from {', '.join(LOSSES)}")
        if self.miner not in MINERS:
            raise CbirError(f"--miner {self.miner}: choose from {', '.join(MINERS)}")
        if self.distance not in ("cosine", "euclidean"):
            raise CbirError(f"--distance {self.distance}: choose cosine or euclidean")
        if self.loss in ("proxyanchor", "arcface") and self.distance != "cosine":
            raise CbirError(f"--loss {self.loss} works on cosine similarity only")
        if self.augment not in AUGMENTATIONS:
            raise CbirError(f"--augment {self.augment}: choose {' or '.join(AUGMENTATIONS)}")
        if self.augment != "flip" and self.mode == "head":
            raise CbirError(f"--augment {self.augment}: a head trains on stored vectors; augmentation needs "
                            f"--mode finetune")
        if self.label not in ("auto", "class", "category"):
            raise CbirError(f"--label {self.label}: choose auto, class or category")
        if self.lr is None:
            self.lr = LEARNING_RATE[self.mode]
        if self.epochs is None:
            self.epochs = EPOCHS[self.mode, "cuda" if resolve_device(self.device).type == "cuda" else "cpu"]
        if min(self.epochs, self.batch_size) < 1 or self.patience < 1 or not self.lr > 0:
            raise CbirError("--epochs, --batch-size and --patience must be at least 1, --lr above 0")
        check_name(self.model_name, "--name")

    @property
    def settings(self) -> dict:
        """The flags that shape the trained model (its fingerprint): not where it is written or run, nor a
        fine-tune's augmentation for a head."""
        ignored = ("run", "force", "name", "device") + (("augment",) if self.mode == "head" else ())
        return {k: v for k, v in asdict(self).items() if k not in ignored}

    @property
    def used_miner(self) -> str:
        return AUTO_MINER[self.loss] if self.miner == "auto" else self.miner

    @property
    def used_margin(self) -> float | None:
        return self.margin if self.margin is not None else DEFAULT_MARGIN.get((self.loss, self.distance))

    @property
    def model_name(self) -> str:
        miner = "" if self.used_miner in ("none", AUTO_MINER[self.loss]) else f"-{self.used_miner}"
        return self.name or f"{self.embeddings}@{self.loss}{miner}{'-ft' if self.mode == 'finetune' else ''}"


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


PROXY_LR_SCALE = 100  # proxies (proxy-anchor, arcface) learn this much faster than the model, as in Proxy-Anchor's code
# what the flags do not say but the result depends on: a model trained otherwise is retrained, not reused
RECIPE = {"finetune_batchnorm": "frozen", "proxy_lr_scale": PROXY_LR_SCALE,
          "validation_gallery": "the whole train split when the test classes are unseen"}


def optimizer_for(model: torch.nn.Module, loss_fn: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the model and, at PROXY_LR_SCALE × its lr, the loss's own parameters (class proxies):
    randomly initialised, they must move far while the model moves little."""
    groups = [{"params": list(model.parameters())}]
    proxies = list(loss_fn.parameters())
    if proxies:
        groups.append({"params": proxies, "lr": cfg.lr * PROXY_LR_SCALE})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def training_rows(layout: RunLayout, cfg: TrainConfig) -> tuple[np.ndarray, pd.DataFrame, dict, str, str]:
    """Train-split vectors and labels with the validation mask; the label used and how validation was held out."""
    vectors, table, info = load_embeddings(layout, cfg.embeddings)
    check_no_leak(layout, cfg.embeddings, table)
    data = load_dataset(layout)
    label = cfg.label
    if label == "auto":
        label = "category" if info["mode"] != "full" and len(data.categories) > 1 else "class"
    column = "category_id" if label == "category" else "class_id"
    labelled = table.assign(label=table[column]).query("label > 0")  # 0: no object / a whole-photo fallback
    train = labelled[labelled.split == "train"]
    test_labels = set(labelled.label[labelled.split == "test"])
    classes = np.array(sorted(set(train.label)))
    if len(classes) < 3:
        raise CbirError(f"embeddings {cfg.embeddings}: {len(classes)} train {_plural(label)}; metric learning needs "
                        f"at least 3 (2 to train, 1 to validate)")
    val, how = hold_out(train, test_labels, cfg.seed, _plural(label))
    # the gallery validation queries search: with unseen test classes, the whole train split — as many classes
    # as the test gallery holds, the held-out ones among the trained ones (a model that pulls unseen classes
    # into seen ones loses there); with recurring labels, the held-out images only
    gallery = np.ones(len(train), bool) if not test_labels & set(classes) else val
    return (np.asarray(vectors[train.index.to_numpy()], np.float32), train.assign(val=val, gallery=gallery), info,
            label, how)


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


def _plural(label: str) -> str:
    return {"class": "classes", "category": "categories"}[label]


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


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a kill mid-write leaves the previous epoch's checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, stamp: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError):
        log.warning("%s: unreadable checkpoint; training starts over", path)
        return None
    return state if state.get("stamp") == stamp else None


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


def train_embedder(cfg: TrainConfig) -> dict:
    """Train the head, keep the epoch with the best validation MAP@R, write the model and its vectors."""
    with writing(cfg.run) as layout:
        name = cfg.model_name
        x, rows, info, label, how = training_rows(layout, cfg)
        inputs = {"embeddings": info["fingerprint"], "settings": cfg.settings, "label": label,
                  "miner": cfg.used_miner, "margin": cfg.used_margin, "recipe": RECIPE}
        model = Artifact(layout, layout.model(name))
        if is_fresh(model, inputs, cfg.force) and Artifact(layout, layout.embeddings(name)).exists():
            return read_json(model.folder() / "card.json")
        stamp = fingerprint(inputs)
        if cfg.mode == "finetune":
            from .finetune import finetune, write_finetuned_vectors

            card, best = finetune(layout, cfg, rows, info, stamp)
        else:
            card, best = _train(layout, cfg, x, rows, info, stamp)
        card.update(name=name, embeddings=cfg.embeddings, label=label, validation=how, miner=cfg.used_miner,
                    margin=cfg.used_margin, data_fingerprint=info["fingerprint"], mode=cfg.mode, loss=cfg.loss,
                    distance=cfg.distance, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)
        partial = layout.partial(model.name)
        weights_file = "backbone.pth" if cfg.mode == "finetune" else "head.pt"
        with commit(model, inputs, {layout.embeddings(cfg.embeddings): info["fingerprint"]}) as staged:
            torch.save(best, staged.file(weights_file))
            staged.write_json("card.json", card)
            _plot_curves(card["history"], staged.file("curves.png"), name)
            staged.summary.update({k: card[k] for k in ("best_epoch", "baseline", "best", "helps", "seconds")})
        if cfg.mode == "finetune":
            write_finetuned_vectors(layout, info, model.folder() / weights_file, name, cfg.device)
        else:
            write_head_vectors(layout, cfg.embeddings, name, model)
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
        return card


def apply_model(run: Path, model_name: str, source: str | None = None, name: str | None = None,
                device: str = "auto", force: bool = False) -> str:
    """`cbir embed --head MODEL`: a trained model's space for another set of the run — a head trained on GT
    boxes applied to the detected ones, or to new embeddings after a re-detection. A head needs vectors
    made by the encoder it was trained on; a fine-tuned trunk re-embeds the set's rows with its weights.
    `source` defaults to the set the model was trained on. Returns the new set's name (default
    SOURCE@MODEL, e.g. det@gt@triplet); a set of that name made otherwise is kept unless `force`."""
    with writing(run) as layout:
        model = Artifact(layout, layout.model(model_name))
        folder, _ = model.open(f"train it with `cbir train-embedder --run {run} --name {model_name}` first")
        card = read_json(folder / "card.json")
        source = source or card["embeddings"]
        _, _, info = load_embeddings(layout, source)
        name = name or (model_name if source == card["embeddings"] else f"{source}@{model_name}")
        check_name(name, "--name")
        existing = Artifact(layout, layout.embeddings(name)).meta()
        made_here = existing and (model.name in existing["upstream"]  # a head's set, or the trunk's re-embedding:
                                  or Path(existing["summary"]["spec"].get("weights", "")).parent == folder)
        if existing and not made_here and not force:
            raise CbirError(f"embeddings {name} exists and was not made by {model_name}; choose another --name "
                            f"(or --force to replace it)")
        if (folder / "backbone.pth").is_file():
            from .finetune import check_finetunable, write_finetuned_vectors

            if info["spec"]["backbone"] != card["backbone"]:
                raise CbirError(f"embeddings {source}: backbone {info['spec']['backbone']}, but {model_name} "
                                f"fine-tuned {card['backbone']}")
            check_finetunable(info["spec"])  # a set the trunk can re-embed (torchvision classifier, crop by crop)
            write_finetuned_vectors(layout, info, folder / "backbone.pth", name, device)
        elif (folder / "head.pt").is_file():
            trained_on = card["source_spec"]["fingerprint"]
            if info["spec"]["fingerprint"] != trained_on:
                raise CbirError(f"embeddings {source}: encoder {info['spec']['fingerprint']}, but the head "
                                f"{model_name} was trained on {trained_on} vectors; embed with that encoder first")
            write_head_vectors(layout, source, name, model)
        else:
            raise CbirError(f"{model.link}: not a train-embedder model (no head.pt or backbone.pth); text bridges "
                            f"write their vectors with `cbir train-text`")
        return name


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
        history, seconds = [{"epoch": 0, "loss": float("nan"), **scores()}], 0.0
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


def _train(layout: RunLayout, cfg: TrainConfig, x: np.ndarray, rows: pd.DataFrame, info: dict,
           stamp: str) -> tuple[dict, dict]:
    labels = rows.label.to_numpy()
    dim = cfg.dim or x.shape[1]

    def train(seen: np.ndarray, validated: bool, epochs: int | None, phase: str) -> tuple[list[dict], float]:
        classes = np.unique(labels[seen])
        torch.manual_seed(cfg.seed)
        head = ProjectionHead(x.shape[1], dim)
        head.initialise(x[seen])
        loss_fn, miner = build_loss(cfg, len(classes), dim)
        optimizer = optimizer_for(head, loss_fn, cfg)
        x_seen, y = torch.as_tensor(x[seen]), torch.as_tensor(np.searchsorted(classes, labels[seen]))
        return fit(cfg, layout, stamp, head, loss_fn, optimizer,
                   lambda epoch, bar: train_epoch(head, loss_fn, miner, optimizer, x_seen, y, cfg, epoch, bar), len(y),
                   (lambda: validation_scores(apply_head(head.eval(), x), rows)) if validated else None,
                   lambda: head_state(head), epochs=epochs, phase=phase)

    card, best = train_then_refit(cfg, layout, rows, train)
    return {**card, "dim_in": int(x.shape[1]), "dim": dim, "source_spec": info["spec"]}, best


def _stalled(history: list[dict], patience: int) -> bool:
    best = max(range(len(history)), key=lambda i: (history[i]["MAP@R"], -i))
    return len(history) - 1 - best >= patience


def head_state(head: ProjectionHead) -> dict:
    """What `load_head` reads back: the state and the head's shape."""
    return {"state": head.state_dict(), "dim_in": head.projection.in_features,
            "dim_out": head.projection.out_features, "dropout": float(head.residual[2].p)}


def write_head_vectors(layout: RunLayout, source: str, name: str, model: Artifact, head_file: str = "head.pt",
                       text: dict | None = None) -> None:
    """Every row of the source set through the model's image head → embeddings/NAME, with a spec that
    rebuilds the encoder for new photos (base encoder, then the head) and, for a text bridge, the `text`
    side that puts words in the same space."""
    from .head import load_head

    vectors, table, info = load_embeddings(layout, source)
    head_path = model.folder() / head_file
    head, _ = load_head(head_path)
    projected = apply_head(head, vectors)
    head_fp = file_sha256(head_path)[:16]
    spec = {"encoder": "head", "base": info["spec"], "head": str(head_path), "head_fingerprint": head_fp,
            "backbone": info["spec"]["backbone"], "fingerprint": fingerprint([info["spec"]["fingerprint"], head_fp]),
            "dim": int(projected.shape[1]), **({"text": text} if text else {})}
    art = Artifact(layout, layout.embeddings(name))
    upstream = {layout.embeddings(source): info["fingerprint"], model.name: model.fingerprint}
    inputs = {"head": head_fp, **upstream}
    if is_fresh(art, inputs):
        return
    with commit(art, inputs, upstream) as staged:
        staged.write_npy(layout.VECTORS, projected.astype(np.float32))
        staged.write_table(layout.ROWS, table)
        staged.summary.update(spec=spec, mode=info["mode"], count=len(table), dim=spec["dim"],
                              sources=info.get("sources", {}), device="cpu")


def _plot_curves(history: list[dict], path: Path, name: str) -> None:
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
