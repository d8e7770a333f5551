"""`cbir train-detector`: fine-tune a torchvision Faster R-CNN on COCO-format boxes → the `models/NAME`
artifact (detector.pt, card.json, curves.png) that `--detector PATH` loads everywhere.

Data: the run's train split (CUB: one category, bird) or any COCO instances file (`--coco`, `--images`).
A hash-drawn share of the training photos is held out and scored with COCOeval after every epoch.

The recipe is chosen by measurement on 2 CPU cores (README "Train the detector"): with torchvision's default
proposal budget (2,000 per level, 512 RoIs) a 4-photo step costs 4.1 s at 320 px, with 600/300 training and
150 test proposals and 128 RoIs — the budget of torchvision's low-resolution
`fasterrcnn_mobilenet_v3_large_320_fpn` — 1.4 s (`benchmarks/detect_bench.py`), and 8 epochs on ~460 photos
reach AP50 0.955 on unseen CUB classes. SGD needs a warm-up and clipped gradients (the issue's probe saw lr
0.02 without them diverge to NaN); the one-cycle schedule gives both the warm-up and the decay. Scale jitter
is torchvision's own: in training mode `GeneralizedRCNNTransform` draws each photo's short side from `min_size`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import CbirError
from ..artifacts import Artifact, commit, file_sha256, fingerprint, is_fresh, read_json, writing
from ..checkpoints import load_checkpoint, save_checkpoint
from ..datasets import load_dataset
from ..datasets.coco import CocoReader, hash_share
from ..device import batches, resolve_device
from ..images import open_photo
from ..layout import RunLayout, check_name
from ..weights import load_state_dict, resolve_weights, weights_enum
from .frcnn import COCO_FRCNN, FORMAT, build_model, check_trunk, detect_with, start_from_coco
from .report import coco_ap, top_box_iou
from .stage import _as_list

log = logging.getLogger(__name__)

# Defaults by device, measured (README "Train the detector"): on 2 CPU cores a few hundred photos train
# in well under 45 minutes; a GPU affords torchvision's own resolution range and a longer schedule.
RECIPES = {"cpu": {"size": 320, "epochs": 8, "trainable_layers": 3, "batch_size": 4},
           "cuda": {"size": 512, "epochs": 12, "trainable_layers": 3, "batch_size": 8}}
PROPOSALS = {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 150,
             "rpn_post_nms_top_n_test": 150, "box_batch_size_per_image": 128}
JITTER = (0.8, 0.9, 1.0, 1.1, 1.2)  # training short sides, as multiples of the evaluation size
VALIDATION_SHARE = 0.15
CLIP = 10.0  # gradient-norm clip


@dataclass(kw_only=True)
class TrainDetectorConfig:
    run: Path
    coco: Path | None = None  # a COCO instances file to train on instead of the run's train split
    images: Path | None = None  # its image folder
    trunk: str = "mobilenet_v2"
    trunk_weights: str = "DEFAULT"  # ImageNet weights of the trunk: a torchvision name, a file, or none
    detector_weights: str | None = None  # ResNet-50 only: COCO Faster R-CNN weights to start from (name or file)
    trainable_layers: int | None = None  # trunk stages trained (0 = frozen); default by device
    min_size: int | None = None  # evaluation short side in pixels; training jitters around it; default by device
    max_size: int | None = None  # long-side cap; default 2x min_size
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str = "sgd"
    lr: float | None = None  # default: 0.01 per 4 photos for SGD, 1e-4 for AdamW
    weight_decay: float = 1e-4
    warmup: float = 0.1  # share of the steps spent warming up (one-cycle schedule)
    validation: float = VALIDATION_SHARE
    max_images: int | None = None  # train on at most this many photos (a hash-drawn subset)
    workers: int = 1
    device: str = "auto"
    seed: int = 0
    name: str | None = None
    force: bool = False

    def __post_init__(self):
        if (self.coco is None) != (self.images is None):
            raise CbirError("--coco and --images go together (an instances file and its image folder)")
        if self.optimizer not in ("sgd", "adamw"):
            raise CbirError(f"--optimizer {self.optimizer}: choose sgd or adamw")
        if self.detector_weights and self.trunk != "resnet50":
            raise CbirError(f"--detector-weights: COCO Faster R-CNN weights exist for --trunk resnet50, not {self.trunk}")
        if not 0 < self.validation < 1 or not 0 <= self.warmup < 1:
            raise CbirError("--validation must lie in (0, 1) and --warmup in [0, 1)")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                            ("--min-size", self.min_size), ("--max-size", self.max_size),
                            ("--max-images", self.max_images)):
            if value is not None and value < 1:
                raise CbirError(f"{flag} {value}: must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise CbirError(f"--lr {self.lr}: must be above 0")
        check_trunk(self.trunk, self.trainable_layers or 0)
        check_name(self.model_name)

    @property
    def model_name(self) -> str:
        return self.name or f"detector-{self.trunk}"

    def resolved(self, device: torch.device) -> dict:
        """The settings actually used: the device's recipe fills what the user left open."""
        recipe = RECIPES["cuda" if device.type == "cuda" else "cpu"]
        batch = self.batch_size or recipe["batch_size"]
        size = self.min_size or recipe["size"]
        lr = self.lr or (0.01 * batch / 4 if self.optimizer == "sgd" else 1e-4)
        layers = recipe["trainable_layers"] if self.trainable_layers is None else self.trainable_layers
        return {"size": size, "max_size": self.max_size or 2 * size, "epochs": self.epochs or recipe["epochs"],
                "batch_size": batch, "lr": lr, "trainable_layers": layers}


