"""The bad-input corpus: every command × every bad input it applies to, generated at test time from the
shipped mini sample (real CUB photos) and its prepared run.

Each case gives the command line and the culprit: the one word (a file, a flag, a value, a record) that the
single error line must name. The harness checks, for every case: a non-zero exit code, exactly one
`cbir …` line on stderr naming the culprit, no traceback, and that no existing artifact of the run changed.
To add a case, add one `Case` to a list below; `Case.files` writes the bad file it needs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbir.cli import main
from cbir.retrieval.index import IndexConfig, build_index
from conftest import MINI, MINI_SPLIT, MOBILENET

PHOTO = sorted((MINI / "images" / "017.Cardinal").glob("*.jpg"))[0]
NOT_AN_IMAGE = b"this is a text file, not a photo\n"


@dataclass
class Case:
    """One bad input: argv with {run}, {cub}, {coco}, {tmp}, {photo}, {weights} filled in; `culprit` must appear
    in the error line. `files` maps a name under {tmp} to bytes or to a function of the context."""

    id: str
    argv: str
    culprit: str
    files: dict[str, bytes | Callable] = field(default_factory=dict)
    damage: Callable | None = None  # damages a private copy of the run before the command
    patch: Callable | None = None  # (monkeypatch) → a machine fault during the command
    code: int = 2


@dataclass
class Context:
    run: Path
    tmp: Path

    def fill(self, text: str) -> list[str]:
        values = {"run": self.run, "tmp": self.tmp, "photo": PHOTO, "weights": MOBILENET, "cub": self.tmp / "cub",
                  "coco": self.tmp / "coco.json", "images": MINI / "images"}
        return [part.format(**values) for part in text.split()]


# ---------------------------------------------------------------- bad files, made from the real sample

def cub_root(tmp: Path, edit: dict[str, Callable[[list[str]], list[str]]] | None = None) -> Path:
    """A CUB folder: the mini sample's annotation files (edited line by line) beside its real images."""
    root = tmp / "cub"
    root.mkdir(exist_ok=True)
    (root / "images").symlink_to(MINI / "images")
    for f in MINI.glob("*.txt"):
        lines = f.read_text().splitlines()
        text = "\n".join((edit or {}).get(f.name, lambda x: x)(lines)) + "\n"
        (root / f.name).write_bytes(text.encode("utf-8", "surrogateescape"))  # \udcXX: a raw non-UTF-8 byte
    return root


def replace_line(number: int, text: str):
    return lambda lines: [text if i == number else line for i, line in enumerate(lines, 1)]


def cub(**edits) -> Callable:
    """An edit per annotation file: cub(bounding_boxes=replace_line(1, '1 nan 0 10 10'))."""
    return lambda ctx: cub_root(ctx.tmp, {f"{name}.txt": e for name, e in edits.items()})


def coco_json(edit: Callable[[dict], None]) -> Callable:
    """The mini run's own gt_coco.json (valid COCO instances over the real images), edited."""
    def make(ctx):
        data = json.loads((ctx.run / "dataset" / "gt_coco.json").read_text())
        edit(data)
        return json.dumps(data, allow_nan=True).encode()
    return make


def detections(edit: Callable[[list], None]) -> Callable:
    """The mini sample's real YOLOv5n results, edited."""
    def make(ctx):
        data = json.loads((MINI / "external_detections.json").read_text())
        edit(data)
        return json.dumps(data, allow_nan=True).encode()
    return make


def set_key(path: tuple, value) -> Callable:
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


PREPARE = "prepare --cub {cub} --out {run} --split " + MINI_SPLIT + " --workers 1 --no-eda"
PREPARE_COCO = "prepare --coco {coco} --images {images} --out {run} --workers 1 --no-eda"
DETECT = "detect --run {run} --detections {tmp}/dets.json"

