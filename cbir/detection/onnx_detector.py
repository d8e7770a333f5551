"""ONNX detectors with onnxruntime (an optional dependency: `pip install 'cbir[onnx]'`).

Two output layouts, told apart by the model's own signature:
- `tf-ssd`, the TensorFlow Object Detection API SSD export: uint8 NHWC input of a fixed size; outputs boxes
  [1, N, 4] as normalised ymin, xmin, ymax, xmax (not clipped), class [1, N] (label index = class + 1),
  scores [1, N], count [1];
- `torchvision`, a torchvision detection model exported with torch.onnx: float CHW input in [0, 1] (the
  model normalises and resizes inside), outputs boxes [N, 4] as x0, y0, x1, y1 in input pixels, labels [N],
  scores [N].

A label index becomes a COCO category id through `--labels FILE` (line i names label i; names are matched
to COCO's, ignoring case and punctuation, so "T.V." is "tv"; lines such as "???" name nothing and their
boxes are dropped); without a file the index is taken as the COCO id (both layouts' convention).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from .. import CbirError
from ..artifacts import read_text
from ..images import Photo
from ..weights import weights_file


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def label_map(path: Path) -> dict[int, int]:
    """Label index → COCO category id, from a label file (one name per line, line i = label i)."""
    from ..datasets.base import coco_categories

    try:
        names = read_text(path).splitlines()
    except OSError as e:
        raise CbirError(f"--labels {path}: unreadable ({type(e).__name__})") from None
    coco = {_key(n): i for i, n in enumerate(coco_categories()) if n not in ("N/A", "__background__")}
    mapping = {i: coco[_key(n)] for i, n in enumerate(names) if _key(n) in coco}
    if not mapping:
        raise CbirError(f"--labels {path}: no line names a COCO category (e.g. person, bird, tv)")
    return mapping


def _layout(session) -> str:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = " ".join(o.name.lower() for o in outputs)
    if len(inputs[0].shape) == 4 and inputs[0].shape[-1] == 3 and "uint8" in inputs[0].type and len(outputs) == 4:
        return "tf-ssd"
    if len(outputs) >= 3 and all(k in names for k in ("boxes", "labels", "scores")):
        return "torchvision"
    raise CbirError("unsupported ONNX detector layout: expected the TF Object Detection API SSD export (uint8 "
                    "[1, H, W, 3] in; boxes, classes, scores, count out) or a torchvision export (boxes, labels, "
                    "scores out)")


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
        try:
            self.layout = _layout(self.session)
        except CbirError as e:
            raise CbirError(f"{path}: {e}") from None
        self.labels = label_map(Path(labels)) if labels else None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        dims = inp.shape[1:3] if self.layout == "tf-ssd" else inp.shape[-2:]
        self.size = (int(dims[1]), int(dims[0])) if all(isinstance(d, int) for d in dims) else None  # (W, H)
        self.batched = self.layout == "torchvision" and len(inp.shape) == 4
        self.spec = {"detector": f"onnx:{resolved.spec}", "weights": resolved.spec,
                     "weights_fingerprint": resolved.fingerprint, "layout": self.layout,
                     "labels": str(Path(labels).absolute()) if labels else None}

    def _category(self, index: int) -> int | None:
        return index if self.labels is None else self.labels.get(index)

    def _raw(self, photo: Photo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One photo → boxes (x0, y0, x1, y1 in original pixels, clipped), label indices, scores."""
        image = photo.image.resize(self.size, Image.BILINEAR) if self.size else photo.image
        sx, sy = photo.width / image.width, photo.height / image.height  # also undoes a reduced decode
        if self.layout == "tf-ssd":
            boxes, classes, scores, count = self.session.run(None, {self.input_name: np.asarray(image, np.uint8)[None]})
            n = int(count[0])
            yxyx = np.clip(boxes[0, :n].astype(np.float64), 0, 1)
            xyxy = yxyx[:, [1, 0, 3, 2]] * [photo.width, photo.height, photo.width, photo.height]
            return xyxy, classes[0, :n].astype(int) + 1, scores[0, :n]
        pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
        out = dict(zip([o.name.lower() for o in self.session.get_outputs()],
                       self.session.run(None, {self.input_name: pixels[None] if self.batched else pixels})))
        pick = {k: next(v for name, v in out.items() if k in name) for k in ("boxes", "labels", "scores")}
        xyxy = np.asarray(pick["boxes"], np.float64).reshape(-1, 4) * [sx, sy, sx, sy]
        xyxy = np.clip(xyxy, 0, [photo.width, photo.height, photo.width, photo.height])
        return xyxy, np.asarray(pick["labels"]).reshape(-1).astype(int), np.asarray(pick["scores"]).reshape(-1)

    def detect(self, photos: list[Photo]) -> list[list[dict]]:
        found = []
        for photo in photos:
            boxes, labels, scores = self._raw(photo)
            dets = []
            for (x0, y0, x1, y1), label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
                category = self._category(label)
                if category is not None:
                    dets.append({"category_id": category, "score": round(float(score), 5),
                                 "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})
            found.append(sorted(dets, key=lambda d: -d["score"]))
        return found
