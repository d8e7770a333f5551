"""ONNX detectors with onnxruntime (an optional dependency: `pip install 'cbir[onnx]'`).

Layout supported: the TensorFlow Object Detection API SSD export (uint8 NHWC input of a fixed size;
outputs boxes [1, N, 4] as normalised ymin, xmin, ymax, xmax — not clipped —, class [1, N] where
class + 1 is the COCO category id, scores [1, N], count [1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .. import CbirError
from ..encoders.weights import weights_file
from ..images import Photo


class OnnxDetector:
    def __init__(self, path: str, labels: str | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CbirError("--detector onnx:...: onnxruntime is not installed (pip install 'cbir[onnx]')") from None
        resolved = weights_file(Path(path))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(resolved.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types
            raise CbirError(f"{path}: not a loadable ONNX model ({type(e).__name__})") from None
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[-1] != 3 or len(self.session.get_outputs()) != 4:
            raise CbirError(f"{path}: unsupported ONNX layout (expected the TF Object Detection API SSD export: "
                            f"uint8 [1, H, W, 3] in; boxes, classes, scores, count out)")
        self.input_name, self.size = inp.name, (int(inp.shape[2]), int(inp.shape[1]))  # (W, H)
        self.spec = {"detector": f"onnx:{resolved.spec}", "weights": resolved.spec,
                     "weights_fingerprint": resolved.fingerprint, "layout": "tf-ssd",
                     "labels": str(Path(labels).absolute()) if labels else None}

    def detect(self, photos: list[Photo]) -> list[list[dict]]:
        found = []
        for photo in photos:
            pixels = np.asarray(photo.image.resize(self.size, Image.BILINEAR), np.uint8)[None]
            boxes, classes, scores, count = self.session.run(None, {self.input_name: pixels})
            n = int(count[0])
            b = np.clip(boxes[0, :n].astype(np.float64), 0, 1) * [photo.height, photo.width, photo.height, photo.width]
            found.append([{"category_id": int(c) + 1, "score": round(float(s), 5),
                           "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]}
                          for (y0, x0, y1, x1), c, s in zip(b.tolist(), classes[0, :n], scores[0, :n])])
        return found
