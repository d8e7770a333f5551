"""Detector and backbone builders by name, weight resolution (online and offline) and fingerprints.

torchvision's weights enums are the source of truth for file names, transforms and categories;
this module only decides where the state_dict comes from when there is no network.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import CbirError
from .artifacts import file_sha256

log = logging.getLogger(__name__)

WEIGHTS_ENV = "CBIR_WEIGHTS_DIR"
OFFLINE_ENV = "CBIR_OFFLINE"  # set on machines without internet: fail at once instead of trying to download
DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a model's parameters come from: `path` None means random init."""

    spec: str
    path: Path | None
    fingerprint: str

    @property
    def random(self) -> bool:
        return self.path is None


def _hub_file(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights(model_name: str, spec: str, weights_enum=None) -> ResolvedWeights:
    """`spec` is 'none', a file path, or a torchvision weights name ('DEFAULT', 'IMAGENET1K_V2').

    For a weights name the file is looked for as `$CBIR_WEIGHTS_DIR/<torchvision file name>`, then in
    the torch hub cache, then downloaded; offline and missing gives one line on how to supply it.
    """
    if spec.lower() == "none":
        log.warning("=" * 70 + "\n%s: RANDOM WEIGHTS (--weights none) — outputs are meaningless, for plumbing tests only\n"
                    + "=" * 70, model_name)
        return ResolvedWeights("none", None, "random-init-seed0")
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise CbirError(f"--weights {spec}: no such file")
        return ResolvedWeights(str(path), path, file_sha256(path)[:16])
    if weights_enum is None:
        raise CbirError(f"{model_name}: no torchvision weights enum; pass --weights PATH to a state_dict file")
    try:
        weights = weights_enum[spec] if spec != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in weights_enum)
        raise CbirError(f"--weights {spec}: not a weights name of {model_name} (known: DEFAULT, {names}) nor a file") from None
    filename = Path(weights.url).name
    candidates = ([Path(os.environ[WEIGHTS_ENV]) / filename] if os.environ.get(WEIGHTS_ENV) else []) + [_hub_file(filename)]
    for candidate in candidates:
        if candidate.is_file():
            return ResolvedWeights(weights.name, candidate, file_sha256(candidate)[:16])
    try:
        if os.environ.get(OFFLINE_ENV):
            raise ConnectionError(f"${OFFLINE_ENV} is set")
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 — any network failure gets the same how-to line
        raise CbirError(f"{model_name} weights {filename} not found and download failed ({type(e).__name__}); "
                        f"put the file in ${WEIGHTS_ENV} or {_hub_file(filename).parent}, or pass its path with --weights "
                        f"(--detector-weights in `cbir run`); --weights none: random init for plumbing tests") from None
    return ResolvedWeights(weights.name, _hub_file(filename), file_sha256(_hub_file(filename))[:16])


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CbirError(f"{path}: not a loadable state_dict ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CbirError(f"{path}: expected a dict of tensors (a state_dict)")
    return sd


def load_partial(model: nn.Module, sd: dict, source: Path, head_prefixes: tuple[str, ...] = ()) -> None:
    """Load a checkpoint that may lack the classifier head; any other missing or unexpected key is an error."""
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefixes)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise CbirError(f"{source}: does not fit {type(model).__name__}: {len(missing)} missing key(s) "
                        f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def weights_enum(name: str):
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


# ---------------------------------------------------------------- detector

@dataclass(frozen=True)
class DetectorSpec:
    name: str = "fasterrcnn_resnet50_fpn"
    weights: str = "DEFAULT"


def build_detector(spec: DetectorSpec, **transform_kwargs) -> tuple[nn.Module, ResolvedWeights, list[str]]:
    """A torchvision detector in eval mode, its weights and its category names (weights.meta)."""
    if spec.name not in DETECTORS:
        raise CbirError(f"--detector {spec.name}: unknown; choose from {', '.join(DETECTORS)}")
    enum = weights_enum(spec.name)
    resolved = resolve_weights(spec.name, spec.weights, enum)
    categories = list(enum.DEFAULT.meta["categories"])
    torch.manual_seed(0)
    model = torchvision.models.get_model(spec.name, weights=None, weights_backbone=None,
                                         num_classes=len(categories), **transform_kwargs)
    if resolved.path is not None:
        load_partial(model, load_state_dict(resolved.path), resolved.path)
    return model.eval(), resolved, categories


# ---------------------------------------------------------------- embedding backbones

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the trunk's input: recorded in the fingerprint so mixed vectors are refused."""

    size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class Backbone:
    trunk: nn.Module  # image batch -> feature map [B, C, h, w]
    dim: int
    stride: int  # input pixels per feature-map cell, for RoI pooling
    preprocess: Preprocess
    name: str
    weights: ResolvedWeights

    @property
    def fingerprint(self) -> str:
        p = self.preprocess
        return f"{self.name}|{self.weights.fingerprint}|{p.size}/{p.resize_size}|{p.mean}|{p.std}"


def _torchvision_trunk(model: nn.Module, name: str) -> nn.Module:
    """The convolutional trunk of a torchvision classifier: everything before global pooling."""
    if hasattr(model, "features") and isinstance(model.features, nn.Module):  # mobilenet, efficientnet, convnext, vgg
        return model.features
    if hasattr(model, "fc") and hasattr(model, "avgpool"):  # resnet, resnext, wide_resnet, regnet
        return nn.Sequential(*[m for n, m in model.named_children() if n not in ("avgpool", "fc")])
    raise CbirError(f"--backbone {name}: no convolutional trunk found (supported: resnet/regnet-like and "
                    f"models with .features such as mobilenet, efficientnet, convnext)")


def _probe(trunk: nn.Module, size: int) -> tuple[int, int]:
    with torch.inference_mode():
        fmap = trunk(torch.zeros(1, 3, size, size))
    return fmap.shape[1], max(1, round(size / fmap.shape[-1]))


def _detector_trunk(weights: str, detector: str) -> tuple[nn.Module, ResolvedWeights, Preprocess]:
    """The ResNet-50 body of the run's Faster R-CNN, with the detector's weights (backbone.body.*)."""
    resolved = resolve_weights(detector, weights, weights_enum(detector))
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    if resolved.path is not None:
        prefix = "backbone.body."
        sd = {k[len(prefix):]: v for k, v in load_state_dict(resolved.path).items() if k.startswith(prefix)}
        if not sd:
            raise CbirError(f"{resolved.path}: has no {prefix}* keys; is it a Faster R-CNN ResNet-50 checkpoint?")
        load_partial(resnet, sd, resolved.path, head_prefixes=("fc.",))
    t = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    return _torchvision_trunk(resnet, "resnet50"), resolved, Preprocess(t.crop_size[0], t.resize_size[0], IMAGENET_MEAN, IMAGENET_STD)


def _timm_trunk(name: str, weights: str) -> tuple[nn.Module, ResolvedWeights, Preprocess]:
    try:
        import timm
    except ImportError:
        raise CbirError("--backbone timm:...: timm is not installed (pip install timm)") from None
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise CbirError(f"--backbone timm:{name}: {e}") from None
    if weights.lower() == "none":
        resolved = resolve_weights(f"timm:{name}", "none")
    elif weights == "DEFAULT":
        try:
            model = timm.create_model(name, pretrained=True)
            resolved = ResolvedWeights("DEFAULT", None, f"timm-hub:{model.pretrained_cfg.get('hf_hub_id', name)}")
        except Exception as e:  # noqa: BLE001
            raise CbirError(f"timm:{name} pretrained weights could not be fetched ({type(e).__name__}); "
                            f"pass --weights PATH to a state_dict file") from None
    else:
        resolved = resolve_weights(f"timm:{name}", weights)
        load_partial(model, load_state_dict(resolved.path), resolved.path,
                     head_prefixes=(model.default_cfg.get("classifier", "classifier"),))
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    pre = Preprocess(size, round(size / cfg.get("crop_pct", 0.875)), tuple(cfg["mean"]), tuple(cfg["std"]))
    model.reset_classifier(0, "")
    return _ForwardFeatures(model), resolved, pre


class _ForwardFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def build_backbone(name: str, weights: str = "DEFAULT", detector: str = "fasterrcnn_resnet50_fpn") -> Backbone:
    """'detector' (the run's Faster R-CNN trunk), any torchvision classifier name, or 'timm:<name>'."""
    if name == "detector" or name.startswith("detector:"):
        detector = name.partition(":")[2] or detector
        trunk, resolved, pre = _detector_trunk(weights, detector)
        name = f"detector:{detector}"
    elif name.startswith("timm:"):
        trunk, resolved, pre = _timm_trunk(name[5:], weights)
    else:
        enum = weights_enum(name)
        if enum is None:
            raise CbirError(f"--backbone {name}: not a torchvision model (see torchvision.models.list_models()) "
                            f"nor timm:<name> nor detector")
        resolved = resolve_weights(name, weights, enum)
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        if resolved.path is not None:
            load_partial(model, load_state_dict(resolved.path), resolved.path,
                         head_prefixes=("classifier.", "fc.", "head.", "heads."))
        w = enum[resolved.spec] if resolved.spec in enum.__members__ else enum.DEFAULT
        t = w.transforms()
        pre = Preprocess(t.crop_size[0], t.resize_size[0], tuple(t.mean), tuple(t.std))
        trunk = _torchvision_trunk(model, name)
    trunk = trunk.eval()
    dim, stride = _probe(trunk, pre.size)
    return Backbone(trunk, dim, stride, pre, name, resolved)