@dataclass
class BoxSet:
    """Photos with their boxes: images [image_id, file, width, height], boxes [image_id, label, x, y, w, h]."""

    images: pd.DataFrame
    boxes: pd.DataFrame
    categories: list[dict]  # label k is categories[k - 1] (k = 0 is the background)
    fingerprint: str
    source: str
    upstream: dict  # the run's artifacts it was read from (none for an outside COCO file)


def run_boxes(layout: RunLayout) -> BoxSet:
    """The run's train split; a run without one has nothing to learn from that its test could not leak."""
    data = load_dataset(layout)
    train = data.images[data.images.split == "train"]
    if train.empty:
        raise CbirError(f"{layout.root}: no train split to learn from (prepare it with --split, or pass --coco)")
    images = pd.DataFrame({"image_id": train.image_id, "file": [str(data.image_path(p)) for p in train.path],
                           "width": train.width, "height": train.height})
    return _box_set(images, data.instances, data.categories, f"run:{data.fingerprint}", str(layout.root),
                    {layout.dataset: data.fingerprint})


def coco_boxes(instances: Path, image_dir: Path) -> BoxSet:
    """Any COCO instances file (crowd regions left out), read and checked by the COCO dataset reader."""
    tables = CocoReader(Path(instances).absolute(), Path(image_dir).absolute()).read()
    if tables.problems:
        raise CbirError(f"--coco {instances}: {len(tables.problems)} bad record(s), first: {tables.problems[0]}")
    files = [str(Path(image_dir) / p) for p in tables.images.path]
    sizes = [_size(f) for f in files]
    images = pd.DataFrame({"image_id": tables.images.image_id, "file": files, "width": [s[0] for s in sizes],
                           "height": [s[1] for s in sizes]})
    return _box_set(images, tables.instances, tables.categories, f"coco:{file_sha256(instances)[:16]}", str(instances), {})


def _size(path: str) -> tuple[int, int]:
    photo = open_photo(Path(path))
    return photo.width, photo.height


def _box_set(images: pd.DataFrame, instances: pd.DataFrame, categories: list[dict], data_fp: str, source: str,
             upstream: dict) -> BoxSet:
    cats = sorted(categories, key=lambda c: int(c["id"]))
    label = {int(c["id"]): k + 1 for k, c in enumerate(cats)}
    boxes = instances[instances.image_id.isin(images.image_id) & (instances.w > 1) & (instances.h > 1)]
    boxes = boxes.assign(label=boxes.category_id.map(label))[["image_id", "label", "x", "y", "w", "h"]]
    images = images[images.image_id.isin(boxes.image_id)].reset_index(drop=True)  # no box: nothing to learn
    if images.empty:
        raise CbirError(f"{source}: no photo with a box to train on")
    return BoxSet(images, boxes.reset_index(drop=True), [{"id": int(c["id"]), "name": c["name"]} for c in cats],
                  data_fp, source, upstream)


