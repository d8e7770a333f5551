"""Training checkpoints that survive a kill: written atomically, read back only when they were written
for the same inputs (`stamp`), so a resumed run repeats exactly what an unbroken one does. Shared by
every trainer (embedders, text bridges, the detector)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a kill mid-write leaves the previous epoch's checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, stamp: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError):
        log.warning("%s: unreadable checkpoint; training starts over", path)
        return None
    return state if state.get("stamp") == stamp else None
