"""The CNN encoder: photo + boxes (original pixels) → one vector per box, with a trunk, a crop recipe and
global pooling. Input making (`InputRecipe`) is plain data so it runs in DataLoader workers; the model
side (`CnnEncoder.forward`) runs on the device."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align
from torchvision.transforms.functional import pil_to_tensor

from .. import CbirError
from ..images import Photo
from ..weights import check_fingerprint, relocate
from .backbones import Backbone, build_backbone
from .tuning import Tuning, tune

log = logging.getLogger(__name__)

CROP_RESIZE = ("squash", "pad", "center")
POOLS = ("avg", "gem")


@dataclass(frozen=True)
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
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def crop_to_input(image: torch.Tensor, box, policy: CropPolicy, size: int, resize_size: int,
                  fill: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [3, H, W] image + box (its pixels) → uint8 [3, size, size] under the crop policy."""
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


@dataclass(frozen=True)
class InputRecipe:
    """Pixels → trunk input; plain data, so DataLoader workers make the inputs."""

    policy: CropPolicy
    size: int
    resize_size: int
    fill: tuple[int, int, int]
    roi: bool

    def inputs(self, photo: Photo, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A photo + [x, y, w, h] boxes in ORIGINAL pixels → (crops [n, 3, s, s], None), or for RoI
        (the photo squashed to 2s x 2s [1, 3, 2s, 2s], its boxes scaled to it [n, 4] xyxy)."""
        image = pil_to_tensor(photo.image)
        boxes = photo.to_decoded(boxes)
        if self.roi:
            side = 2 * self.size
            sx, sy = side / image.shape[-1], side / image.shape[-2]
            xyxy = np.stack([boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 0] + boxes[:, 2]) * sx,
                             (boxes[:, 1] + boxes[:, 3]) * sy], 1)
            return TF.resize(image, [side, side], antialias=True)[None], torch.tensor(xyxy, dtype=torch.float32)
        crops = [crop_to_input(image, b, self.policy, self.size, self.resize_size, self.fill) for b in boxes]
        return torch.stack(crops), None


def pool_features(fmap: torch.Tensor, pool: str, p: float = 3.0) -> torch.Tensor:
    """Global average or generalised-mean (GeM, p=3) pooling of [B, C, h, w] → [B, C]."""
    if pool == "gem":
        return fmap.clamp(min=1e-6).pow(p).mean((-2, -1)).pow(1.0 / p)
    return fmap.mean((-2, -1))


def fuse_batch_norm(trunk: torch.nn.Module) -> torch.nn.Module:
    """Inference-only trunk with every BatchNorm folded into the convolution before it (torch.fx): the same
    function up to float rounding, and on a 2-core CPU MobileNetV2 ran 94 → 186 img/s (batch 4,
    channels_last). A trunk fx cannot trace (some timm or detector bodies) is kept as it is."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(trunk)
    except Exception as e:  # noqa: BLE001 — tracing fails in many ways; fusion is only an optimisation
        log.debug("batch norm not fused for %s (%s)", type(trunk).__name__, e)
        return trunk


class CnnEncoder:
    """An `Encoder`: the trunk on its device, normalising uint8 batches itself so workers ship compact
    tensors; `spec` records everything that shapes a vector."""

    def __init__(self, backbone: Backbone, device: torch.device, *, pool: str = "gem", crop_margin: float = 0.0,
                 crop_resize: str = "pad", size: int | None = None, roi: bool = False, bf16: bool = False):
        if pool not in POOLS:
            raise CbirError(f"--pool {pool}: choose from {', '.join(POOLS)}")
        if size is not None and not 32 <= size <= 2048:
            raise CbirError(f"--size {size}: must lie in [32, 2048]")
        self.backbone, self.device, self.pool, self.bf16 = backbone, device, pool, bf16
        pre, size = backbone.preprocess, size or backbone.preprocess.size
        self.recipe = InputRecipe(CropPolicy(crop_margin, crop_resize), size, round(size * pre.resize_size / pre.size),
                                  tuple(int(round(m * 255)) for m in pre.mean), roi)
        self.trunk = fuse_batch_norm(backbone.trunk.to(device).eval())
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
        crop = "roi" if roi else f"{crop_resize}+{crop_margin}"
        self.spec = {"fingerprint": f"{backbone.fingerprint}|size{size}|{pool}|{crop}",
                     "encoder": "cnn", "backbone": backbone.name, "weights": backbone.weights.spec,
                     "weights_fingerprint": backbone.weights.fingerprint, "dim": backbone.dim, "size": size,
                     "preprocess": asdict(backbone.preprocess), "pool": pool, "crop_margin": crop_margin,
                     "crop_resize": crop_resize, "roi": roi, "bf16": bf16}

    @property
    def fingerprint(self) -> str:
        return self.spec["fingerprint"]

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def input_side(self) -> int:
        """Side of the trunk's square input: the crop size, or twice it for a whole-image RoI pass."""
        return self.recipe.size * (2 if self.recipe.roi else 1)

    @cached_property
    def tuning(self) -> Tuning:
        """Memory format and batch size measured for this trunk here (cached across runs); the trunk is
        put in the winning format."""
        tuning = tune(self.trunk, f"{self.backbone.name} (BN fused)", self.input_side, self.device)
        self.trunk.to(memory_format=tuning.torch_format)
        return tuning

    @property
    def default_batch(self) -> int:
        return self.tuning.batch

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor] | None = None) -> np.ndarray:
        x = ((images.to(self.device, non_blocking=True).float() - self.mean) / self.std)
        x = x.contiguous(memory_format=self.tuning.torch_format)
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            fmap = self.trunk(x).float()
            if boxes is not None:
                fmap = roi_align(fmap, [b.to(self.device) for b in boxes], output_size=(4, 4),
                                 spatial_scale=1.0 / self.backbone.stride, sampling_ratio=2, aligned=True)
            return pool_features(fmap, self.pool).cpu().numpy().astype(np.float32)

    def encode(self, photo: Photo, boxes: np.ndarray) -> np.ndarray:
        return self.encode_batch([photo], [boxes])[0]

    def encode_batch(self, photos: list[Photo], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Vectors of several photos' boxes through one forward pass (concurrent queries share the model)."""
        inputs = [self.recipe.inputs(p, np.asarray(b, float)) for p, b in zip(photos, boxes)]
        images = torch.cat([i[0] for i in inputs])
        vectors = self.forward(images, None if inputs[0][1] is None else [i[1] for i in inputs])
        return np.split(vectors, np.cumsum([len(b) for b in boxes])[:-1])


def cnn_encoder(spec: dict, device: torch.device, weights: str | None = None) -> CnnEncoder:
    """Rebuild the encoder a stored spec describes (`weights`: the new place of a moved weights file)."""
    backbone = build_backbone(spec["backbone"], relocate(spec["weights"], spec["weights_fingerprint"], weights))
    check_fingerprint(backbone.weights, spec["weights_fingerprint"], "backbone")
    return CnnEncoder(backbone, device, pool=spec["pool"], crop_margin=spec["crop_margin"],
                      crop_resize=spec["crop_resize"], size=spec["size"], roi=spec["roi"], bf16=spec["bf16"])
