"""train-detector: real CUB photos lower the loss and give a checkpoint every command loads; a killed run
resumes where it was and ends where an unbroken one does; broken checkpoints get one line; the trained
trunk feeds `--backbone detector`."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import MOBILENET, copy_run
from conftest import on_ray as on_ray_engine

from cbir.cli import main
from cbir.datasets import load_dataset
from cbir.detection import build_detector, training
from cbir.detection.frcnn import FORMAT, build_model, read_checkpoint
from cbir.detection.training import TrainDetectorConfig, train_detector
from cbir.images import open_photo
from cbir.layout import RunLayout

TINY = {"min_size": 128, "batch_size": 4, "workers": 0, "trunk_weights": str(MOBILENET)}


@pytest.fixture(scope="module")
def trained(mini_run, tmp_path_factory):
    """The mini sample's train photos (real CUB), 4 epochs at 128 px: (run, card)."""
    run = copy_run(mini_run, tmp_path_factory.mktemp("det") / "run")
    return run, train_detector(TrainDetectorConfig(run=run, epochs=4, **TINY))


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(trained):
    run, card = trained
    losses = [h["loss"] for h in card["history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert card["data"]["train_images"] + card["data"]["validation_images"] == \
        int((load_dataset(RunLayout(run)).images.split == "train").sum())  # the train split only, all of it
    assert card["categories"] == [{"id": 16, "name": "bird"}]  # COCO's id, as prepare writes it and card["trainable_layers"] == 3
    folder = run / "models" / card["name"]
    assert {"detector.pt", "card.json", "curves.png", "meta.json"} <= {p.name for p in folder.iterdir()}
    ckpt = read_checkpoint(folder)
    assert ckpt["format"] == FORMAT and ckpt["build"]["eval_size"] == 128
    detector = build_detector(str(folder), "DEFAULT", device=torch.device("cpu"), score_floor=0.0)
    data = load_dataset(RunLayout(run))
    photo = open_photo(data.image_path(data.images.path[0]))
    found = detector.detect([photo])[0]
    assert found and {d["category_id"] for d in found} == {16}
    assert all(0 <= d["bbox"][0] and d["bbox"][0] + d["bbox"][2] <= photo.width + 0.01 for d in found)
    assert detector.spec["weights_fingerprint"] == card["weights_file_sha256"]


def test_the_same_command_again_is_a_noop(trained, caplog):
    caplog.set_level(logging.INFO)
    run, card = trained
    assert train_detector(TrainDetectorConfig(run=run, epochs=4, **TINY))["seconds"] == card["seconds"]
    assert "up to date" in caplog.text


def test_a_killed_run_resumes_after_its_last_epoch_and_ends_as_an_unbroken_one(mini_run, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    cfg = {**TINY, "epochs": 2, "max_images": 8, "min_size": 96}
    unbroken = train_detector(TrainDetectorConfig(run=copy_run(mini_run, tmp_path / "a"), **cfg))
    run = copy_run(mini_run, tmp_path / "b")
    real, calls = training.validate, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "validate", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_detector(TrainDetectorConfig(run=run, **cfg))
    assert not (run / "models").exists() or not any((run / "models").iterdir())
    monkeypatch.setattr(training, "validate", real)
    resumed = train_detector(TrainDetectorConfig(run=run, **cfg))
    assert "resuming models/detector-mobilenet_v2 after epoch 1 of 2" in caplog.text
    for a, b in zip(unbroken["history"], resumed["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["AP50"] == pytest.approx(b["AP50"], abs=1e-3)


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cbir ")]
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_broken_or_foreign_checkpoints_get_one_line(trained, tmp_path, capsys):
    run, card = trained
    good = run / "models" / card["name"] / "detector.pt"
    cases = {"truncated.pt": good.read_bytes()[:100_000], "garbage.pt": b"\x00not a checkpoint" * 1000}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["build"] = {**ckpt["build"], "trunk": "mobilenet_v3_large"}  # the weights no longer fit
    torch.save(ckpt, tmp_path / "mismatched.pt")
    expected = {"truncated.pt": "not a loadable checkpoint", "garbage.pt": "not a loadable checkpoint",
                "foreign.pt": "not a cbir train-detector checkpoint", "mismatched.pt": "do not fit",
                "missing.pt": "no such file"}
    for name, words in expected.items():
        line = _one_line(capsys, ["detect", "--run", str(run), "--detector", str(tmp_path / name), "--force"])
        assert name in line and words in line, line


def test_bad_training_flags_get_one_line(mini_run, capsys):
    assert "resnet50 has 5 stages; choose 0-5" in _one_line(
        capsys, ["train-detector", "--run", str(mini_run), "--trainable-layers", "6", "--trunk", "resnet50"])
    assert "COCO Faster R-CNN weights exist for --trunk resnet50" in _one_line(
        capsys, ["train-detector", "--run", str(mini_run), "--detector-weights", "DEFAULT"])
    assert "--coco and --images go together" in _one_line(capsys, ["train-detector", "--run", str(mini_run), "--coco",
                                                                   "x.json"])


def test_trained_trunk_is_what_backbone_detector_embeds_and_the_query_side_rebuilds_the_detector(trained, tmp_path,
                                                                                                ray_cluster):
    """With a trained detector's boxes, `--backbone detector` embeds with that detector's own trunk; on a Ray
    cluster both stages give the same boxes (byte for byte) and vectors (1e-5)."""
    import filecmp

    import numpy as np

    from cbir.detection.stage import DetectConfig, detect
    from cbir.encoders.backbones import build_backbone
    from cbir.encoders.stage import EmbedConfig, embed

    src, card = trained
    folder = src / "models" / card["name"]
    run, on_ray = copy_run(src, tmp_path / "run"), copy_run(src, tmp_path / "ray")
    for target, engine in ((run, {}), (on_ray, on_ray_engine(ray_cluster))):
        detect(DetectConfig(run=target, detector=str(folder), score=0.05, workers=0, force=True, **engine))
        _, _, info = embed(EmbedConfig(run=target, mode="det", backbone="detector", workers=0, **engine))
    for name in ("detections.json", "raw_detections.json"):
        assert filecmp.cmp(run / "detections" / name, on_ray / "detections" / name, shallow=False)
    vectors = [np.load(r / "embeddings" / "det" / "vectors.npy") for r in (run, on_ray)]
    assert vectors[0].shape == vectors[1].shape and np.abs(vectors[0] - vectors[1]).max() <= 1e-5
    assert info["spec"]["backbone"] == "detector:trained:mobilenet_v2"
    trunk = build_backbone("detector", str(folder / "detector.pt"), "trained:mobilenet_v2").trunk
    state = read_checkpoint(folder)["state_dict"]
    assert torch.equal(trunk[17].conv[0][0].weight, state["backbone.body.17.conv.0.0.weight"])
    assert not torch.equal(trunk[17].conv[0][0].weight, torch.load(MOBILENET, weights_only=True)[
        "features.17.conv.0.0.weight"])  # trained (3 stages): not the ImageNet trunk any more
    from cbir.retrieval.index import IndexConfig, build_index
    from cbir.retrieval.query import Querier

    build_index(IndexConfig(run=run, embeddings="det", factory="Flat", pca=8))
    querier = Querier(run, "det")  # what search and the page load: the run's own detector, fingerprint checked
    assert querier.detector.spec["detector"] == "trained:mobilenet_v2" and "detector-mobilenet_v2" in querier.detector_note
    shutil.rmtree(run)
    shutil.rmtree(on_ray)


def test_a_frozen_trunk_stays_the_imagenet_trunk():
    state = torch.load(MOBILENET, weights_only=True)
    build = {"trunk": "mobilenet_v2", "trainable_layers": 0, "num_classes": 2, "train_sizes": [128],
             "eval_size": 128, "max_size": 256, "proposals": training.PROPOSALS}
    model = build_model(build, state)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.body.") for n in trainable)
    assert torch.equal(model.backbone.body["18"][0].weight, state["features.18.0.weight"])


def test_a_run_of_imported_boxes_answers_new_photos_with_a_trained_detector(trained, mini_run, tmp_path):
    from cbir.retrieval.index import IndexConfig, build_index
    from cbir.retrieval.query import Querier

    src, card = trained
    run = copy_run(mini_run, tmp_path / "run")  # boxes imported from YOLOv5n: no detector of its own
    build_index(IndexConfig(run=run, embeddings="det", factory="Flat", pca=8))
    assert Querier(run, "det").detector is None
    querier = Querier(run, "det", detector=str(src / "models" / card["name"]))
    data = load_dataset(RunLayout(run))
    boxes = querier.boxes([open_photo(data.image_path(data.images.path[0]))], score=0.0)[0]
    assert boxes and all(b["source"] == "detected" for b in boxes)
    assert "boxes from trained:mobilenet_v2 (detector-mobilenet_v2)" in querier.detector_note


def test_a_coco_file_trains_every_category_under_its_own_id():
    """`--coco FILE --images DIR`: label k is the k-th category by id, crowd regions are left out."""
    import json as json_

    from conftest import SHARED

    from cbir.detection.training import coco_boxes

    coco = SHARED / "data" / "coco_sample"
    boxes = coco_boxes(coco / "instances.json", coco / "images")
    raw = json_.loads((coco / "instances.json").read_text())
    assert [c["id"] for c in boxes.categories] == sorted(c["id"] for c in raw["categories"])
    plain = [a for a in raw["annotations"] if not a.get("iscrowd") and a["bbox"][2] > 1 and a["bbox"][3] > 1]
    assert len(boxes.boxes) == len(plain) and boxes.upstream == {}
    first = plain[0]
    row = boxes.boxes[(boxes.boxes.image_id == first["image_id"])].iloc[0]
    assert boxes.categories[int(row.label) - 1]["id"] == sorted(
        (a for a in plain if a["image_id"] == first["image_id"]), key=lambda a: a["id"])[0]["category_id"]
