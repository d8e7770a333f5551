"""`cbir download-cub`: fetch the official CUB-200-2011 archive, resumably, and verify it."""

from __future__ import annotations

import hashlib
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from . import CbirError

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, timeout: float = 30) -> Path:
    """Download to `dest`, continuing a `.part` file left by an interrupted run (HTTP Range)."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the .part is already complete
            part.rename(dest)
            return dest
        raise CbirError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CbirError(f"cannot reach {url} ({getattr(e, 'reason', e)}); download CUB_200_2011.tgz by hand "
                        f"and pass its folder to `cbir prepare --cub`") from None
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        total = int(response.headers.get("Content-Length", 0)) + have
        with open(part, "ab" if resumed else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                               unit_scale=True, desc=dest.name) as bar:
            while block := response.read(1 << 16):
                f.write(block)
                bar.update(len(block))
    part.rename(dest)
    return dest


def download_cub(out: Path, url: str = CUB_URL, md5: str = CUB_MD5) -> Path:
    """Fetch, verify and extract; returns the CUB root (the folder holding images.txt). Idempotent."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    archive = out / Path(url).name
    if not archive.exists():
        fetch(url, archive)
    got = _md5(archive)
    if got != md5:
        archive.rename(archive.with_name(archive.name + ".bad"))
        raise CbirError(f"{archive}: md5 {got} != expected {md5}; moved aside to {archive.name}.bad, run again")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        root = out / names[0].split("/")[0]
        if not (root / "images.txt").exists():
            tar.extractall(out, filter="data")
    if not (root / "images.txt").exists():
        raise CbirError(f"{archive}: extracted, but {root}/images.txt is missing; is this the CUB archive?")
    return root