ANNOTATIONS = [
    Case("cub-nan-box", PREPARE, "bounding_boxes.txt:1", {"cub": cub(bounding_boxes=replace_line(1, "1 nan 27 325 304"))}),
    Case("cub-inf-box", PREPARE, "bounding_boxes.txt:2", {"cub": cub(bounding_boxes=replace_line(2, "2 inf 30 153 264"))}),
    Case("cub-negative-width", PREPARE, "bounding_boxes.txt:1", {"cub": cub(bounding_boxes=replace_line(1, "1 60 27 -5 304"))}),
    Case("cub-zero-height", PREPARE, "bounding_boxes.txt:3", {"cub": cub(bounding_boxes=replace_line(3, "3 14 112 388 0"))}),
    Case("cub-word-for-number", PREPARE, "bounding_boxes.txt:1", {"cub": cub(bounding_boxes=replace_line(1, "1 sixty 27 325 304"))}),
    Case("cub-short-line", PREPARE, "image_class_labels.txt:2", {"cub": cub(image_class_labels=replace_line(2, "2"))}),
    Case("cub-duplicate-image-id", PREPARE, "images.txt", {"cub": cub(images=lambda l: l + [l[0]])}),
    Case("cub-unknown-id-in-boxes", PREPARE, "bounding_boxes.txt", {"cub": cub(bounding_boxes=replace_line(1, "9999 60 27 325 304"))}),
    Case("cub-missing-label", PREPARE, "image_class_labels.txt", {"cub": cub(image_class_labels=lambda l: l[:-1])}),
    Case("cub-unknown-class", PREPARE, "classes.txt", {"cub": cub(image_class_labels=replace_line(1, "1 999"))}),
    Case("cub-bad-training-flag", PREPARE.replace(MINI_SPLIT, "official"), "train_test_split.txt:1",
         {"cub": cub(train_test_split=replace_line(1, "1 7"))}),
    Case("cub-empty-images-file", PREPARE, "images.txt", {"cub": cub(images=lambda l: [])}),
    Case("cub-not-utf8", PREPARE, "classes.txt", {"cub": cub(classes=lambda l: l[:-1] + ["200 caf\udce9"])}),
    Case("cub-utf16", PREPARE, "images.txt: not UTF-8 text: UTF-16", {"cub": lambda ctx: (cub_root(ctx.tmp) / "images.txt")
         .write_text((MINI / "images.txt").read_text(), encoding="utf-16")}),
    Case("cub-latin1", PREPARE, "classes.txt: not UTF-8 text: a byte", {"cub": lambda ctx: (cub_root(ctx.tmp) / "classes.txt")
         .write_bytes((MINI / "classes.txt").read_bytes() + "201 Caf\u00e9\n".encode("latin-1"))}),
    Case("cub-path-escapes-root", PREPARE, "images.txt:1", {"cub": cub(images=replace_line(1, "1 ../../../etc/passwd"))}),
    Case("cub-missing-image", PREPARE, "Nope.jpg", {"cub": cub(images=replace_line(1, "1 001.Black_footed_Albatross/Nope.jpg"))}),
    Case("cub-images-folder-missing", PREPARE, "images", {"cub": lambda ctx: (cub_root(ctx.tmp) / "images").unlink()}),
    Case("cub-root-missing", "prepare --cub {tmp}/nowhere --out {run} --no-eda", "nowhere"),
    Case("cub-root-is-a-file", "prepare --cub {tmp}/file.txt --out {run} --no-eda", "file.txt", {"file.txt": b"x"}),
    Case("split-overlap", PREPARE.replace(MINI_SPLIT, "classes:1-10/5-20"), "classes:1-10/5-20", {"cub": cub()}),
    Case("split-unknown", PREPARE.replace(MINI_SPLIT, "bogus"), "bogus", {"cub": cub()}),
    Case("split-empty-side", PREPARE.replace(MINI_SPLIT, "classes:1-10/300-400"), "classes:1-10/300-400", {"cub": cub()}),
    Case("max-pixels-zero", PREPARE + " --max-pixels 0", "--max-pixels", {"cub": cub()}),
    Case("photo-over-max-pixels", PREPARE + " --max-pixels 1000", ".jpg", {"cub": cub()}),
    Case("coco-not-json", PREPARE_COCO, "coco.json", {"coco.json": b"{not json"}),
    Case("coco-empty-file", PREPARE_COCO, "coco.json", {"coco.json": b""}),
    Case("coco-not-utf8", PREPARE_COCO, "coco.json", {"coco.json": b'{"images": "\xff\xfe"}'}),
    Case("coco-list-not-object", PREPARE_COCO, "coco.json", {"coco.json": b"[]"}),
    Case("coco-images-a-dict", PREPARE_COCO, "coco.json", {"coco.json": coco_json(set_key(("images",), {}))}),
    Case("coco-duplicate-image-id", PREPARE_COCO, "images[1]", {"coco.json": coco_json(set_key(("images", 1, "id"), 1))}),
    Case("coco-image-id-float", PREPARE_COCO, "images[0]", {"coco.json": coco_json(set_key(("images", 0, "id"), 1.5))}),
    Case("coco-width-a-string", PREPARE_COCO, "images[2]", {"coco.json": coco_json(set_key(("images", 2, "width"), "640"))}),
    Case("coco-no-file-name", PREPARE_COCO, "images[0]", {"coco.json": coco_json(lambda d: d["images"][0].pop("file_name"))}),
    Case("coco-file-name-escapes", PREPARE_COCO, "images[0]", {"coco.json": coco_json(set_key(("images", 0, "file_name"), "../../../etc/passwd"))}),
    Case("coco-unknown-image-id", PREPARE_COCO, "annotations[0]", {"coco.json": coco_json(set_key(("annotations", 0, "image_id"), 4242))}),
    Case("coco-unknown-category", PREPARE_COCO, "annotations[1]", {"coco.json": coco_json(set_key(("annotations", 1, "category_id"), 99))}),
    Case("coco-bbox-string", PREPARE_COCO, "annotations[0]", {"coco.json": coco_json(set_key(("annotations", 0, "bbox"), [1, 2, "3", 4]))}),
    Case("coco-bbox-three-values", PREPARE_COCO, "annotations[0]", {"coco.json": coco_json(set_key(("annotations", 0, "bbox"), [1, 2, 3]))}),
    Case("coco-bbox-nan", PREPARE_COCO, "annotations[3]", {"coco.json": coco_json(set_key(("annotations", 3, "bbox"), [1, 2, math.nan, 4]))}),
    Case("coco-negative-width", PREPARE_COCO, "annotations[0]", {"coco.json": coco_json(set_key(("annotations", 0, "bbox"), [1, 2, -3, 4]))}),
    Case("coco-duplicate-annotation-id", PREPARE_COCO, "annotations[1]", {"coco.json": coco_json(set_key(("annotations", 1, "id"), 1))}),
    Case("coco-category-no-name", PREPARE_COCO, "categories[0]", {"coco.json": coco_json(lambda d: d["categories"][0].pop("name"))}),
    Case("coco-images-folder-missing", PREPARE_COCO.replace("{images}", "{tmp}/noimages"), "noimages",
         {"coco.json": coco_json(lambda d: None)}),
    Case("coco-captions-not-json", PREPARE_COCO + " --captions {tmp}/cap.json", "cap.json",
         {"coco.json": coco_json(lambda d: None), "cap.json": b"nope"}),
    Case("coco-caption-a-number", PREPARE_COCO + " --captions {tmp}/cap.json", "annotations[0]",
         {"coco.json": coco_json(lambda d: None), "cap.json": b'{"annotations": [{"image_id": 1, "caption": 7}]}'}),
    Case("captions-without-coco", PREPARE + " --captions {tmp}/cap.json", "--captions", {"cub": cub(), "cap.json": b"{}"}),
    Case("coco-random-share", PREPARE_COCO + " --split random:1.5", "random:1.5", {"coco.json": coco_json(lambda d: None)}),
]

