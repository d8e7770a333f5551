"""Where a model's parameters come from: torchvision's weights API online, files offline, and a
fingerprint that travels with every vector so a moved or swapped file is caught.

Order for a weights name ('DEFAULT', 'IMAGENET1K_V2'): `$CBIR_WEIGHTS_DIR/<torchvision file name>`,
the torch hub cache, then a download; offline and missing gives one line on how to supply it.
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
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".onnx")


@dataclass(frozen=True)
class ResolvedWeights:
    """`spec` as the user gave it (a weights name, or the file's absolute path); `path` None = random init."""

    spec: str
    path: Path | None
    fingerprint: str

    @property
    def random(self) -> bool:
        return self.path is None


def _hub_file(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def weights_file(path: Path) -> ResolvedWeights:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CbirError(f"--weights {path}: no such file")
    return ResolvedWeights(str(path.absolute()), path.absolute(), file_sha256(path)[:16])


def resolve_weights(model_name: str, spec: str, weights_enum=None, flag: str = "--weights") -> ResolvedWeights:
    """`spec` is 'none', a file path, or a torchvision weights name of `weights_enum`; `flag` is the option
    that gave it (--weights for backbones, --detector-weights for detectors), named in every message."""
    if spec.lower() == "none":
        log.warning("=" * 70 + "\n%s: RANDOM WEIGHTS (%s none) — outputs are meaningless, for plumbing tests only\n"
                    + "=" * 70, model_name, flag)
        return ResolvedWeights("none", None, "random-init-seed0")
    path = Path(spec).expanduser()
    if path.suffix in FILE_SUFFIXES or path.exists() or os.sep in spec:
        return weights_file(path)
    if weights_enum is None:
        raise CbirError(f"{model_name}: no torchvision weights enum; pass {flag} PATH to a state_dict file")
    try:
        weights = weights_enum[spec] if spec != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in weights_enum)
        raise CbirError(f"{flag} {spec}: not a weights name of {model_name} (known: DEFAULT, {names}) nor a file") from None
    filename = Path(weights.url).name
    candidates = ([Path(os.environ[WEIGHTS_ENV]) / filename] if os.environ.get(WEIGHTS_ENV) else []) + [_hub_file(filename)]
    for candidate in candidates:
        if candidate.is_file():
            return ResolvedWeights(weights.name, candidate.absolute(), file_sha256(candidate)[:16])
    try:
        if os.environ.get(OFFLINE_ENV):
            raise ConnectionError(f"${OFFLINE_ENV} is set")
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 — any network failure gets the same how-to line
        raise CbirError(f"{model_name} weights {filename} not found and download failed ({type(e).__name__}); "
                        f"put the file in ${WEIGHTS_ENV} or {_hub_file(filename).parent}, or pass its path with {flag} "
                        f"(or {flag} none: random init, for plumbing tests)") from None
    return ResolvedWeights(weights.name, _hub_file(filename), file_sha256(_hub_file(filename))[:16])


def relocate(spec: str, expected: str, override: str | None = None) -> str:
    """The weights spec to rebuild a recorded model with: `override` (--weights, for a moved file), the
    recorded file, or a file of the same name in $CBIR_WEIGHTS_DIR — whichever holds the recorded
    fingerprint. Weights names and random init are returned as they are (their resolution is checked later)."""
    if override is None and (spec == "none" or not Path(spec).is_absolute()):
        return spec
    candidates = [Path(override).expanduser()] if override else [Path(spec)]
    if not override and os.environ.get(WEIGHTS_ENV):
        candidates.append(Path(os.environ[WEIGHTS_ENV]) / Path(spec).name)
    changed = None
    for candidate in candidates:
        if candidate.is_file():
            got = file_sha256(candidate)[:16]
            if got == expected:
                return str(candidate.absolute())
            changed = changed or (candidate, got)
    if changed:
        raise CbirError(f"weights file {changed[0]} has fingerprint {changed[1]}, not the recorded {expected}: these "
                        f"are other weights than the run's; pass the original file with --weights PATH")
    raise CbirError(f"weights file {spec} (fingerprint {expected}) is not there any more; pass its new place with "
                    f"--weights PATH (or put it in ${WEIGHTS_ENV})")


def check_fingerprint(resolved: ResolvedWeights, expected: str, what: str) -> None:
    if resolved.fingerprint != expected:
        raise CbirError(f"{what} weights {resolved.spec} ({resolved.fingerprint}) differ from the run's ({expected}); "
                        f"supply the same file with --weights")


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
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CbirError(f"{source}: does not fit {type(model).__name__} ({str(e).splitlines()[1].strip()[:150]})") from None
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
