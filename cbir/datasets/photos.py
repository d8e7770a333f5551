"""Any folder of photos as a dataset: the reader behind `cbir prepare --photos DIR` and `cbir sync`.

- **What counts as a photo** is decided by content, not by extension: every regular file under DIR that
  Pillow decodes fully (JPEG, PNG, WebP, GIF's first frame, BMP, TIFF, AVIF; HEIC with the `heic` extra).
  Anything else — not an image, empty, truncated, unreadable, over the pixel cap, gone before it was read, a
  link leading out of DIR or round in a loop — is skipped with its reason (`dataset/skipped.csv`), never
  fatal. Hidden and system entries (`.DS_Store`, `Thumbs.db`, `@eaDir`, any name starting with '.') are not
  the user's photos: left out silently, counted. Links to folders inside DIR are not followed (their
  photos are reached by their own path); links to files inside DIR are, and show up as duplicates.
- **Identity by content.** An image's id comes from the SHA-256 of its bytes (53 bits, so JSON clients that
  hold numbers as doubles keep it exactly): renaming or moving a file keeps its id, two files with the same
  bytes are one image with two paths. SHA-256 because it is the fastest hash in the standard library here
  (1.7 GB/s with the CPU's SHA instructions, faster than BLAKE2b or MD5 on these machines; see
  docs/your-photos.md) and nothing stronger is needed; a first scan is bound by decoding, not hashing.
- **Rescans are cheap.** The scan keeps every file's size, modification time and hash (`dataset/files.parquet`);
  the next scan stats every file and hashes and decodes only those whose size or time changed, in
  resumable shards.
- **Labels are optional**: the first-level folder (`--class-labels folders`, torchvision's ImageFolder
  convention) or a CSV of path,label; without them every photo is gallery and there is nothing to score.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from .. import CbirError
from ..artifacts import read_table, run_in_shards
from ..images import DEFAULT_MAX_PIXELS, PhotoTooLarge, open_photo
from .base import Tables, coco_categories, path_text, text_path
from .coco import assign_split as random_split
from .coco import read_coco

log = logging.getLogger(__name__)

SYSTEM_NAMES = frozenset({"Thumbs.db", "desktop.ini", "@eaDir", "__MACOSX", "$RECYCLE.BIN", "lost+found",
                          "System Volume Information"})
FILE_COLUMNS = ["path", "size", "mtime_ns", "sha256", "width", "height", "mode", "reason"]
CHECK_SHARD = 500  # files hashed and decoded per resumable shard
ID_BITS = 53  # ids stay exact as JSON numbers in every client (doubles hold 53 bits)
FOLDERS = "folders"
GALLERY = "gallery"  # the split of unlabelled photos: all of them in the gallery (stored as 'train')
_checked: dict[tuple[str, int, int, int], dict] = {}  # this process's checks: a sync's report, then its prepare


def walk(root: Path) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, str]], int]:
    """Every regular file under `root` as (path under root, file, size, mtime_ns), sorted; the entries left
    out with a reason (links out of the folder or in a loop, unreadable folders, sockets...); and how many
    hidden or system entries were passed over."""
    real_root = root.resolve()
    files, skipped, hidden = [], [], 0
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            skipped.append((prefix.rstrip("/") or ".", f"unreadable folder ({e.strerror})"))
            continue
        for entry in entries:
            rel = prefix + entry.name
            if entry.name.startswith(".") or entry.name in SYSTEM_NAMES:
                hidden += 1
                continue
            try:
                link = entry.is_symlink()
                if link:
                    target = Path(entry.path).resolve(strict=True)
                    if not target.is_relative_to(real_root):
                        skipped.append((rel, f"a link to {target}, outside the folder"))
                        continue
                info = entry.stat()
            except FileNotFoundError:
                skipped.append((rel, "a broken link" if link else "vanished during the scan"))
                continue
            except (OSError, RuntimeError) as e:  # ELOOP, or pathlib's own loop error
                skipped.append((rel, "a symlink loop" if "loop" in str(e).lower() else f"unreadable ({e})"))
                continue
            if stat.S_ISDIR(info.st_mode):
                if not link:  # a link to a folder inside: its photos are taken by their own path
                    stack.append((entry.path, rel + "/"))
            elif stat.S_ISREG(info.st_mode):
                files.append((rel, entry.path, info.st_size, info.st_mtime_ns))
            else:
                skipped.append((rel, "not a regular file"))
    return sorted(files), sorted(skipped), hidden


def check_file(file: str, size: int, max_pixels: int) -> dict:
    """Hash and fully decode one file: its SHA-256 and upright size, or the reason it is not a usable photo."""
    out = {"sha256": "", "width": 0, "height": 0, "mode": "", "reason": ""}
    try:
        if size == 0:
            return {**out, "reason": "empty file"}
        data = Path(file).read_bytes()
        if not data:
            return {**out, "reason": "empty file"}
        photo = open_photo(io.BytesIO(data), max_pixels)
    except FileNotFoundError:
        return {**out, "reason": "vanished during the scan"}
    except OSError as e:
        return {**out, "reason": f"unreadable ({e.strerror or e})"}
    except PhotoTooLarge as e:
        return {**out, "reason": "too large: " + str(e).split(": ", 1)[-1]}
    except CbirError as e:
        why = str(e).split(": ", 1)[-1]
        return {**out, "reason": "not a photo (no image format recognised)" if "cannot identify" in why else
                f"damaged or truncated ({why.removeprefix('cannot decode image (').removesuffix(')')})"}
    with Image.open(io.BytesIO(data)) as im:
        mode = im.mode  # the file's own (the decode gave RGB)
    return {**out, "sha256": hashlib.sha256(data).hexdigest(), "width": photo.width, "height": photo.height,
            "mode": mode}


def content_ids(hashes: Sequence[str]) -> dict[str, int]:
    """A positive 53-bit image id per distinct hash, from the hash itself; a collision (about 1 in 10^4 for a
    million photos) moves the later hash, in sorted order, to the next free id."""
    ids, used = {}, set()
    for h in sorted(set(hashes)):
        i = max(1, int(h[:16], 16) >> (64 - ID_BITS))
        while i in used:
            i = i % (2 ** ID_BITS - 1) + 1
        used.add(i)
        ids[h] = i
    return ids


def scan(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS, previous: pd.DataFrame | None = None,
         workers: int = 2, partial: Path | None = None) -> tuple[pd.DataFrame, list[tuple[str, str]], int]:
    """Every file under `root` (FILE_COLUMNS): unchanged ones (same size and time as in `previous`) keep their
    hash and check, the others are hashed and decoded — in shards kept under `partial`, so a killed scan
    resumes. Returns the table, the walk's own skips, and the hidden count."""
    found, skipped, hidden = walk(root)
    cache = {} if previous is None else {p: r for p, *r in previous[FILE_COLUMNS].itertuples(index=False)}
    rows, todo = [], []
    for rel, file, size, mtime in found:
        text = path_text(rel)
        old = cache.get(text)
        if old is not None and (old[0], old[1]) == (size, mtime) and _verdict_holds(old, max_pixels):
            rows.append((text, *old))
        elif (file, size, mtime, max_pixels) in _checked:
            rows.append((text, size, mtime, *_checked[file, size, mtime, max_pixels].values()))
        else:
            todo.append((text, file, size, mtime))
    if todo:
        rows += _check_all(todo, max_pixels, workers, partial)
    files = pd.DataFrame(rows, columns=FILE_COLUMNS).sort_values("path", ignore_index=True)
    return files.astype({"size": "int64", "mtime_ns": "int64", "width": "int64", "height": "int64"}), skipped, hidden


