"""Memory format and batch size for a trunk, chosen by measuring it on this machine, not by a rule.

Which wins depends on the backbone, the input size, the device and the thread count: on a 2-core CPU
MobileNetV2 ran 2x faster in `channels_last` at batch 4 but lost at batch 32, while large `channels_last`
batches win on a GPU. So the first time a (backbone, size, device, threads, torch) combination is used,
every candidate is timed on random input for a fraction of a second; the winner is cached in
``$CBIR_CACHE_DIR`` (default ``~/.cache/cbir``) as ``tuning.json`` and reused by `embed`, queries and the
page. On a CPU with several threads the winner is also timed data-parallel (one single-threaded copy of the
trunk per thread, each on its own batch), so an inline stage can choose how to run its batches
(`Tuning.batch_threads`). The result never changes a vector beyond float rounding, so it is not part of any
fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import to_json

log = logging.getLogger(__name__)

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
BATCHES = {"cpu": (1, 2, 4, 8, 16, 32), "cuda": (16, 32, 64, 128, 256)}
SECONDS_PER_CANDIDATE = 0.6


@dataclass(frozen=True)
class Tuning:
    memory_format: str
    batch: int
    rates: dict  # "format/batch" → images/s, as measured
    data_parallel_rate: float | None = None  # CPU: images/s at (format, batch), one single-threaded copy per thread

    @property
    def torch_format(self) -> torch.memory_format:
        return FORMATS[self.memory_format]

    def batch_threads(self) -> int:
        """How many batches an inline stage runs side by side, each on one thread with torch single-threaded: all of
        torch's threads when the trunk runs faster that way (data-parallel) than on all threads at once, else 1.
        The decode does not tip it: either way it is spread over every core (`encoders.stage.encoded_batches`).
        On one 2-core machine MobileNetV2 ran 184 img/s data-parallel against 197 on both threads; on another,
        245 against 327 — there two copies fit the caches worse than one model on both cores."""
        threads = torch.get_num_threads()
        if not self.data_parallel_rate or threads == 1:
            return 1
        return threads if self.data_parallel_rate > self.rates[f"{self.memory_format}/{self.batch}"] else 1


def cache_file() -> Path:
    return Path(os.environ.get("CBIR_CACHE_DIR", Path.home() / ".cache" / "cbir")) / "tuning.json"


def _key(name: str, size: int, device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (f"{name}|{size}px|{device.type}:{where}|{torch.get_num_threads()} threads|torch {torch.__version__}"
            f"|data-parallel")  # entries from before data-parallel timing are measured again


def images_per_second(trunk: torch.nn.Module, device: torch.device, size: int, batch: int, fmt,
                      rounds: int = 3) -> float:
    """Images/s of the trunk (already in memory format `fmt`), the best of a few short rounds (a busy machine
    slows some rounds, never speeds one up)."""
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    best = 0.0
    with torch.inference_mode():
        trunk(x)  # warm-up: kernels, caches, cudnn choices
        for _ in range(rounds):
            _sync(device)
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < SECONDS_PER_CANDIDATE / rounds or done < 2:
                trunk(x)
                done += 1
            _sync(device)
            best = max(best, batch * done / (time.perf_counter() - start))
    return best


def data_parallel_images_per_second(trunk: torch.nn.Module, size: int, batch: int, fmt, threads: int) -> float:
    """CPU images/s with `threads` threads each running the trunk single-threaded at once, summed."""
    def one_copy(_):
        torch.set_num_threads(1)  # torch's thread count is per thread
        return images_per_second(trunk, torch.device("cpu"), size, batch, fmt)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one_copy, range(threads)))


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
    rates = {}
    for f, fmt in FORMATS.items():
        trunk.to(memory_format=fmt)
        for b in BATCHES.get(device.type, BATCHES["cpu"]):
            rates[f"{f}/{b}"] = round(images_per_second(trunk, device, size, b, fmt), 1)
    best = max(rates, key=rates.get)
    f, batch = best.split("/")
    trunk.to(memory_format=FORMATS[f])
    threads = torch.get_num_threads()
    parallel = (round(data_parallel_images_per_second(trunk, size, int(batch), FORMATS[f], threads), 1)
                if device.type == "cpu" and threads > 1 else None)
    tuning = Tuning(f, int(batch), rates, parallel)
    log.info("%s: %s at batch %s (%.0f img/s; data-parallel %s img/s)", name, f, batch, rates[best], parallel)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached[key] = tuning.__dict__
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(to_json(cached))
        tmp.replace(path)
    except OSError as e:  # a read-only home is no reason to fail: measure again next time
        log.warning("could not cache the tuning in %s (%s)", path, e.strerror)
    return tuning