DETECTIONS = [
    Case("dets-not-json", DETECT, "dets.json", {"dets.json": b"[{"}),
    Case("dets-not-utf8", DETECT, "dets.json", {"dets.json": b"[\xff]"}),
    Case("dets-object-not-list", DETECT, "dets.json", {"dets.json": b'{"image_id": 1}'}),
    Case("dets-score-a-string", DETECT, "entry 0", {"dets.json": detections(set_key((0, "score"), "0.9"))}),
    Case("dets-bbox-a-dict", DETECT, "entry 2", {"dets.json": detections(set_key((2, "bbox"), {"x": 1}))}),
    Case("dets-no-bbox", DETECT, "entry 1", {"dets.json": detections(lambda d: d[1].pop("bbox"))}),
    Case("dets-nan-box", DETECT, "entry 0", {"dets.json": detections(set_key((0, "bbox"), [1, math.nan, 3, 4]))}),
    Case("dets-infinite-score", DETECT, "entry 3", {"dets.json": detections(set_key((3, "score"), math.inf))}),
    Case("dets-negative-width", DETECT, "entry 0", {"dets.json": detections(set_key((0, "bbox"), [10, 10, -5, 20]))}),
    Case("dets-zero-height", DETECT, "entry 4", {"dets.json": detections(set_key((4, "bbox"), [10, 10, 5, 0]))}),
    Case("dets-score-above-one", DETECT, "entry 0", {"dets.json": detections(set_key((0, "score"), 1.7))}),
    Case("dets-all-unknown", DETECT, "dets.json", {"dets.json": detections(lambda d: [x.update(image_id=x["image_id"] + 10 ** 6) for x in d])}),
    Case("dets-duplicate-entry", DETECT, "entry 1", {"dets.json": detections(lambda d: d.insert(1, dict(d[0])))}),
    Case("dets-category-a-string", DETECT, "entry 0", {"dets.json": detections(set_key((0, "category_id"), "bird"))}),
    Case("dets-empty-file", DETECT, "dets.json", {"dets.json": b""}),
    Case("dets-file-missing", "detect --run {run} --detections {tmp}/none.json", "none.json"),
    Case("dets-unknown-category-flag", DETECT + " --categories dragon", "dragon", {"dets.json": detections(lambda d: None)}),
]

