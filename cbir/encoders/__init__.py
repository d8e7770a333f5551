"""Encoders: inputs in, vectors out, each carrying its own preprocessing and fingerprint.

The `Encoder` protocol is the seam between the stages and the models: the embed stage, queries of new
photos and `index --add` all go through it, so a new kind of encoder (a trained head, a text model) is
one new module registered in `cbir.training.encoders`, the one place that sees both the frozen
encoders here and the trained ones above them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..images import Photo


class Encoder(Protocol):
    spec: dict  # everything that shapes a vector; spec["fingerprint"] is compared before mixing vectors
    dim: int

    def encode(self, photo: Photo, boxes: np.ndarray) -> np.ndarray:
        """[n, dim] float32 vectors of `boxes` ([x, y, w, h] in the photo's original pixels)."""

    def encode_batch(self, photos: list[Photo], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """`encode` of several photos at once (one pass through the model); the same vectors."""
