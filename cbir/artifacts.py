"""Run state you can trust: atomic multi-file artifacts, input fingerprints, one writer per run.

- An artifact is a folder written in `RUN/.staging/`, renamed next to its name and switched in with an
  atomic symlink swap: after a crash anywhere the run holds the old version or the new one, never a mix.
- Its `meta.json` records the fingerprint of its inputs (settings, upstream fingerprints, model); a stage
  is skipped only when that fingerprint matches, otherwise redone with one line saying what changed.
- Every writing command holds `RUN/.lock` (fcntl); a second writer fails at once naming the holder.
- `manifest.json` is rebuilt from the artifacts' own meta files under that lock, so it never loses entries.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import CbirError, __version__
from .layout import META, RunLayout

log = logging.getLogger(__name__)

TOKEN_HEX = 10  # hex digits of a version token: `embeddings/.det@<token>`


# ---------------------------------------------------------------- single files

@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (Path, tuple)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def finite(obj: Any) -> Any:
    """`obj` with every NaN or infinite number as None (JSON's null), numpy scalars and arrays as Python's:
    strict JSON readers (browsers, Go, jq, `json.loads` with `parse_constant`) refuse NaN and Infinity. A
    null in a report means "not computed for that row", and the report's text says why."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [finite(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def to_json(obj: Any, indent: int | None = 1) -> str:
    """Strict JSON (no NaN or Infinity) of what the tool writes or prints."""
    return json.dumps(finite(obj), indent=indent, default=_json_default, allow_nan=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(to_json(obj))


BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32", codecs.BOM_UTF16_LE: "UTF-16",
        codecs.BOM_UTF16_BE: "UTF-16"}  # UTF-32 first: its little-endian mark starts with UTF-16's


def read_text(path: Path) -> str:
    """A text file people may have saved in an editor: UTF-8, with or without the byte-order mark that
    Windows tools put first; any other encoding is one line naming the file and what was found."""
    data = Path(path).read_bytes()
    found = next((name for bom, name in BOMS.items() if data.startswith(bom)), None)
    try:
        if found is None:
            return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        found = f"a byte that is not UTF-8 (0x{data[e.start]:02x} at byte {e.start}; Latin-1 or Windows-1252?)"
    raise CbirError(f"{path}: not UTF-8 text: {found}; save it as UTF-8")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise CbirError(f"{path}: not found")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CbirError(f"{path}: not valid JSON ({e})") from None


def read_table(path: Path) -> pd.DataFrame:
    if not Path(path).exists():
        raise CbirError(f"{path}: not found")
    try:
        return pd.read_parquet(path) if Path(path).suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 — a truncated or foreign file gets one line
        raise CbirError(f"{path}: unreadable table ({type(e).__name__}); rerun the stage that makes it "
                        f"with --force") from None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A short, stable hash of JSON-able inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of what shapes the numbers: recorded in every artifact."""
    import faiss
    import torch
    import torchvision

    return {"cbir": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "faiss": faiss.__version__}


def command_line() -> str:
    return " ".join(["cbir", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("cbir", "cli.py", "__main__.py") \
        else " ".join(sys.argv)


FAULT_ADVICE = {errno.ENOSPC: "no space left on the device; free some and rerun",
                errno.EDQUOT: "disk quota exceeded; free some space and rerun",
                errno.EROFS: "read-only file system; copy the run somewhere writable (cp -a) and rerun there",
                errno.EACCES: "permission denied; fix the folder's permissions or copy the run (cp -a) and rerun",
                errno.EPERM: "operation not permitted; fix the folder's permissions or copy the run and rerun"}


def machine_fault(e: OSError, run: Path | None) -> str:
    """One line for a fault of the machine while a stage works: what, where, what to do. Stages write into
    staging and switch in whole versions, so what was finished before is still there."""
    where = e.filename or run or "the run"
    advice = FAULT_ADVICE.get(e.errno, f"{e.strerror or e}; rerun when it is fixed")
    return f"{where}: {advice} (finished work is kept; nothing half-written was switched in)"


# ---------------------------------------------------------------- one writer per run

class RunBusy(CbirError):
    """Another process holds the run's writer lock (the service answers 409: try again later)."""


_held: dict[Path, tuple[int, int]] = {}  # lock path -> (fd, depth): stages nest inside `cbir run`


@contextmanager
def run_lock(layout: RunLayout) -> Iterator[None]:
    """Exclusive, re-entrant (within a process) writer lock; a second writer fails at once."""
    path = layout.lock
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield
        finally:
            _held[path] = (fd, _held[path][1] - 1)
        return
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CbirError(f"{layout.root}: cannot write here ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace")
        os.close(fd)
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']}, `{h['command']}` since {h['since']}"
        except (ValueError, KeyError):
            who = "another process"
        raise RunBusy(f"{layout.root} is busy: {who}; wait for it or use another run directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": command_line(),
                             "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
    _held[path] = (fd, 1)
    try:
        yield
    finally:
        del _held[path]
        os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock


def holds_lock(layout: RunLayout) -> bool:
    return layout.lock in _held


# ---------------------------------------------------------------- artifacts

@dataclass
class Artifact:
    """One committed artifact of a run: a folder with data files and its `meta.json`."""

    layout: RunLayout
    name: str

    @property
    def link(self) -> Path:
        return self.layout.path(self.name)

    def exists(self) -> bool:
        return (self.link / META).is_file()

    def meta(self) -> dict | None:
        path = self.link / META
        return read_json(path) if path.is_file() else None

    @property
    def fingerprint(self) -> str | None:
        meta = self.meta()
        return meta["fingerprint"] if meta else None

    def folder(self, hint: str = "") -> Path:
        """The committed version's folder, resolved once, so every file read comes from one version."""
        if not self.exists():
            raise CbirError(f"{self.link}: not found{'; ' + hint if hint else ''}")
        return self.link.resolve()

    def check_files(self, folder: Path | None = None) -> str | None:
        """None when every recorded file is there with its recorded size, else what is wrong."""
        folder = folder or self.folder()
        meta = read_json(folder / META)
        for name, size in meta.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None

    def open(self, hint: str = "") -> tuple[Path, dict]:
        """(folder, meta) of a verified version: a damaged artifact gets one line saying how to redo it."""
        folder = self.folder(hint)
        problem = self.check_files(folder)
        if problem:
            raise CbirError(f"{self.link}: damaged ({problem}); redo it with --force")
        return folder, read_json(folder / META)


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two input records ('score 0.3 → 0.5')."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "—"), new.get(key, "—")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_short(a)} → {_short(b)}")
    return out


def _short(v) -> str:
    text = json.dumps(v, default=_json_default) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def is_fresh(artifact: Artifact, inputs: dict, force: bool = False) -> bool:
    """True when the artifact was made from exactly these inputs (and is intact); logs why not."""
    meta = artifact.meta()
    if meta is None:
        return False
    if force:
        log.info("%s: --force, redoing", artifact.name)
        return False
    problem = artifact.check_files()
    if problem:
        log.info("%s: damaged (%s); redoing", artifact.name, problem)
        return False
    if meta["fingerprint"] == fingerprint(inputs):
        log.info("%s: up to date (same inputs); skipped", artifact.name)
        return True
    log.info("%s: inputs changed (%s); redoing", artifact.name,
             "; ".join(changes(meta.get("inputs", {}), json.loads(json.dumps(inputs, default=_json_default))))
             or "fingerprint")
    return False


@dataclass
class Staged:
    """A new artifact version being written: data files go in `folder`, a summary into `summary`."""

    folder: Path
    summary: dict = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.folder / name

    def write_json(self, name: str, obj: Any) -> None:
        self.file(name).write_text(to_json(obj))

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        df.to_parquet(self.file(name), index=False) if name.endswith(".parquet") else df.to_csv(self.file(name), index=False)

    def write_npy(self, name: str, array: np.ndarray) -> None:
        with open(self.file(name), "wb") as f:
            np.save(f, array)

    def copy_from(self, folder: Path, names: Sequence[str]) -> None:
        """Carry files over from the previous version (hard links when possible: no copy, no sharing of writes)."""
        for name in names:
            try:
                os.link(folder / name, self.file(name))
            except OSError:
                shutil.copy2(folder / name, self.file(name))


@contextmanager
def commit(artifact: Artifact, inputs: dict, upstream: dict[str, str] | None = None) -> Iterator[Staged]:
    """Write a new version of `artifact` and switch it in atomically; the lock must be held."""
    layout = artifact.layout
    if not holds_lock(layout):
        raise RuntimeError(f"commit of {artifact.name} without the run lock")
    token = uuid.uuid4().hex[:TOKEN_HEX]
    staging = layout.staging / f"{artifact.name.replace('/', '__')}@{token}"
    staging.mkdir(parents=True)
    staged = Staged(staging)
    try:
        yield staged
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        meta = {"artifact": artifact.name, "fingerprint": fingerprint(inputs),
                "inputs": json.loads(json.dumps(inputs, default=_json_default)), "upstream": upstream or {},
                "files": files, "summary": staged.summary, "command": command_line(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
        (staging / META).write_text(to_json(meta))
        _switch_in(artifact.link, staging, token)
        refresh_manifest(layout)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _switch_in(link: Path, staging: Path, token: str) -> None:
    """Rename the staged folder beside `link`, point `link` at it (atomic), drop versions before the last."""
    link.parent.mkdir(parents=True, exist_ok=True)
    version = link.parent / f".{link.name}@{token}"
    os.rename(staging, version)
    previous = link.resolve() if link.is_symlink() else None
    if link.exists() and not link.is_symlink():  # a plain folder (e.g. a copy that followed the links)
        shutil.rmtree(link)
    tmp_link = link.parent / f".{link.name}.link-{token}"
    os.symlink(version.name, tmp_link)
    os.replace(tmp_link, link)
    keep = {version.name, previous.name if previous else None}  # a reader may still hold the previous one
    for old in _versions(link):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _versions(link: Path) -> list[Path]:
    """The version folders of this artifact only: `.det@<token>`, never those of `det@multisimilarity`,
    whose names share the prefix."""
    own = re.compile(rf"\.{re.escape(link.name)}@[0-9a-f]{{{TOKEN_HEX}}}")
    return [p for p in link.parent.glob(f".{glob.escape(link.name)}@*") if own.fullmatch(p.name)]


def remove_artifact(artifact: Artifact) -> None:
    """Drop an artifact (e.g. a stage that no longer produces it); the lock must be held."""
    target = artifact.link.resolve() if artifact.link.is_symlink() else None
    artifact.link.unlink(missing_ok=True)
    if target is not None:
        shutil.rmtree(target, ignore_errors=True)
    refresh_manifest(artifact.layout)


def refresh_manifest(layout: RunLayout) -> dict:
    """manifest.json = one entry per committed artifact, built from their own meta files."""
    entries = {}
    for name in layout.artifact_names():
        meta = Artifact(layout, name).meta()
        if meta:
            entries[name] = {k: meta[k] for k in ("fingerprint", "upstream", "summary", "command", "created",
                                                  "versions") if k in meta}
    manifest = {"run": "relative paths: every artifact is a folder named by its key", "artifacts": entries}
    write_json(layout.manifest, manifest)
    return manifest


def clean_leftovers(layout: RunLayout) -> None:
    """Staging folders of a writer that died; only ever called with the lock held."""
    shutil.rmtree(layout.staging, ignore_errors=True)


@contextmanager
def writing(run: Path | RunLayout) -> Iterator[RunLayout]:
    """What every writing stage does first: hold the run's lock, clear a dead writer's staging."""
    layout = run if isinstance(run, RunLayout) else RunLayout(run)
    with run_lock(layout):
        if _held[layout.lock][1] == 1:
            clean_leftovers(layout)
        yield layout


# ---------------------------------------------------------------- resumable sharded work

class Interrupted(CbirError):
    """Ctrl-C during sharded work: says exactly what was kept."""


def run_in_shards(items: Sequence, shard_size: int, partial_dir: Path, stamp: str,
                  compute: Callable[[Sequence], Any], save: Callable[[Path, Any], None],
                  load: Callable[[Path], Any], progress=None, *, engine=None) -> list:
    """Process `items` shard by shard, keeping finished shards on disk so a killed run resumes.

    `stamp` (the stage's input fingerprint) guards the shards: ones left by other inputs are
    discarded, never mixed in. With `engine` (an `engines.EngineConfig`), `compute` is a
    `engines.ShardWork` and the missing shards are computed there, in any order; either way each
    result is saved here, atomically, as it arrives. Returns the per-shard results in order.
    """
    partial_dir = Path(partial_dir)
    stamp_file = partial_dir / "fingerprint"
    if partial_dir.exists() and (not stamp_file.exists() or stamp_file.read_text() != stamp):
        shutil.rmtree(partial_dir)
    partial_dir.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp)

    def shard(number: int) -> Path:
        return partial_dir / f"shard_{number:06d}"

    parts = [(number, items[start:start + shard_size])
             for number, start in enumerate(range(0, len(items), shard_size))]
    done = {number for number, _ in parts if shard(number).exists()}
    missing = [(number, part) for number, part in parts if number not in done]
    if progress is not None:
        progress.update(sum(len(part) for number, part in parts if number in done))
    kept = [len(done)]

    def keep(number: int, result: Any) -> None:
        with atomic_path(shard(number)) as tmp:
            save(tmp, result)
        kept[0] += 1

    try:
        if engine is None:
            for number, part in missing:
                keep(number, compute(part))
        else:
            from .engines import map_shards

            map_shards(engine, compute, missing, keep, progress)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {kept[0]} of {len(parts)} shards are kept in {partial_dir}; run the "
                          f"same command to resume from there") from None
    return [load(shard(number)) for number, _ in parts]


def finish_shards(partial_dir: Path) -> None:
    shutil.rmtree(partial_dir, ignore_errors=True)
