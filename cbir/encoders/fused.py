"""The encoder of fused vector sets (`full+det`): per query box, the whole photo's vector and the box's
vector, each L2-normalised, concatenated and divided by sqrt(parts) — the way `fuse_embeddings` fuses the
stored sets, so a fused index is searched in its own space."""

from __future__ import annotations

import numpy as np
import torch

from ..images import Photo


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FusedEncoder:
    def __init__(self, parts: list, modes: list[str], spec: dict):
        self.parts, self.modes, self.spec = parts, modes, spec
        self.dim = sum(p.dim for p in parts)

    def encode(self, photo: Photo, boxes: np.ndarray) -> np.ndarray:
        return self.encode_batch([photo], [boxes])[0]

    def encode_batch(self, photos: list[Photo], boxes: list[np.ndarray]) -> list[np.ndarray]:
        counts = [len(b) for b in boxes]
        blocks = []
        for encoder, mode in zip(self.parts, self.modes):
            if mode == "full":  # one vector per photo, repeated for each of its boxes
                whole = [np.array([[0.0, 0.0, p.width, p.height]]) for p in photos]
                vectors = np.concatenate(encoder.encode_batch(photos, whole))
                blocks.append(_unit(np.repeat(vectors, counts, axis=0)))
            else:
                blocks.append(_unit(np.concatenate(encoder.encode_batch(photos, boxes))))
        fused = np.concatenate(blocks, 1) / np.sqrt(len(blocks))
        return np.split(fused.astype(np.float32), np.cumsum(counts)[:-1])


def fused_encoder(spec: dict, device: torch.device, weights: str | None = None) -> FusedEncoder:
    """Each part's encoder rebuilt from its spec; parts with the same spec share one model."""
    from . import encoder_from_spec

    built: dict[str, object] = {}
    for part in spec["parts"]:
        if part["fingerprint"] not in built:
            built[part["fingerprint"]] = encoder_from_spec(part, device, weights)
    return FusedEncoder([built[p["fingerprint"]] for p in spec["parts"]], spec["modes"], spec)