class _Photos(Dataset):
    """Decoded photos as float tensors with their targets; `flip` mirrors half of them (seeded per epoch)."""

    def __init__(self, boxes: BoxSet, ids: np.ndarray, flip: np.ndarray | None = None):
        self.boxes = boxes
        self.rows = boxes.images.set_index("image_id").loc[ids].reset_index()
        self.by_image = dict(tuple(boxes.boxes.groupby("image_id")))
        self.flip = np.zeros(len(ids), bool) if flip is None else flip

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from torchvision.transforms.functional import pil_to_tensor

        row = self.rows.iloc[i]
        photo = open_photo(Path(row.file))
        image = pil_to_tensor(photo.image).float().div_(255)
        b = self.by_image[row.image_id]
        xyxy = torch.as_tensor(photo.to_decoded(b[["x", "y", "w", "h"]].to_numpy(float)), dtype=torch.float32)
        xyxy[:, 2:] += xyxy[:, :2]
        if self.flip[i]:
            image = image.flip(-1)
            xyxy[:, [0, 2]] = image.shape[-1] - xyxy[:, [2, 0]]
        target = {"boxes": xyxy, "labels": torch.tensor(b.label.to_numpy(), dtype=torch.int64)}
        return int(row.image_id), photo, image, target


def grouped_batches(images: pd.DataFrame, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of photos of one orientation (landscape or portrait), as torchvision's reference
    `GroupedBatchSampler` does: photos of one batch are padded to a common size, so mixing orientations
    pays for empty pixels."""
    out = []
    for _, group in images.groupby(images.width >= images.height):
        ids = rng.permutation(group.image_id.to_numpy())
        out += [ids[i:i + batch] for i in range(0, len(ids), batch)]
    return [out[i] for i in rng.permutation(len(out))]


def hold_out(boxes: BoxSet, cfg: TrainDetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids): a hash-drawn share of the photos, the same whatever their order."""
    ids = boxes.images.image_id.to_numpy()
    if cfg.max_images and cfg.max_images < len(ids):
        ids = ids[np.argsort(hash_share(pd.Series(ids), cfg.seed + 1))[:cfg.max_images]]
    val = hash_share(pd.Series(ids), cfg.seed) < cfg.validation
    if val.all() or not val.any():
        val = np.arange(len(ids)) < max(1, round(cfg.validation * len(ids)))
    if len(ids) - val.sum() < 1:
        raise CbirError(f"{boxes.source}: {len(ids)} photo(s) with boxes; training needs at least 2")
    return ids[~val], ids[val]


def build_settings(cfg: TrainDetectorConfig, boxes: BoxSet, used: dict) -> dict:
    sizes = sorted({max(32, round(used["size"] * f / 32) * 32) for f in JITTER} - {used["size"]}) + [used["size"]]
    return {"trunk": cfg.trunk, "trainable_layers": used["trainable_layers"], "num_classes": len(boxes.categories) + 1,
            "train_sizes": sizes, "eval_size": used["size"], "max_size": used["max_size"], "proposals": PROPOSALS,
            "seed": cfg.seed}


def initial_model(cfg: TrainDetectorConfig, build: dict) -> tuple[torch.nn.Module, dict]:
    """The model before training and where its weights came from (recorded in the card and manifests)."""
    if cfg.detector_weights:
        coco = resolve_weights(COCO_FRCNN, cfg.detector_weights, weights_enum(COCO_FRCNN), "--detector-weights")
        model = build_model(build)
        start_from_coco(model, load_state_dict(coco.path), coco.path, build["num_classes"])
        return model, {"start": f"{COCO_FRCNN} COCO weights", "weights": coco.spec, "weights_fingerprint": coco.fingerprint}
    trunk = resolve_weights(cfg.trunk, cfg.trunk_weights, weights_enum(cfg.trunk), "--trunk-weights")
    model = build_model({**build, "trunk_weights": str(trunk.path)}, None if trunk.random else load_state_dict(trunk.path))
    return model, {"start": f"{cfg.trunk} ImageNet trunk" if not trunk.random else "random init",
                   "weights": trunk.spec, "weights_fingerprint": trunk.fingerprint}


def validation_gt(boxes: BoxSet, val_ids: np.ndarray):
    """The held-out photos' boxes as pycocotools GT (built once, scored every epoch) and as a table."""
    from pycocotools.coco import COCO

    label_ids = [0] + [c["id"] for c in boxes.categories]
    rows = boxes.boxes[boxes.boxes.image_id.isin(val_ids)].assign(
        category_id=lambda b: b.label.map(dict(enumerate(label_ids))))
    gt = COCO()
    gt.dataset = {"images": [{"id": int(i)} for i in val_ids], "categories": boxes.categories,
                  "annotations": [{"id": k + 1, "image_id": int(r.image_id), "category_id": int(r.category_id),
                                   "bbox": [r.x, r.y, r.w, r.h], "area": r.w * r.h, "iscrowd": 0}
                                  for k, r in enumerate(rows.itertuples())]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
    return gt, rows


def validate(model, loader: DataLoader, boxes: BoxSet, val_ids: np.ndarray, device: torch.device, gt) -> dict:
    """COCOeval AP / AP50 and the top-box hit rate of the held-out photos (`gt`: from `validation_gt`)."""
    model.eval()
    label_ids = [0] + [c["id"] for c in boxes.categories]
    dets = []
    for batch in batches(loader):
        found = detect_with(model, device, [p for _, p, _, _ in batch], label_ids)
        dets += [{"image_id": iid, **d} for (iid, *_), boxes_of in zip(batch, found) for d in boxes_of]
    coco, rows = gt
    ap = coco_ap(coco, dets, [int(i) for i in val_ids], [c["id"] for c in boxes.categories])
    iou, _ = top_box_iou(dets, rows, pd.Series(val_ids))
    return {"AP": round(ap["AP"], 4), "AP50": round(ap["AP50"], 4), "top_box_hit": round(float((iou >= 0.5).mean()), 4)}


def _loader(boxes: BoxSet, ids, batch_sampler=None, flip=None, workers: int = 1, batch_size: int = 4) -> DataLoader:
    data = _Photos(boxes, ids, flip)
    if batch_sampler is not None:
        return DataLoader(data, batch_sampler=batch_sampler, num_workers=workers, collate_fn=_as_list)
    return DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_as_list)


def train_detector(cfg: TrainDetectorConfig) -> dict:
    """Train (or resume) and commit the model; skipped when data and settings are unchanged."""
    with writing(cfg.run) as layout:
        boxes = coco_boxes(cfg.coco, cfg.images) if cfg.coco else run_boxes(layout)
        device = resolve_device(cfg.device)
        used = cfg.resolved(device)
        build = build_settings(cfg, boxes, used)
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("run", "coco", "images", "workers", "device",
                                                                     "force", "name")}
        inputs = {"data": boxes.fingerprint, "settings": settings, "used": used, "build": build,
                  "device": device.type}
        art = Artifact(layout, layout.model(cfg.model_name))
        if is_fresh(art, inputs, cfg.force):
            return read_json(art.folder() / "card.json")
        train_ids, val_ids = hold_out(boxes, cfg)
        model, start = initial_model(cfg, build)
        model.to(device)
        history, seconds, state = _fit(cfg, layout, art, model, boxes, train_ids, val_ids, used, device,
                                       fingerprint(inputs))
        card = {"name": cfg.model_name, "architecture": f"FasterRCNN + FPN over {cfg.trunk}", **start,
                "trunk": cfg.trunk, "trainable_layers": used["trainable_layers"], "categories": boxes.categories,
                "input_size": {"eval_short_side": used["size"], "train_short_sides": build["train_sizes"],
                               "max_size": used["max_size"]},
                "data": {"source": boxes.source, "fingerprint": boxes.fingerprint, "train_images": len(train_ids),
                         "validation_images": len(val_ids),
                         "train_boxes": int(boxes.boxes.image_id.isin(train_ids).sum())},
                "epochs": used["epochs"], "batch_size": used["batch_size"], "optimizer": cfg.optimizer, "lr": used["lr"],
                "proposals": PROPOSALS, "history": history, "validation": history[-1], "seconds": round(seconds, 1),
                "device": str(device), "threads": torch.get_num_threads()}
        with commit(art, inputs, boxes.upstream) as staged:
            torch.save({"format": FORMAT, "build": build, "categories": boxes.categories, "state_dict": state,
                        "card": {k: card[k] for k in ("name", "architecture", "start", "weights_fingerprint",
                                                      "epochs", "seconds")}}, staged.file("detector.pt"))
            card["weights_file_sha256"] = file_sha256(staged.file("detector.pt"))[:16]
            staged.write_json("card.json", card)
            _plot(history, staged.file("curves.png"), cfg.model_name)
            staged.summary.update({"validation": history[-1], "seconds": card["seconds"], "trunk": cfg.trunk,
                                   "trainable_layers": used["trainable_layers"]})
        shutil.rmtree(layout.partial(art.name), ignore_errors=True)
        log.info("%s: validation AP %.3f, AP50 %.3f, top-box hit %.1f%% → %s", cfg.model_name, history[-1]["AP"],
                 history[-1]["AP50"], 100 * history[-1]["top_box_hit"], art.link)
        return card