def _verdict_holds(old: list, max_pixels: int) -> bool:
    """Whether a cached check (FILE_COLUMNS after the path) still stands under this pixel cap: a photo bigger
    than the new cap, or one refused as too large under an older cap, is checked again."""
    _, _, _, width, height, _, reason = old
    return not reason.startswith("too large") and width * height <= max_pixels


def _check_all(todo: list[tuple[str, str, int, int]], max_pixels: int, workers: int,
               partial: Path | None) -> list[tuple]:
    """Hash and decode the files that changed: threads (hashing and decoding release the GIL), in shards."""
    def compute(part):
        with ThreadPoolExecutor(max(1, workers)) as pool:
            checks = list(pool.map(lambda t: check_file(t[1], t[2], max_pixels), part))
        bar.update(len(part))
        for (_, file, size, mtime), check in zip(part, checks):
            _checked[file, size, mtime, max_pixels] = check
        return [(text, size, mtime, *check.values()) for (text, _, size, mtime), check in zip(part, checks)]

    with tqdm(total=len(todo), desc="hash and check photos", unit="file") as bar:
        if partial is None:
            return [r for start in range(0, len(todo), CHECK_SHARD) for r in compute(todo[start:start + CHECK_SHARD])]
        stamp = hashlib.sha256(json.dumps([t[0:1] + t[2:] for t in todo] + [max_pixels]).encode()).hexdigest()[:16]
        shards = run_in_shards(todo, CHECK_SHARD, partial, stamp, compute,
                               lambda p, rows: p.write_text(json.dumps(rows)),
                               lambda p: [tuple(r) for r in json.loads(p.read_text())], bar)
    return [r for shard in shards for r in shard]


