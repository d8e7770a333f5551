"""What `train-embedder` is asked for: `TrainConfig` (checked as it is built), the losses, miners and
augmentations it can use, and the per-mode defaults. Both the shared loop (`loop.py`) and the two
trainers (`stage.py`, `finetune.py`) read it, so it imports neither."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .. import CbirError
from ..device import resolve_device
from ..layout import check_name

LOSSES = ("contrastive", "triplet", "multisimilarity", "proxyanchor", "arcface")
MINERS = ("auto", "none", "all", "hard", "semihard", "easy-positive", "multisimilarity")
AUTO_MINER = {"contrastive": "none", "triplet": "semihard", "multisimilarity": "multisimilarity",
              "proxyanchor": "none", "arcface": "none"}
# margins in the distance's own units: cosine similarity, or L2 distance of unit vectors
DEFAULT_MARGIN = {("contrastive", "cosine"): 0.5, ("contrastive", "euclidean"): 1.0, ("triplet", "cosine"): 0.1,
                  ("triplet", "euclidean"): 0.2, ("proxyanchor", "cosine"): 0.1, ("arcface", "cosine"): 28.6}
# defaults by mode and device: a head trains in seconds anywhere; a fine-tuned trunk is bounded on a CPU —
# MobileNetV2 at 224 px runs ~20 crops/s forward and backward on 2 cores, so 10 epochs of ~1,500 train
# crops fit in 30 minutes with validation (benchmarks/results/finetune_cpu.md) — and longer on a GPU
EPOCHS = {("head", "cpu"): 30, ("head", "cuda"): 30, ("finetune", "cpu"): 10, ("finetune", "cuda"): 30}
LEARNING_RATE = {"head": 1e-4, "finetune": 1e-5}
AUGMENTATIONS = ("flip", "crop")  # what a fine-tune sees of each crop (finetune.augment)
PROXY_LR_SCALE = 100  # proxies (proxy-anchor, arcface) learn this much faster than the model, as in Proxy-Anchor's code
# what the flags do not say but the result depends on: a model trained otherwise is retrained, not reused
RECIPE = {"finetune_batchnorm": "frozen", "proxy_lr_scale": PROXY_LR_SCALE,
          "validation_gallery": "the whole train split when the test classes are unseen"}


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