FLAGS = [
    Case("pca-not-a-number", "index --run {run} --embeddings det --pca abc", "--pca"),
    Case("pca-negative", "index --run {run} --embeddings det --pca -3", "--pca"),
    Case("pca-over-dimension", "index --run {run} --embeddings det --pca 5000 --name big", "5000"),
    Case("whiten-shrink-out-of-range", "index --run {run} --embeddings det --pca 8 --whiten 2", "--whiten '2'"),
    Case("whiten-shrink-not-a-number", "evaluate --run {run} --embeddings det --whiten half", "--whiten 'half'"),
    Case("factory-unknown", "index --run {run} --embeddings det --factory Bogus --name x", "Bogus"),
    Case("factory-untrainable", "index --run {run} --embeddings det --factory IVF4096,Flat --name x", "IVF4096,Flat"),
    Case("gpu-bogus", "index --run {run} --embeddings det --gpu maybe --name x", "--gpu"),
    Case("store-bogus", "index --run {run} --embeddings det --store mongo --name x", "mongo"),
    Case("gallery-unknown-split", "index --run {run} --embeddings det --gallery val --name x", "val"),
    Case("index-embeddings-missing", "index --run {run} --embeddings nosuch", "nosuch"),
    Case("index-name-escapes", "index --run {run} --embeddings det --name ../../x", "../../x"),
    Case("index-name-hidden", "index --run {run} --embeddings det --name .hidden", ".hidden"),
    Case("remove-not-ids", "index --run {run} --name det --remove abc", "abc"),
    Case("remove-unknown-id", "index --run {run} --name det --remove 99999", "99999"),
    Case("add-missing-photo", "index --run {run} --name det --add {tmp}/gone.jpg", "gone.jpg"),
    # combined or empty requests: done whole, or refused in one line, never half done or silently nothing
    Case("add-and-remove-together", "index --run {run} --name det --add {photo} --remove 1", "--remove"),
    Case("add-with-build-settings", "index --run {run} --name det --add {photo} --pca 4", "--pca"),
    Case("add-only-unreadable-photos", "index --run {run} --name det --add {tmp}/a.jpg {tmp}/b.jpg", "nothing added",
         files={"a.jpg": NOT_AN_IMAGE, "b.jpg": b""}),
    Case("add-folder-without-photos", "index --run {run} --name det --add {tmp}/notes", "no photos",
         files={"notes": lambda ctx: (ctx.tmp / "notes").mkdir() or (ctx.tmp / "notes" / "a.txt").write_text("x") and None}),
    Case("search-no-detector-and-detector", "search --run {run} --index det --image {photo} --no-detector --detector none",
         "--no-detector"),
    Case("device-bogus", "embed --run {run} --mode gt --device bogus", "bogus"),
    Case("device-cuda-letter", "embed --run {run} --mode gt --device cuda:x", "cuda:x"),
    Case("device-cuda-absent", "embed --run {run} --mode gt --backbone mobilenet_v2 --weights {weights} --device cuda "
         "--name cuda", "cuda"),
    Case("workers-negative", "embed --run {run} --mode gt --workers -1", "--workers"),
    Case("batch-size-zero", "embed --run {run} --mode gt --batch-size 0", "--batch-size"),
    Case("size-too-small", "embed --run {run} --mode gt --size 8", "--size"),
    Case("crop-margin-nan", "embed --run {run} --mode gt --crop-margin nan", "--crop-margin"),
    Case("embed-name-escapes", "embed --run {run} --mode gt --name ../x", "../x"),
    Case("backbone-unknown", "embed --run {run} --mode gt --backbone bogusnet --name b", "bogusnet"),
    Case("weights-missing-file", "embed --run {run} --mode gt --backbone mobilenet_v2 --weights {tmp}/w.pth --name w",
         "w.pth"),
    Case("weights-not-a-state-dict", "embed --run {run} --mode gt --backbone mobilenet_v2 --weights {tmp}/w.pth "
         "--name w", "w.pth", {"w.pth": NOT_AN_IMAGE}),
    Case("weights-wrong-model", "embed --run {run} --mode gt --backbone resnet18 --weights {weights} --name w",
         "torchvision_mobilenet_v2"),
    Case("score-above-one", DETECT + " --score 2", "--score", {"dets.json": b"[]"}),
    Case("min-size-negative", "detect --run {run} --min-size -5 --detector-weights none --force", "-5"),
    Case("max-per-image-zero", DETECT + " --max-per-image 0", "--max-per-image", {"dets.json": b"[]"}),
    Case("detector-unknown", "detect --run {run} --detector yolo99 --force", "yolo99"),
    Case("detector-onnx-missing", "detect --run {run} --detector onnx:{tmp}/m.onnx --force", "m.onnx"),
    Case("detector-onnx-not-onnx", "detect --run {run} --detector onnx:{tmp}/m.onnx --force", "m.onnx",
         {"m.onnx": NOT_AN_IMAGE}),
    Case("splits-unknown", DETECT + " --splits val", "val", {"dets.json": detections(lambda d: None)}),
    Case("k-zero", "search --run {run} --index det --query-id 1 --k 0", "--k"),
    Case("k-not-a-number", "search --run {run} --index det --query-id 1 --k many", "--k"),
    Case("text-weight-above-one", "search --run {run} --index det --query-id 1 --text red --text-weight 2", "--text-weight"),
    Case("search-index-missing", "search --run {run} --index nosuch --query-id 1", "nosuch"),
    Case("search-unknown-query-id", "search --run {run} --index det --query-id 99999", "99999"),
    Case("search-photo-missing", "search --run {run} --index det --image {tmp}/gone.jpg", "gone.jpg"),
    Case("search-photo-not-an-image", "search --run {run} --index det --image {tmp}/fake.jpg", "fake.jpg",
         {"fake.jpg": NOT_AN_IMAGE}),
    Case("search-photo-empty", "search --run {run} --index det --image {tmp}/empty.jpg", "empty.jpg", {"empty.jpg": b""}),
    Case("search-photo-truncated", "search --run {run} --index det --image {tmp}/cut.jpg", "cut.jpg",
         {"cut.jpg": PHOTO.read_bytes()[:2000]}),
    Case("search-text-without-bridge", "search --run {run} --index det --text red", "det"),
    Case("search-filter-bad", "search --run {run} --index det --query-id 1 --filter split===test", "split===test"),
    Case("search-filter-unknown-field", "search --run {run} --index det --query-id 1 --filter colour==1", "colour"),
    Case("search-category-unknown", "search --run {run} --index det --query-id 1 --category dragon", "dragon"),
    Case("rerank-unknown", "search --run {run} --index det --query-id 1 --rerank magic", "--rerank"),
    Case("evaluate-embeddings-missing", "evaluate --run {run} --embeddings nosuch", "nosuch"),
    Case("evaluate-pca-bad", "evaluate --run {run} --embeddings det --pca abc", "--pca"),
    Case("train-epochs-zero", "train-embedder --run {run} --embeddings det --epochs 0", "--epochs"),
    Case("train-lr-negative", "train-embedder --run {run} --embeddings det --lr -1", "--lr"),
    Case("train-name-escapes", "train-embedder --run {run} --embeddings det --name ../m", "../m"),
    Case("train-text-unknown-encoder", "train-text --run {run} --embeddings det --text bogus", "bogus"),
    Case("evaluate-text-no-bridge", "evaluate-text --run {run}", "train-text"),
    Case("ui-auth-malformed", "ui --run {run} --index det --auth nopassword", "--auth"),
    Case("port-out-of-range", "ui --run {run} --index det --port 99999", "--port"),
    Case("ui-index-missing", "ui --run {run} --index nosuch --port 7999", "nosuch"),
    Case("run-folder-missing", "status --run {tmp}/norun", "norun"),
    Case("run-is-a-file", "embed --run {tmp}/file.txt --mode gt", "file.txt", {"file.txt": b"x"}),
    Case("run-not-prepared", "embed --run {tmp} --mode gt", "dataset"),
]


