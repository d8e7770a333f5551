"""The encoder of fused vector sets (`full+det`): per query box, the whole photo's vector and the box's
vector, each L2-normalised, concatenated and divided by sqrt(parts) — the way `fuse_embeddings` fuses the
stored sets, so a fused index is searched in its own space."""

from __future__ import annotations

import numpy as np
import torch

from ..images import Photo
from ..vectors import unit_rows as _unit


class FusedEncoder:
    def __init__(self, parts: list, modes: list[str], spec: dict):
        self.parts, self.modes, self.spec = parts, modes, spec
        self.dim = sum(p.dim for p in parts)

    def encode(self, photo: Photo, boxes: np.ndarray) -> np.ndarray:
        return self.encode_batch([photo], [boxes])[0]

    def encode_batch(self, photos: list[Photo], boxes: list[np.ndarray]) -> list[np.ndarray]:
        counts = [len(b) for b in boxes]
        whole = [np.array([[0.0, 0.0, p.width, p.height]]) for p in photos]
        wanted = [whole if mode == "full" else [np.asarray(b, float) for b in boxes] for mode in self.modes]
        vectors = self._encode_parts(photos, wanted)
        blocks = [_unit(np.repeat(v, counts, axis=0) if mode == "full" else v)  # a photo's vector for each box
                  for v, mode in zip(vectors, self.modes)]
        fused = np.concatenate(blocks, 1) / np.sqrt(len(blocks))
        return np.split(fused.astype(np.float32), np.cumsum(counts)[:-1])

    def _encode_parts(self, photos: list[Photo], wanted: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Each part's vectors of its boxes ([n, dim] over all photos); parts sharing one encoder (full and det
        of the same trunk) go through it in a single pass."""
        out: list = [None] * len(self.parts)
        for encoder in {id(p): p for p in self.parts}.values():
            members = [i for i, p in enumerate(self.parts) if p is encoder]
            per_photo = encoder.encode_batch(photos, [np.concatenate([wanted[i][j] for i in members])
                                                      for j in range(len(photos))])
            pieces = [np.split(v, np.cumsum([len(wanted[i][j]) for i in members])[:-1])
                      for j, v in enumerate(per_photo)]
            for slot, i in enumerate(members):
                out[i] = np.concatenate([photo_pieces[slot] for photo_pieces in pieces])
        return out


def fused_encoder(spec: dict, device: torch.device, weights: str | None = None, *, build) -> FusedEncoder:
    """Each part's encoder rebuilt from its spec by `build` (any kind, trained ones too); parts with the same
    spec share one model."""
    built: dict[str, object] = {}
    for part in spec["parts"]:
        if part["fingerprint"] not in built:
            built[part["fingerprint"]] = build(part, device, weights)
    return FusedEncoder([built[p["fingerprint"]] for p in spec["parts"]], spec["modes"], spec)
