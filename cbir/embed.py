"""Embedding stage: one vector per image (full), GT box (gt) or detected instance (det).

Every vector row i is described by row i of the table beside it, and the pair carries the
backbone fingerprint, so vectors of different models or preprocessing can never be mixed silently.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from . import CbirError
from .artifacts import (finish_shards, read_json, read_table, record, require_run, run_in_shards, write_json,
                        write_npy, write_table)
from .data import cub_root, load_rgb, load_split
from .detect import resolve_device
from .models import Backbone, build_backbone

log = logging.getLogger(__name__)

MODES = ("full", "gt", "det")
CROP_RESIZE = ("squash", "pad", "center")
POOLS = ("avg", "gem")
SHARD_IMAGES = 256  # images per resumable shard
TABLE_COLUMNS = ["image_id", "instance", "x", "y", "w", "h", "source", "score", "split", "class_id"]


@dataclass
class CropPolicy:
    """How a box becomes the trunk's square input. Defaults from benchmarks/results/embed_bench_*.md on the
    CUB sample: letterboxing the tight box keeps the whole bird undistorted (best MAP@R and mAP); center-crop
    cuts off heads and tails (worst); a margin brought no consistent gain."""

    margin: float = 0.0  # grow the box by this fraction of its width/height on each side
    resize: str = "pad"  # pad: letterbox; squash: stretch to square; center: resize short side + center crop

    def __post_init__(self):
        if self.resize not in CROP_RESIZE:
            raise CbirError(f"--crop-resize {self.resize}: choose from {', '.join(CROP_RESIZE)}")
        if not 0 <= self.margin <= 2:
            raise CbirError(f"--crop-margin {self.margin}: must lie in [0, 2]")


def grow_box(box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """[x, y, w, h] grown by `margin` and clipped → integer (x0, y0, x1, y1), at least 1 px each way."""
    x, y, w, h = box
    x0, y0 = max(0, int(np.floor(x - margin * w))), max(0, int(np.floor(y - margin * h)))
    x1, y1 = min(width, int(np.ceil(x + w + margin * w))), min(height, int(np.ceil(y + h + margin * h)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def crop_to_input(image: torch.Tensor, box, policy: CropPolicy, size: int, resize_size: int,
                  fill: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [3, H, W] image + box → uint8 [3, size, size] under the crop policy."""
    x0, y0, x1, y1 = grow_box(box, policy.margin, image.shape[-1], image.shape[-2])
    crop = image[:, y0:y1, x0:x1]
    if policy.resize == "squash":
        return TF.resize(crop, [size, size], antialias=True)
    if policy.resize == "center":
        return TF.center_crop(TF.resize(crop, resize_size, antialias=True), [size, size])
    h, w = crop.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = torch.empty(3, side, side, dtype=crop.dtype)
    padded[:] = torch.tensor(fill, dtype=crop.dtype).view(3, 1, 1)
    padded[:, top:top + h, left:left + w] = crop
    return TF.resize(padded, [size, size], antialias=True)


@dataclass
class EmbedConfig:
    run: Path
    mode: str = "full"
    backbone: str = "detector"
    weights: str = "DEFAULT"
    pool: str = "gem"  # GeM beat average pooling in every mode on the sample (MAP@R +4 to +6 points)
    crop_margin: float = 0.0
    crop_resize: str = "pad"
    size: int | None = None  # input side; default: the weights' own crop size
    roi: bool = False  # det/gt: pool every box from one pass over the whole image
    batch_size: int | None = None  # default: per device, see DEFAULT_BATCH
    workers: int = 2
    device: str = "auto"
    bf16: bool = False
    name: str | None = None
    force: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise CbirError(f"--mode {self.mode}: choose from {', '.join(MODES)}")
        if self.pool not in POOLS:
            raise CbirError(f"--pool {self.pool}: choose from {', '.join(POOLS)}")
        if self.roi and self.mode == "full":
            raise CbirError("--roi pools boxes from the image's feature map; use it with --mode gt or det")
        CropPolicy(self.crop_margin, self.crop_resize)

    @property
    def output_name(self) -> str:
        return self.name or self.mode


