"""Index and search: L2-normalise → PCA (fitted on train only) → L2-normalise → a FAISS index from an
`index_factory` string, saved with its metadata table and manifest; instance and image-level results.

The whole reduction lives inside the FAISS index (an IndexPreTransform), so a saved index is one file
that maps raw backbone vectors to cosine similarities, on CPU or GPU alike.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from . import CbirError
from .artifacts import atomic_path, read_json, read_table, record, require_run, write_json, write_table
from .data import cub_root, load_rgb, load_split
from .detect import kept_boxes, load_run_detector, resolve_device
from .embed import Embedder, embed_photo, load_embeddings
from .models import build_backbone

log = logging.getLogger(__name__)

# From benchmarks/results/index_bench_cpu.md (2 CPU cores, 256-d clustered vectors): exact search takes
# 12 ms a query at 10^5 but 125 ms at 10^6; IVF-SQ8 keeps recall@10 0.96-0.99 up to 10^6 at a quarter of
# the memory with ~1,900 queries/s, beating HNSW32 there (recall 0.92, 5x the memory) and, unlike HNSW,
# supports removal; IVF-PQ compresses 4x more but recall fell to 0.49, so it is only the choice past ~5*10^7.
AUTO_EXACT_MAX = 100_000
AUTO_SQ8_MAX = 50_000_000
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32


def auto_factory(n: int, dim: int, n_train: int) -> str:
    """Exact for small galleries, then IVF (4·sqrt(n) lists, at most one per 39 train vectors)."""
    if n <= AUTO_EXACT_MAX:
        return "Flat"
    lists = max(1, min(int(4 * np.sqrt(n)), n_train // 39))
    if n <= AUTO_SQ8_MAX:
        return f"IVF{lists},SQ8"
    return f"IVF{lists},PQ{max(m for m in (64, 32, 16, 8) if dim % m == 0)}"


def transform_prefix(pca: int | None, whiten: bool) -> str:
    return f"L2norm,PCA{'W' if whiten else ''}{pca},L2norm," if pca else "L2norm,"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def fit_pca_dim(pca: int | None, dim: int, n_train: int) -> int | None:
    """PCA needs at most min(dim, n_train) components; larger requests are lowered with a warning."""
    if not pca:
        return None
    top = min(dim, n_train)
    if pca > top:
        log.warning("--pca %d > what %d train vectors of dim %d support; using %d", pca, n_train, dim, top)
    return min(pca, top)


def reduce(vectors: np.ndarray, train: np.ndarray, pca: int | None, whiten: bool) -> np.ndarray:
    """The index's transform chain applied to `vectors`, fitted on `train` (evaluation uses this)."""
    dim = vectors.shape[1]
    pca = fit_pca_dim(pca, dim, len(train))
    index = faiss.index_factory(dim, transform_prefix(pca, whiten) + "Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    for i in range(index.chain.size()):
        x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
    return x


def to_gpu(index, gpu: str):
    """A GPU copy of the index when faiss-gpu and a GPU are present and the index type supports it."""
    if gpu == "off" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        if gpu not in ("off", "auto"):
            raise CbirError(f"--gpu {gpu}: faiss has no GPU support here (install faiss-gpu) or no GPU is visible")
        return index
    device = 0 if gpu == "auto" else int(gpu)
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index)
    except RuntimeError as e:  # e.g. HNSW has no GPU implementation
        log.info("index stays on CPU (%s)", str(e).splitlines()[0][:100])
        return index


@dataclass
class IndexConfig:
    run: Path
    embeddings: str
    name: str | None = None
    pca: int | None = 256
    whiten: bool = False
    factory: str = "auto"
    gpu: str = "auto"
    gallery: tuple[str, ...] = ("train", "test")

    @property
    def index_name(self) -> str:
        return self.name or self.embeddings


