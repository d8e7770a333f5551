"""Changing a saved index: add new photos (detect → embed → add, resumable), remove images, and replay
those edits onto a rebuilt index so a rebuild never drops them silently."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import CbirError
from ..artifacts import fingerprint, finish_shards, run_in_shards, writing
from ..device import resolve_device
from ..images import IMAGE_SUFFIXES, open_photo, photo_files
from ..layout import RunLayout
from ..training.encoders import encoder_from_spec
from .query import Querier
from .saved import SearchIndex, commit_index, load_index

log = logging.getLogger(__name__)

SHARD_PHOTOS = 16
ADDED_COLUMNS = ["image_id", "instance", "x", "y", "w", "h", "source", "score", "category_id", "split", "class_id",
                 "path", "class_name"]


def parse_ids(text: str) -> list[int]:
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text or ""):
        raise CbirError(f"--remove {text!r}: expected comma-separated image ids, e.g. 12,40")
    return [int(t) for t in text.split(",")]


def _save_shard(path: Path, result: tuple[np.ndarray, list[dict], list[str]]) -> None:
    vectors, rows, errors = result
    buffer = io.BytesIO()
    np.savez(buffer, vectors=vectors, meta=np.array(json.dumps({"rows": rows, "errors": errors})))
    path.write_bytes(buffer.getvalue())


def _load_shard(path: Path) -> tuple[np.ndarray, list[dict], list[str]]:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return z["vectors"], meta["rows"], meta["errors"]


def _embed_photos(q: Querier, files: list[Path], progress: tqdm) -> tuple[np.ndarray, list[dict], list[str]]:
    """Boxes and vectors of some photos (one detector and one encoder pass for the readable ones); rows carry
    their photo's path, ids are given at the end."""
    photos, paths, errors = [], [], []
    for path in files:
        try:
            photos.append(open_photo(path))
            paths.append(path)
        except CbirError as e:
            errors.append(str(e))
    boxes = q.boxes(photos) if photos else []
    vectors = q.vectors(photos, boxes) if photos else []
    progress.update(len(files))
    rows = [{"path": str(path), "instance": i, "x": b["bbox"][0], "y": b["bbox"][1], "w": b["bbox"][2],
             "h": b["bbox"][3], "source": b["source"], "score": float(b["score"]),
             "category_id": int(b.get("category_id", 0))} for path, bs in zip(paths, boxes) for i, b in enumerate(bs)]
    return (np.concatenate(vectors) if vectors else np.zeros((0, q.encoder.dim), np.float32)), rows, errors


def add_rows(si: SearchIndex, vectors: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """Add vectors of added photos with the next store ids; returns the ids given."""
    ids = np.arange(si.manifest["next_id"], si.manifest["next_id"] + len(rows), dtype=np.int64)
    new = rows.assign(id=ids, split="added", class_id=-1, class_name="").set_index("id")
    si.store.add(vectors, ids, new)
    si.table = pd.concat([si.table, new[si.table.columns]]) if len(si.table) else new[ADDED_COLUMNS]
    si.added = np.concatenate([si.added, vectors.astype(np.float32)])
    si.manifest["next_id"] = int(ids[-1] + 1) if len(ids) else si.manifest["next_id"]
    return ids


def add_photos(run: Path | RunLayout, name: str, paths: list[Path], use_detector: bool = True,
               weights: str | None = None, detector_weights: str | None = None,
               querier: Querier | None = None) -> tuple[int, list[str], dict[str, int]]:
    """Detect → embed → add new photos to a saved index, in resumable shards; image ids continue after the
    run's, a photo already in the index (same absolute path) is skipped. Returns (instances, errors, the
    image id given to each added photo), so a user can find, filter or --remove them later. A long-lived
    caller (the service) passes its `querier`: its models are used, over the index as committed now."""
    with writing(run) as layout:
        q = querier.reloaded(repair=True) if querier is not None else \
            Querier(layout, name, "run" if use_detector else "none", gpu="off", weights=weights,
                    detector_weights=detector_weights, repair=True)
        si = q.si
        known = set(si.table.path[si.table.split == "added"])
        found = photo_files(paths)
        if not found:
            raise CbirError(f"{', '.join(map(str, paths))}: no photos there (looked for "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))} files); the index is unchanged")
        files = [p for p in found if str(p) not in known]
        if not files:
            return 0, [], {}
        stamp = fingerprint({"index": si.manifest, "photos": [str(p) for p in files]})
        partial = layout.partial(f"index/{name}.add")
        with tqdm(total=len(files), desc=f"add photos to {name}", unit="img") as bar:
            shards = run_in_shards(files, SHARD_PHOTOS, partial, stamp, lambda part: _embed_photos(q, part, bar),
                                   _save_shard, _load_shard, bar)
        vectors = np.concatenate([s[0] for s in shards]) if shards else np.zeros((0, q.encoder.dim), np.float32)
        rows = pd.DataFrame([r for s in shards for r in s[1]], columns=["path", "instance", "x", "y", "w", "h",
                                                                        "source", "score", "category_id"])
        errors = [e for s in shards for e in s[2]]
        if not len(rows) and len(files) == len(found):
            finish_shards(partial)
            why = (f"none of the {len(errors)} photo(s) could be read (first: {errors[0]})" if errors else
                   f"no object was found in the {len(files)} photo(s)")
            raise CbirError(f"index {name}: nothing added: {why}; the index is unchanged")
        if errors:
            log.warning("%d unreadable photo(s) skipped, first: %s", len(errors), errors[0])
        if len(rows):
            first = si.manifest["next_image_id"]
            image_ids = {p: first + i for i, p in enumerate(rows.path.drop_duplicates())}
            rows["image_id"] = rows.path.map(image_ids)
            add_rows(si, vectors, rows)
            si.manifest["next_image_id"] = first + len(image_ids)
            si.manifest["edits"].append({"op": "add", "image_ids": sorted(image_ids.values()),
                                         "instances": len(rows)})
            commit_index(layout, si, si.manifest["upstream"])
        finish_shards(partial)
        return len(rows), errors, image_ids if len(rows) else {}


