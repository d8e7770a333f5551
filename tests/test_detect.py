import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

from cbir import CbirError
from cbir.artifacts import Interrupted, run_in_shards
from cbir.datasets.prepare import PrepareConfig, prepare
from cbir.detection.report import box_iou_xywh, detection_quality, write_detection_report
from cbir.detection.stage import DetectConfig, detect
from cbir.layout import RunLayout
from conftest import EXTERNAL, MINI


@pytest.fixture
def tiny_run(tmp_path):
    """cub_mini restricted to classes 1 (train) and 14 (test): 16 images."""
    run = tmp_path / "run"
    prepare(PrepareConfig(run=run, root=MINI, split="classes:1-1/14-14", workers=1))
    return run


ALL_COCO = tuple(c for c in FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
                 if c not in ("__background__", "N/A"))


def test_torchvision_detector_random_weights_writes_valid_coco_results(tiny_run, caplog):
    # random weights rarely say "bird": keep every category so real boxes flow through the plumbing
    result = detect(DetectConfig(run=tiny_run, weights="none", splits=("train",), score=0.0, max_per_image=3,
                                 workers=0, batch_size=4, categories=ALL_COCO))
    assert "RANDOM WEIGHTS" in caplog.text
    dets = json.loads((tiny_run / "detections" / "detections.json").read_text())
    detected = [d for d in dets if d["source"] == "detected"]
    assert len(detected) == 8 * 3
    per_image = np.bincount([d["image_id"] for d in detected])
    assert per_image.max() == 3
    assert result.meta["images"] == 8 and {d["category_id"] for d in dets} <= set(range(1, 91))
    for d in detected:  # boxes in original-image pixels, inside the image
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 500.5
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tiny_run / "dataset" / "gt_coco.json"))
        res = gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets])
    assert len(res.getAnnIds()) == len(dets)
    meta = result.meta
    assert meta["weights_fingerprint"] == "random-init-seed0" and meta["min_size"] == "auto"


def test_finished_detection_is_a_noop_unless_forced(tiny_run):
    cfg = DetectConfig(run=tiny_run, detections=MINI / "external_detections.json")
    detect(cfg)
    stamp = (tiny_run / "detections" / "detections.json").stat().st_mtime_ns
    detect(cfg)
    assert (tiny_run / "detections" / "detections.json").stat().st_mtime_ns == stamp
    detect(DetectConfig(run=tiny_run, detections=MINI / "external_detections.json", force=True, fallback="full"))
    assert json.loads((tiny_run / "detections" / "meta.json").read_text())["summary"]["fallback"] == "full"


def _independent_ap50(run, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(run / "dataset" / "gt_coco.json"))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.catIds = [16]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[1]


def test_import_and_quality_report_match_independent_numbers(sample_run):
    q = write_detection_report(sample_run, force=True)
    raw = [d for d in json.loads(EXTERNAL.read_text()) if d["score"] >= 0.3]
    assert q["AP50"] == pytest.approx(_independent_ap50(sample_run, raw), abs=1e-9)
    assert 0.5 < q["AP50"] < 0.95  # a real COCO detector on CUB birds
    # top-box IoU by hand on a few images
    gt = {a["image_id"]: a["bbox"] for a in json.loads((sample_run / "dataset" / "gt_coco.json").read_text())["annotations"]}
    tops = {}
    for d in sorted(raw, key=lambda d: -d["score"]):
        tops.setdefault(d["image_id"], d["bbox"])
    ious = [box_iou_xywh(np.array([tops[i]]), np.array([gt[i]]))[0] for i in gt if i in tops]
    assert q["median_top_box_iou"] == pytest.approx(np.median(ious), abs=2e-3)
    assert q["share_with_box"] == pytest.approx(len(tops) / len(gt), abs=1e-4)
    assert q["top_box_iou50_rate"] == pytest.approx(sum(v >= 0.5 for v in ious) / len(gt), abs=1e-4)
    assert "AP50" in (sample_run / "reports" / "detection" / "detection.md").read_text()


def test_multi_instance_images_and_fallback_sources(sample_run):
    dets = json.loads((sample_run / "detections" / "detections.json").read_text())
    meta = json.loads((sample_run / "detections" / "meta.json").read_text())["summary"]
    assert meta["images_with_several_instances"] > 0
    ids = [d["image_id"] for d in dets]
    assert len(set(ids)) == meta["images"]  # fallback gt: every image has an instance
    fallback = [d for d in dets if d["source"] == "fallback-gt"]
    gt = {a["image_id"]: a["bbox"] for a in json.loads((sample_run / "dataset" / "gt_coco.json").read_text())["annotations"]}
    assert fallback and all(d["bbox"] == pytest.approx(gt[d["image_id"]]) for d in fallback)
    assert meta["fallback_rate"] == pytest.approx(len(fallback) / meta["images"], abs=1e-4)