@dataclass
class SearchIndex:
    """A loaded index: the FAISS object, one metadata row per stored id, and its manifest."""

    index: faiss.Index
    table: pd.DataFrame  # indexed by FAISS id
    manifest: dict
    root: Path | None = None  # where CUB-relative paths resolve

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarity, id) per query row; -1 ids pad short results."""
        if self.index.ntotal == 0:
            raise CbirError(f"index {self.manifest['name']} is empty; add vectors with `cbir index --add`")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise CbirError(f"query vectors have dim {queries.shape[1]}, index {self.manifest['name']} expects "
                            f"{self.dim} ({self.manifest['backbone']})")
        if k < 1:
            raise CbirError(f"--k {k}: must be at least 1")
        return self.index.search(queries, min(k, self.index.ntotal))

    def image_path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() or self.root is None else self.root / "images" / p


def index_paths(run: Path, name: str) -> tuple[Path, Path, Path]:
    base = Path(run) / "index"
    return base / f"{name}.faiss", base / f"{name}.parquet", base / f"{name}.json"


def _meta_table(run: Path, table: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    split = load_split(run)[["image_id", "path", "class_name"]]
    out = table.merge(split, on="image_id", how="left").assign(id=ids)
    return out.set_index("id")


def build_index(cfg: IndexConfig) -> SearchIndex:
    """Train the reduction (and any index parameters) on train rows; add the gallery splits; save."""
    run = require_run(cfg.run)
    vectors, table, spec = load_embeddings(run, cfg.embeddings)
    is_train = (table.split == "train").to_numpy()
    if not is_train.any():
        raise CbirError(f"embeddings {cfg.embeddings}: no train-split rows to fit PCA on")
    gallery = table.split.isin(cfg.gallery).to_numpy()
    if not gallery.any():
        raise CbirError(f"embeddings {cfg.embeddings}: no rows in gallery splits {cfg.gallery}")
    pca = fit_pca_dim(cfg.pca, spec["dim"], int(is_train.sum()))
    body = auto_factory(int(gallery.sum()), pca or spec["dim"], int(is_train.sum())) if cfg.factory == "auto" \
        else cfg.factory
    factory = transform_prefix(pca, cfg.whiten) + ("" if body.startswith("IDMap") else "IDMap2,") + body
    try:
        index = faiss.index_factory(spec["dim"], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise CbirError(f"--factory {body!r}: FAISS cannot build {factory!r} ({str(e).splitlines()[-1][:120]})") from None
    index.train(np.ascontiguousarray(vectors[is_train], dtype=np.float32))
    ids = np.flatnonzero(gallery).astype(np.int64)
    work = to_gpu(index, cfg.gpu)
    work.add_with_ids(np.ascontiguousarray(vectors[gallery], dtype=np.float32), ids)
    if work is not index:
        index = faiss.index_gpu_to_cpu(work)
    params = set_search_params(index)
    manifest = {"name": cfg.index_name, "embeddings": cfg.embeddings, "fingerprint": spec["fingerprint"],
                "backbone": spec["backbone"], "dim_in": spec["dim"], "pca": pca, "whiten": cfg.whiten,
                "factory": factory, "search_params": params, "count": int(index.ntotal), "gallery": list(cfg.gallery),
                "trained_on": "train split", "train_rows": int(is_train.sum()), "next_id": int(len(table)),
                "embedding_spec": spec}
    search_index = SearchIndex(index, _meta_table(run, table[gallery], ids), manifest, cub_root(run))
    save_index(run, search_index)
    return search_index


SEARCH_PARAMS = {"efSearch": HNSW_EF_SEARCH, "nprobe": IVF_NPROBE}


def set_search_params(index, params: dict = SEARCH_PARAMS) -> dict:
    """Apply the search-time knobs the index has (through wrappers); returns those that applied."""
    space, applied = faiss.ParameterSpace(), {}
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
            applied[name] = value
        except RuntimeError:
            pass
    return applied


def save_index(run: Path, si: SearchIndex) -> None:
    faiss_path, table_path, manifest_path = index_paths(run, si.manifest["name"])
    faiss_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(faiss_path) as tmp:
        faiss.write_index(si.index, str(tmp))
    write_table(table_path, si.table.reset_index())
    write_json(manifest_path, si.manifest)
    record(run, f"index/{si.manifest['name']}", **{k: si.manifest[k] for k in
                                                   ("embeddings", "fingerprint", "factory", "count", "pca")})


def load_index(run: Path, name: str, gpu: str = "auto") -> SearchIndex:
    faiss_path, table_path, manifest_path = index_paths(run, name)
    if not faiss_path.exists():
        raise CbirError(f"{faiss_path}: not found; build it with `cbir index --run {run} --embeddings NAME`")
    manifest = read_json(manifest_path)
    try:
        index = faiss.read_index(str(faiss_path))
    except RuntimeError:
        raise CbirError(f"{faiss_path}: not a readable FAISS index; rebuild it with `cbir index`") from None
    table = read_table(table_path).set_index("id")
    if len(table) != index.ntotal:
        raise CbirError(f"{faiss_path}: holds {index.ntotal} vectors but its table {len(table)} rows; rebuild it")
    set_search_params(index, manifest["search_params"])
    return SearchIndex(to_gpu(index, gpu), table, manifest, cub_root(run))


# ---------------------------------------------------------------- results

def neighbours(si: SearchIndex, sims: np.ndarray, ids: np.ndarray, exclude_image: int | None = None) -> pd.DataFrame:
    """Instance-level result rows of one query, best first."""
    keep = ids >= 0
    rows = si.table.loc[ids[keep]].reset_index().assign(similarity=sims[keep])
    if exclude_image is not None:
        rows = rows[rows.image_id != exclude_image]
    return rows.reset_index(drop=True)


def image_level(rows: pd.DataFrame) -> pd.DataFrame:
    """Each gallery image once, ranked by its best-matching instance (rows must be best first)."""
    best = rows.sort_values("similarity", ascending=False, kind="stable").drop_duplicates("image_id")
    return best.reset_index(drop=True)


def result_record(row) -> dict:
    return {"image_id": int(row.image_id), "instance": int(row.instance), "class_id": int(row.class_id),
            "class_name": row.class_name if isinstance(row.class_name, str) else "",
            "path": row.path if isinstance(row.path, str) else "",
            "box": [round(float(v), 1) for v in (row.x, row.y, row.w, row.h)], "source": row.source,
            "similarity": round(float(row.similarity), 5)}


@dataclass
class QueryBox:
    box: list[float]
    score: float
    source: str
    neighbours: pd.DataFrame = field(default_factory=pd.DataFrame)
    images: pd.DataFrame = field(default_factory=pd.DataFrame)


def query_vectors(si: SearchIndex, vectors: np.ndarray, boxes: list[dict], k: int,
                  exclude_image: int | None = None) -> tuple[list[QueryBox], pd.DataFrame]:
    """Search every query box; over-fetch so the image-level lists still hold k distinct images."""
    if k > len(si.table):
        raise CbirError(f"--k {k} exceeds the gallery ({len(si.table)} vectors in index {si.manifest['name']})")
    sims, ids = si.search(vectors, min(len(si.table), 4 * k + 8))
    out = []
    for i, b in enumerate(boxes):
        rows = neighbours(si, sims[i], ids[i], exclude_image)
        out.append(QueryBox(b["bbox"], b["score"], b["source"], rows.head(k), image_level(rows).head(k)))
    merged = image_level(pd.concat([q.neighbours for q in out], ignore_index=True)).head(k) if out else pd.DataFrame()
    return out, merged


def results_json(query: str, boxes: list[QueryBox], merged: pd.DataFrame) -> dict:
    return {"query": query, "boxes": [
        {"box": [round(float(v), 1) for v in q.box], "score": round(float(q.score), 4), "source": q.source,
         "neighbours": [result_record(r) for r in q.neighbours.itertuples()],
         "images": [result_record(r) for r in q.images.itertuples()]} for q in boxes],
        "images": [result_record(r) for r in merged.itertuples()]}


def parse_ids(text: str) -> list[int]:
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text or ""):
        raise CbirError(f"--remove {text!r}: expected comma-separated image ids, e.g. 12,40")
    return [int(t) for t in text.split(",")]


def remove_images(run: Path, name: str, image_ids: list[int]) -> int:
    """Drop every instance of the given images from a saved index, without a rebuild; ids of the rest stay."""
    si = load_index(run, name, gpu="off")
    unknown = sorted(set(image_ids) - set(si.table.image_id))
    if unknown:
        raise CbirError(f"--remove: image id(s) {unknown[:5]} are not in index {name}")
    drop = si.table.index[si.table.image_id.isin(image_ids)].to_numpy(np.int64)
    try:
        removed = si.index.remove_ids(faiss.IDSelectorBatch(drop))
    except RuntimeError:
        raise CbirError(f"index {name} ({si.manifest['factory']}) does not support removal (HNSW); rebuild it "
                        f"with `cbir index` or use a Flat/IVF factory") from None
    si.table = si.table.drop(index=drop)
    si.manifest["count"] = int(si.index.ntotal)
    save_index(run, si)
    return int(removed)


# ---------------------------------------------------------------- new photos: query and add

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class Querier:
    """Index, backbone and (optionally) detector loaded once; answers photos the way the run was built."""

    def __init__(self, run: Path, index_name: str, use_detector: bool = True, device: str = "auto", gpu: str = "auto"):
        self.run = require_run(run)
        self.si = load_index(run, index_name, gpu)
        self.spec = self.si.manifest["embedding_spec"]
        self.device = resolve_device(device)
        backbone = build_backbone(self.spec["backbone"], self.spec["weights"])
        if backbone.weights.fingerprint != self.spec["weights_fingerprint"]:
            raise CbirError(f"backbone weights {backbone.weights.spec} ({backbone.weights.fingerprint}) differ from "
                            f"the index's ({self.spec['weights_fingerprint']}); supply the same weights file")
        self.embedder = Embedder(backbone, self.device, self.spec["pool"], self.spec["bf16"])
        self.detector, self.detect_meta = None, {}
        if use_detector and self.spec["mode"] != "full" and (Path(run) / "detections.meta.json").exists():
            self.detector, self.detect_meta = load_run_detector(run, self.device)
        split = load_split(run)
        self.gt_by_name = {Path(r.path).name: (r.width, r.height, [r.x, r.y, r.w, r.h]) for r in split.itertuples()}

    @property
    def detector_note(self) -> str:
        if self.spec["mode"] == "full":
            return "index of whole images: the whole photo is the query"
        if self.detector is None:
            return ("no detector for new photos (imported boxes or --detector none): the whole photo is the query, "
                    "plus its GT box when the photo is one of the run's")
        return f"boxes from {self.detect_meta['detector']} ({self.detect_meta['weights']})"

    def boxes(self, image, score: float | None = None, name: str | None = None) -> list[dict]:
        """Detected boxes of the run's categories, or else the whole photo as a fallback instance plus, for a
        photo of the run itself (matched by file name and size), its GT box."""
        found = []
        if self.detector is not None:
            m = self.detect_meta
            with torch.inference_mode():
                out = self.detector([pil_to_tensor(image).to(self.device).float().div_(255)])[0]
            found = kept_boxes(out, {int(c): n for c, n in m["classes"].items()},
                               m["score_threshold"] if score is None else score, m["max_per_image"])
            for d in found:
                d["source"] = "detected"
        if found:
            return found
        whole = [{"bbox": [0.0, 0.0, float(image.width), float(image.height)], "score": 0.0, "source": "fallback-full"}]
        width, height, gt = self.gt_by_name.get(name, (None, None, None))
        if self.spec["mode"] != "full" and (width, height) == image.size:
            whole.append({"bbox": [float(v) for v in gt], "score": 1.0, "source": "gt"})
        return whole

    def query(self, image, k: int, score: float | None = None, exclude_image: int | None = None,
              name: str | None = None):
        boxes = self.boxes(image, score, name)
        vectors = embed_photo(image, np.array([b["bbox"] for b in boxes]), self.spec, self.embedder)
        return query_vectors(self.si, vectors, boxes, k, exclude_image)

    def query_id(self, image_id: int, k: int):
        """Query with an image already in the run: its stored vectors, itself excluded from the results."""
        vectors, table, _ = load_embeddings(self.run, self.si.manifest["embeddings"])
        rows = table.index[table.image_id == image_id].to_numpy()
        if len(rows) == 0:
            raise CbirError(f"--query-id {image_id}: not in embeddings {self.si.manifest['embeddings']}")
        boxes = [{"bbox": [r.x, r.y, r.w, r.h], "score": r.score, "source": r.source} for r in table.loc[rows].itertuples()]
        return query_vectors(self.si, np.asarray(vectors[rows]), boxes, k, exclude_image=image_id)


def photo_files(paths: list[Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise CbirError(f"--add {p}: no such file or folder")
    return out


def add_photos(run: Path, name: str, paths: list[Path], use_detector: bool = True) -> tuple[int, list[str]]:
    """Detect → embed → add new photos to a saved index; new image ids continue after the run's,
    a photo already in the index (same absolute path) is skipped. Returns (instances added, errors)."""
    q = Querier(run, name, use_detector, gpu="off")
    si, table = q.si, q.si.table
    known = set(table.path.dropna())
    next_image = int(max(table.image_id.max(), load_split(run).image_id.max())) + 1
    next_id = int(si.manifest["next_id"])
    rows, vectors, errors = [], [], []
    for path in tqdm(photo_files(paths), desc="add photos", unit="img"):
        path = path.resolve()
        if str(path) in known:
            continue
        try:
            image = load_rgb(path)
        except CbirError as e:
            errors.append(str(e))
            continue
        boxes = q.boxes(image)
        vectors.append(embed_photo(image, np.array([b["bbox"] for b in boxes]), q.spec, q.embedder))
        for i, b in enumerate(boxes):
            x, y, w, h = b["bbox"]
            rows.append({"id": next_id, "image_id": next_image, "instance": i, "x": x, "y": y, "w": w, "h": h,
                         "source": b["source"], "score": b["score"], "split": "added", "class_id": -1,
                         "path": str(path), "class_name": ""})
            next_id += 1
        next_image += 1
    if errors:
        log.warning("%d unreadable photo(s) skipped, first: %s", len(errors), errors[0])
    if rows:
        new = pd.DataFrame(rows).set_index("id")
        si.index.add_with_ids(np.concatenate(vectors).astype(np.float32), new.index.to_numpy(np.int64))
        si.table = pd.concat([table, new[table.columns]])
        si.manifest.update(count=int(si.index.ntotal), next_id=next_id)
        save_index(run, si)
    return len(rows), errors