# ---------------------------------------------------------------- faults of the machine and damaged artifacts

def truncate(relative: str, keep: float = 0.5):
    def damage(run: Path):
        path = (run / relative).resolve()
        data = path.read_bytes()
        path.chmod(0o644)
        path.write_bytes(data[:int(len(data) * keep)])
    return damage


def scramble(relative: str):
    """Same size, garbage bytes: a size check alone does not see it."""
    def damage(run: Path):
        path = (run / relative).resolve()
        size = path.stat().st_size
        path.chmod(0o644)
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return damage


def failing_write(code: int):
    """The disk fills (ENOSPC) or turns read-only (EROFS) / forbidden (EACCES) while a stage writes."""
    def patch(monkeypatch):
        def save(file, *args, **kwargs):
            raise OSError(code, os.strerror(code), getattr(file, "name", None))
        monkeypatch.setattr(np, "save", save)
    return patch


def dying_worker(monkeypatch):
    """A decoding worker process killed (the OOM killer, a segfault in a codec)."""
    monkeypatch.setattr("cbir.encoders.stage.ImageCrops.__getitem__", lambda self, i: os._exit(9))


EMBED_AGAIN = "embed --run {run} --mode gt --backbone mobilenet_v2 --weights {weights} --workers 0 --name again"
MACHINE = [
    Case("disk-full-while-embedding", EMBED_AGAIN, "space", patch=failing_write(errno.ENOSPC)),
    Case("read-only-run", EMBED_AGAIN, "read-only", patch=failing_write(errno.EROFS)),
    Case("permission-denied", EMBED_AGAIN, "ermission", patch=failing_write(errno.EACCES)),
    Case("worker-dies", EMBED_AGAIN.replace("--workers 0", "--workers 1"), "worker", patch=dying_worker),
    Case("vectors-truncated", "search --run {run} --index det --query-id 1", "vectors", damage=truncate("embeddings/det/vectors.npy")),
    Case("vectors-scrambled", "index --run {run} --embeddings det --name fresh", "vectors.npy",
         damage=scramble("embeddings/det/vectors.npy")),
    Case("rows-scrambled", "index --run {run} --embeddings det --name fresh", "rows.parquet",
         damage=scramble("embeddings/det/rows.parquet")),
    Case("faiss-scrambled", "search --run {run} --index det --query-id 1", "index.faiss", damage=scramble("index/det/index.faiss")),
    Case("faiss-truncated", "search --run {run} --index det --query-id 1", "index.faiss", damage=truncate("index/det/index.faiss")),
    Case("spec-not-json", "search --run {run} --index det --query-id 1", "meta.json",
         damage=lambda run: (run / "embeddings/det/meta.json").resolve().write_text("{oops")),
    Case("images-table-scrambled", "index --run {run} --embeddings det --name fresh", "images.parquet",
         damage=scramble("dataset/images.parquet")),
    Case("detections-truncated", "embed --run {run} --mode det --name d2", "detections", damage=truncate("detections/detections.json")),
    Case("detections-scrambled", "embed --run {run} --mode det --name d2", "detections.json",
         damage=scramble("detections/detections.json")),
]

