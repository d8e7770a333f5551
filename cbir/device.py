"""Device choice, shared by every stage that runs a model."""

from __future__ import annotations

import re

import torch

from . import CbirError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(device: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'; anything else is a one-line error."""
    if not DEVICE_PATTERN.fullmatch(device or ""):
        raise CbirError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CbirError(f"--device {device}: CUDA is not available on this machine")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise CbirError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(device)
