"""train-embedder (head mode): data discipline, a toy set the loss must separate, resume after kill, the card,
and the trained encoder reproducing the stored vectors for a new query."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from tqdm import tqdm

from cbir import CbirError
from cbir.datasets import load_dataset
from cbir.encoders.stage import load_embeddings
from cbir.layout import RunLayout
from cbir.training.head import ProjectionHead, apply_head
from cbir.training.config import LOSSES
from cbir.training.loop import score_vectors
from cbir.training.stage import TrainConfig, build_loss, train_embedder, train_epoch, training_rows
from conftest import copy_run

pytest.importorskip("pytorch_metric_learning")


@pytest.fixture
def run(sample_run, tmp_path):
    return copy_run(sample_run, tmp_path / "run")


def test_training_sees_train_rows_only_and_validates_on_unseen_classes(run):
    x, rows, info, label, how = training_rows(RunLayout(run), TrainConfig(run=run, embeddings="det"))
    assert set(rows.split) == {"train"} and label == "class" and how.startswith("class-disjoint")
    train_classes, val_classes = set(rows.label[~rows.val]), set(rows.label[rows.val])
    assert val_classes and train_classes and not train_classes & val_classes
    assert rows.gallery.all()  # held-out classes are searched for among every train-split class, as in the test
    _, table, _ = load_embeddings(run, "det")
    assert not set(rows.label) & set(table.class_id[table.split == "test"])  # test classes never seen
    assert len(x) == len(rows)


@pytest.mark.parametrize("loss", LOSSES)
def test_a_head_separates_a_toy_set_with_clear_structure(loss):
    # 6 classes told apart by 4 weak dimensions under 60 dimensions of larger noise: cosine on the raw
    # vectors barely sees them; a head trained with a correctly wired loss learns to weight them up
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 4)) * 3

    def sample(n):
        labels = rng.integers(0, 6, n)
        return np.hstack([centres[labels] + rng.normal(size=(n, 4)), rng.normal(size=(n, 60)) * 4]).astype(
            np.float32), labels

    x, y = sample(600)
    xv, yv = sample(300)
    cfg = TrainConfig(run=".", loss=loss, epochs=1, lr=1e-2, batch_size=48)
    torch.manual_seed(0)
    head = ProjectionHead(64, 64)
    head.initialise(x)
    before = score_vectors(apply_head(head.eval(), xv), yv)["MAP@R"]
    loss_fn, miner = build_loss(cfg, 6, 64)
    optimizer = torch.optim.AdamW(list(head.parameters()) + list(loss_fn.parameters()), lr=cfg.lr)
    bar = tqdm(disable=True)
    for epoch in range(1, 16):
        train_epoch(head, loss_fn, miner, optimizer, torch.as_tensor(x), torch.as_tensor(y), cfg, epoch, bar)
    after = score_vectors(apply_head(head.eval(), xv), yv)["MAP@R"]
    assert after > before + 0.15, (loss, before, after)


def test_train_writes_model_card_and_vectors_and_is_idempotent(run):
    card = train_embedder(TrainConfig(run=run, embeddings="det", epochs=3))
    saved = json.loads((run / "models" / "det@multisimilarity" / "card.json").read_text())
    assert saved == json.loads(json.dumps(card))  # the card round-trips
    assert saved["history"][0]["epoch"] == 0 and len(saved["history"]) <= 4
    assert saved["best"]["MAP@R"] >= saved["baseline"]["MAP@R"]  # never worse than no change on validation
    vectors, table, info = load_embeddings(run, "det@multisimilarity")
    base_vectors, base_table, _ = load_embeddings(run, "det")
    assert len(vectors) == len(base_vectors) and (table.image_id == base_table.image_id).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    stamp = (run / "embeddings" / "det@multisimilarity" / "vectors.npy").stat().st_mtime_ns
    train_embedder(TrainConfig(run=run, embeddings="det", epochs=3))  # same inputs: nothing redone
    assert (run / "embeddings" / "det@multisimilarity" / "vectors.npy").stat().st_mtime_ns == stamp
    with pytest.raises(CbirError, match="--loss bogus"):
        TrainConfig(run=run, loss="bogus")


def test_the_trained_encoder_reproduces_stored_vectors_for_a_query(run):
    from cbir.images import open_photo
    from cbir.retrieval.index import IndexConfig, build_index
    from cbir.retrieval.query import Querier

    train_embedder(TrainConfig(run=run, embeddings="full", epochs=2, label="class"))
    build_index(IndexConfig(run=run, embeddings="full@multisimilarity", pca=None, factory="Flat"))
    q = Querier(run, "full@multisimilarity", detector="none")
    vectors, table, _ = load_embeddings(run, "full@multisimilarity")
    row = table[table.split == "test"].iloc[0]
    data = load_dataset(RunLayout(run))
    photo = open_photo(data.image_path(data.images.set_index("image_id").path[row.image_id]))
    got = q.encoder.encode(photo, np.array([[0, 0, photo.width, photo.height]], float))[0]
    assert np.dot(got, vectors[row.name]) > 0.999  # new photos land in the trained space


@pytest.mark.parametrize("kill_at", ["checkpoint.pt", pytest.param("refit-checkpoint.pt", marks=pytest.mark.slow)])
def test_training_resumes_after_kill_and_matches_an_unbroken_run(run, tmp_path, kill_at):
    # killed in the validated loop, or in the refit after it: the rerun resumes and ends where an unbroken one does
    other = copy_run(run, tmp_path / "other")
    cmd = [sys.executable, "-m", "cbir.cli", "train-embedder", "--embeddings", "det", "--epochs", "6",
           "--patience", "6", "--lr", "3e-4"]
    proc = subprocess.Popen(cmd + ["--run", str(run)], stderr=subprocess.PIPE, text=True)
    checkpoint = run / ".partial" / "models__det@multisimilarity" / kill_at
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    assert checkpoint.exists(), "killed too late: no checkpoint left to resume from"
    resumed = subprocess.run(cmd + ["--run", str(run)], capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-1500:]
    unbroken = subprocess.run(cmd + ["--run", str(other)], capture_output=True, text=True)
    assert unbroken.returncode == 0
    a = json.loads((run / "models" / "det@multisimilarity" / "card.json").read_text())
    b = json.loads((other / "models" / "det@multisimilarity" / "card.json").read_text())
    assert [h["MAP@R"] for h in a["history"]] == pytest.approx([h["MAP@R"] for h in b["history"]], abs=1e-6)
    assert a["refit"]["losses"] == pytest.approx(b["refit"]["losses"], abs=1e-6)
    assert np.allclose(load_embeddings(run, "det@multisimilarity")[0], load_embeddings(other, "det@multisimilarity")[0],
                       atol=1e-6)


def test_refit_trains_again_on_every_train_class_for_the_epochs_validation_chose(run, monkeypatch):
    import cbir.training.stage as stage

    seen = []  # (classes, rows) of each epoch's training data
    real_epoch = stage.train_epoch

    def spy(model, loss_fn, miner, optimizer, x, y, *args, **kwargs):
        seen.append((len(torch.unique(y)), len(y)))
        return real_epoch(model, loss_fn, miner, optimizer, x, y, *args, **kwargs)

    monkeypatch.setattr(stage, "train_epoch", spy)
    card = train_embedder(TrainConfig(run=run, embeddings="det", epochs=4, patience=4, lr=3e-4))
    _, rows, *_ = training_rows(RunLayout(run), TrainConfig(run=run, embeddings="det"))
    validated, refitted = seen[:len(card["history"]) - 1], seen[len(card["history"]) - 1:]
    assert card["helps"] and card["refit"]["epochs"] == card["best_epoch"] == len(refitted)
    assert set(validated) == {(rows.label[~rows.val].nunique(), int((~rows.val).sum()))}  # validation rows held out
    assert set(refitted) == {(rows.label.nunique(), len(rows))}  # then every train row, validation classes too
    assert card["refit"] == {**card["refit"], "train_vectors": len(rows), "classes": rows.label.nunique()}
    refit_vectors = load_embeddings(run, "det@multisimilarity")[0]

    card = train_embedder(TrainConfig(run=run, embeddings="det", epochs=4, patience=4, lr=3e-4, refit=False))
    assert card["refit"] is None and len(seen) == len(validated) + len(refitted) + len(card["history"]) - 1  # no refit
    validated_vectors = load_embeddings(run, "det@multisimilarity")[0]
    assert not np.allclose(refit_vectors, validated_vectors, atol=1e-4)  # the refit is the model kept, not the other


def test_run_with_too_few_train_classes_stops_in_one_line_and_keeps_the_embeddings(tmp_path):
    from conftest import MINI, MOBILENET

    out = subprocess.run([sys.executable, "-m", "cbir.cli", "run", "--cub", str(MINI), "--split", "classes:1-10/11-20",
                          "--out", str(tmp_path / "run"), "--modes", "full", "--backbone", "mobilenet_v2", "--weights",
                          str(MOBILENET), "--train-embedder", "triplet"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "2 train classes; metric learning needs at least 3" in out.stderr.strip().splitlines()[-1]
    assert len(load_embeddings(tmp_path / "run", "full")[0]) == 32  # the stages before it are kept


def test_finetune_crops_follow_the_rows_whatever_their_order(mini_run):
    from cbir.encoders.backbones import build_backbone
    from cbir.encoders.cnn import CnnEncoder
    from cbir.images import open_photo
    from cbir.training.finetune import decode_crops
    from conftest import MOBILENET

    layout = RunLayout(mini_run)
    _, table, _ = load_embeddings(mini_run, "det")
    rows = table.iloc[::-1].head(12)  # several boxes per photo, out of order
    encoder = CnnEncoder(build_backbone("mobilenet_v2", str(MOBILENET)), torch.device("cpu"))
    crops = decode_crops(layout, rows, encoder)
    data = load_dataset(layout)
    for k, row in enumerate(rows.itertuples()):
        photo = open_photo(data.image_path(data.images.set_index("image_id").path[row.image_id]))
        assert torch.equal(crops[k], encoder.recipe.inputs(photo, np.array([[row.x, row.y, row.w, row.h]]))[0][0])


@pytest.mark.slow
def test_finetune_trains_the_trunk_and_reembeds_with_it(run):
    from cbir.encoders.backbones import build_backbone
    from cbir.encoders.stage import EmbedConfig, embed
    from conftest import MOBILENET

    # small crops keep this a seconds-long test; the trunk and the loop are the real ones
    embed(EmbedConfig(run=run, mode="gt", backbone="mobilenet_v2", weights=str(MOBILENET), size=64, name="gt64",
                      workers=0))
    card = train_embedder(TrainConfig(run=run, embeddings="gt64", mode="finetune", epochs=2, lr=1e-4))
    assert card["mode"] == "finetune" and card["name"] == "gt64@multisimilarity-ft" and len(card["history"]) == 3
    assert card["augment"] == "flip"
    weights = run / "models" / "gt64@multisimilarity-ft" / "backbone.pth"
    build_backbone("mobilenet_v2", str(weights))  # a torchvision state dict: --weights FILE loads it
    tuned, table, info = load_embeddings(run, "gt64@multisimilarity-ft")
    frozen, frozen_table, _ = load_embeddings(run, "gt64")
    assert info["spec"]["weights"] == str(weights.resolve()) and (table.image_id == frozen_table.image_id).all()
    same = np.allclose(tuned, frozen, atol=1e-4)
    assert same != card["helps"]  # the best epoch's trunk made the vectors; epoch 0 is the frozen trunk
    from cbir.training.stage import apply_model

    stamp = (run / "embeddings" / "gt64@multisimilarity-ft" / "vectors.npy").stat().st_mtime_ns
    assert apply_model(run, "gt64@multisimilarity-ft") == "gt64@multisimilarity-ft"  # its own set: nothing redone
    assert (run / "embeddings" / "gt64@multisimilarity-ft" / "vectors.npy").stat().st_mtime_ns == stamp


def test_embed_head_puts_another_set_through_a_trained_head_and_the_report_holds_it_to_its_source(run):
    from cbir.evaluation.retrieval import EvalConfig, evaluate
    from cbir.retrieval.rerank import Rerank
    from cbir.training.head import load_head
    from cbir.training.stage import apply_model

    train_embedder(TrainConfig(run=run, embeddings="full", epochs=2, label="class"))
    assert apply_model(run, "full@multisimilarity", "det") == "det@full@multisimilarity"  # same encoder as full
    moved, table, info = load_embeddings(run, "det@full@multisimilarity")
    det, det_table, _ = load_embeddings(run, "det")
    head, _ = load_head(run / "models" / "full@multisimilarity" / "head.pt")
    assert np.allclose(moved, apply_head(head, det), atol=1e-6) and (table.image_id == det_table.image_id).all()
    with pytest.raises(CbirError, match="embeddings det exists and was not made by full@multisimilarity"):
        apply_model(run, "full@multisimilarity", "det", name="det")  # never over a set made otherwise
    with pytest.raises(CbirError, match="models/nope: not found"):
        apply_model(run, "nope", "det")

    result = evaluate(EvalConfig(run=run, embeddings=("det", "det@full@multisimilarity"), pca=(None,),
                                 rerank=(Rerank(),), plots=False))
    trained = pd.read_csv(run / "reports" / "retrieval" / "trained.csv")
    assert list(trained.embeddings) == ["det@full@multisimilarity"] and list(trained.source) == ["det"]
    r1 = result.computed.set_index("embeddings")["R@1"]
    assert trained["ΔR@1"][0] == pytest.approx(r1["det@full@multisimilarity"] - r1["det"])
    card = json.loads((run / "models" / "full@multisimilarity" / "card.json").read_text())
    assert trained["best epoch"][0] == card["best_epoch"]
    assert "## Trained embeddings against their source" in (run / "reports/retrieval/comparison.md").read_text()


def test_defaults_by_mode_and_device():
    from cbir.training.config import EPOCHS, LEARNING_RATE

    finetune = TrainConfig(run=".", mode="finetune", device="cpu")
    assert (finetune.epochs, finetune.lr) == (EPOCHS["finetune", "cpu"], LEARNING_RATE["finetune"]) == (10, 1e-5)
    assert TrainConfig(run=".", device="cpu").epochs == 30 and TrainConfig(run=".", epochs=3).epochs == 3


def test_augmentation_flips_or_crops_and_never_touches_the_decoded_crops():
    from cbir.training.finetune import augment

    torch.manual_seed(0)
    crops = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32).remainder(251).to(torch.uint8)
    kept = crops.clone()
    flipped = augment(crops, "flip")
    assert all(torch.equal(f, c) or torch.equal(f, c.flip(-1)) for f, c in zip(flipped, crops))
    cropped = augment(crops, "crop")
    assert cropped.shape == crops.shape and cropped.dtype == torch.uint8
    assert not any(torch.equal(f, c) or torch.equal(f, c.flip(-1)) for f, c in zip(cropped, crops))
    assert torch.equal(crops, kept)
    with pytest.raises(CbirError, match="--augment crop: a head trains on stored vectors"):
        TrainConfig(run=".", augment="crop")
    assert TrainConfig(run=".", mode="finetune", augment="crop", device="cpu").augment == "crop"
