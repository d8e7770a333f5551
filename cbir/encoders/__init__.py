"""Encoders: inputs in, vectors out, each carrying its own preprocessing and fingerprint.

The `Encoder` protocol is the seam between the stages and the models: the embed stage, queries of new
photos and `index --add` all go through it, so a new kind of encoder (a trained head, a text model) is
one new module registered in `ENCODERS`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .. import CbirError
from ..images import Photo


class Encoder(Protocol):
    spec: dict  # everything that shapes a vector; spec["fingerprint"] is compared before mixing vectors
    dim: int

    def encode(self, photo: Photo, boxes: np.ndarray) -> np.ndarray:
        """[n, dim] float32 vectors of `boxes` ([x, y, w, h] in the photo's original pixels)."""

    def encode_batch(self, photos: list[Photo], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """`encode` of several photos at once (one pass through the model); the same vectors."""


def encoder_from_spec(spec: dict, device: torch.device, weights: str | None = None) -> Encoder:
    """The encoder a stored vector spec was made with, rebuilt (weights checked against its fingerprint)."""
    from ..training.head import head_encoder
    from .cnn import cnn_encoder
    from .fused import fused_encoder

    encoders = {"cnn": cnn_encoder, "fused": fused_encoder, "head": head_encoder}
    kind = spec.get("encoder", "cnn")
    if kind not in encoders:
        raise CbirError(f"encoder kind {kind!r} of these vectors is unknown to this cbir; known: {', '.join(encoders)}")
    return encoders[kind](spec, device, weights)