class PhotoFolderReader:
    """A folder of photos, with optional labels (first-level folders or a CSV) and optional known boxes."""

    name = "photos"

    def __init__(self, folder: Path, class_labels: str | None = None, boxes: Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2, previous: Path | None = None,
                 partial: Path | None = None):
        self.folder, self.root = folder, folder
        self.labels_file = None if class_labels in (None, FOLDERS) else Path(class_labels).expanduser().absolute()
        self.class_labels, self.boxes = class_labels, boxes
        self.max_pixels, self.workers, self.previous, self.partial = max_pixels, workers, previous, partial

    @property
    def default_split(self) -> str:
        return "random:0.5" if self.class_labels else GALLERY

    def scan(self) -> tuple[pd.DataFrame, list[tuple[str, str]], int]:
        if not self.folder.is_dir():
            raise CbirError(f"{self.folder}: no such folder")
        previous = read_table(self.previous) if self.previous is not None and self.previous.is_file() else None
        files, skipped, hidden = scan(self.folder, self.max_pixels, previous, self.workers, self.partial)
        if files.empty and not skipped:
            raise CbirError(f"{self.folder}: empty folder (no files" + (f", {hidden} hidden" if hidden else "") + ")")
        return files, skipped, hidden

    def read(self) -> Tables:
        files, walk_skips, hidden = self.scan()
        photos = files[files.reason == ""].copy()
        if photos.empty:
            first = files.iloc[0] if len(files) else None
            raise CbirError(f"{self.folder}: no photos among {len(files)} file(s)" +
                            (f" (first: {first.path}: {first.reason})" if first is not None else ""))
        photos["image_id"] = photos.sha256.map(content_ids(photos.sha256))
        skipped = [(p, r) for p, r in files.loc[files.reason != "", ["path", "reason"]].itertuples(index=False)]
        skipped += [(path_text(p), r) for p, r in walk_skips]
        photos, label_skips = self._labelled(photos)
        skipped += label_skips
        first = photos.sort_values("path").drop_duplicates("image_id")  # an image's path: the first of its copies
        duplicates = photos[~photos.index.isin(first.index)].merge(first[["image_id", "path"]], on="image_id",
                                                                     suffixes=("", "_first"))
        images = first[["image_id", "path", "class_id", "class_name", "width", "height", "mode"]]
        instances, categories, problems, counts = self._boxes(photos)
        counts.update(hidden_or_system=hidden, duplicates=len(duplicates), labelled=bool(self.class_labels),
                      content_ids=True, skipped=len(skipped))
        return Tables(images.reset_index(drop=True), instances, categories, problems=problems, counts=counts,
                      files=files, skipped=pd.DataFrame(sorted(skipped), columns=["path", "reason"]),
                      duplicates=duplicates[["image_id", "path", "path_first"]].rename(columns={"path_first": "same_as"}))

    def _labelled(self, photos: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """Photos with class_id/class_name (1.. by sorted label; 0 and '' without labels) and the photos
        left out for having none."""
        if not self.class_labels:
            return photos.assign(class_id=0, class_name=""), []
        if self.class_labels == FOLDERS:
            parts = photos.path.map(lambda t: text_path(t).split("/", 1))
            label = parts.map(lambda p: path_text(p[0]) if len(p) > 1 else None)
            why = "not inside a class folder (--class-labels folders)"
        else:
            table = read_table(self.labels_file)
            if not {"path", "label"} <= set(table.columns):
                raise CbirError(f"{self.labels_file}: expected columns path,label (found {', '.join(table.columns)})")
            table = table.dropna(subset=["path", "label"]).astype(str)
            label = photos.path.map(table.drop_duplicates("path", keep="last").set_index("path").label)
            unknown = len(set(table.path) - set(photos.path))
            if unknown:
                log.warning("%s: %d path(s) name no photo of %s; ignored", self.labels_file, unknown, self.folder)
            why = f"no label in {self.labels_file.name}"
        skips = [(p, why) for p in photos.path[label.isna()]]
        photos = photos[label.notna()].assign(class_name=label[label.notna()])
        names = sorted(photos.class_name.unique())
        return photos.assign(class_id=photos.class_name.map({n: i for i, n in enumerate(names, 1)})), skips

    def _boxes(self, photos: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], list[str], dict]:
        """Known boxes from a COCO instances file whose file_name entries are paths under the folder (any copy
        of an image names it); without one, no boxes and COCO's categories (the detectors' own ids)."""
        columns = ["image_id", "instance", "category_id", "category", "x", "y", "w", "h"]
        if self.boxes is None:
            categories = [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(coco_categories())
                          if n not in ("N/A", "__background__")]
            return pd.DataFrame(columns=columns).astype({c: "int64" for c in columns[:3]}), categories, [], {}
        coco, problems, crowd = read_coco(self.boxes)
        ids = photos.set_index("path").image_id
        names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        to_image = {im["id"]: ids.get(im["file_name"]) for im in coco.dataset["images"]}
        rows, outside = [], 0
        for a in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            image = to_image.get(a["image_id"])
            if image is None or pd.isna(image):
                outside += 1
            else:
                rows.append((int(image), a["category_id"], names[a["category_id"]], *a["bbox"]))
        instances = pd.DataFrame(rows, columns=["image_id", "category_id", "category", "x", "y", "w", "h"])
        instances = instances.drop_duplicates().sort_values(["image_id", "y", "x"], ignore_index=True)
        instances["instance"] = instances.groupby("image_id").cumcount()
        if outside:
            log.warning("%s: %d box(es) are for files not among the photos; left out", self.boxes, outside)
        return instances[columns], coco.dataset["categories"], problems, {"crowd_skipped": crowd,
                                                                          "boxes_for_missing_photos": outside}

    def assign_split(self, images: pd.DataFrame, split: str) -> pd.Series:
        if split == GALLERY:
            return pd.Series("train", index=images.index)
        if not self.class_labels:
            raise CbirError(f"--split {split}: the photos have no labels (give --class-labels folders or FILE.csv), "
                            f"so nothing can be held out to score; without labels every photo is gallery")
        return random_split(images, split)

    def source_files(self) -> list[Path]:
        return [p for p in (self.labels_file, self.boxes) if p is not None]

    def image_dir(self) -> Path:
        return self.folder


