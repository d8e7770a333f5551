"""`train-embedder --mode finetune`: the trunk itself trained end to end on the set's crops (train split only),
with the same losses, miners, sampler, validation rule, checkpoints, epoch choice and refit as the head mode.

The result is a torchvision state dict (`models/NAME/backbone.pth`); the set is then re-embedded with it by
the ordinary `embed` stage, so its vectors, index, search and page need nothing new. Supported trunks: the
torchvision classifiers whose trunk is `model.features` (MobileNet, EfficientNet, ConvNeXt, VGG ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torchvision.transforms.v2 import RandomResizedCrop
from tqdm import tqdm

from .. import CbirError
from ..datasets import load_dataset
from ..device import resolve_device
from ..encoders.cnn import CnnEncoder, pool_features
from ..engines import LOCAL, EngineConfig
from ..layout import RunLayout
from .loop import build_loss, fit, optimizer_for, train_epoch, train_then_refit, validation_scores

log = logging.getLogger(__name__)


class TrainableTrunk(torch.nn.Module):
    """Normalisation, the trunk and the set's pooling: crops (0-255) in, vectors out.

    BatchNorm stays frozen (ImageNet statistics, eval mode even in training), as in Proxy-Anchor's and
    torchvision's detection recipes: batches of 8 classes x 4 crops give noisy statistics, and on the CUB
    sample training them made unseen-class retrieval worse after one epoch."""

    def __init__(self, encoder: CnnEncoder):
        super().__init__()
        self.trunk, self.pool = encoder.backbone.trunk, encoder.pool  # unfused: the convolutions train
        self.register_buffer("mean", encoder.mean.cpu())
        self.register_buffer("std", encoder.std.cpu())

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        crops = crops.to(self.mean.device, non_blocking=True).float()
        return pool_features(self.trunk((crops - self.mean) / self.std), self.pool)


def check_finetunable(spec: dict) -> None:
    """Refuse, in one line and without loading weights, vectors whose encoder a fine-tune cannot train."""
    if spec.get("encoder", "cnn") != "cnn" or spec["backbone"].startswith(("timm:", "detector")) or spec["roi"]:
        raise CbirError(f"--mode finetune: supports torchvision classifier trunks embedded crop by crop; these "
                        f"vectors come from {spec.get('encoder', 'cnn')}:{spec['backbone']}"
                        f"{' with --roi' if spec.get('roi') else ''}")
    if not hasattr(torchvision.models.get_model(spec["backbone"], weights=None), "features"):
        raise CbirError(f"--mode finetune: {spec['backbone']} has no `.features` trunk; use a MobileNet, "
                        f"EfficientNet, ConvNeXt or VGG backbone")


def base_encoder(spec: dict) -> CnnEncoder:
    """The encoder the set was embedded with, rebuilt on the CPU from its spec (weights checked)."""
    from ..encoders.cnn import cnn_encoder

    check_finetunable(spec)
    return cnn_encoder(spec, torch.device("cpu"))


def decode_crops(layout: RunLayout, rows: pd.DataFrame, encoder: CnnEncoder) -> torch.Tensor:
    """Every row's crop, decoded once (uint8 [n, 3, s, s]) in the order of `rows`, by the embed stage's own
    per-image crop reader."""
    from ..encoders.stage import ImageCrops

    data = load_dataset(layout)
    with_paths = rows.join(data.images.set_index("image_id").path, on="image_id")  # the table rows lack paths
    images = ImageCrops(data, with_paths, encoder.recipe)
    crops = torch.cat([images[i][0] for i in tqdm(range(len(images)), desc="decoding crops", unit="img")])
    out = torch.empty_like(crops, dtype=torch.uint8)
    out[torch.as_tensor(images.order)] = crops.to(torch.uint8)
    return out


def embed_crops(model: TrainableTrunk, crops: torch.Tensor, batch: int = 32) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(crops[i:i + batch]).cpu() for i in range(0, len(crops), batch)]).numpy()


def augment(crops: torch.Tensor, how: str) -> torch.Tensor:
    """A fresh batch (the decoded crops stay): `flip` mirrors half the crops; `crop` first takes a random
    resized crop of each (scale 0.16–1, aspect 3/4–4/3, back to the same side: the Multi-Similarity
    paper's CUB recipe, torchvision's RandomResizedCrop), then mirrors half."""
    out = crops.clone()
    if how == "crop":
        side = crops.shape[-1]
        resize = RandomResizedCrop(side, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
        out = torch.stack([resize(c) for c in out])
    flip = torch.rand(len(out)) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def finetune(layout: RunLayout, cfg, rows: pd.DataFrame, info: dict, stamp: str) -> tuple[dict, dict]:
    """Train the trunk; returns (card, the kept state dict as a torchvision model's, `features.` keys)."""
    spec = info["spec"]
    encoder = base_encoder(spec)
    device = resolve_device(cfg.device)
    crops = decode_crops(layout, rows, encoder)
    labels = rows.label.to_numpy()
    gallery = rows.gallery.to_numpy().copy()  # writable: torch indexes with it
    start_weights = {k: v.clone() for k, v in encoder.backbone.trunk.state_dict().items()}

    def train(seen: np.ndarray, validated: bool, epochs: int | None, phase: str) -> tuple[list[dict], float]:
        classes = np.unique(labels[seen])
        torch.manual_seed(cfg.seed)
        encoder.backbone.trunk.load_state_dict(start_weights)  # from the set's own weights, each time
        model = TrainableTrunk(encoder).to(device)
        loss_fn, miner = build_loss(cfg, len(classes), encoder.dim)
        loss_fn.to(device)  # proxy losses hold parameters
        optimizer = optimizer_for(model, loss_fn, cfg)
        seen_crops, y = crops[torch.as_tensor(seen)], torch.as_tensor(np.searchsorted(classes, labels[seen]))

        def validate() -> dict:  # only the validation gallery's crops are embedded (it holds the queries)
            vectors = np.zeros((len(rows), encoder.dim), np.float32)
            vectors[gallery] = embed_crops(model, crops[gallery])
            return validation_scores(vectors, rows)

        return fit(cfg, layout, stamp, model, loss_fn, optimizer,
                   lambda epoch, bar: train_epoch(model, loss_fn, miner, optimizer, seen_crops, y, cfg, epoch, bar,
                                                  lambda batch: augment(batch, cfg.augment)),
                   len(y), validate if validated else None, lambda: _features(model), epochs=epochs, phase=phase)

    card, best = train_then_refit(cfg, layout, rows, train)
    return {**card, "dim": encoder.dim, "backbone": spec["backbone"], "input_side": encoder.recipe.size,
            "device": str(device), "augment": cfg.augment}, best


def _features(model: TrainableTrunk) -> dict:
    """The trunk's weights under the torchvision model's own key names, so `--weights FILE` loads them."""
    return {f"features.{k}": v.detach().cpu().clone() for k, v in model.trunk.state_dict().items()}


def write_finetuned_vectors(layout: RunLayout, info: dict, weights: Path, name: str, device: str = "auto",
                            engine: EngineConfig = LOCAL) -> None:
    """Re-embed the rows of the set `info` describes with the trained trunk through the ordinary `embed`
    stage → embeddings/NAME (its own fingerprint check makes a repeat a no-op)."""
    from dataclasses import fields

    from ..encoders.stage import EmbedConfig, embed

    spec = info["spec"]
    known = {f.name for f in fields(EmbedConfig)}
    embed(EmbedConfig(run=layout.root, mode=info["mode"], backbone=spec["backbone"], weights=str(weights),
                      **{k: spec[k] for k in ("pool", "crop_margin", "crop_resize", "size", "bf16") if k in known},
                      device=device, name=name, engine=engine))
