"""CUB's 312 binary attributes: the vocabulary, each class's share of images showing each attribute, and
(in a full download) each image's own labels — read from the official files, turned into short phrases
("a red crown", "a cone bill") from which sentences are sampled to pair words with birds.

The attribute names follow one pattern, `has_<part>_<kind>::<value>` (`has_wing_color::black`), so the
phrases are built by rule, never listed by hand; a group is the part of the name before `::`, and exactly
one value of a group describes a bird in a sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CbirError
from ..artifacts import read_text

ATTRIBUTE_NAMES = "attributes.txt"
CLASS_VALUES = "class_attribute_labels_continuous.txt"
IMAGE_LABELS = "image_attribute_labels.txt"
KINDS = ("color", "pattern", "shape", "size")  # the read-out's groups; a bill's length counts as size


def attribute_files(root: Path) -> dict[str, Path]:
    """The attribute files of a CUB folder that has them ({} when it has none): the vocabulary sits in
    `attributes/` (this sample) or beside the dataset folder (the official archive)."""
    folder = root / "attributes"
    names = next((p for p in (folder / ATTRIBUTE_NAMES, root / ATTRIBUTE_NAMES, root.parent / ATTRIBUTE_NAMES)
                  if p.is_file()), None)
    if names is None or not (folder / CLASS_VALUES).is_file():
        return {}
    files = {"names": names, "classes": folder / CLASS_VALUES}
    if (folder / IMAGE_LABELS).is_file():
        files["images"] = folder / IMAGE_LABELS
    return files


def describe(name: str) -> dict:
    """`has_wing_color::black` → group wing_color, part wing, kind color, value black, phrase 'a black wing'."""
    m = re.fullmatch(r"has_(?:(\w+?)_)?(color|pattern|shape|size|length)::(.+)", name)
    if not m:
        raise ValueError(f"not a has_<part>_<kind>::<value> attribute name: {name!r}")
    part, kind, raw = (m.group(1) or "").replace("_", " "), m.group(2), m.group(3)
    value = re.sub(r"\(.*?\)", "", raw).replace("_", " ").replace("-", " ").strip()
    article = "an" if value[0] in "aeiou" else "a"
    if kind == "size":
        phrase = f"{article} {value} bird"
    elif kind == "length":
        phrase = f"a bill {value}"
    elif part == "primary":
        phrase = f"{value} plumage"
    elif kind == "shape" and not part:
        phrase = f"{article} {value} shape"
    elif part in value or part.endswith("parts"):  # tail and wing shapes name their part; parts are plural
        phrase = f"{value}" if part in value else f"{value} {part}"
    else:
        phrase = f"{article} {value} {part}"
    return {"group": f"{part.replace(' ', '_')}_{kind}".strip("_"), "part": part,
            "kind": "size" if kind == "length" else kind, "value": value, "phrase": phrase}


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in read_text(path).splitlines() if line.strip()]


@dataclass
class Attributes:
    names: pd.DataFrame  # attribute_id, name, group, part, kind, value, phrase
    classes: pd.DataFrame  # class_id + one float column per attribute id (share of the class's images, 0-1)
    images: pd.DataFrame | None = None  # image_id, attribute_id, present, certainty (a full download only)

    def class_matrix(self, class_ids) -> np.ndarray:
        """[len(class_ids), n_attributes] shares in the vocabulary's order."""
        table = self.classes.set_index("class_id")
        missing = set(class_ids) - set(table.index)
        if missing:
            raise CbirError(f"no attribute values for class {min(missing)}")
        return table.loc[list(class_ids)].to_numpy(np.float32)

    @cached_property
    def groups(self) -> list[np.ndarray]:
        """The vocabulary's rows per attribute group, in the vocabulary's order (one value per group is
        what a sentence says)."""
        return list(self.names.groupby("group", sort=False).indices.values())

    def sample_sentence(self, shares: np.ndarray, n_attributes: int, rng: np.random.Generator
                        ) -> tuple[str, np.ndarray]:
        """One description of a bird whose attribute shares are `shares`: `n_attributes` groups drawn with
        probability by how strongly the bird shows them, one value per group drawn by its share. Returns
        the sentence and the 0/1 vector of the attributes it names."""
        strength = np.array([shares[idx].max() for idx in self.groups])
        alive = np.flatnonzero(strength > 0)
        if len(alive) == 0:
            return "a bird", np.zeros(len(self.names), np.float32)
        chosen = rng.choice(alive, size=min(n_attributes, len(alive)), replace=False,
                            p=strength[alive] / strength[alive].sum())
        picked = [self.groups[g][rng.choice(len(self.groups[g]), p=shares[self.groups[g]] / shares[self.groups[g]].sum())]
                  for g in chosen]
        return self.sentence(picked), np.isin(np.arange(len(self.names)), picked).astype(np.float32)

    def strongest_sentence(self, shares: np.ndarray, n_attributes: int, usual: np.ndarray | None = None) -> str:
        """The description a person would give of a class: the `n_attributes` attributes (one per group) by
        which it stands out from `usual` (the shares of birds in general, e.g. the train classes' mean;
        None: simply its most certain attributes). Ties are broken by the vocabulary's order."""
        lift = shares - (usual if usual is not None else 0)
        best = [(lift[idx].max(), idx[int(np.argmax(lift[idx]))]) for idx in self.groups]
        order = sorted(range(len(best)), key=lambda i: -best[i][0])[:n_attributes]
        return self.sentence([best[i][1] for i in order])

    def sentence(self, picked: list[int]) -> str:
        """'a bird with a red crown, a black wing and a cone bill' (a size becomes 'a small bird ...')."""
        rows = self.names.iloc[list(picked)]
        size = rows[rows.group == "size"]
        phrases = list(rows[rows.group != "size"].phrase)
        head = size.phrase.iloc[0] if len(size) else "a bird"
        if not phrases:
            return head
        tail = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{head} with {tail}"


