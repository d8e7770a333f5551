"""torchvision Faster R-CNN detectors, built by name with the weights API (offline paths included)."""

from __future__ import annotations

import math

import torch
import torchvision
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .. import CbirError
from ..images import Photo
from ..datasets.base import coco_categories
from ..weights import load_partial, load_state_dict, resolve_weights, weights_enum
from .frcnn import detect_with

DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")
NATIVE_BOUNDS = (224, 1024)  # --min-size auto keeps the photo's own short side inside these bounds


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """Resize each photo to its own short side (clamped), not to a fixed 800 px: CUB photos are ~375 px,
    so the fixed size does ~4x the pixels for no gain in recall on birds this large."""

    def __init__(self, base: GeneralizedRCNNTransform, bounds: tuple[int, int] = NATIVE_BOUNDS):
        super().__init__(base.min_size, base.max_size, base.image_mean, base.image_std,
                         size_divisible=base.size_divisible, fixed_size=base.fixed_size)
        self.bounds, self.base_max_size = bounds, base.max_size

    def resize(self, image, target=None):
        """Set this photo's sizes from its own shape (never from earlier photos), then resize as torchvision does."""
        short, long = min(image.shape[-2:]), max(image.shape[-2:])
        target_short = int(min(max(short, self.bounds[0]), self.bounds[1]))
        self.min_size = (target_short,)
        self.max_size = max(self.base_max_size, math.ceil(long * target_short / short))
        return super().resize(image, target)


class TorchvisionDetector:
    def __init__(self, name: str, weights: str, *, device: torch.device, min_size: str = "auto",
                 score_floor: float = 0.05):
        if min_size != "auto" and not str(min_size).isdigit():
            raise CbirError(f"--min-size {min_size}: 'auto' or a number of pixels")
        enum = weights_enum(name)
        resolved = resolve_weights(name, weights, enum, "--detector-weights")
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=len(enum.DEFAULT.meta["categories"]),
                                             box_score_thresh=score_floor)
        if resolved.path is not None:
            load_partial(model, load_state_dict(resolved.path), resolved.path)
        if str(min_size) == "auto":
            model.transform = NativeResolutionTransform(model.transform)
        else:
            model.transform.min_size = (int(min_size),)
        self.model, self.device = model.eval().to(device), device
        self.spec = {"detector": name, "weights": resolved.spec, "weights_fingerprint": resolved.fingerprint,
                     "min_size": str(min_size)}

    def detect(self, photos: list[Photo]) -> list[list[dict]]:
        return detect_with(self.model, self.device, photos, range(len(coco_categories())))  # label k is COCO id k
