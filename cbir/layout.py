"""`RunLayout`: the one place that knows where everything lives inside a run directory.

Every artifact is a directory named by a short, '/'-separated artifact name (``dataset``,
``embeddings/det``, ``index/det`` ...). The name is a relative symlink to the committed version
(``embeddings/.det@<token>``), so a user sees stable paths, a reader that resolves the name once sees
one consistent version, and moving the whole run keeps working. No other module builds a path
inside a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import CbirError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]{0,63}")
META = "meta.json"

# artifact kinds that hold one artifact per name (a folder of them), and the single ones
COLLECTIONS = ("embeddings", "models", "index", "reports")
SINGLES = ("dataset", "eda", "detections")


def check_name(name: str, what: str = "--name") -> str:
    """Names become folder names inside the run: a safe character set, never a path."""
    if not SAFE_NAME.fullmatch(name or "") or name.startswith("."):
        raise CbirError(f"{what} {name!r}: use 1-64 letters, digits and _ . + @ - (no slashes), starting with a "
                        f"letter or digit")
    return name


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run. Artifact names are relative; `path(name)` gives the stable (symlinked) folder."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().absolute())

    # ---------------------------------------------------------------- bookkeeping files
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def staging(self) -> Path:
        """Where a new artifact version is written before it is renamed into place (same filesystem)."""
        return self.root / ".staging"

    @property
    def run_config(self) -> Path:
        """The settings of the last `cbir run` (what `cbir sync` reruns)."""
        return self.root / "run.json"

    @property
    def uploads(self) -> Path:
        """Photos sent to the service's `POST /v1/images`, named by their content: an index's --add record
        points at these files, so a rebuild can re-embed them."""
        return self.root / "uploads"

    def partial(self, artifact: str) -> Path:
        """Finished shards of an interrupted stage, so the same command resumes."""
        return self.root / ".partial" / artifact.replace("/", "__")

    # ---------------------------------------------------------------- artifacts
    def path(self, artifact: str) -> Path:
        return self.root / artifact

    def artifact_names(self) -> list[str]:
        """Every committed artifact present, in pipeline order."""
        names = [n for n in SINGLES if (self.root / n).exists()]
        for collection in COLLECTIONS:
            folder = self.root / collection
            if folder.is_dir():
                names += sorted(f"{collection}/{p.name}" for p in folder.iterdir() if not p.name.startswith("."))
        return names

    # the named artifacts of the pipeline
    dataset = "dataset"
    eda = "eda"
    detections = "detections"

    @staticmethod
    def embeddings(name: str) -> str:
        return f"embeddings/{check_name(name, '--embeddings')}"

    @staticmethod
    def model(name: str) -> str:
        return f"models/{check_name(name, '--name')}"

    @staticmethod
    def index(name: str) -> str:
        return f"index/{check_name(name, '--index')}"

    @staticmethod
    def report(name: str) -> str:
        return f"reports/{check_name(name, 'report')}"

    # files inside artifacts (names only: the artifact folder is resolved by the reader)
    IMAGES = "images.parquet"
    INSTANCES = "instances.parquet"
    GT_COCO = "gt_coco.json"
    CAPTIONS = "captions.parquet"
    ATTRIBUTES = "attributes.parquet"
    CLASS_ATTRIBUTES = "class_attributes.parquet"
    IMAGE_ATTRIBUTES = "image_attributes.parquet"
    BAD_IMAGES = "bad_images.txt"
    FILES = "files.parquet"  # a photo folder's scan: every file's size, time, hash and check
    SKIPPED = "skipped.csv"  # the files of a photo folder that are not usable photos, with the reason
    DUPLICATES = "duplicates.csv"  # paths whose bytes equal another path's (one image, several paths)
    DETECTIONS = "detections.json"
    RAW_DETECTIONS = "raw_detections.json"  # the detector's own answer per image, before fallbacks (for syncs)
    BAD_DETECTIONS = "bad_detections.txt"
    VECTORS = "vectors.npy"
    ROWS = "rows.parquet"
    FAISS = "index.faiss"
    ADDED_VECTORS = "added_vectors.npy"
    METRICS = "metrics.csv"
    COMPARISON = "comparison.md"
    REPORT = "report.md"
