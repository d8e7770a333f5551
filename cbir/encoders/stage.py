"""The `embed` stage: one vector per image (full), GT box (gt) or detected instance (det) →
the `embeddings/NAME` artifact: vectors.npy (float32 [N, D]) + rows.parquet (row i describes vector i)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import CbirError
from ..artifacts import (
    Artifact,
    commit,
    fingerprint,
    finish_shards,
    is_fresh,
    read_table,
    run_in_shards,
    to_json,
    writing,
)
from ..datasets import ImageFolder, RunDataset, load_dataset
from ..detection.results import load_detections
from ..device import batches, decode_workers, resolve_device
from ..engines import LOCAL, EngineConfig, absolute, files_here
from ..images import open_photo
from ..layout import RunLayout, check_name
from ..vectors import unit_rows
from .backbones import build_backbone
from .cnn import CnnEncoder, InputRecipe

log = logging.getLogger(__name__)

MODES = ("full", "gt", "det")
SHARD_IMAGES = 256  # images per resumable shard
TABLE_COLUMNS = ["image_id", "instance", "x", "y", "w", "h", "source", "score", "category_id", "split", "class_id"]


@dataclass(kw_only=True)
class EmbedConfig:
    run: Path
    mode: str = "full"
    backbone: str = "detector"
    weights: str = "DEFAULT"
    pool: str = "gem"  # GeM beat average pooling in every mode on the sample (MAP@R +4 to +6 points)
    crop_margin: float = 0.0
    crop_resize: str = "pad"
    size: int | None = None  # input side; default: the weights' own crop size
    roi: bool = False  # det/gt: pool every box from one pass over the whole image
    batch_size: int | None = None  # default: measured for the trunk here (encoders.tuning)
    workers: int | None = None  # decode processes; default: device.decode_workers (inline on a 2-core CPU)
    device: str = "auto"
    bf16: bool = False
    name: str | None = None
    engine: EngineConfig = LOCAL  # where the encoder runs; the vectors are the same on every engine
    force: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise CbirError(f"--mode {self.mode}: choose from {', '.join(MODES)}")
        if self.roi and self.mode == "full":
            raise CbirError("--roi pools boxes from the image's feature map; use it with --mode gt or det")
        if self.batch_size is not None and self.batch_size < 1:
            raise CbirError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise CbirError(f"--workers {self.workers}: must be 0 or more")
        check_name(self.output_name)

    @property
    def output_name(self) -> str:
        return self.name or self.mode


def instances(layout: RunLayout, data: RunDataset, mode: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rows to embed, one per vector (whole images, GT boxes, or detected instances with their
    fallbacks), and the fingerprints of the artifacts they came from."""
    base = data.images[["image_id", "path", "split", "class_id", "width", "height"]]
    upstream = {"dataset": data.fingerprint}
    if mode == "full":
        rows = base.assign(instance=0, x=0.0, y=0.0, w=base.width.astype(float), h=base.height.astype(float),
                           source="full", score=1.0, category_id=0)
    elif mode == "gt":
        gt = data.instances[["image_id", "instance", "x", "y", "w", "h", "category_id"]]
        rows = gt.merge(base, on="image_id").assign(source="gt", score=1.0)
    else:
        dets, det_fp = load_detections(layout)
        upstream["detections"] = det_fp
        if dets.empty:
            raise CbirError(f"{layout.path(layout.detections)}: holds no instances; lower --score or use "
                            f"--fallback gt|full in `cbir detect`")
        rows = dets.merge(base, on="image_id")
    return rows.sort_values(["image_id", "instance"], ignore_index=True), upstream


