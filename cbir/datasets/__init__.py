"""Datasets: a reader turns a dataset on disk into two tables, the seam every later stage reads.

- images table: one row per image — image_id (the dataset's own id), path (relative to the image
  folder), class_id, class_name (the image-level label retrieval is scored on), split, width, height, mode;
- instances table: one row per ground-truth object — image_id, instance, category_id (COCO id),
  category, x, y, w, h in original pixels — so many boxes and categories per image fit.

A new dataset is one new module with a `DatasetReader`, registered in `READERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from .. import CbirError
from ..artifacts import Artifact, read_json, read_table
from ..layout import RunLayout
from .attributes import Attributes
from .base import (  # noqa: F401 (the package's API)
    IMAGE_COLUMNS,
    INSTANCE_COLUMNS,
    SPLITS,
    DatasetReader,
    Tables,
    check_splits,
    finite_number,
    image_file,
    relative_image_path,
    short_name,
)


def reader(name: str, root: Path, images: Path | None = None, captions: Path | None = None,
           **photo_options) -> DatasetReader:
    """CUB: `root` is the folder holding images.txt; COCO: `root` is the instances JSON, `images` its folder;
    photos: `root` is any folder of photos (`photo_options`: see `PhotoFolderReader`)."""
    root = Path(root).expanduser().absolute()
    if name == "cub":
        from .cub import CubReader

        return CubReader(root)
    if name == "coco":
        from .coco import CocoReader

        if images is None:
            raise CbirError("--coco needs --images DIR (the folder of the JSON's file_name entries)")
        return CocoReader(root, Path(images).expanduser().absolute(),
                          Path(captions).expanduser().absolute() if captions else None)
    if name == "photos":
        from .photos import PhotoFolderReader

        return PhotoFolderReader(root, **photo_options)
    raise CbirError(f"unknown dataset kind {name!r}; known: cub, coco, photos")


@dataclass
class RunDataset:
    """The prepared dataset of a run, as later stages see it."""

    images: pd.DataFrame
    instances: pd.DataFrame
    image_dir: Path
    fingerprint: str
    meta: dict
    folder: Path  # the committed dataset artifact (gt_coco.json, captions)

    @property
    def labelled(self) -> bool:
        """False for a photo folder prepared without --class-labels: no class to score retrieval on."""
        return self.meta["summary"].get("labelled", True)

    @cached_property
    def categories(self) -> list[dict]:
        """The dataset's COCO categories, as written into gt_coco.json (read once: the file is MBs on COCO)."""
        return read_json(self.folder / RunLayout.GT_COCO)["categories"]

    @cached_property
    def captions(self) -> pd.DataFrame | None:
        """image_id, caption of a dataset prepared with captions (COCO --captions), else None."""
        path = self.folder / RunLayout.CAPTIONS
        return read_table(path) if path.is_file() else None

    @cached_property
    def attributes(self) -> Attributes | None:
        """The attribute vocabulary and values of a dataset that has them (CUB), else None."""
        names = self.folder / RunLayout.ATTRIBUTES
        if not names.is_file():
            return None
        images = self.folder / RunLayout.IMAGE_ATTRIBUTES
        return Attributes(read_table(names), read_table(self.folder / RunLayout.CLASS_ATTRIBUTES),
                          read_table(images) if images.is_file() else None)

    def image_path(self, path: str) -> Path:
        return image_file(self.image_dir, path)

    @property
    def photos(self) -> ImageFolder:
        return ImageFolder(self.image_dir.absolute())


@dataclass(frozen=True)
class ImageFolder:
    """All that decoding needs of a run's dataset: where its photos are. Small and picklable, so that a
    cluster's decode tasks get it instead of the dataset's tables."""

    image_dir: Path

    def image_path(self, path: str) -> Path:
        return image_file(self.image_dir, path)


def load_dataset(layout: RunLayout) -> RunDataset:
    """The run's prepared tables; a one-line error naming `cbir prepare` when there are none."""
    art = Artifact(layout, layout.dataset)
    folder, meta = art.open(f"not a prepared run; create it with `cbir prepare --cub DIR --out {layout.root}`")
    return RunDataset(read_table(folder / layout.IMAGES), read_table(folder / layout.INSTANCES),
                      Path(meta["inputs"]["image_dir"]), meta["fingerprint"], meta, Path(folder))


def check_no_leak(layout: RunLayout, name: str, table: pd.DataFrame) -> None:
    """Refuse embeddings whose split labels disagree with the prepared dataset: a train image among the
    test queries (or a test image used to fit PCA) would inflate every number."""
    split = load_dataset(layout).images.set_index("image_id").split
    known = table.image_id.isin(split.index)
    if not known.all():
        raise CbirError(f"embeddings {name}: {int((~known).sum())} rows have image ids not in the dataset; "
                        f"redo them with `cbir embed --force`")
    wrong = table.split.to_numpy() != split.loc[table.image_id].to_numpy()
    if wrong.any():
        r = table[wrong].iloc[0]
        raise CbirError(f"embeddings {name}: {int(wrong.sum())} rows disagree with the dataset split (image "
                        f"{r.image_id} is '{r.split}' there, '{split.loc[r.image_id]}' in the dataset): train rows "
                        f"would leak into the test queries; redo them with `cbir embed --force`")
