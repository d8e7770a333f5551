"""Every encoder kind, frozen or trained, rebuilt from the spec stored with its vectors (`embeddings/NAME`'s
meta.json). It lives here, above both the frozen encoders (`cbir.encoders`) and the trained heads
(`training.head`), so that neither layer imports the other. A new kind is one builder here; the kinds
built over other encoders (a head over its base encoder, a fusion of parts) are in `COMPOSITE` and get
this function to build their parts."""

from __future__ import annotations

import torch

from .. import CbirError
from ..encoders import Encoder
from ..encoders.cnn import cnn_encoder
from ..encoders.fused import fused_encoder
from .head import head_encoder

COMPOSITE = {"fused": fused_encoder, "head": head_encoder}  # kinds built over other encoders


def encoder_from_spec(spec: dict, device: torch.device, weights: str | None = None) -> Encoder:
    """The encoder a stored vector spec was made with, rebuilt (weights checked against its fingerprint)."""
    kind = spec.get("encoder", "cnn")
    if kind == "cnn":
        return cnn_encoder(spec, device, weights)
    if kind not in COMPOSITE:
        raise CbirError(f"encoder kind {kind!r} of these vectors is unknown to this cbir; known: cnn, "
                        f"{', '.join(COMPOSITE)}")
    return COMPOSITE[kind](spec, device, weights, build=encoder_from_spec)