class ImageCrops(Dataset):
    """One item per photo of `rows` (columns path, x, y, w, h), in order of first appearance, decoded once: all
    of its rows' crops, or the RoI inputs. `order[j]` is the position in `rows` of the j-th crop the items give."""

    def __init__(self, data: RunDataset, rows: pd.DataFrame, recipe: InputRecipe):
        # numpy grouping, plain paths and box arrays: a DataFrame per photo (a groupby) cost ~0.2 ms a row, 2-3 % of
        # the stage on 2 cores; numpy takes ~4 us
        rank = pd.factorize(rows.image_id.to_numpy())[0]  # each row's photo, numbered by first appearance
        self.order = np.argsort(rank, kind="stable")
        starts = np.flatnonzero(np.diff(rank[self.order], prepend=-1))
        boxes = rows[["x", "y", "w", "h"]].to_numpy(float)[self.order]
        self.boxes = np.split(boxes, starts[1:]) if len(rows) else []
        self.paths = [data.image_path(p) for p in rows.path.to_numpy()[self.order[starts]]]
        self.recipe = recipe

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.recipe.inputs(open_photo(self.paths[i]), self.boxes[i])

    def batches(self, size: int) -> list[list[int]]:
        """Consecutive items grouped so that each group gives the model at least `size` inputs, fewer only at
        the end (one per box, or one per photo with RoI; a photo's boxes stay together): the batch size the
        tuning chose counts what the model sees, not photos."""
        out, group, inputs = [], [], 0
        for i, boxes in enumerate(self.boxes):
            group.append(i)
            inputs += 1 if self.recipe.roi else len(boxes)
            if inputs >= size:
                out.append(group)
                group, inputs = [], 0
        return out + [group] * bool(group)


def _collate(batch):
    images = torch.cat([b[0] for b in batch])
    boxes = [b[1] for b in batch] if batch[0][1] is not None else None
    return images, boxes


DECODE_AHEAD = 16  # one at a time: batches decoded on every core before the model runs them on every core


def encoded_batches(items: ImageCrops, encoder: CnnEncoder, batch_size: int, workers: int,
                    threads: int | None = None) -> Iterator[np.ndarray]:
    """The vectors of each batch of `items` (`ImageCrops.batches`), in order. With decode worker processes (a GPU,
    or more than 2 cores) a DataLoader overlaps decoding with the model. Inline (`workers` 0, the choice on a 2-core
    CPU) no core should idle while another decodes, and no thread should compete with the model's: with `threads`
    above 1, that many batches run side by side, each thread decoding its batch and running the model
    single-threaded; with 1, DECODE_AHEAD batches are decoded on every core (single-threaded torch each), then
    the model runs them one after another on all of torch's threads. A chunk amortises the hand-over between the
    two phases: on a 2-core machine 16 batches beat 1, 2 and 4 in 3 of 4 rounds and tied in the fourth. By
    default the trunk's tuning chooses (`Tuning.batch_threads`); benchmarks/embed_bench.py measures both ways."""
    groups = items.batches(batch_size)
    if workers > 0:
        loader = DataLoader(items, batch_sampler=groups, num_workers=workers, collate_fn=_collate)
        yield from (encoder.forward(images, boxes) for images, boxes in batches(loader))
        return

    def decode(group: list[int]) -> tuple[torch.Tensor, list | None]:
        return _collate([items[i] for i in group])

    threads = encoder.tuning.batch_threads() if threads is None else threads
    pool = ThreadPoolExecutor(max(threads, torch.get_num_threads()), initializer=torch.set_num_threads,
                              initargs=(1,))  # torch's thread count is per thread: the pool's never touch the model's
    try:
        if threads > 1:
            yield from pool.map(lambda group: encoder.forward(*decode(group)), groups)
            return
        for start in range(0, len(groups), DECODE_AHEAD):
            decoded = list(pool.map(decode, groups[start:start + DECODE_AHEAD]))  # all of it before the model starts
            yield from (encoder.forward(*batch) for batch in decoded)
    finally:  # an interrupt or a bad photo: drop the batches not started
        pool.shutdown(cancel_futures=True)


def embed_rows(rows: pd.DataFrame, data: RunDataset | ImageFolder, encoder: CnnEncoder, batch_size: int,
               workers: int, progress: tqdm | None = None, threads: int | None = None) -> np.ndarray:
    """Vectors for `rows` (grouped by image, decoded in workers or threads), in the order of `rows`."""
    items = ImageCrops(data, rows, encoder.recipe)
    out = []
    for vectors in encoded_batches(items, encoder, max(1, batch_size), workers, threads):
        out.append(vectors)
        if progress is not None:
            progress.update(len(vectors))
    return in_row_order(items.order, out, encoder.dim)


