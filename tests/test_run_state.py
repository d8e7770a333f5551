"""Run state you can trust: freshness by fingerprint, one writer, atomic artifacts, kept edits, moved runs,
huge photos. Each test reproduces a failure a user met before these mechanisms existed."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cbir import CbirError
from cbir.artifacts import Staged, run_lock
from cbir.datasets import load_dataset
from cbir.detection.stage import DetectConfig, detect
from cbir.encoders.stage import EmbedConfig, embed
from cbir.layout import RunLayout
from cbir.retrieval.index import IndexConfig, build_index
from cbir.retrieval.ingest import add_photos, remove_images
from cbir.retrieval.saved import load_index
from cbir.status import run_status
from conftest import MINI, MINI_SPLIT, MOBILENET, SHARED, copy_run

SSD = SHARED / "weights" / "coco_ssd_mobilenet_v1_quant.onnx"


def _status(run) -> dict[str, str]:
    return {name: state for name, state, _ in run_status(run)}


def _cli(*args, check=True, cwd=None):
    out = subprocess.run([sys.executable, "-m", "cbir.cli", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd)
    if check and out.returncode != 0:
        raise AssertionError(out.stderr[-2000:])
    return out


def test_changed_detection_inputs_make_dependents_stale_and_redone(mini_run, tmp_path, caplog):
    run = copy_run(mini_run, tmp_path / "run")
    assert _status(run)["embeddings/det"] == "done"
    caplog.set_level("INFO")
    detect(DetectConfig(run=run, detections=MINI / "external_detections.json", score=0.6))
    assert "inputs changed (score 0.3 → 0.6)" in caplog.text
    status = _status(run)
    assert status["detections"] == "done" and status["embeddings/det"] == "stale"
    assert status["embeddings/full"] == "done"  # does not depend on the boxes
    _, table, _ = embed(EmbedConfig(run=run, mode="det", backbone="mobilenet_v2", weights=str(MOBILENET), workers=0))
    kept = json.loads((run / "detections" / "detections.json").read_text())
    assert len(table) == len(kept) and _status(run)["embeddings/det"] == "done"
    detect(DetectConfig(run=run, detections=MINI / "external_detections.json", score=0.6, fallback="full"))
    assert _status(run)["embeddings/det"] == "stale"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads((MINI / "external_detections.json").read_text())[:5]))
    detect(DetectConfig(run=run, detections=other, score=0.6, fallback="full"))
    assert "source.file_sha256" in caplog.text


def test_a_reprepared_split_makes_everything_downstream_stale(mini_run, tmp_path):
    from cbir.datasets.prepare import PrepareConfig, prepare

    run = copy_run(mini_run, tmp_path / "run")
    prepare(PrepareConfig(run=run, root=MINI, split="classes:1-9/10-20", workers=1))
    status = _status(run)
    assert status["dataset"] == "done"
    assert all(status[a] == "stale" for a in ("detections", "embeddings/full", "embeddings/gt", "embeddings/det"))


def test_a_second_writer_is_refused_at_once_and_the_manifest_lists_everything(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from cbir.artifacts import run_lock; "
                               f"from cbir.layout import RunLayout\nwith run_lock(RunLayout({str(run)!r})):\n"
                               f"    print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        out = _cli("embed", "--run", run, "--mode", "gt", "--backbone", "mobilenet_v2", "--weights", MOBILENET,
                   "--workers", 0, "--force", check=False)
        assert out.returncode == 2 and time.perf_counter() - start < 30
        assert f"is busy: pid {holder.pid}" in out.stderr and "Traceback" not in out.stderr
        assert _cli("status", "--run", run).returncode == 0  # readers need no lock
    finally:
        holder.kill()
        holder.wait()
    with run_lock(RunLayout(run)):  # released when the holder died
        pass
    manifest = json.loads((run / "manifest.json").read_text())["artifacts"]
    assert set(manifest) == set(RunLayout(run).artifact_names())
    assert {"dataset", "detections", "embeddings/full", "embeddings/gt", "embeddings/det"} <= set(manifest)


def test_a_crash_between_the_files_of_an_artifact_leaves_the_old_version(mini_run, tmp_path, monkeypatch):
    run = copy_run(mini_run, tmp_path / "run")
    before = (run / "embeddings" / "gt" / "vectors.npy").read_bytes()

    def crash(self, name, df):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Staged, "write_table", crash)  # after vectors.npy, before rows.parquet
    with pytest.raises(OSError):
        embed(EmbedConfig(run=run, mode="gt", backbone="mobilenet_v2", weights=str(MOBILENET), workers=0,
                          crop_resize="squash"))
    monkeypatch.undo()
    assert (run / "embeddings" / "gt" / "vectors.npy").read_bytes() == before
    assert _status(run)["embeddings/gt"] == "done"
    meta = json.loads((run / "embeddings" / "gt" / "meta.json").read_text())
    assert meta["summary"]["spec"]["crop_resize"] == "pad"  # old vectors under the old spec: never a mix
    build_index(IndexConfig(run=run, embeddings="gt", pca=8, factory="Flat"))
    assert not (run / ".staging").exists() or not list((run / ".staging").iterdir())


def test_a_new_version_never_removes_an_artifact_whose_name_extends_it(tmp_path):
    # `det@multisimilarity` (a trained head) and `det` share the prefix `.det@` of their version folders;
    # rewriting `det` once dropped the head's vectors
    from cbir.artifacts import Artifact, commit

    layout = RunLayout(tmp_path / "run")
    with run_lock(layout):
        for name in ("det@multisimilarity", "det@text-minilm", "det", "det"):
            with commit(Artifact(layout, layout.embeddings(name)), {"v": name}) as staged:
                staged.write_json("x.json", {"name": name})
    for name in ("det@multisimilarity", "det@text-minilm", "det"):
        assert json.loads((layout.root / "embeddings" / name / "x.json").read_text()) == {"name": name}
    assert len(list((layout.root / "embeddings").glob(".det@??????????"))) == 2  # current + previous of det


def test_rebuilds_keep_added_and_removed_images(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    build_index(IndexConfig(run=run, embeddings="det", pca=8, factory="Flat"))
    new = tmp_path / "new"
    new.mkdir()
    photo = sorted((MINI / "images" / "014.Indigo_Bunting").glob("*.jpg"))[1]
    Image.open(photo).save(new / "a.jpg")
    added, _, ids = add_photos(run, "det", [new], use_detector=False)
    victim = int(load_index(run, "det").table.query("split == 'test'").image_id.iloc[0])
    remove_images(run, "det", [victim])
    before = load_index(run, "det")
    added_rows = before.table[before.table.split == "added"]
    assert added == len(added_rows) == 1
    assert ids == {str(new / "a.jpg"): int(added_rows.image_id.iloc[0])}  # what `index --add` prints
    # the same settings again (what `cbir run` does): fresh, nothing dropped
    again = build_index(IndexConfig(run=run, embeddings="det", pca=8, factory="Flat"))
    assert again.table.index.equals(before.table.index)
    # new settings: rebuilt, the edits replayed with the same image ids
    rebuilt = build_index(IndexConfig(run=run, embeddings="det", pca=4, factory="Flat"))
    assert rebuilt.manifest["pca"] == 4 and len(rebuilt.manifest["edits"]) == 2
    assert rebuilt.table[rebuilt.table.split == "added"].image_id.tolist() == added_rows.image_id.tolist()
    assert victim not in set(rebuilt.table.image_id)
    sims, ids = rebuilt.search(np.asarray(before.added), 1)
    assert rebuilt.table.loc[ids[0, 0]].image_id == added_rows.image_id.iloc[0] and sims[0, 0] > 0.999
    # a rebuild for another encoder must re-embed the added photo: refused (index unchanged) when it is gone
    (new / "a.jpg").unlink()
    embed(EmbedConfig(run=run, mode="det", backbone="mobilenet_v2", weights=str(MOBILENET), workers=0, pool="avg"))
    with pytest.raises(CbirError, match="is gone; restore it"):
        build_index(IndexConfig(run=run, embeddings="det", pca=4, factory="Flat"))
    assert load_index(run, "det").table.index.equals(rebuilt.table.index)


def _kill_at_random_then_rerun(args, run, artifact, files, seed):
    """Start `cbir ARGS`, SIGKILL it at a random moment, rerun it to the end; return the artifact's bytes."""
    rng = random.Random(seed)
    proc = subprocess.Popen([sys.executable, "-m", "cbir.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(1.5, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = _status(run).get(artifact)
    assert state in (None, "done", "missing", "partial", "stale"), state  # never damaged
    _cli(*args)
    return {f: (run / artifact / f).read_bytes() for f in files}


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_kill_9_at_random_points_then_rerun_gives_the_clean_bytes(mini_run, tmp_path, seed):
    clean = copy_run(mini_run, tmp_path / "clean")
    killed = copy_run(mini_run, tmp_path / "killed")
    embed_args = ["embed", "--mode", "full", "--backbone", "mobilenet_v2", "--weights", MOBILENET, "--workers", 0,
                  "--name", "again"]
    _cli(*embed_args[:1], "--run", clean, *embed_args[1:])
    expected = {f: (clean / "embeddings" / "again" / f).read_bytes() for f in ("vectors.npy", "rows.parquet")}
    got = _kill_at_random_then_rerun([embed_args[0], "--run", killed, *embed_args[1:]], killed,
                                     "embeddings/again", expected, seed)
    assert got == expected
    for run in (clean, killed):
        _cli("index", "--run", run, "--embeddings", "det", "--pca", 8, "--factory", "Flat")
    add = ["index", "--name", "det", "--add", MINI / "images" / "014.Indigo_Bunting", "--no-detector"]
    _cli(add[0], "--run", clean, *add[1:])
    expected = {f: (clean / "index" / "det" / f).read_bytes() for f in ("index.faiss", "rows.parquet")}
    got = _kill_at_random_then_rerun([add[0], "--run", killed, *add[1:]], killed, "index/det", expected, seed)
    assert got == expected


@pytest.mark.slow  # kept out of CI's run (25-minute budget); `make test-all` runs it
def test_search_works_from_another_directory_after_moving_the_run(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    build_index(IndexConfig(run=run, embeddings="det", pca=8, factory="Flat"))
    photo = sorted((MINI / "images" / "017.Cardinal").glob("*.jpg"))[0]
    first = json.loads(_cli("search", "--run", run, "--index", "det", "--image", photo, "--json").stdout)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    os.rename(run, moved)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    again = json.loads(_cli("search", "--run", moved, "--index", "det", "--image", photo, "--json",
                            cwd=elsewhere).stdout)
    assert again["images"] == first["images"]
    # the weights file moved too: --weights points at it, checked against the recorded fingerprint
    spec = json.loads((moved / "index" / "det" / "meta.json").read_text())["summary"]["embedding_spec"]
    assert spec["weights"] == str(MOBILENET.absolute())
    bad = tmp_path / "other.pth"
    bad.write_bytes(MOBILENET.read_bytes()[:-8] + b"\0" * 8)
    out = _cli("search", "--run", moved, "--index", "det", "--image", photo, "--weights", bad, check=False)
    assert out.returncode == 2 and "not the recorded" in out.stderr


def test_a_60_mpx_photo_gets_its_box_in_original_pixels(tmp_path):
    pytest.importorskip("onnxruntime")
    from cbir.detection import build_detector
    from cbir.images import open_photo

    data_photo = sorted((MINI / "images" / "017.Cardinal").glob("*.jpg"))[0]
    bird = Image.open(data_photo).convert("RGB")
    canvas = Image.new("RGB", (9000, 6700), (120, 130, 110))  # 60.3 Mpx
    scale = 8
    big = bird.resize((bird.width * scale, bird.height * scale), Image.BILINEAR)
    at = (4000, 2500)
    canvas.paste(big, at)
    path = tmp_path / "huge.jpg"
    canvas.save(path, quality=90)
    photo = open_photo(path)
    assert (photo.width, photo.height) == (9000, 6700) and photo.image.width * photo.image.height <= 40_000_000
    small = build_detector(f"onnx:{SSD}", "", device=None).detect([open_photo(data_photo)])[0]
    found = build_detector(f"onnx:{SSD}", "", device=None).detect([photo])[0]
    birds_small = [d for d in small if d["category_id"] == 16 and d["score"] >= 0.3]
    birds = [d for d in found if d["category_id"] == 16 and d["score"] >= 0.3]
    assert birds_small and birds
    x, y, w, h = birds[0]["bbox"]
    sx, sy, sw, sh = birds_small[0]["bbox"]
    expected = np.array([at[0] + sx * scale, at[1] + sy * scale, sw * scale, sh * scale])
    got = np.array([x, y, w, h])
    iou = _iou(got, expected)
    assert iou > 0.6, (got, expected)
    with pytest.raises(CbirError, match="exceeds --max-pixels"):
        open_photo(path, max_pixels=50_000_000)


def _iou(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_status_of_a_fresh_prepare_lists_what_is_missing(tmp_path):
    from cbir.datasets.prepare import PrepareConfig, prepare

    run = tmp_path / "run"
    prepare(PrepareConfig(run=run, root=MINI, split=MINI_SPLIT, workers=1))
    status = _status(run)
    assert status["dataset"] == "done" and status["detections"] == "missing" and status["index/det"] == "missing"
    out = _cli("status", "--run", run).stdout
    assert "dataset" in out and "missing" in out
    assert len(load_dataset(RunLayout(run)).images) == 32


def test_artifacts_are_readable_by_a_second_user_of_a_shared_run(mini_run):
    """Files follow the user's umask (022 here: 0644), never a private 0600 of temp files."""
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in mini_run.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".lock"]
    assert files and all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in files), \
        [(str(p), oct(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o777 != 0o666 & ~mask][:3]