CORPUS = ANNOTATIONS + DETECTIONS + FLAGS + MACHINE


# ---------------------------------------------------------------- the harness

def snapshot(run: Path) -> dict[str, str]:
    """Every file of the run (through its artifact links) with a hash of its bytes, and every link's target."""
    state = {}
    for path in sorted(run.rglob("*")):
        key = str(path.relative_to(run))
        if path.is_symlink():
            state[key] = "-> " + os.readlink(path)
        elif path.is_file() and path.name != ".lock":
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@dataclass
class Outcome:
    code: int | None
    stderr: str
    trace: str = ""
    stdout: str = ""

    @property
    def lines(self) -> list[str]:
        """What stderr says, less progress bars (tqdm's `%|` lines) and log records."""
        return [line for line in self.stderr.splitlines() if line.strip() and "%|" not in line
                and not line.startswith(("INFO ", "WARNING ", "DEBUG "))]


def attempt(argv: list[str]) -> Outcome:
    """Run the CLI in this process (as `cbir ARGV`), capturing stderr; an exception out of main is a traceback."""
    err, out = io.StringIO(), io.StringIO()
    code, trace = None, ""
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 — exactly what the corpus exists to catch
            trace = traceback.format_exc()
    return Outcome(code, err.getvalue(), trace, out.getvalue())