def in_row_order(order: np.ndarray, batches: list[np.ndarray], dim: int) -> np.ndarray:
    """The batches' vectors (photo by photo, `ImageCrops` order) put back in the order of the rows."""
    vectors = np.concatenate(batches) if batches else np.zeros((0, dim), np.float32)
    result = np.empty_like(vectors)
    result[order] = vectors
    return result


class RowsByImage(Sequence):
    """Rows sorted by image as a sequence of images: a slice of images gives all of their rows, so a shard
    never splits a photo's boxes (it is decoded once) and the shards' vectors concatenate in row order."""

    COLUMNS = ("image_id", "path", "x", "y", "w", "h")  # what decoding needs; all a cluster is sent

    def __init__(self, rows: pd.DataFrame):
        self.rows = rows[list(self.COLUMNS)].reset_index(drop=True)
        ids = self.rows.image_id.to_numpy()
        self.starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, images: slice) -> pd.DataFrame:
        first, stop, _ = images.indices(len(self))
        if first >= stop:
            return self.rows.iloc[0:0]
        return self.rows.iloc[self.starts[first]:self.starts[stop] if stop < len(self) else len(self.rows)]


@dataclass
class EmbedWork:
    """The encoder's part of `embed` for an engine (`engines.ShardWork`): a shard is the rows of some photos
    (`RowsByImage`); its result, their vectors in row order."""

    build: dict  # make_encoder's arguments
    photos: ImageFolder
    recipe: InputRecipe
    batch_size: int
    workers: int | None
    encoder: CnnEncoder | None = None  # the driver's own, for the local engine; a cluster's actors build theirs

    def __getstate__(self):
        build = {**self.build, **{k: absolute(self.build[k]) for k in ("weights", "detector")}}
        return {**self.__dict__, "build": build, "encoder": None, "workers": 0}  # an actor decodes on its own CPUs

    def load(self) -> CnnEncoder:
        return self.encoder or make_encoder(**self.build)

    def run(self, encoder: CnnEncoder, rows: pd.DataFrame, progress=None) -> np.ndarray:
        workers = decode_workers(encoder.device) if self.workers is None else self.workers
        return embed_rows(rows, self.photos, encoder, self.batch_size, workers, progress)

    def decode(self, rows: pd.DataFrame) -> tuple[list, np.ndarray]:
        items = ImageCrops(self.photos, rows, self.recipe)
        return [_collate([items[i] for i in group]) for group in items.batches(max(1, self.batch_size))], items.order

    def infer(self, encoder: CnnEncoder, decoded: tuple[list, np.ndarray]) -> np.ndarray:
        batches, order = decoded
        return in_row_order(order, [encoder.forward(images, boxes) for images, boxes in batches], encoder.dim)

    def size(self, rows: pd.DataFrame) -> int:
        return len(rows)

    def needs(self, rows: pd.DataFrame) -> list[str]:
        model = files_here(self.build["weights"], self.build["detector"])
        return model + [str(self.photos.image_path(path)) for path in rows.path.unique()]