def read_attributes(files: dict[str, Path], class_ids: set[int]) -> Attributes:
    """The vocabulary and the values of `class_ids`; a malformed line is one error naming file and line."""
    rows = []
    for lineno, parts in enumerate(_lines(files["names"]), 1):
        try:
            rows.append({"attribute_id": int(parts[0]), "name": parts[1], **describe(parts[1])})
        except (ValueError, IndexError) as e:
            raise CbirError(f"{files['names']}:{lineno}: malformed attribute line ({e})") from None
    names = pd.DataFrame(rows)
    values = []
    for lineno, parts in enumerate(_lines(files["classes"]), 1):
        try:
            numbers = [float(p) for p in parts]
        except ValueError as e:
            raise CbirError(f"{files['classes']}:{lineno}: not a number ({e})") from None
        if len(numbers) != len(names) or not np.isfinite(numbers).all() or min(numbers) < 0 or max(numbers) > 100:
            raise CbirError(f"{files['classes']}:{lineno}: expected {len(names)} shares in 0-100, got "
                            f"{len(numbers)} values in {min(numbers):g}..{max(numbers):g}")
        values.append(numbers)
    classes = pd.DataFrame(np.asarray(values, np.float32) / 100, columns=[str(i) for i in names.attribute_id])
    classes.insert(0, "class_id", np.arange(1, len(classes) + 1))  # line N is class N, as in classes.txt
    images = _image_labels(files["images"], len(names)) if "images" in files else None
    return Attributes(names, classes[classes.class_id.isin(class_ids)].reset_index(drop=True), images)


def _image_labels(path: Path, n_attributes: int) -> pd.DataFrame:
    """image_id attribute_id is_present certainty [time]; a few official lines carry an extra field."""
    rows = _lines(path)
    bad = next((i for i, r in enumerate(rows, 1) if len(r) < 4 or not all(p.isdigit() for p in r[:4])), None)
    if bad:
        raise CbirError(f"{path}:{bad}: expected 'image_id attribute_id is_present certainty_id ...'")
    table = pd.DataFrame([r[:4] for r in rows], columns=["image_id", "attribute_id", "present", "certainty"]).astype(int)
    if not table.attribute_id.between(1, n_attributes).all():
        raise CbirError(f"{path}: attribute id {table.attribute_id.max()} outside 1-{n_attributes}")
    return table
