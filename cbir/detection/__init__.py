"""Detection: detectors behind one `Detector` protocol (torchvision builders, ONNX models), the stage that
writes COCO results, the import of any detector's results, and the quality report.

A detector takes decoded photos and returns, per photo, every box it found as
`{"category_id": COCO id, "score": s, "bbox": [x, y, w, h]}` in the photo's ORIGINAL pixels, best first.
A new detector is one new module with a builder registered in `build_detector`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from .. import CbirError
from ..images import Photo


class Detector(Protocol):
    spec: dict  # detector, weights, weights_fingerprint, and what else shapes its boxes

    def detect(self, photos: list[Photo]) -> list[list[dict]]: ...


def build_detector(name: str, weights: str, *, device: torch.device, min_size: str = "auto",
                   score_floor: float = 0.05, labels: str | None = None) -> Detector:
    """'fasterrcnn_*' (torchvision builders, weights API), 'onnx:PATH' (onnxruntime), or the folder or
    detector.pt of a `cbir train-detector` model."""
    if name.startswith("onnx:"):
        from .onnx_detector import OnnxDetector

        return OnnxDetector(name[5:], labels, threads=torch.get_num_threads())  # the process's CPUs, as torch
    from .torchvision_detector import DETECTORS, TorchvisionDetector

    if name not in DETECTORS and (name.endswith(".pt") or "/" in name or Path(name).exists()):
        from .frcnn import TrainedDetector

        return TrainedDetector(name, device=device, min_size=min_size, score_floor=score_floor)

    if name not in DETECTORS:
        raise CbirError(f"--detector {name}: unknown; choose from {', '.join(DETECTORS)}, onnx:PATH or a train-detector model folder")
    return TorchvisionDetector(name, weights, device=device, min_size=min_size, score_floor=score_floor)