def top_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each image's top-scoring row (ties: lowest instance), with its position in the set as `row`: the
    instance that stands for the image as a query (evaluation and fusion share this rule)."""
    ranked = table.reset_index(names="row").sort_values(["image_id", "score", "instance"],
                                                        ascending=[True, False, True], kind="stable")
    return ranked.drop_duplicates("image_id").set_index("image_id")


def fuse_embeddings(layout: RunLayout, name: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """`full+det` style fusion, one vector per image: each part's top-scoring vector L2-normalised, the parts
    concatenated and divided by sqrt(parts) (unit length). The table is the last part's (its box, score and
    source); images missing from a part are left out. Queries are fused the same way (`FusedEncoder`)."""
    parts = [load_embeddings(layout, p) for p in name.split("+")]
    tops = [top_rows(table) for _, table, _ in parts]
    common = sorted(set.intersection(*(set(t.index) for t in tops)))
    if not common:
        raise CbirError(f"embeddings {name}: its parts share no image")
    blocks = []
    for (vectors, _, _), top in zip(parts, tops):
        block = np.asarray(vectors[top.loc[common, "row"].to_numpy()], np.float32)
        blocks.append(unit_rows(block))
    vectors = np.concatenate(blocks, 1) / np.sqrt(len(parts))
    table = tops[-1].loc[common].reset_index().drop(columns="row")[parts[-1][1].columns]
    infos = [info for _, _, info in parts]
    spec = {"encoder": "fused", "parts": [i["spec"] for i in infos], "modes": [i["mode"] for i in infos],
            "fingerprint": "fused(" + ",".join(i["spec"]["fingerprint"] for i in infos) + ")",
            "backbone": "+".join(dict.fromkeys(i["spec"]["backbone"] for i in infos)), "dim": int(vectors.shape[1])}
    info = {"spec": spec, "mode": name, "count": len(table), "dim": spec["dim"], "name": name,
            "fingerprint": fingerprint([i["fingerprint"] for i in infos]),
            "upstream": {k: v for i in infos for k, v in i["upstream"].items()}}
    return vectors, table, info


def run_detector_trunk(layout: RunLayout, weights: str) -> tuple[str, str]:
    """(detector, weights) for `--backbone detector`: the run's own detector when it has a trunk (a torchvision
    Faster R-CNN, or a trained one, whose checkpoint holds the weights), else the ResNet-50 Faster R-CNN."""
    meta = Artifact(layout, layout.detections).meta()
    detector = meta["summary"].get("detector", "") if meta else ""
    if detector.startswith("trained:"):
        return detector, weights if weights != "DEFAULT" else meta["summary"]["weights"]
    return (detector if detector.startswith("fasterrcnn") else "fasterrcnn_resnet50_fpn"), weights


def encoder_args(cfg: EmbedConfig, layout: RunLayout) -> dict:
    """`make_encoder`'s arguments for `cfg`, the run's detector resolved here (a cluster's nodes may not see
    the run folder)."""
    detector, weights = run_detector_trunk(layout, cfg.weights) if cfg.backbone == "detector" else (None, cfg.weights)
    return {"backbone": cfg.backbone, "weights": weights, "detector": detector or "fasterrcnn_resnet50_fpn",
            "device": cfg.device, "pool": cfg.pool, "crop_margin": cfg.crop_margin, "crop_resize": cfg.crop_resize,
            "size": cfg.size, "roi": cfg.roi, "bf16": cfg.bf16}


def make_encoder(*, backbone: str, weights: str, detector: str, device: str, **options) -> CnnEncoder:
    return CnnEncoder(build_backbone(backbone, weights, detector), resolve_device(device), **options)


def vector_inputs(spec: dict) -> dict:
    """The spec as an input of freshness: the weights' place is not (a moved file is the same weights)."""
    return {k: v for k, v in spec.items() if k != "weights"}


