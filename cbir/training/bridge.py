"""The `train-text` stage: a learned bridge between words and a run's image (or box) embeddings.

No image–text model can be had on these machines, so `cbir` learns its own: two projection heads — one
over the frozen image vectors, one over a text encoder's vectors — trained with pytorch-metric-learning
(supervised contrastive — NT-Xent with in-batch negatives and every same-label pair a positive — or a
triplet loss) so that a text lands near the images it describes.

Pairs (`--pairs`), from the training split only:
- `attributes` (CUB): sentences sampled from each class's attribute shares (or each image's own labels,
  where the dataset has them), several per image — "a small bird with a red crown and a black wing";
  relevance is the class;
- `captions` (COCO): each human caption with its photo; relevance is the photo;
- `labels`: each box with its category's name; relevance is the category.

Validation holds out whole classes when the test classes are unseen (CUB), else whole images, and its
text → image MAP@R chooses the epoch (the shared `fit` loop: per-epoch checkpoints, resume after kill).
Outputs `models/NAME` (image_head.pt, text_head.pt, card.json, curves.png) and `embeddings/NAME`: the
image vectors in the shared space, whose spec carries the text side, so `index`, `search --text` and the
page work on it like on any set.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import CbirError
from ..artifacts import Artifact, commit, file_sha256, fingerprint, is_fresh, read_json, writing
from ..datasets import RunDataset, check_no_leak, load_dataset
from ..encoders.stage import load_embeddings
from ..encoders.text import AttributeEncoder, TextEncoder, text_encoder
from ..layout import RunLayout, check_name
from .head import ProjectionHead, apply_head, load_checked_head
from .loop import fit, hold_out, plot_curves, score_vectors, step, summary_card
from .stage import head_state, write_head_vectors

log = logging.getLogger(__name__)

PAIRS = ("auto", "attributes", "captions", "labels")
LOSSES = ("supcon", "triplet")
LABEL_TEMPLATES = ("{}", "a {}", "a photo of a {}")  # a category name as people type it


@dataclass(kw_only=True)
class BridgeConfig:
    run: Path
    embeddings: str = "gt"
    text: str = "glove"  # glove | minilm | attributes | hf:NAME
    pairs: str = "auto"  # attributes where the dataset has them, else captions for whole photos, else labels
    loss: str = "supcon"
    temperature: float = 0.1  # supcon
    margin: float = 0.1  # triplet, in cosine similarity
    dim: int = 128
    sentences: int = 8  # attribute sentences sampled per training image
    attributes: tuple[int, int] = (3, 7)  # attributes per sampled sentence: at least, at most
    epochs: int = 40
    patience: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    name: str | None = None
    force: bool = False

    def __post_init__(self):
        if self.pairs not in PAIRS:
            raise CbirError(f"--pairs {self.pairs}: choose from {', '.join(PAIRS)}")
        if self.loss not in LOSSES:
            raise CbirError(f"--loss {self.loss}: choose from {', '.join(LOSSES)}")
        if min(self.epochs, self.batch_size, self.patience, self.dim, self.sentences) < 1:
            raise CbirError("--epochs, --batch-size, --patience, --dim and --sentences must be at least 1")
        if not (1 <= self.attributes[0] <= self.attributes[1]):
            raise CbirError(f"--attributes {self.attributes[0]}-{self.attributes[1]}: need 1 <= at least <= at most")
        if not (self.lr > 0 and self.temperature > 0 and self.margin > 0):
            raise CbirError("--lr, --temperature and --margin must be above 0")
        check_name(self.model_name, "--name")

    @property
    def model_name(self) -> str:
        text = self.text.split("/")[-1].replace(":", "-")
        return self.name or f"{self.embeddings}@text-{text}" + (f"-{self.pairs}" if self.pairs != "auto" else "")


@dataclass
class Pairs:
    rows: np.ndarray  # row of the embeddings table each text describes
    texts: list[str]
    labels: np.ndarray  # relevance: pairs with one label are positives of each other
    kind: str  # attributes | captions | labels


def used_pairs(cfg: BridgeConfig, data: RunDataset, mode: str) -> str:
    if cfg.pairs != "auto":
        return cfg.pairs
    if data.attributes is not None:
        return "attributes"
    return "captions" if mode == "full" and data.captions is not None else "labels"


def build_pairs(cfg: BridgeConfig, data: RunDataset, table: pd.DataFrame, kind: str) -> Pairs:
    """(row, text, label) for every train-split row the pairs apply to; deterministic in cfg.seed."""
    train = table[table.split == "train"]
    if kind == "attributes":
        return _attribute_pairs(cfg, data, train)
    if kind == "captions":
        if data.captions is None:
            raise CbirError("--pairs captions: this run's dataset has no captions (prepare it with --captions FILE)")
        photo = train[train.source == "full"]
        if photo.empty:
            raise CbirError("--pairs captions pairs whole photos with their captions: use --embeddings full")
        captions = data.captions.merge(photo.reset_index()[["index", "image_id"]], on="image_id")
        return Pairs(captions["index"].to_numpy(), list(captions.caption), captions.image_id.to_numpy(), kind)
    boxes = train[train.category_id > 0]
    if boxes.empty:
        raise CbirError(f"--pairs labels: embeddings {cfg.embeddings} has no boxes with a category")
    names = {int(c["id"]): c["name"] for c in data.categories}
    templates = np.random.default_rng(cfg.seed).integers(0, len(LABEL_TEMPLATES), len(boxes))
    return Pairs(boxes.index.to_numpy(), [LABEL_TEMPLATES[t].format(names[int(c)]) for t, c in
                                           zip(templates, boxes.category_id)], boxes.category_id.to_numpy(), kind)


def _attribute_pairs(cfg: BridgeConfig, data: RunDataset, train: pd.DataFrame) -> Pairs:
    attributes = data.attributes
    if attributes is None:
        raise CbirError("--pairs attributes: this run's dataset has no attribute files (CUB's attributes/ folder)")
    labelled = train[train.class_id > 0]
    shares = attributes.class_matrix(sorted(set(labelled.class_id)))
    by_class = dict(zip(sorted(set(labelled.class_id)), shares))
    own = _image_shares(attributes)
    rng = np.random.default_rng(cfg.seed)
    rows, texts, labels = [], [], []
    for row, image_id, class_id in zip(labelled.index, labelled.image_id, labelled.class_id):
        base = own.get(int(image_id), by_class[class_id])
        for _ in range(cfg.sentences):
            text, _ = attributes.sample_sentence(base, int(rng.integers(cfg.attributes[0], cfg.attributes[1] + 1)),
                                                 rng)
            rows.append(row), texts.append(text), labels.append(class_id)
    return Pairs(np.array(rows), texts, np.array(labels), "attributes")


def _image_shares(attributes) -> dict[int, np.ndarray]:
    """Each image's own attributes (present and at least 'probably', certainty 3+) where labelled."""
    if attributes.images is None:
        return {}
    sure = attributes.images[(attributes.images.present == 1) & (attributes.images.certainty >= 3)]
    out = {}
    for image_id, group in sure.groupby("image_id"):
        v = np.zeros(len(attributes.names), np.float32)
        v[group.attribute_id.to_numpy() - 1] = 1.0
        out[int(image_id)] = v
    return out


