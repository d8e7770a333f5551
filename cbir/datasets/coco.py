"""COCO-format datasets (instances JSON + an image folder, optional captions JSON): the reader and its splits.

Every record is checked once, here: a malformed image, category or annotation is a one-line problem naming
its index and id (prepare stops on the first unless --skip-bad, which drops and lists them). Crowd regions
(`iscrowd: 1`) are not objects to crop and are left out, counted; images without any object are kept.
The image-level label (`class_id`) is the category of the image's largest object, so CUB-style
leave-one-out scoring still runs; multi-object scoring (`cbir evaluate-objects`) uses the whole object set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from .. import CbirError
from ..artifacts import read_json
from .base import Tables, finite_number, relative_image_path

NO_OBJECTS = (0, "(no objects)")
SPLIT_HELP = "random:F[:SEED] (a share F of images to train, by a hash of the image id) or coco_split " \
             "(the images' coco_split field: train2017 → train, val2017 → test)"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _image_problem(im) -> str | None:
    if not isinstance(im, dict):
        return f"is a {type(im).__name__}, not an object"
    if not _is_int(im.get("id")):
        return f"id {im.get('id')!r} is not an integer"
    if not isinstance(im.get("file_name"), str) or not im["file_name"]:
        return "file_name missing or not a string"
    try:
        relative_image_path(im["file_name"])
    except ValueError as e:
        return f"file_name {e}"
    if not all(_is_int(im.get(k)) and im[k] > 0 for k in ("width", "height")):
        return f"width/height {im.get('width')!r}x{im.get('height')!r} are not positive integers"
    return None


def _annotation_problem(a, images: set[int], categories: set[int]) -> str | None:
    if not isinstance(a, dict):
        return f"is a {type(a).__name__}, not an object"
    if not _is_int(a.get("id")):
        return f"id {a.get('id')!r} is not an integer"
    if a.get("image_id") not in images:
        return f"image_id {a.get('image_id')!r} is not in images"
    if a.get("category_id") not in categories:
        return f"category_id {a.get('category_id')!r} is not in categories"
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(finite_number(v) for v in box)):
        return f"bbox {str(box)[:60]} is not [x, y, w, h] of finite numbers"
    if box[2] <= 0 or box[3] <= 0:
        return f"bbox {box} has a zero or negative size"
    if a.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd {a.get('iscrowd')!r} is not 0 or 1"
    return None


def read_coco(path: Path) -> tuple[COCO, list[str], int]:
    """The checked instances file as a pycocotools COCO index, the problems found, and the crowd count."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):
        raise CbirError(f"{path}: not COCO instances (expected an object with lists images, annotations, categories)")
    categories = {}
    for i, c in enumerate(data["categories"]):
        if not (isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str)):
            raise CbirError(f"{path}: categories[{i}] is not {{id: int, name: str}}: {str(c)[:80]}")
        if c["id"] in categories:
            raise CbirError(f"{path}: categories[{i}]: duplicate category id {c['id']}")
        categories[c["id"]] = {"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")}
    problems, images = [], {}
    for i, im in enumerate(data["images"]):
        why = _image_problem(im) or (f"duplicate image id {im['id']}" if im["id"] in images else None)
        if why:
            problems.append(f"{path}: images[{i}]: {why}")
        else:
            images[im["id"]] = im
    annotations, seen = [], set()
    for i, a in enumerate(data["annotations"]):
        why = _annotation_problem(a, set(images), set(categories)) or \
            (f"duplicate annotation id {a['id']}" if a["id"] in seen else None)
        if why:
            problems.append(f"{path}: annotations[{i}]: {why}")
        else:
            seen.add(a["id"])
            annotations.append({"iscrowd": 0, **a})  # other tools' files often leave iscrowd out
    if not images:
        raise CbirError(f"{path}: no usable images" + (f" (first problem: {problems[0]})" if problems else ""))
    coco = COCO()
    coco.dataset = {"images": list(images.values()), "annotations": annotations,
                    "categories": list(categories.values())}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, problems, sum(a.get("iscrowd", 0) for a in annotations)