def instances(run: Path, mode: str) -> pd.DataFrame:
    """The rows to embed, one per vector: whole images, GT boxes, or detected instances (with fallbacks)."""
    split = load_split(run)
    base = split[["image_id", "path", "split", "class_id", "width", "height"]]
    if mode == "full":
        return base.assign(instance=0, x=0.0, y=0.0, w=split.width.astype(float), h=split.height.astype(float),
                           source="full", score=1.0)
    if mode == "gt":
        return base.assign(instance=0, x=split.x, y=split.y, w=split.w, h=split.h, source="gt", score=1.0)
    path = Path(run) / "detections.json"
    if not path.exists():
        raise CbirError(f"{path}: not found; run `cbir detect --run {run}` (or import boxes with --detections) first")
    dets = pd.DataFrame(read_json(path))
    if dets.empty:
        raise CbirError(f"{path}: holds no instances; lower --score or use --fallback gt|full in `cbir detect`")
    dets = dets.assign(source=dets.get("source", "detected"))
    dets[["x", "y", "w", "h"]] = pd.DataFrame(dets.bbox.tolist(), index=dets.index)
    dets["instance"] = dets.groupby("image_id").cumcount()
    out = dets[["image_id", "instance", "x", "y", "w", "h", "source", "score"]].merge(base, on="image_id")
    return out.sort_values(["image_id", "instance"], ignore_index=True)


