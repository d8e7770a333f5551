"""Trainable Faster R-CNN: torchvision's `FasterRCNN` with an FPN over a classifier trunk (torchvision's
`backbone_utils` extractors), and the detector that loads a `cbir train-detector` checkpoint.

A checkpoint (`detector.pt`) is self-describing: `build` (everything needed to rebuild the architecture),
`categories` (label k = categories[k-1], with the dataset's own ids), `state_dict` and a short `card`.
It is read with `torch.load(weights_only=True)`; the trunk weights it started from are not needed again.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import pil_to_tensor

from .. import CbirError
from ..artifacts import file_sha256
from ..images import Photo

FORMAT = "cbir-detector/1"
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MOBILENETS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
TRUNKS = RESNETS + MOBILENETS
COCO_FRCNN = "fasterrcnn_resnet50_fpn"  # the card's detector: its COCO weights can start a ResNet-50 run


def trunk_stages(trunk: str) -> int:
    """How many stages `--trainable-layers` counts for this trunk (torchvision's own rule)."""
    if trunk in RESNETS:
        return 5
    features = torchvision.models.get_model(trunk, weights=None).features
    return 2 + sum(bool(getattr(b, "_is_cn", False)) for b in features)


def check_trunk(trunk: str, trainable_layers: int) -> None:
    if trunk not in TRUNKS:
        raise CbirError(f"--trunk {trunk}: choose from {', '.join(TRUNKS)}")
    stages = trunk_stages(trunk)
    if not 0 <= trainable_layers <= stages:
        raise CbirError(f"--trainable-layers {trainable_layers}: {trunk} has {stages} stages; choose 0-{stages}")


def build_model(build: dict, trunk_state: dict | None = None) -> FasterRCNN:
    """The architecture `build` describes; `trunk_state` (a classifier's state dict) initialises the trunk.

    Trunks use frozen BatchNorm as torchvision's pretrained detectors do (batches of 2-8 photos are too
    small for batch statistics); the FPN returns torchvision's default levels (ResNet: C2-C5, MobileNet:
    the last two stages), with the anchors of `fasterrcnn_resnet50_fpn` and `fasterrcnn_mobilenet_v3_large_fpn`.
    """
    from ..weights import load_partial

    torch.manual_seed(build.get("seed", 0))
    trunk = torchvision.models.get_model(build["trunk"], weights=None, norm_layer=FrozenBatchNorm2d)
    if trunk_state is not None:
        load_partial(trunk, trunk_state, Path(build.get("trunk_weights", "trunk")), head_prefixes=("fc.", "classifier."))
    layers = build["trainable_layers"]
    if build["trunk"] in RESNETS:
        backbone, anchors = _resnet_fpn_extractor(trunk, layers), None
    else:
        backbone = _mobilenet_extractor(trunk, True, layers)
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(backbone, num_classes=build["num_classes"], rpn_anchor_generator=anchors,
                       min_size=tuple(build["train_sizes"]), max_size=build["max_size"], **build["proposals"])
    return model


def start_from_coco(model: FasterRCNN, state: dict, source: Path, num_classes: int) -> None:
    """Load COCO Faster R-CNN weights (91 classes) into a ResNet-50 model, then give it a fresh box
    predictor for `num_classes` (torchvision's fine-tuning recipe)."""
    from ..weights import load_partial

    model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features, 91)
    load_partial(model, state, source)
    model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features,
                                                      num_classes)


def read_checkpoint(path: Path) -> dict:
    """A train-detector checkpoint, checked: one line for a missing, corrupt or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / "detector.pt"
    if not path.is_file():
        raise CbirError(f"--detector {path}: no such file (a train-detector model folder or its detector.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated, garbage or pickled objects: all the same answer
        raise CbirError(f"--detector {path}: not a loadable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CbirError(f"--detector {path}: not a cbir train-detector checkpoint (no '{FORMAT}' format tag)")
    return {**ckpt, "path": path.absolute()}


def model_from_checkpoint(ckpt: dict) -> FasterRCNN:
    model = build_model(ckpt["build"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CbirError(f"--detector {ckpt['path']}: weights do not fit its recorded architecture ({first[:150]})") from None
    return model


def to_results(outputs: list[dict], photos: list[Photo], label_ids: list[int]) -> list[list[dict]]:
    """torchvision detection outputs → COCO results per photo in original pixels (label k → label_ids[k])."""
    found = []
    for photo, out in zip(photos, outputs):
        boxes = out["boxes"].cpu().double() * photo.scale
        found.append([{"category_id": label_ids[int(c)], "score": round(float(s), 5),
                       "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(float(b[2] - b[0]), 2),
                                round(float(b[3] - b[1]), 2)]}
                      for b, c, s in zip(boxes, out["labels"].tolist(), out["scores"].tolist())])
    return found


def detect_with(model, device: torch.device, photos: list[Photo], label_ids) -> list[list[dict]]:
    """One inference pass of a torchvision detection model over decoded photos → COCO results per photo."""
    with torch.inference_mode():
        outputs = model([pil_to_tensor(p.image).to(device).float().div_(255) for p in photos])
    return to_results(outputs, photos, label_ids)


def set_eval_size(model: FasterRCNN, size: int) -> None:
    """torchvision resizes to `min_size[-1]` in eval mode (a random entry while training)."""
    model.transform.min_size = (*[s for s in model.transform.min_size if s != size], size)


class TrainedDetector:
    """A `cbir train-detector` checkpoint as a `Detector`; boxes carry the training data's category ids."""

    def __init__(self, path: str | Path, *, device: torch.device, min_size: str = "auto", score_floor: float = 0.05):
        ckpt = read_checkpoint(Path(path))
        if min_size != "auto" and not str(min_size).isdigit():
            raise CbirError(f"--min-size {min_size}: 'auto' (the trained size) or a number of pixels")
        model = model_from_checkpoint(ckpt)
        size = ckpt["build"]["eval_size"] if min_size == "auto" else int(min_size)
        set_eval_size(model, size)
        model.roi_heads.score_thresh = score_floor
        self.model, self.device = model.eval().to(device), device
        self.label_ids = [0] + [int(c["id"]) for c in ckpt["categories"]]
        self.categories = ckpt["categories"]
        self.build = ckpt["build"]
        self.spec = {"detector": f"trained:{ckpt['build']['trunk']}", "weights": str(ckpt["path"]),
                     "weights_fingerprint": file_sha256(ckpt["path"])[:16], "min_size": str(min_size),
                     "trunk": ckpt["build"]["trunk"]}

    def detect(self, photos: list[Photo]) -> list[list[dict]]:
        return detect_with(self.model, self.device, photos, self.label_ids)
