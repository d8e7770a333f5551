"""Photo-folder sync benchmark: how fast a folder is scanned, rescanned unchanged and rescanned with 1 % of its
files changed, and what a 1 % `cbir sync` costs next to a full `cbir run --photos`.

    python benchmarks/sync_bench.py --photos ../shared/data/cub_sample/images [--files 100000] [--work DIR]
        [--detector onnx:SSD.onnx --labels SSD.labels.txt --weights MOBILENET.pth]

1. **Scan** (`cbir.datasets.photos.scan`, what `prepare --photos` and `sync` run first) on a generated tree of
   `--files` files: copies of the real photos, each with 8 unique bytes after the JPEG's end (decoders ignore
   them), so every file is a distinct photo that must be hashed and decoded. First scan (hash + full decode),
   unchanged rescan (stat only), rescan with 1 % of the files rewritten (those hashed and decoded again).
   The tree is written once and read from the page cache afterwards, as on a machine that just wrote it.
2. **Sync against a full build** on the real photos as a labelled folder (class folders): `cbir run --photos`
   with the given detector and MobileNetV2, then 1 % of the photos changed (half replaced by new bytes, half
   added) and `cbir sync`, each timed as a whole process, with the stages' own seconds.

Results → benchmarks/results/sync_bench_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from report import write_report

from cbir.datasets.photos import PhotoFolderReader, changes, scan


def make_tree(photos: list[Path], root: Path, files: int, per_folder: int = 1000) -> list[Path]:
    """`files` distinct photos in folders of `per_folder`: real bytes plus a unique 8-byte tail."""
    made = []
    blobs = [p.read_bytes() for p in photos]
    for i in range(files):
        folder = root / f"folder_{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"photo_{i:06d}.jpg"
        path.write_bytes(blobs[i % len(blobs)] + i.to_bytes(8, "big"))
        made.append(path)
    return made


def rewrite(paths: list[Path], photos: list[Path], salt: int) -> None:
    """New bytes at the same paths (another photo's, with a new tail): changed content, changed size or time."""
    for i, path in enumerate(paths):
        path.write_bytes(photos[(i + 7) % len(photos)].read_bytes() + (salt + i).to_bytes(8, "big"))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def scan_rows(photos: list[Path], files: int, work: Path) -> list[dict]:
    root = work / "tree"
    shutil.rmtree(root, ignore_errors=True)
    seconds_made, paths = timed(lambda: make_tree(photos, root, files))
    print(f"tree of {files} files written in {seconds_made:.0f} s", file=sys.stderr)
    workers = os.cpu_count() or 2
    first_s, (table, _, _) = timed(lambda: scan(root, workers=workers))
    cache = work / "files.parquet"  # the run keeps the scan as dataset/files.parquet
    table.to_parquet(cache, index=False)
    reader = PhotoFolderReader(root, workers=workers, previous=cache)
    first = PhotoFolderReader(root, workers=workers).read()  # the previous version's tables (checks are memoised)

    def rescan():
        tables = reader.read()
        return changes(first.images, first.duplicates, tables)

    unchanged_s, found = timed(rescan)
    assert found["unchanged"] == files, found
    changed = paths[:: 100]
    rewrite(changed, photos, 10 ** 9)
    changed_s, found = timed(rescan)
    assert found["changed"] == len(changed), found
    shutil.rmtree(root)
    return [{"scan": "first scan (hash + decode every file)", "files": files, "seconds": round(first_s, 2),
             "files/s": round(files / first_s)},
            {"scan": "rescan, nothing changed (stat only; ids, labels, duplicates, the change report)", "files": files,
             "seconds": round(unchanged_s, 2), "files/s": round(files / unchanged_s)},
            {"scan": f"rescan, 1 % changed ({len(changed)} files hashed and decoded; the same)", "files": files,
             "seconds": round(changed_s, 2), "files/s": round(files / changed_s)}]


def cbir(*argv: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cbir", *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start, done.stdout


def stage_seconds(stdout: str) -> dict[str, float]:
    """The `stage  seconds  result` table `cbir run` and `cbir sync` print."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"(\S.*?)\s{2,}(\d+\.\d)\s", line)
        if m and m.group(1) != "stage":
            out[m.group(1)] = float(m.group(2))
    return out


def sync_rows(photos_root: Path, work: Path, flags: list[str], labelled: bool) -> tuple[list[dict], dict]:
    folder, run = work / "folder", work / "run"
    flags = ["--class-labels", "folders", *flags] if labelled else flags
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(photos_root, folder)
    photos = sorted(folder.rglob("*.jpg"))
    full_s, full_out = cbir("run", "--photos", str(folder), "--out", str(run), *flags)
    share = max(2, len(photos) // 100)
    rewrite(photos[1::100][: share // 2], photos, 10 ** 9)  # edited in place
    for i, src in enumerate(photos[50::100][: share - share // 2]):  # added beside the others
        shutil.copy(src, src.with_name(f"added_{i}.jpg"))
        with open(src.with_name(f"added_{i}.jpg"), "ab") as f:
            f.write(i.to_bytes(8, "big"))
    sync_s, sync_out = cbir("sync", "--run", str(run))
    full, synced = stage_seconds(full_out), stage_seconds(sync_out)
    heavy = [k for k in full if k == "detect" or k.startswith("embed")]
    kind = "labelled (evaluated)" if labelled else "unlabelled"
    rows = [{"folder": kind, "what": f"cbir run --photos ({len(photos)} photos)", "seconds": round(full_s, 1),
             "detect + embed s": round(sum(full[k] for k in heavy), 1), "share of the full build": "100 %"},
            {"folder": kind, "what": f"cbir sync after {share} photos changed ({share / len(photos):.1%})", "seconds": round(sync_s, 1),
             "detect + embed s": round(sum(synced.get(k, 0) for k in heavy), 1),
             "share of the full build": f"{sync_s / full_s:.1%} of the time; "
                                        f"{sum(synced.get(k, 0) for k in heavy) / sum(full[k] for k in heavy):.1%} "
                                        f"of detect + embed"}]
    summary = sync_out.splitlines()[0]
    shutil.rmtree(folder)
    shutil.rmtree(run)
    return rows, {"folder": kind, "full build stages": full, "sync stages": synced, "sync said": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="a folder of real photos (class subfolders)")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--detector", default=None)
    ap.add_argument("--labels", default=None)
    ap.add_argument("--weights", default=None, help="MobileNetV2 weights for the embeddings")
    ap.add_argument("--skip-scan", action="store_true")
    ap.add_argument("--skip-sync", action="store_true")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="sync_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    photos = sorted(a.photos.rglob("*.jpg"))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join(["python", *sys.argv])}
    parts = ["# Photo-folder sync", "", f"`{result['command']}` — {result['machine']}", ""]
    if not a.skip_scan:
        result["scan"] = scan_rows(photos, a.files, work)
        parts += ["## Scanning a folder", "", f"A generated tree of {a.files:,} distinct photos ({len(photos)} real "
                  "CUB photos, each copy with its own 8-byte tail), in folders of 1,000. Goal: an unchanged rescan "
                  "of 100,000 files in under 5 s.", "", pd.DataFrame(result["scan"]).to_markdown(index=False), ""]
    if not a.skip_sync:
        flags = ["--backbone", "mobilenet_v2", "--modes", "full,det"]
        flags += ["--detector", a.detector] if a.detector else []
        flags += ["--labels", a.labels] if a.labels else []
        flags += ["--weights", a.weights] if a.weights else []
        runs = [sync_rows(a.photos, work, flags, labelled) for labelled in (False, True)]
        result.update(sync=[r for rows, _ in runs for r in rows], stages=[detail for _, detail in runs])
        parts += ["## A 1 % sync against a full build", "", "The real photos as a folder, once without labels and "
                  "once labelled by class folder (`--class-labels folders`: then `cbir run` and `cbir sync` also "
                  f"score retrieval); `cbir run --photos DIR {' '.join(flags)}`, then 1 % of the photos changed "
                  "(half edited in place, half added) and `cbir sync`; whole processes, start-up included. Goal: "
                  "under 3 % of a full build.", "", pd.DataFrame(result["sync"]).to_markdown(index=False), ""]
        for detail in result["stages"]:
            parts += [f"{detail['folder']}: sync's report `{detail['sync said']}`; stage seconds (full build → "
                      "sync): " + ", ".join(f"{k} {v:.1f} → {detail['sync stages'].get(k, 0):.1f}"
                                          for k, v in detail["full build stages"].items()), ""]
    write_report("sync_bench_cpu", result, parts)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