@dataclass(frozen=True)
class InputRecipe:
    """Pixels → trunk input for one stored spec; shared by the embed stage and single-photo queries."""

    policy: CropPolicy
    size: int
    resize_size: int
    fill: tuple[int, int, int]
    roi: bool

    @classmethod
    def from_spec(cls, spec: dict, backbone: Backbone) -> InputRecipe:
        pre, size = backbone.preprocess, spec["size"]
        return cls(CropPolicy(spec["crop_margin"], spec["crop_resize"]), size,
                   round(size * pre.resize_size / pre.size), tuple(int(round(m * 255)) for m in pre.mean), spec["roi"])

    def inputs(self, image: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 image [3, H, W] + [x, y, w, h] boxes → (crops [n, 3, s, s], None), or for RoI
        (the image squashed to 2s x 2s [1, 3, 2s, 2s], its boxes scaled to it [n, 4] xyxy)."""
        if self.roi:
            side = 2 * self.size
            sx, sy = side / image.shape[-1], side / image.shape[-2]
            xyxy = np.stack([boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 0] + boxes[:, 2]) * sx,
                             (boxes[:, 1] + boxes[:, 3]) * sy], 1)
            return TF.resize(image, [side, side], antialias=True)[None], torch.tensor(xyxy, dtype=torch.float32)
        crops = [crop_to_input(image, b, self.policy, self.size, self.resize_size, self.fill) for b in boxes]
        return torch.stack(crops), None


class _Crops(Dataset):
    """One item per image, decoded once in a worker: all of its crops, or the RoI inputs."""

    def __init__(self, root: Path, groups: list[pd.DataFrame], recipe: InputRecipe):
        self.root, self.groups, self.recipe = root, groups, recipe

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        rows = self.groups[i]
        image = pil_to_tensor(load_rgb(self.root / "images" / rows.path.iloc[0]))
        return self.recipe.inputs(image, rows[["x", "y", "w", "h"]].to_numpy(float))


def _collate(batch):
    images = torch.cat([b[0] for b in batch])
    boxes = [b[1] for b in batch] if batch[0][1] is not None else None
    return images, boxes


def pool_features(fmap: torch.Tensor, pool: str, p: float = 3.0) -> torch.Tensor:
    """Global average or generalised-mean (GeM, p=3) pooling of [B, C, h, w] → [B, C]."""
    if pool == "gem":
        return fmap.clamp(min=1e-6).pow(p).mean((-2, -1)).pow(1.0 / p)
    return fmap.mean((-2, -1))


# Measured (benchmarks/results/embed_bench_*): on a 2-core CPU, MobileNetV2 runs 69 img/s at batch 4 in
# NCHW but 33 img/s at batch 32 in channels_last (cache-bound); on an H100 large channels_last batches win.
DEFAULT_BATCH = {"cpu": 4, "cuda": 64}


def default_batch(device: torch.device) -> int:
    return DEFAULT_BATCH.get(device.type, 8)


class Embedder:
    """The trunk on its device, normalising uint8 batches itself so workers ship compact tensors."""

    def __init__(self, backbone: Backbone, device: torch.device, pool: str, bf16: bool):
        self.backbone, self.device, self.pool, self.bf16 = backbone, device, pool, bf16
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.trunk = backbone.trunk.to(device).to(memory_format=self.memory_format)
        self.mean = torch.tensor(backbone.preprocess.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(backbone.preprocess.std, device=device).view(1, 3, 1, 1) * 255

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.to(self.device, non_blocking=True).float() - self.mean) / self.std)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            return self.trunk(x).float()

    def __call__(self, images: torch.Tensor, boxes: list[torch.Tensor] | None = None) -> np.ndarray:
        fmap = self.feature_map(images)
        if boxes is not None:
            stride = self.backbone.stride
            fmap = roi_align(fmap, [b.to(self.device) for b in boxes], output_size=(4, 4),
                             spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)
        return pool_features(fmap, self.pool).cpu().numpy().astype(np.float32)


def _detector_name(run: Path) -> str:
    meta_path = Path(run) / "detections.meta.json"
    detector = read_json(meta_path).get("detector") if meta_path.exists() else None
    return detector if detector and detector != "external" else "fasterrcnn_resnet50_fpn"


def embedding_spec(cfg: EmbedConfig, backbone: Backbone) -> dict:
    """Everything that shapes a vector; index and evaluation refuse to mix different specs."""
    size = cfg.size or backbone.preprocess.size
    return {"fingerprint": f"{backbone.fingerprint}|size{size}|{cfg.pool}|"
                           f"{'roi' if cfg.roi else f'{cfg.crop_resize}+{cfg.crop_margin}'}",
            "backbone": backbone.name, "weights": backbone.weights.spec,
            "weights_fingerprint": backbone.weights.fingerprint, "dim": backbone.dim, "size": size,
            "preprocess": asdict(backbone.preprocess), "pool": cfg.pool, "crop_margin": cfg.crop_margin,
            "crop_resize": cfg.crop_resize, "roi": cfg.roi, "bf16": cfg.bf16, "mode": cfg.mode}


def embed_rows(rows: pd.DataFrame, root: Path, embedder: Embedder, recipe: InputRecipe, batch_size: int,
               workers: int, progress: tqdm | None = None) -> np.ndarray:
    """Vectors for `rows` (grouped by image, decoded in workers), in the order of `rows`."""
    groups = [g for _, g in rows.groupby("image_id", sort=False)]
    loader = DataLoader(_Crops(root, groups, recipe), batch_size=max(1, batch_size),
                        num_workers=workers, collate_fn=_collate)
    out = []
    for images, boxes in loader:
        out.append(embedder(images, boxes))
        if progress is not None:
            progress.update(len(boxes) if boxes is not None else len(images))
    order = np.concatenate([g.index.to_numpy() for g in groups])
    vectors = np.concatenate(out) if out else np.zeros((0, embedder.backbone.dim), np.float32)
    result = np.empty_like(vectors)
    result[np.argsort(np.argsort(order))] = vectors
    return result


def paths(run: Path, name: str) -> tuple[Path, Path, Path]:
    base = Path(run) / "embeddings"
    return base / f"{name}.npy", base / f"{name}.parquet", base / f"{name}.json"


def embed(cfg: EmbedConfig) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Embed the run's images or boxes → embeddings/<name>.npy + .parquet + .json (spec)."""
    run = require_run(cfg.run)
    npy, table_path, spec_path = paths(run, cfg.output_name)
    backbone = build_backbone(cfg.backbone, cfg.weights, _detector_name(run))
    spec = embedding_spec(cfg, backbone)
    if npy.exists() and spec_path.exists():
        old = read_json(spec_path)
        if old["fingerprint"] == spec["fingerprint"] and old["mode"] == cfg.mode and not cfg.force:
            log.info("%s exists with the same spec; nothing to do (use --force to redo)", npy)
            return np.load(npy, mmap_mode="r"), read_table(table_path), old
        if not cfg.force:
            raise CbirError(f"{npy} was made by {old['backbone']} ({old['fingerprint']}); refusing to mix with "
                            f"{spec['fingerprint']}: pass --name NEW for a second set, or --force to replace it")
    rows = instances(run, cfg.mode)
    device = resolve_device(cfg.device)
    embedder = Embedder(backbone, device, cfg.pool, cfg.bf16)
    recipe = InputRecipe.from_spec(spec, backbone)
    root = cub_root(run)
    bar = tqdm(total=len(rows), desc=f"embed {cfg.output_name} ({backbone.name})", unit="box")
    image_order = rows.image_id.drop_duplicates().to_numpy()

    def compute(image_ids):
        part = rows[rows.image_id.isin(image_ids)]
        return embed_rows(part, root, embedder, recipe, cfg.batch_size or default_batch(device), cfg.workers, bar)

    def save(path, array):
        with open(path, "wb") as f:
            np.save(f, array)

    shards = run_in_shards(image_order, SHARD_IMAGES, run / "embeddings" / f"{cfg.output_name}.partial",
                           {**spec, "rows": len(rows)}, compute, save, np.load, bar)
    bar.close()
    vectors = np.concatenate(shards).astype(np.float32)
    if not np.isfinite(vectors).all():
        raise CbirError(f"{cfg.output_name}: the backbone produced NaN/inf features; check the weights file")
    table = rows[TABLE_COLUMNS].reset_index(drop=True)
    write_npy(npy, vectors)
    write_table(table_path, table)
    write_json(spec_path, {**spec, "count": len(table)})
    finish_shards(run / "embeddings" / f"{cfg.output_name}.partial")
    record(run, f"embeddings/{cfg.output_name}", **spec, count=len(table))
    return vectors, table, spec


def load_embeddings(run: Path, name: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Vectors (memory-mapped), their table and spec; refuses misaligned or incomplete sets."""
    npy, table_path, spec_path = paths(run, name)
    if not npy.exists():
        raise CbirError(f"{npy}: not found; run `cbir embed --run {run} --mode ... --name {name}` first")
    vectors, table, spec = np.load(npy, mmap_mode="r"), read_table(table_path), read_json(spec_path)
    if len(vectors) != len(table) or vectors.ndim != 2 or vectors.shape[1] != spec["dim"]:
        raise CbirError(f"{npy}: {vectors.shape} vectors do not match its table ({len(table)} rows) and spec "
                        f"(dim {spec['dim']}); re-run `cbir embed --force`")
    return vectors, table, spec


def embed_photo(image, boxes: np.ndarray, spec: dict, embedder: Embedder) -> np.ndarray:
    """Vectors for boxes of one in-memory photo, with a stored embeddings spec (used by search and ui)."""
    images, xyxy = InputRecipe.from_spec(spec, embedder.backbone).inputs(pil_to_tensor(image), np.asarray(boxes, float))
    return embedder(images, None if xyxy is None else [xyxy])