@pytest.fixture(scope="module")
def pristine_run(mini_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("corpus") / "pristine"
    shutil.copytree(mini_run, run, symlinks=True)
    build_index(IndexConfig(run=run, embeddings="det", pca=8, factory="Flat"))
    return run


@pytest.fixture(scope="module")
def corpus_run(pristine_run) -> Path:
    run = pristine_run.parent / "run"
    shutil.copytree(pristine_run, run, symlinks=True)
    return run


def restore(run: Path, pristine: Path) -> None:
    """A case that changed the shared run fails; the next case gets the pristine run back."""
    shutil.rmtree(run)
    shutil.copytree(pristine, run, symlinks=True)


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_input_gets_one_line_and_changes_nothing(case: Case, corpus_run, pristine_run, tmp_path, monkeypatch):
    run = corpus_run
    if case.damage:
        run = tmp_path / "run"
        shutil.copytree(pristine_run, run, symlinks=True)
        case.damage(run)
    ctx = Context(run, tmp_path)
    for name, content in case.files.items():
        made = content(ctx) if callable(content) else content
        if isinstance(made, bytes):
            (tmp_path / name).write_bytes(made)
    argv = ctx.fill(case.argv)
    before = snapshot(run)
    if case.patch:
        case.patch(monkeypatch)
    outcome = attempt(argv)
    monkeypatch.undo()
    after = snapshot(run)
    # an interrupted stage may leave resumable shards in .partial/; anything else new or changed is a fault
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
                     and not (k not in before and k.startswith(".partial/")))
    if changed and run == corpus_run:
        restore(run, pristine_run)
    assert not outcome.trace, f"traceback: {outcome.trace[-1500:]}"
    assert outcome.code not in (0, None), f"silently accepted: exit {outcome.code}; stderr {outcome.stderr[-500:]}"
    assert not changed, f"lost work: {changed[:5]} changed"
    assert outcome.code == case.code, f"exit code {outcome.code}: {outcome.stderr[-500:]}"
    assert len(outcome.lines) == 1, f"not one line: {outcome.stderr[-800:]!r}"
    assert case.culprit.lower() in outcome.lines[0].lower(), f"culprit {case.culprit!r} not named: {outcome.lines[0]}"
    assert "Traceback" not in outcome.stderr


# ---------------------------------------------------------------- unusual but good input: a correct result