def changes(old_images: pd.DataFrame | None, old_duplicates: pd.DataFrame | None, tables: Tables) -> dict:
    """What a rescan found against the previous scan, by content: added, changed (same path, new bytes), moved
    (same bytes, other path), removed; and how many files are skipped or duplicates now."""
    def paths(images, duplicates):
        both = pd.concat([images[["image_id", "path"]], duplicates[["image_id", "path"]]]) if duplicates is not None \
            else images[["image_id", "path"]]
        return both.set_index("path").image_id

    new = paths(tables.images, tables.duplicates)
    old = paths(old_images, old_duplicates) if old_images is not None else pd.Series(dtype="int64")
    common = new.index.intersection(old.index)
    changed = common[new[common].to_numpy() != old[common].to_numpy()]
    new_ids, old_ids = set(new), set(old)
    at_changed = set(new[changed]) | set(old[changed])
    # moved: an image on both sides whose set of paths differs (one merge, no loop over images)
    pairs = pd.merge(new.reset_index(), old.reset_index(), on=["path", "image_id"], how="outer", indicator=True)
    moved = set(pairs.image_id[pairs._merge != "both"]) & new_ids & old_ids
    return {"added": len(new_ids - old_ids - at_changed), "changed": len(changed),
            "moved": len(moved), "removed": len(old_ids - new_ids - at_changed),
            "unchanged": len(new_ids & old_ids) - len(moved), "skipped": len(tables.skipped),
            "duplicates": len(tables.duplicates)}


def describe(found: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in found.items())