def _fit(cfg, layout, art, model, boxes, train_ids, val_ids, used, device, stamp) -> tuple[list[dict], float, dict]:
    """SGD/AdamW with a one-cycle schedule, clipped gradients and AMP on CUDA; a checkpoint after every epoch
    (model, optimiser, schedule, history) so a killed run resumes where it was."""

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=used["lr"], momentum=0.9, weight_decay=cfg.weight_decay)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr=used["lr"], weight_decay=cfg.weight_decay))
    train_rows = boxes.images[boxes.images.image_id.isin(train_ids)]
    steps = len(grouped_batches(train_rows, used["batch_size"], np.random.default_rng(0)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=used["lr"], total_steps=used["epochs"] * steps,
                                                   pct_start=max(cfg.warmup, 1e-3), anneal_strategy="cos")
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    ckpt_path = layout.partial(art.name) / "checkpoint.pt"
    state = load_checkpoint(ckpt_path, stamp)
    history, seconds = [], 0.0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        history, seconds = state["history"], state["seconds"]
        log.info("resuming %s after epoch %d of %d", art.name, len(history), used["epochs"])
    val_loader = _loader(boxes, val_ids, workers=cfg.workers, batch_size=used["batch_size"])
    gt = validation_gt(boxes, val_ids)
    with tqdm(total=used["epochs"] * steps, initial=len(history) * steps, desc=f"train {cfg.model_name}",
              unit="step") as bar:
        for epoch in range(len(history) + 1, used["epochs"] + 1):
            start = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, epoch])  # an epoch's batches depend on (seed, epoch) only
            order = grouped_batches(train_rows, used["batch_size"], rng)
            flip = rng.random(len(train_ids)) < 0.5
            position = {iid: k for k, iid in enumerate(train_ids)}
            torch.manual_seed(cfg.seed * 1000 + epoch)
            loader = _loader(boxes, train_ids, [[position[i] for i in b] for b in order], flip, cfg.workers)
            losses = _epoch(model, loader, optimizer, schedule, scaler, device, bar)
            history.append({"epoch": epoch, **losses, **validate(model, val_loader, boxes, val_ids, device, gt),
                            "lr_end": schedule.get_last_lr()[0]})
            seconds += time.perf_counter() - start
            save_checkpoint(ckpt_path, {"stamp": stamp, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                                         "history": history, "seconds": seconds})
            h = history[-1]
            log.info("epoch %d: loss %.3f, validation AP %.3f, AP50 %.3f, top-box hit %.1f%% (%.0f s)", epoch, h["loss"],
                     h["AP"], h["AP50"], 100 * h["top_box_hit"], time.perf_counter() - start)
    return history, seconds, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _epoch(model, loader, optimizer, schedule, scaler, device, bar) -> dict:
    model.train()
    sums, n = {}, 0
    for batch in batches(loader):
        images = [image.to(device, non_blocking=True) for _, _, image, _ in batch]
        targets = [{k: v.to(device) for k, v in t.items()} for *_, t in batch]
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            parts = model(images, targets)
        loss = sum(parts.values())
        value = float(loss.detach())
        if not torch.isfinite(loss):
            raise CbirError(f"training diverged (loss {value}); lower --lr or raise --warmup")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], CLIP)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n += 1
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{schedule.get_last_lr()[0]:.4f}")
        bar.update(1)
    return {k: round(v / max(1, n), 4) for k, v in sums.items()}


def _plot(history: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for column in [c for c in h.columns if c.startswith("loss")]:
        axes[0].plot(h.epoch, h[column], marker="o", label=column.replace("loss_", ""))
    axes[0].set(xlabel="epoch", ylabel="training loss (mean over the epoch)", title=name)
    axes[0].legend(fontsize=7)
    for column in ("AP", "AP50", "top_box_hit"):
        axes[1].plot(h.epoch, h[column], marker="o", label=column)
    axes[1].set(xlabel="epoch", title="validation (held-out training photos)", ylim=(0, 1))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

