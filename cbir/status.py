"""`cbir status`: every artifact of a run as done / stale (and why) / missing / partial / damaged."""

from __future__ import annotations

from pathlib import Path

from . import CbirError
from .artifacts import Artifact, file_sha256
from .layout import RunLayout

EXPECTED = ["dataset", "eda", "detections", "reports/detection", "embeddings/full", "embeddings/gt",
            "embeddings/det", "index/det", "reports/retrieval"]


def artifact_state(layout: RunLayout, name: str) -> tuple[str, str]:
    art = Artifact(layout, name)
    partial = layout.partial(name)
    shards = len(list(partial.glob("shard_*"))) if partial.is_dir() else 0
    resume = f"{shards} shard(s) of unfinished work kept; rerun the command to resume" if shards else ""
    meta = art.meta()
    if meta is None:
        return ("partial", resume) if shards else ("missing", "")
    problem = art.check_files()
    if problem:
        return "damaged", f"{problem}; redo it with --force"
    why = [f"{up} changed since" if Artifact(layout, up).fingerprint not in (None, fp) else
           f"{up} is missing" for up, fp in meta.get("upstream", {}).items()
           if Artifact(layout, up).fingerprint != fp]
    why += _outside_changes(meta)
    detail = _describe(meta)
    if why:
        return "stale", "; ".join(why)
    return ("done", "; ".join(d for d in (detail, "newer work interrupted: " + resume if resume else "") if d))


def _outside_changes(meta: dict) -> list[str]:
    """Changes outside the run that make an artifact stale: the dataset's annotation files; moved weights."""
    inputs, summary, out = meta.get("inputs", {}), meta.get("summary", {}), []
    for name, sha in inputs.get("annotations", {}).items():
        path = Path(inputs["root"]) / name
        if not path.is_file():
            out.append(f"{path} is gone")
        elif file_sha256(path)[:16] != sha:
            out.append(f"{path} changed")
    weights = summary.get("spec", {}).get("weights") or summary.get("weights")
    if weights and Path(weights).is_absolute() and not Path(weights).exists():
        out.append(f"weights file {weights} moved (pass --weights PATH to search/ui/index --add)")
    return out


def _describe(meta: dict) -> str:
    s = meta.get("summary", {})
    bits = {"images": "images", "instances": "instances", "count": "vectors", "rows": "rows"}
    text = ", ".join(f"{s[k]} {label}" for k, label in bits.items() if isinstance(s.get(k), int))
    if s.get("edits"):
        text += f", {len(s['edits'])} --add/--remove edit(s) kept"
    return f"{text} ({meta['created']})" if text else meta["created"]


def run_status(run: Path) -> list[tuple[str, str, str]]:
    """(artifact, state, detail) for the expected artifacts and every other one present."""
    if not Path(run).is_dir():
        raise CbirError(f"{run}: no such run folder (make one with `cbir prepare --out {run}`)")
    layout = RunLayout(run)
    names = list(dict.fromkeys(EXPECTED + layout.artifact_names()))
    partial_root = layout.root / ".partial"
    if partial_root.is_dir():
        names += [p.name.replace("__", "/") for p in sorted(partial_root.iterdir())
                  if p.name.replace("__", "/") not in names]
    return [(name, *artifact_state(layout, name)) for name in names]
