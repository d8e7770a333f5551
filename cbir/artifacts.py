"""The run directory: atomic writes, the manifest, and resumable sharded work.

Stages talk only through files here, so every write is temp-file + rename (a killed stage never
leaves a half-written artifact) and every artifact has a manifest entry saying what made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import CbirError, __version__

MANIFEST = "manifest.json"


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def write_table(path: Path, df: pd.DataFrame) -> None:
    """Parquet when pyarrow is present (typed, compact), CSV otherwise; the suffix says which."""
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise CbirError(f"{path}: not found")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise CbirError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CbirError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def versions() -> dict[str, str]:
    """Versions of what shapes the numbers: recorded in every manifest entry."""
    import torch
    import torchvision

    out = {"cbir": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import faiss

        out["faiss"] = faiss.__version__
    except ImportError:
        pass
    return out


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_manifest(run: Path) -> dict:
    path = Path(run) / MANIFEST
    return read_json(path) if path.exists() else {"artifacts": {}}


def record(run: Path, artifact: str, **info) -> dict:
    """Add or replace the manifest entry of `artifact` (a path relative to the run)."""
    manifest = load_manifest(run)
    entry = {"command": " ".join(sys.argv), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "versions": versions(), **info}
    manifest["artifacts"][artifact] = entry
    write_json(Path(run) / MANIFEST, manifest)
    return entry


def entry(run: Path, artifact: str) -> dict:
    """The manifest entry of an artifact a stage depends on, or a one-line error naming the stage to run."""
    found = load_manifest(run)["artifacts"].get(artifact)
    if found is None:
        raise CbirError(f"{Path(run) / artifact}: missing from {MANIFEST}; run the stage that makes it first")
    return found


def require_run(run: Path) -> Path:
    run = Path(run)
    if not (run / "split.csv").exists():
        raise CbirError(f"{run}: not a run directory (no split.csv); create it with `cbir prepare --cub DIR --out {run}`")
    return run


def run_in_shards(items: Sequence, shard_size: int, partial_dir: Path, config: dict,
                  compute: Callable[[Sequence], Any], save: Callable[[Path, Any], None],
                  load: Callable[[Path], Any], progress=None) -> list:
    """Process `items` shard by shard, keeping finished shards on disk so a killed run resumes.

    `config` fingerprints the work: shards left by a run with another config are discarded,
    never mixed in. `compute` reports its own progress; shards found on disk advance `progress` here.
    Returns the per-shard results in order.
    """
    partial_dir = Path(partial_dir)
    stamp = partial_dir / "config.json"
    if partial_dir.exists() and (not stamp.exists() or read_json(stamp) != json.loads(json.dumps(config, default=str))):
        shutil.rmtree(partial_dir)
    partial_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.exists():
        write_json(stamp, config)
    results = []
    for start in range(0, len(items), shard_size):
        shard = partial_dir / f"shard_{start // shard_size:06d}"
        if not shard.exists():
            with atomic_path(shard) as tmp:
                save(tmp, compute(items[start:start + shard_size]))
        elif progress is not None:
            progress.update(len(items[start:start + shard_size]))
        results.append(load(shard))
    return results


def finish_shards(partial_dir: Path) -> None:
    shutil.rmtree(partial_dir, ignore_errors=True)
