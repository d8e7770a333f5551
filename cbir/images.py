"""Decoding photos: upright RGB, any mode, any size — with every box kept in the original's pixels.

Large photos are decoded reduced (JPEG DCT scaling, then a resize) for speed and memory, and the
`Photo` says by how much, so detectors and crops convert boxes between decoded and original pixels.
PIL's decompression-bomb check is replaced by our own `max_pixels` limit, with a one-line refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import CbirError

DEFAULT_MAX_PIXELS = 200_000_000  # refuse larger photos (a 200 Mpx RGB decode is 600 MB)
DECODE_PIXELS = 40_000_000  # decode larger photos reduced to about this many pixels
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height

Image.MAX_IMAGE_PIXELS = None  # our own limit (max_pixels) replaces PIL's warning/bomb error, see open_photo

try:  # HEIC/HEIF (iPhone photos) through the optional `heic` extra; AVIF is in Pillow's own wheels
    from pillow_heif import register_heif_opener
except ImportError:
    pass
else:
    register_heif_opener()


@dataclass
class Photo:
    """A decoded photo: `image` may be reduced; `width`/`height` are the original upright size."""

    image: Image.Image
    width: int
    height: int

    @property
    def scale(self) -> float:
        """Original pixels per decoded pixel (1.0 unless the photo was decoded reduced)."""
        return self.width / self.image.width

    def to_decoded(self, boxes: np.ndarray) -> np.ndarray:
        """[x, y, w, h] boxes in original pixels → pixels of the decoded image."""
        return np.asarray(boxes, float).reshape(-1, 4) / self.scale

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        return np.asarray(boxes, float).reshape(-1, 4) * self.scale


class PhotoTooLarge(CbirError):
    """A photo over the pixel limit (a decompression-bomb guard): callers with their own limit say so."""


def _upright(path: Path, im: Image.Image, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the opened photo once upright, from its header; refuses over `max_pixels`."""
    width, height = im.size
    if width * height > max_pixels:
        raise PhotoTooLarge(f"{path}: {width}x{height} = {width * height / 1e6:.0f} Mpx exceeds --max-pixels "
                            f"{max_pixels / 1e6:.0f} Mpx; raise --max-pixels or downscale the photo")
    return (height, width) if im.getexif().get(0x0112, 1) in _TRANSPOSED else (width, height)


def upright_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, mode) of the upright photo from its header alone; refuses over `max_pixels`."""
    try:
        with Image.open(path) as im:
            return (*_upright(path, im, max_pixels), im.mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CbirError(f"{path}: cannot decode image ({e})") from None


def open_photo(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, decode_pixels: int = DECODE_PIXELS) -> Photo:
    """Decode to upright RGB: EXIF rotation applied, L/CMYK/RGBA/P converted (alpha on white),
    reduced when over `decode_pixels`. Raises CbirError naming the file when unreadable or too large
    (the size is checked from the header, before any pixel is decoded)."""
    try:
        with Image.open(path) as im:
            width, height = _upright(path, im, max_pixels)
            if width * height > decode_pixels:
                factor = (width * height / decode_pixels) ** 0.5
                im.draft("RGB", (int(im.width / factor), int(im.height / factor)))  # JPEG: decode at 1/2, 1/4, 1/8
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CbirError(f"{path}: cannot decode image ({e})") from None
    if im.width * im.height > decode_pixels:
        factor = (im.width * im.height / decode_pixels) ** 0.5
        im = im.resize((max(1, round(im.width / factor)), max(1, round(im.height / factor))), Image.BILINEAR)
    return Photo(im, width, height)


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image alone, for pictures (reports, the page) where original pixels do not matter."""
    return open_photo(path, max_pixels).image


def photo_files(paths: list[Path]) -> list[Path]:
    """Files given, and the photos inside folders given (recursively, sorted); absolute."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f.absolute() for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p.absolute())
        else:
            raise CbirError(f"{p}: no such file or folder")
    return out
