"""Device choice, shared by every stage that runs a model."""

from __future__ import annotations

import os
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


def decode_workers(device: torch.device) -> int:
    """Decode processes beside a model on `device`. On a 2-core CPU a worker only competes with the model's
    two threads: embedding ran 74.7 img/s decoding inline against 68.6 with one worker (MobileNetV2, CUB
    sample, benchmarks/results/embed_bench_cpu_speed.md), so the decode stays inline there; with a GPU, or
    more cores, workers overlap decoding with the model (not measured on more than 2 cores)."""
    cores = os.cpu_count() or 1
    if device.type == "cpu" and cores <= 2:
        return 0
    return max(1, min(8, cores - 1))
