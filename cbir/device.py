"""Device choice, shared by every stage that runs a model."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

import torch

from . import CbirError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str) -> str:
    """The spelling of a device (not whether it is here): checked with the flags, before any work."""
    if not DEVICE_PATTERN.fullmatch(device or ""):
        raise CbirError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(device: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'; anything else is a one-line error."""
    check_device(device)
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
    sample, benchmarks/results/embed_bench_cpu_speed.md), so the decode stays in the process there, where
    batches may run side by side (encoders.stage.encoded_batches); with a GPU, or more cores, workers overlap
    decoding with the model (not measured on more than 2 cores)."""
    cores = os.cpu_count() or 1
    if device.type == "cpu" and cores <= 2:
        return 0
    return max(1, min(8, cores - 1))


def batches(loader: Iterable) -> Iterator:
    """A DataLoader's batches; a decoding worker that dies (the OOM killer, a crash in a codec) becomes one
    line saying what to do, not torch's traceback. Sharded stages keep what they finished."""
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise CbirError(f"a decoding worker process died ({str(e).splitlines()[0][:90]}); rerun to resume — "
                        f"finished shards are kept — with --workers 0 if it recurs (out of memory?)") from None
