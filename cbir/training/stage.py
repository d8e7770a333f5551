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
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import CbirError
from ..artifacts import Artifact, commit, file_sha256, fingerprint, is_fresh, read_json, writing
from ..datasets import check_no_leak, load_dataset
from ..encoders.stage import load_embeddings
from ..engines import LOCAL, EngineConfig
from ..layout import RunLayout, check_name
from .config import RECIPE, TrainConfig
from .finetune import check_finetunable, finetune, write_finetuned_vectors
from .head import ProjectionHead, apply_head, load_head
from .loop import (
    build_loss,
    fit,
    hold_out,
    optimizer_for,
    plot_curves,
    train_epoch,
    train_then_refit,
    validation_scores,
)

log = logging.getLogger(__name__)


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


def _plural(label: str) -> str:
    return {"class": "classes", "category": "categories"}[label]


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
            plot_curves(card["history"], staged.file("curves.png"), name)
            staged.summary.update({k: card[k] for k in ("best_epoch", "baseline", "best", "helps", "seconds")})
        if cfg.mode == "finetune":
            write_finetuned_vectors(layout, info, model.folder() / weights_file, name, cfg.device)
        else:
            write_head_vectors(layout, cfg.embeddings, name, model)
        shutil.rmtree(partial, ignore_errors=True)
        return card


def apply_model(run: Path, model_name: str, source: str | None = None, name: str | None = None,
                device: str = "auto", force: bool = False, engine: EngineConfig = LOCAL) -> str:
    """`cbir embed --head MODEL`: a trained model's space for another set of the run — a head trained on GT
    boxes applied to the detected ones, or to new embeddings after a re-detection. A head needs vectors
    made by the encoder it was trained on; a fine-tuned trunk re-embeds the set's rows with its weights.
    `source` defaults to the set the model was trained on. Returns the new set's name (default
    SOURCE@MODEL, e.g. det@gt@triplet); a set of that name made otherwise is kept unless `force`. A trunk
    re-embeds on `engine`; a head is one matrix product over the stored vectors, done here on any engine."""
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
            if info["spec"]["backbone"] != card["backbone"]:
                raise CbirError(f"embeddings {source}: backbone {info['spec']['backbone']}, but {model_name} "
                                f"fine-tuned {card['backbone']}")
            check_finetunable(info["spec"])  # a set the trunk can re-embed (torchvision classifier, crop by crop)
            write_finetuned_vectors(layout, info, folder / "backbone.pth", name, device, engine)
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


def head_state(head: ProjectionHead) -> dict:
    """What `load_head` reads back: the state and the head's shape."""
    return {"state": head.state_dict(), "dim_in": head.projection.in_features,
            "dim_out": head.projection.out_features, "dropout": float(head.residual[2].p)}


def write_head_vectors(layout: RunLayout, source: str, name: str, model: Artifact, head_file: str = "head.pt",
                       text: dict | None = None) -> None:
    """Every row of the source set through the model's image head → embeddings/NAME, with a spec that
    rebuilds the encoder for new photos (base encoder, then the head) and, for a text bridge, the `text`
    side that puts words in the same space."""
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
