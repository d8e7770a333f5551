"""Memory format and batch size for a trunk, chosen by measuring it on this machine, not by a rule.

Which wins depends on the backbone, the input size, the device and the thread count: on a 2-core CPU
MobileNetV2 ran 2x faster in `channels_last` at batch 4 but lost at batch 32, while large `channels_last`
batches win on a GPU. So the first time a (backbone, size, device, threads, torch) combination is used,
every candidate is timed on random input for a fraction of a second; the winner is cached in
``$CBIR_CACHE_DIR`` (default ``~/.cache/cbir``) as ``tuning.json`` and reused by `embed`, queries and the
page. The result never changes a vector beyond float rounding, so it is not part of any fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
BATCHES = {"cpu": (1, 2, 4, 8, 16, 32), "cuda": (16, 32, 64, 128, 256)}
SECONDS_PER_CANDIDATE = 0.6


@dataclass(frozen=True)
class Tuning:
    memory_format: str
    batch: int
    rates: dict  # "format/batch" → images/s, as measured

    @property
    def torch_format(self) -> torch.memory_format:
        return FORMATS[self.memory_format]


def cache_file() -> Path:
    return Path(os.environ.get("CBIR_CACHE_DIR", Path.home() / ".cache" / "cbir")) / "tuning.json"


def _key(name: str, size: int, device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return f"{name}|{size}px|{device.type}:{where}|{torch.get_num_threads()} threads|torch {torch.__version__}"


def images_per_second(trunk: torch.nn.Module, device: torch.device, size: int, batch: int, fmt,
                      rounds: int = 3) -> float:
    """Images/s, the best of a few short rounds (a busy machine slows some rounds, never speeds one up)."""
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    model = trunk.to(memory_format=fmt)
    best = 0.0
    with torch.inference_mode():
        model(x)  # warm-up: kernels, caches, cudnn choices
        for _ in range(rounds):
            _sync(device)
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < SECONDS_PER_CANDIDATE / rounds or done < 2:
                model(x)
                done += 1
            _sync(device)
            best = max(best, batch * done / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tune(trunk: torch.nn.Module, name: str, size: int, device: torch.device) -> Tuning:
    """The fastest (memory format, batch) for this trunk here, measured once and cached."""
    key, path = _key(name, size, device), cache_file()
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if key in cached:
        return Tuning(**cached[key])
    log.info("timing %s at %d px on %s (memory format x batch size, once; cached in %s)", name, size, device, path)
    rates = {f"{f}/{b}": round(images_per_second(trunk, device, size, b, FORMATS[f]), 1)
             for f in FORMATS for b in BATCHES.get(device.type, BATCHES["cpu"])}
    best = max(rates, key=rates.get)
    fmt, batch = best.split("/")
    tuning = Tuning(fmt, int(batch), rates)
    log.info("%s: %s at batch %s (%.0f img/s)", name, fmt, batch, rates[best])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached[key] = tuning.__dict__
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only home is no reason to fail: measure again next time
        log.warning("could not cache the tuning in %s (%s)", path, e.strerror)
    return tuning