def read_captions(path: Path, images: set[int]) -> tuple[pd.DataFrame, list[str]]:
    """COCO captions → (image_id, caption) rows of known images; other records are problems."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CbirError(f"{path}: not COCO captions (expected an object with a list 'annotations')")
    rows, problems = [], []
    for i, a in enumerate(data["annotations"]):
        if not (isinstance(a, dict) and isinstance(a.get("caption"), str) and a["caption"].strip()):
            problems.append(f"{path}: annotations[{i}]: no caption text")
        elif a.get("image_id") not in images:
            problems.append(f"{path}: annotations[{i}]: image_id {a.get('image_id')!r} is not in the instances file")
        else:
            rows.append((a["image_id"], a["caption"].strip()))
    return pd.DataFrame(rows, columns=["image_id", "caption"]), problems


def hash_share(image_ids: pd.Series, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per image id that depends on nothing else (not on order or subset)."""
    return np.array([int.from_bytes(hashlib.sha1(f"{seed}:{i}".encode()).digest()[:8], "big") / 2 ** 64
                     for i in image_ids])


def assign_split(images: pd.DataFrame, split: str) -> pd.Series:
    m = re.fullmatch(r"random:(0?\.\d+|[01](?:\.\d*)?)(?::(\d+))?", split)
    if m:
        share = float(m.group(1))
        if not 0 < share < 1:
            raise CbirError(f"--split {split}: the train share must lie strictly between 0 and 1")
        out = np.where(hash_share(images.image_id, int(m.group(2) or 0)) < share, "train", "test")
    elif split == "coco_split":
        if "coco_split" not in images or images.coco_split.isna().any():
            raise CbirError("--split coco_split: some images have no coco_split field; use random:F")
        out = images.coco_split.map({"train2017": "train", "val2017": "test"}).fillna("").to_numpy()
    else:
        raise CbirError(f"--split {split}: unknown for COCO; use {SPLIT_HELP}")
    out = pd.Series(out, index=images.index)
    for part in ("train", "test"):
        if not (out == part).any():
            raise CbirError(f"--split {split} leaves {part} empty ({len(images)} images)")
    return out


class CocoReader:
    """COCO instances: many objects and categories per image; crowd regions left out."""

    name = "coco"
    default_split = "random:0.5"

    def __init__(self, instances: Path, images: Path, captions: Path | None = None):
        self.instances, self.images, self.captions = instances, images, captions
        self.root = instances.parent

    def read(self) -> Tables:
        coco, problems, crowd = read_coco(self.instances)
        names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        anns = coco.loadAnns(coco.getAnnIds(iscrowd=False))
        instances = pd.DataFrame([(a["image_id"], a["category_id"], *a["bbox"], a["id"]) for a in anns],
                                 columns=["image_id", "category_id", "x", "y", "w", "h", "annotation_id"])
        instances = instances.sort_values(["image_id", "annotation_id"], ignore_index=True)
        instances["instance"] = instances.groupby("image_id").cumcount()
        instances["category"] = instances.category_id.map(names)
        largest = instances.assign(area=instances.w * instances.h).sort_values(
            ["image_id", "area"], ascending=[True, False], kind="stable").drop_duplicates("image_id")
        dominant = largest.set_index("image_id").category_id
        ims = pd.DataFrame(coco.dataset["images"])
        ims = ims.rename(columns={"id": "image_id", "file_name": "path"}).sort_values("image_id", ignore_index=True)
        ims["class_id"] = ims.image_id.map(dominant).fillna(NO_OBJECTS[0]).astype(int)
        ims["class_name"] = ims.class_id.map(names).fillna(NO_OBJECTS[1])
        keep = ["image_id", "path", "class_id", "class_name"] + (["coco_split"] if "coco_split" in ims else [])
        captions = None
        if self.captions is not None:
            captions, caption_problems = read_captions(self.captions, set(ims.image_id))
            problems += caption_problems
        empty = int((ims.class_id == NO_OBJECTS[0]).sum())
        crowds = pd.DataFrame([(a["image_id"], a["category_id"], *a["bbox"]) for a in
                               coco.loadAnns(coco.getAnnIds(iscrowd=True)) if a.get("iscrowd")],
                              columns=["image_id", "category_id", "x", "y", "w", "h"])
        return Tables(ims[keep], instances.drop(columns="annotation_id"), coco.dataset["categories"], captions,
                      problems, {"crowd_skipped": crowd, "images_without_objects": empty}, crowds)

    def assign_split(self, images: pd.DataFrame, split: str) -> pd.Series:
        return assign_split(images, split)

    def source_files(self) -> list[Path]:
        return [self.instances] + ([self.captions] if self.captions else [])

    def image_dir(self) -> Path:
        return self.images