def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    b = np.array([[5, 0, 10, 10], [20, 20, 5, 5]], float)
    assert box_iou_xywh(a, b) == pytest.approx([50 / 150, 0.0])


def _write(tmp_path, obj):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(obj))
    return path


def test_bad_detection_files(tiny_run, tmp_path):
    good = {"image_id": 1, "category_id": 16, "bbox": [10, 10, 50, 50], "score": 0.9}
    with pytest.raises(CbirError, match="expected a JSON list"):
        detect(DetectConfig(run=tiny_run, detections=_write(tmp_path, {"annotations": []})))
    with pytest.raises(CbirError, match="entry 0: is not"):
        detect(DetectConfig(run=tiny_run, detections=_write(tmp_path, [{"image_id": 1, "bbox": [1, 2]}])))
    with pytest.raises(CbirError, match="another dataset"):
        detect(DetectConfig(run=tiny_run, detections=_write(tmp_path, [{**good, "image_id": 999999}])))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(CbirError, match="not valid JSON"):
        detect(DetectConfig(run=tiny_run, detections=tmp_path / "broken.json"))


def test_bad_entries_stop_the_import_or_are_listed_with_skip_bad(tiny_run, tmp_path):
    good = {"image_id": 1, "category_id": 16, "bbox": [10, 10, 50, 50], "score": 0.9}
    dets = [good, {**good, "image_id": 999999}, {**good, "bbox": [float("nan"), 1, 2, 3]}, dict(good),
            {**good, "bbox": [-30, -10, 100, 100]}, {**good, "bbox": [10, 10, 0.2, 40]},
            {**good, "category_id": 1}, {**good, "score": 1.5}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    with pytest.raises(CbirError, match=r"3 bad detection\(s\), first: .*d.json: entry 2: bbox \[nan"):
        detect(DetectConfig(run=tiny_run, detections=path, fallback="none"))
    result = detect(DetectConfig(run=tiny_run, detections=path, fallback="none", skip_bad=True))
    listed = (tiny_run / "detections" / "bad_detections.txt").read_text().splitlines()
    assert [line.split(": ")[1] for line in listed] == ["entry 2", "entry 3", "entry 7"]
    assert result.meta["bad_detections"] == 3
    counts = result.meta["box_counts"]  # what is left is usable: another image, clipped, too thin, other kinds
    assert (counts["not_in_run"], counts["degenerate"], counts["other_category"], counts["clipped"]) == (1, 1, 1, 1)
    boxes = sorted(d["bbox"] for d in result.detections)
    assert boxes == [[0.0, 0.0, 70.0, 90.0], [10.0, 10.0, 50.0, 50.0]]


def test_unreadable_image_is_listed_and_skipped(tmp_path):
    cub = tmp_path / "cub"
    shutil.copytree(MINI, cub)
    run = tmp_path / "run"
    prepare(PrepareConfig(run=run, root=cub, split="classes:1-1/14-14", workers=1))
    victim = sorted((cub / "images" / "001.Black_footed_Albatross").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    result = detect(DetectConfig(run=run, weights="none", splits=("train",), workers=0))
    assert len(result.meta["unreadable"]) == 1 and victim.name in result.meta["unreadable"][0]["error"]
    bad_id = result.meta["unreadable"][0]["image_id"]
    assert bad_id not in {d["image_id"] for d in result.detections}
    assert len({d["image_id"] for d in result.detections}) == 7


def test_sharded_work_resumes_after_interruption(tmp_path):
    calls = []

    def compute(items):
        calls.append(list(items))
        if len(calls) == 2 and not (tmp_path / "crashed").exists():
            (tmp_path / "crashed").touch()
            raise KeyboardInterrupt
        return [x * 2 for x in items]

    save = lambda p, r: p.write_text(json.dumps(r))  # noqa: E731
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    items = list(range(10))
    with pytest.raises(Interrupted, match="1 of 3 shards are kept"):
        run_in_shards(items, 4, tmp_path / "partial", "v1", compute, save, load)
    out = run_in_shards(items, 4, tmp_path / "partial", "v1", compute, save, load)
    assert [x for shard in out for x in shard] == [x * 2 for x in items]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7], [8, 9]]  # shard 0 was not redone
    calls.clear()
    run_in_shards(items, 4, tmp_path / "partial", "v2", compute, save, load)
    assert len(calls) == 3  # another config discards the old shards


def test_quality_report_requires_detections(tiny_run):
    with pytest.raises(CbirError, match="detections: not found"):
        detection_quality(RunLayout(tiny_run))
