"""A learned projection head over frozen embeddings, and the encoder that applies it to new photos.

The head starts as the identity (or, for a smaller `dim`, the train vectors' principal directions), so
before any step it ranks exactly as the frozen vectors do; training adds a residual MLP whose last layer
starts at zero. Early stopping on the validation part can therefore always fall back to "no change".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import CbirError
from ..images import Photo


def unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x, dim=-1)


class ProjectionHead(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(dim_in, dim_out, bias=False)
        self.residual = nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(dim_out, dim_out))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def initialise(self, train: np.ndarray) -> None:
        """Identity when dims match; a random isometry into a wider output; else the top right-singular
        vectors of the unit train vectors (padded with random orthonormal rows when there are fewer train
        vectors than output dims). Similarities between inputs are kept, or kept as far as the dim allows."""
        dim_out, dim_in = self.projection.weight.shape
        with torch.no_grad():
            if dim_in == dim_out:
                self.projection.weight.copy_(torch.eye(dim_in))
                return
            if dim_out > dim_in:  # a wider output (a 50-d text vector into a 128-d space): an isometry
                q = torch.linalg.qr(torch.randn(dim_out, dim_in, generator=torch.Generator().manual_seed(0)))[0]
                self.projection.weight.copy_(q)
                return
            x = torch.as_tensor(train, dtype=torch.float32)
            _, _, vh = torch.linalg.svd(unit(x), full_matrices=False)
            rows = vh[:dim_out]
            if len(rows) < dim_out:
                extra = torch.linalg.qr(torch.randn(dim_in, dim_out, generator=torch.Generator().manual_seed(0)))[0].T
                rows = torch.linalg.qr(torch.cat([rows, extra[len(rows):]]).T)[0].T[:dim_out]
            self.projection.weight.copy_(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = unit(x)
        return unit(self.projection(x) + self.residual(x))


def load_head(path: Path) -> tuple[ProjectionHead, dict]:
    """A saved head (state and shape) — tensors and plain values only (`weights_only=True`)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        head = ProjectionHead(saved["dim_in"], saved["dim_out"], saved["dropout"])
        head.load_state_dict(saved["state"])
    except (OSError, RuntimeError, KeyError, EOFError) as e:
        raise CbirError(f"{path}: not a cbir head checkpoint ({type(e).__name__}); retrain it with "
                        f"`cbir train-embedder --force`") from None
    return head.eval(), saved


def apply_head(head: ProjectionHead, vectors: np.ndarray, batch: int = 4096) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([head(torch.as_tensor(np.array(vectors[i:i + batch], np.float32))).numpy()
                               for i in range(0, len(vectors), batch)] or [np.zeros((0, head.projection.out_features),
                                                                                    np.float32)])


class HeadEncoder:
    """The frozen encoder the head was trained on, then the head: new photos land in the trained space."""

    def __init__(self, base, head: ProjectionHead, spec: dict):
        self.base, self.head, self.spec = base, head, spec
        self.dim = head.projection.out_features

    def encode(self, photo: Photo, boxes: np.ndarray) -> np.ndarray:
        return self.encode_batch([photo], [boxes])[0]

    def encode_batch(self, photos: list[Photo], boxes: list[np.ndarray]) -> list[np.ndarray]:
        vectors = self.base.encode_batch(photos, boxes)
        projected = apply_head(self.head, np.concatenate(vectors))
        return np.split(projected.astype(np.float32), np.cumsum([len(v) for v in vectors])[:-1])


def load_checked_head(path: str | Path, fingerprint: str, trainer: str) -> ProjectionHead:
    """The head a vector spec names, refused in one line when it is gone or not the one the vectors were
    made with (`trainer`: the command that makes it again)."""
    from ..artifacts import file_sha256

    path = Path(path)
    if not path.is_file():
        raise CbirError(f"{path}: the trained head of these vectors is gone (was the run moved? retrain with "
                        f"`cbir {trainer}`)")
    if file_sha256(path)[:16] != fingerprint:
        raise CbirError(f"{path}: not the head these vectors were made with (fingerprint differs; retrain with "
                        f"`cbir {trainer} --force`)")
    return load_head(path)[0]


def head_encoder(spec: dict, device: torch.device, weights: str | None = None, *, build) -> HeadEncoder:
    """The head of a vector spec over its base encoder, which `build` makes from the spec's `base`."""
    head = load_checked_head(spec["head"], spec["head_fingerprint"], "train-embedder")
    return HeadEncoder(build(spec["base"], device, weights), head, spec)
