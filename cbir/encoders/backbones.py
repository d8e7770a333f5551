"""Embedding trunks by name: the run's detector body, any torchvision classifier, or timm:<name>.

A trunk maps an image batch to a feature map; its preprocessing comes from the weights' own metadata
and is part of its fingerprint, so vectors of different models or preprocessing never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from .. import CbirError
from ..weights import ResolvedWeights, load_partial, load_state_dict, resolve_weights, weights_enum, weights_file

# ---------------------------------------------------------------- embedding backbones


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
    """The trunk of a Faster R-CNN (`backbone.body.*`): torchvision's ResNet-50 one with the detector's weights,
    or a `cbir train-detector` checkpoint's (`detector` 'trained:TRUNK', `weights` the checkpoint)."""
    trained = detector.startswith("trained:")
    resolved = weights_file(Path(weights)) if trained else resolve_weights(detector, weights, weights_enum(detector))
    arch = detector.partition(":")[2] if trained else "resnet50"
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    if resolved.path is not None:
        from ..detection.frcnn import read_checkpoint

        state = read_checkpoint(resolved.path)["state_dict"] if trained else load_state_dict(resolved.path)
        prefix = "backbone.body."
        sd = {("features." if hasattr(model, "features") else "") + k[len(prefix):]: v
              for k, v in state.items() if k.startswith(prefix)}
        if not sd:
            raise CbirError(f"{resolved.path}: has no {prefix}* keys; is it a Faster R-CNN checkpoint?")
        load_partial(model, sd, resolved.path, head_prefixes=("fc.", "classifier."))
    t = weights_enum(arch).DEFAULT.transforms()
    return _torchvision_trunk(model, arch), resolved, Preprocess(t.crop_size[0], t.resize_size[0], tuple(t.mean),
                                                                 tuple(t.std))


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