def remove_images(run: Path | RunLayout, name: str, image_ids: list[int]) -> int:
    """Drop every instance of the given images from a saved index, without a rebuild; ids of the rest stay."""
    with writing(run) as layout:
        si = load_index(layout, name, gpu="off", repair=True)
        unknown = sorted(set(image_ids) - set(si.table.image_id))
        if unknown:
            raise CbirError(f"--remove: image id(s) {unknown[:5]} are not in index {name}")
        drop = si.table.index[si.table.image_id.isin(image_ids)].to_numpy(np.int64)
        removed = si.store.remove(drop)
        added_ids = si.table.index[si.table.split == "added"]
        si.added = si.added[~np.isin(added_ids, drop)]
        si.table = si.table.drop(index=drop)
        si.manifest["edits"].append({"op": "remove", "image_ids": sorted(set(image_ids))})
        commit_index(layout, si, si.manifest["upstream"])
        return removed


def replay_edits(layout: RunLayout, new: SearchIndex, old: SearchIndex) -> None:
    """Carry the old index's --add/--remove edits onto a rebuilt one: removed images are removed again, added
    photos are added again with their image ids and boxes — their stored vectors when the encoder is the
    same, else re-embedded from their files (refused, index unchanged, when a file is gone)."""
    edits = old.manifest.get("edits", [])
    if not edits:
        return
    removed = {i for e in edits if e["op"] == "remove" for i in e["image_ids"]}
    base = new.table.index[new.table.image_id.isin(removed) & (new.table.split != "added")].to_numpy(np.int64)
    if len(base):
        new.store.remove(base)
        new.table = new.table.drop(index=base)
    added = old.table[old.table.split == "added"].sort_index()
    if len(added):
        vectors = old.added if old.manifest["embedding_spec"]["fingerprint"] == \
            new.manifest["embedding_spec"]["fingerprint"] else _reembed(layout, new, added)
        add_rows(new, vectors, added.reset_index(drop=True)[ADDED_COLUMNS[:-4] + ["path"]])
    new.manifest.update(edits=edits, next_image_id=max(new.manifest["next_image_id"], old.manifest["next_image_id"]))
    log.info("index %s: replayed %d edit(s) of the previous version (%d added instance(s), %d image(s) removed)",
             new.name, len(edits), len(added), len(removed))


def _reembed(layout: RunLayout, new: SearchIndex, added: pd.DataFrame) -> np.ndarray:
    """Vectors of the added photos' recorded boxes under the rebuilt index's encoder, in `added` order."""
    missing = sorted({p for p in added.path if not Path(p).is_file()})
    if missing:
        raise CbirError(f"index {new.name}: {len(set(added.path))} photo(s) added with --add must be re-embedded for "
                        f"the new settings, but {missing[0]} is gone; restore it, build under another --name, or "
                        f"remove those images first (`cbir index --remove`)")
    encoder = encoder_from_spec(new.manifest["embedding_spec"], resolve_device("auto"))
    vectors = np.zeros((len(added), encoder.dim), np.float32)
    position = pd.Series(np.arange(len(added)), index=added.index)
    for path, rows in tqdm(added.groupby("path", sort=False), desc="re-embed added photos", unit="img"):
        vectors[position[rows.index].to_numpy()] = encoder.encode(open_photo(Path(path)),
                                                                  rows[["x", "y", "w", "h"]].to_numpy(float))
    return vectors