def photo(mode: str = "RGB", size=(320, 240), fmt: str = "PNG", exif_orientation: int | None = None) -> Callable:
    """A real CUB photo in another mode, size or orientation."""
    def make(ctx):
        image = Image.open(PHOTO).convert(mode if mode != "I;16" else "L").resize(size)
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image, np.uint16) * 257)
        out = io.BytesIO()
        exif = Image.Exif()
        if exif_orientation:
            exif[0x0112] = exif_orientation
        image.save(out, fmt, **({"exif": exif} if exif_orientation else {}))
        return out.getvalue()
    return make


@dataclass
class Good:
    """Unusual input that must give a correct result: exit 0 and `check(outcome, ctx)` holds."""

    id: str
    argv: str
    check: Callable
    files: dict[str, bytes | Callable] = field(default_factory=dict)


def searched(size: tuple[int, int]):
    """The photo was searched whole (this run imports its boxes) at its upright size, and found neighbours."""
    def check(outcome, ctx):
        doc = json.loads(outcome.stdout)
        assert doc["boxes"][0]["box"] == [0.0, 0.0, float(size[0]), float(size[1])]
        assert len(doc["boxes"][0]["neighbours"]) == 3
    return check


def listed(file: str, what: str):
    def check(outcome, ctx):
        assert what in (ctx.tmp / "new" / file).read_text()
    return check


SEARCH = "search --run {run} --index det --image {tmp}/p --json --k 3"
GOOD = [
    Good("greyscale", SEARCH, searched((320, 240)), {"p": photo("L")}),
    Good("cmyk-jpeg", SEARCH, searched((320, 240)), {"p": photo("CMYK", fmt="JPEG")}),
    Good("rgba", SEARCH, searched((320, 240)), {"p": photo("RGBA")}),
    Good("palette", SEARCH, searched((320, 240)), {"p": photo("P")}),
    Good("16-bit", SEARCH, searched((320, 240)), {"p": photo("I;16")}),
    Good("exif-rotated", SEARCH, searched((240, 320)), {"p": photo(fmt="JPEG", exif_orientation=6)}),
    Good("one-pixel", SEARCH, searched((1, 1)), {"p": photo(size=(1, 1))}),
    Good("huge-48-mpx", SEARCH, searched((8000, 6000)), {"p": photo(size=(8000, 6000), fmt="JPEG")}),
    Good("skip-bad-annotation", "prepare --cub {cub} --out {tmp}/new --split " + MINI_SPLIT + " --workers 1 --no-eda "
         "--skip-bad", listed("dataset/bad_images.txt", "bounding_boxes.txt:1"),
         {"cub": cub(bounding_boxes=replace_line(1, "1 nan 27 325 304"))}),
    Good("box-outside-is-clipped", "prepare --cub {cub} --out {tmp}/new --split " + MINI_SPLIT + " --workers 1 --no-eda",
         lambda outcome, ctx: "1 boxes clipped" in outcome.stdout,
         {"cub": cub(bounding_boxes=replace_line(1, "1 60 27 5000 304"))}),
]


def test_a_byte_order_mark_on_every_cub_file_reads_as_without_one(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark first: the prepared tables are the same as without."""
    with_bom = tmp_path / "bom"
    with_bom.mkdir()
    cub_root(with_bom, {f.name: (lambda lines: ["\ufeff" + lines[0], *lines[1:]]) for f in MINI.glob("*.txt")})
    for name, root in (("plain", MINI), ("bom", with_bom / "cub")):
        assert main(["prepare", "--cub", str(root), "--out", str(tmp_path / name), "--split", MINI_SPLIT, "--workers",
                     "1", "--no-eda"]) == 0
    for table in ("images.parquet", "instances.parquet"):
        plain, bom = (pd.read_parquet(tmp_path / run / "dataset" / table) for run in ("plain", "bom"))
        pd.testing.assert_frame_equal(plain, bom)


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_unusual_good_input_gives_a_correct_result(case: Good, corpus_run, tmp_path):
    ctx = Context(corpus_run, tmp_path)
    for name, content in case.files.items():
        made = content(ctx) if callable(content) else content
        if isinstance(made, bytes):
            (tmp_path / name).write_bytes(made)
    outcome = attempt(ctx.fill(case.argv))
    assert not outcome.trace, outcome.trace[-1500:]
    assert outcome.code == 0, outcome.stderr[-800:]
    assert case.check(outcome, ctx) is not False