def embed(cfg: EmbedConfig) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Embed the run's images or boxes → embeddings/<name>; skipped when its inputs are unchanged."""
    with writing(cfg.run) as layout:
        art = Artifact(layout, layout.embeddings(cfg.output_name))
        data = load_dataset(layout)
        rows, upstream = instances(layout, data, cfg.mode)
        build = encoder_args(cfg, layout)
        encoder = make_encoder(**build)
        inputs = {"mode": cfg.mode, "encoder": vector_inputs(encoder.spec), **upstream}
        if is_fresh(art, inputs, cfg.force):
            return load_embeddings(layout, cfg.output_name)
        stamp = fingerprint(inputs)
        have, reused = _reusable(art, inputs, data, rows)
        work = EmbedWork(build=build, photos=data.photos, recipe=encoder.recipe,
                         batch_size=cfg.batch_size or encoder.default_batch, workers=cfg.workers, encoder=encoder)

        def save(path, array):
            with open(path, "wb") as f:
                np.save(f, array)

        partial = layout.partial(art.name)
        with tqdm(total=int((~have).sum()), desc=f"embed {cfg.output_name} ({encoder.backbone.name})",
                  unit="box") as bar:
            shards = run_in_shards(RowsByImage(rows[~have]), SHARD_IMAGES, partial, stamp, work, save, np.load, bar,
                                   engine=cfg.engine)
        vectors = np.zeros((len(rows), encoder.dim), np.float32)
        if have.any():
            vectors[have] = reused
        if shards:
            vectors[~have] = np.concatenate(shards)
        if have.any():
            log.info("embed %s: %d vector(s) computed, %d kept from the previous version (same photo and box)",
                     cfg.output_name, int((~have).sum()), int(have.sum()))
        if not np.isfinite(vectors).all():
            raise CbirError(f"{cfg.output_name}: the backbone produced NaN/inf features; check the weights file")
        table = rows[TABLE_COLUMNS].reset_index(drop=True)
        with commit(art, inputs, upstream) as staged:
            staged.write_npy(layout.VECTORS, vectors)
            staged.write_table(layout.ROWS, table)
            staged.summary.update(spec=encoder.spec, mode=cfg.mode, count=len(table), dim=encoder.dim,
                                  sources=table.source.value_counts().to_dict(), device=str(encoder.device),
                                  computed=int((~have).sum()), reused=int(have.sum()))
        finish_shards(partial)
        return load_embeddings(layout, cfg.output_name)


REUSE_KEY = ["image_id", "x", "y", "w", "h"]  # a vector is a function of its photo's bytes and its box


def _reusable(art: Artifact, inputs: dict, data: RunDataset, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(which rows the previous version already holds a vector for, those vectors in row order). Only where
    an image id names the photo's bytes (a photo folder) and the mode and encoder are unchanged: a sync then
    embeds the added and changed photos' boxes only, and a moved photo keeps its vectors."""
    have = np.zeros(len(rows), bool)
    meta = art.meta()
    if not (data.meta["summary"].get("content_ids") and meta and not art.check_files()):
        return have, np.zeros((0, 0), np.float32)

    def settings(d):
        return {k: v for k, v in d.items() if k not in ("dataset", "detections")}

    if settings(meta["inputs"]) != settings(json.loads(to_json(inputs))):
        return have, np.zeros((0, 0), np.float32)
    folder = art.folder()
    old = read_table(folder / art.layout.ROWS)[REUSE_KEY].reset_index(names="old").drop_duplicates(REUSE_KEY)
    match = rows[REUSE_KEY].reset_index(drop=True).reset_index(names="new").merge(old, on=REUSE_KEY)
    have[match.new.to_numpy()] = True
    match = match.sort_values("new")
    return have, np.asarray(np.load(folder / art.layout.VECTORS, mmap_mode="r")[match.old.to_numpy()], np.float32)


def load_embeddings(run: Path | RunLayout, name: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Vectors (memory-mapped), their table and the artifact's summary (spec, mode, fingerprint, upstream);
    refuses misaligned or damaged sets. `A+B` fuses stored sets per image (see `fuse_embeddings`)."""
    layout = run if isinstance(run, RunLayout) else RunLayout(run)
    if "+" in name:
        return fuse_embeddings(layout, name)
    art = Artifact(layout, layout.embeddings(name))
    folder, meta = art.open(f"run `cbir embed --run {layout.root} --mode ... --name {name}` first")
    try:
        vectors = np.load(folder / layout.VECTORS, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise CbirError(f"{folder / layout.VECTORS}: unreadable ({e}); redo it with `cbir embed --force`") from None
    table = read_table(folder / layout.ROWS)
    info = {**meta["summary"], "fingerprint": meta["fingerprint"], "name": name,
            "upstream": {art.name: meta["fingerprint"]}}
    if len(vectors) != len(table) or vectors.ndim != 2 or vectors.shape[1] != info["dim"]:
        raise CbirError(f"{art.link}: {vectors.shape} vectors do not match its table ({len(table)} rows) and spec "
                        f"(dim {info['dim']}); redo it with `cbir embed --force`")
    return vectors, table, info