def build_text_encoder(name: str, data: RunDataset) -> TextEncoder:
    if name == "attributes":
        if data.attributes is None:
            raise CbirError("--text attributes needs a dataset with an attribute vocabulary (CUB)")
        return AttributeEncoder(list(data.attributes.names.phrase))
    return text_encoder(name)


class Bridge(torch.nn.Module):
    """An image head and a text head into one `dim`-space; both start as their inputs' principal axes."""

    def __init__(self, image_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image = ProjectionHead(image_dim, dim)
        self.text = ProjectionHead(text_dim, dim)


def cross_modal_loss(cfg: BridgeConfig):
    """PML's loss applied both ways (texts against images, images against texts), each text's positives
    being the images of its label and the rest of the batch its negatives."""
    from pytorch_metric_learning import distances, losses

    if cfg.loss == "supcon":  # NT-Xent / InfoNCE with every same-label pair a positive, in matrix form
        loss = losses.SupConLoss(temperature=cfg.temperature)
    else:
        loss = losses.TripletMarginLoss(margin=cfg.margin, distance=distances.CosineSimilarity())

    def both_ways(text_z: torch.Tensor, image_z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (loss(text_z, labels, ref_emb=image_z, ref_labels=labels) +
                loss(image_z, labels, ref_emb=text_z, ref_labels=labels)) / 2
    return loss, both_ways


def train_text(cfg: BridgeConfig) -> dict:
    """Train the bridge, keep the epoch with the best validation text → image MAP@R, write both heads and
    the image vectors in the shared space."""
    with writing(cfg.run) as layout:
        name = cfg.model_name
        vectors, table, info = load_embeddings(layout, cfg.embeddings)
        check_no_leak(layout, cfg.embeddings, table)
        data = load_dataset(layout)
        kind = used_pairs(cfg, data, info["mode"])
        encoder = build_text_encoder(cfg.text, data)
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("run", "force", "name", "pairs")}
        inputs = {"embeddings": info["fingerprint"], "dataset": data.fingerprint, "text": encoder.spec["fingerprint"],
                  "pairs": kind, "settings": settings}
        model = Artifact(layout, layout.model(name))
        if is_fresh(model, inputs, cfg.force) and Artifact(layout, layout.embeddings(name)).exists():
            return read_json(model.folder() / "card.json")
        pairs = build_pairs(cfg, data, table, kind)
        train = table.loc[np.unique(pairs.rows)]
        test_labels = set(_row_labels(table[table.split == "test"], kind))
        val_rows, how = hold_out(train.assign(label=_row_labels(train, kind)), test_labels, cfg.seed,
                                 {"attributes": "classes", "captions": "photos", "labels": "categories"}[kind])
        val = np.isin(pairs.rows, train.index[val_rows])
        if val.all() or not val.any():
            raise CbirError(f"embeddings {cfg.embeddings}: too few train {kind} pairs to hold out a validation part")
        log.info("%d %s pairs (%d train, %d validation; %s), text encoder %s", len(pairs.texts), kind,
                 (~val).sum(), val.sum(), how, cfg.text)
        text_x = encoder.encode_texts(pairs.texts)
        image_x = np.asarray(vectors[pairs.rows], np.float32)
        card = _train(layout, cfg, fingerprint(inputs), image_x, text_x, pairs, val)
        card.update(name=name, kind="bridge", embeddings=cfg.embeddings, text=cfg.text, text_spec=encoder.spec,
                    pairs=kind, validation=how, loss=cfg.loss, pairs_count=len(pairs.texts), epochs=cfg.epochs,
                    examples=pairs.texts[:5], data_fingerprint=info["fingerprint"])
        partial = layout.partial(model.name)
        best = torch.load(partial / "best.pt", map_location="cpu", weights_only=True)
        with commit(model, inputs, {layout.embeddings(cfg.embeddings): info["fingerprint"]}) as staged:
            torch.save(best["image"], staged.file("image_head.pt"))
            torch.save(best["text"], staged.file("text_head.pt"))
            staged.write_json("card.json", card)
            plot_curves(card["history"], staged.file("curves.png"), f"{name} (text → image)")
            staged.summary.update({k: card[k] for k in ("best_epoch", "baseline", "best", "seconds", "pairs", "text")})
        text_head = model.folder() / "text_head.pt"
        write_head_vectors(layout, cfg.embeddings, name, model, "image_head.pt",
                           text={**encoder.spec, "head": str(text_head), "head_fingerprint": file_sha256(text_head)[:16]})
        shutil.rmtree(partial, ignore_errors=True)
        return card


def _row_labels(rows: pd.DataFrame, kind: str) -> pd.Series:
    return {"attributes": rows.class_id, "captions": rows.image_id, "labels": rows.category_id}[kind]


def _train(layout: RunLayout, cfg: BridgeConfig, stamp: str, image_x: np.ndarray, text_x: np.ndarray,
           pairs: Pairs, val: np.ndarray) -> dict:
    labels = pairs.labels
    torch.manual_seed(cfg.seed)
    bridge = Bridge(image_x.shape[1], text_x.shape[1], cfg.dim)
    bridge.image.initialise(image_x[~val])
    bridge.text.initialise(text_x[~val])
    loss_fn, both_ways = cross_modal_loss(cfg)
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xi, xt = torch.as_tensor(image_x[~val]), torch.as_tensor(text_x[~val])
    y = torch.as_tensor(labels[~val])

    def run_epoch(epoch: int, bar) -> float:
        generator = torch.Generator().manual_seed(cfg.seed + epoch)  # a resumed run repeats an unbroken one
        order = torch.randperm(len(y), generator=generator)
        bridge.train()
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue
            losses.append(step(bridge, optimizer, both_ways(bridge.text(xt[idx]), bridge.image(xi[idx]), y[idx])))
            bar.update(len(idx))
        return float(np.mean(losses)) if losses else float("nan")

    _, first = np.unique(np.where(val, pairs.rows, -1), return_index=True)
    val_images = first[val[first]]  # each validation image once, as the texts' reference set

    def validate() -> dict:
        bridge.eval()
        return score_vectors(apply_head(bridge.text, text_x[val]), labels[val],
                             apply_head(bridge.image, image_x[val_images]), labels[val_images])

    def best_state() -> dict:
        return {"image": head_state(bridge.image), "text": head_state(bridge.text)}

    history, seconds = fit(cfg, layout, stamp, bridge, loss_fn, optimizer, run_epoch, len(y), validate, best_state)
    return {**summary_card(history, seconds, val, np.unique(labels[~val])), "dim": cfg.dim,
            "image_dim": int(image_x.shape[1]), "text_dim": int(text_x.shape[1])}


class TextQuery:
    """Words → the shared space of a bridged embeddings set (its spec's text side), plus what was understood."""

    def __init__(self, spec: dict, what: str = "these vectors"):
        from ..encoders.text import text_encoder_from_spec

        text = spec.get("text")
        if not text:
            raise CbirError(f"{what} has no text side: train one with `cbir train-text --embeddings SET` and "
                            f"search the index of its output set")
        self.head = load_checked_head(text["head"], text["head_fingerprint"], "train-text")
        self.encoder = text_encoder_from_spec(text)

    def vectors(self, texts: list[str]) -> np.ndarray:
        return apply_head(self.head, self.encoder.encode_texts(texts))

    def from_encoded(self, x: np.ndarray) -> np.ndarray:
        """Text-side inputs given directly (an attribute share vector) → the shared space."""
        return apply_head(self.head, np.asarray(x, np.float32))
