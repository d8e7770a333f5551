import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from cbir import CbirError
from cbir.datasets import load_dataset
from cbir.encoders.backbones import build_backbone
from cbir.encoders.cnn import CnnEncoder, CropPolicy, InputRecipe, crop_to_input, grow_box
from cbir.encoders.stage import EmbedConfig, embed, load_embeddings
from cbir.weights import load_partial
from cbir.images import open_photo
from cbir.layout import RunLayout
from conftest import EFFICIENTNET, MOBILENET, copy_run


@pytest.fixture(scope="module")
def mobilenet():
    return build_backbone("mobilenet_v2", str(MOBILENET))


@pytest.mark.parametrize("name, weights, dim", [
    ("mobilenet_v2", str(MOBILENET), 1280),
    ("timm:tf_efficientnet_lite0", str(EFFICIENTNET), 1280),
    ("resnet50", "none", 2048),
    ("detector", "none", 2048),
    ("efficientnet_b0", "none", 1280),
])
def test_backbone_dims_are_discovered(name, weights, dim):
    backbone = build_backbone(name, weights)
    assert backbone.dim == dim
    with torch.inference_mode():
        fmap = backbone.trunk(torch.zeros(2, 3, backbone.preprocess.size, backbone.preprocess.size))
    assert fmap.shape[:2] == (2, dim) and backbone.stride == 32


def test_preprocessing_comes_from_the_weights_metadata():
    assert build_backbone("timm:tf_efficientnet_lite0", str(EFFICIENTNET)).preprocess.mean == (0.5, 0.5, 0.5)
    mob = build_backbone("mobilenet_v2", str(MOBILENET)).preprocess
    assert mob.mean == pytest.approx((0.485, 0.456, 0.406)) and mob.size == 224 and mob.resize_size == 232


def test_trunk_checkpoint_tolerates_only_a_missing_head(tmp_path):
    sd = torch.load(MOBILENET, weights_only=True)
    bad = dict(sd)
    bad["features.99.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CbirError, match="1 unexpected"):
        build_backbone("mobilenet_v2", str(tmp_path / "bad.pth"))
    partial = {k: v for k, v in sd.items() if not k.startswith("features.18")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CbirError, match="missing key"):
        build_backbone("mobilenet_v2", str(tmp_path / "partial.pth"))


def test_missing_weights_give_a_one_line_how_to(monkeypatch, tmp_path):
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("CBIR_OFFLINE", "1")
    with pytest.raises(CbirError) as e:
        build_backbone("resnet50", "DEFAULT")
    msg = str(e.value)
    assert "resnet50-" in msg and "CBIR_WEIGHTS_DIR" in msg and "\n" not in msg


def test_weights_found_in_cbir_weights_dir(monkeypatch, tmp_path):
    from torchvision.models import MobileNet_V2_Weights

    shutil.copy(MOBILENET, tmp_path / MobileNet_V2_Weights.DEFAULT.url.rsplit("/", 1)[1])
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path))
    backbone = build_backbone("mobilenet_v2", "DEFAULT")
    assert backbone.weights.path.parent == tmp_path


def test_load_partial_names_the_problem():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CbirError, match="missing"):
        load_partial(model, {"weight": torch.zeros(2, 2)}, "x.pth")
    load_partial(model, {"weight": torch.zeros(2, 2)}, "x.pth", head_prefixes=("bias",))


def test_crop_policies_give_square_inputs_of_the_right_content():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, 20:60, 50:150] = 255  # a 100 x 40 white box
    box = [50, 20, 100, 40]
    squash = crop_to_input(image, box, CropPolicy(0, "squash"), 32, 37, (0, 0, 0))
    assert squash.shape == (3, 32, 32) and squash.float().mean() > 250  # only the box, stretched
    pad = crop_to_input(image, box, CropPolicy(0, "pad"), 32, 37, (0, 0, 0))
    assert 0.3 < pad.float().mean() / 255 < 0.5  # box letterboxed: 40/100 of the square
    center = crop_to_input(image, box, CropPolicy(0, "center"), 32, 37, (0, 0, 0))
    assert center.shape == (3, 32, 32)
    grown = crop_to_input(image, box, CropPolicy(0.5, "squash"), 32, 37, (0, 0, 0))
    assert grown.float().mean() < squash.float().mean()  # the margin brings in background


def test_grow_box_clips_and_never_degenerates():
    assert grow_box([-10, -10, 500, 500], 0.1, 100, 80) == (0, 0, 100, 80)
    assert grow_box([10.2, 10.7, 0.1, 0.1], 0.0, 100, 80)[2:] >= (11, 11)


def test_greyscale_and_tiny_box_crops(mobilenet, mini_run):
    data = load_dataset(RunLayout(mini_run))
    grey = data.instances.merge(data.images, on="image_id").query("image_id == 448").iloc[0]
    photo = open_photo(data.image_path(grey.path))
    assert pil_to_tensor(photo.image).shape[0] == 3
    recipe = InputRecipe(CropPolicy(), 224, 232, (124, 116, 104), False)
    crops, _ = recipe.inputs(photo, np.array([[grey.x, grey.y, grey.w, grey.h], [5.0, 5.0, 0.4, 0.6]]))
    assert crops.shape == (2, 3, 224, 224)
    vectors = CnnEncoder(mobilenet, torch.device("cpu"), pool="avg").forward(crops)
    assert vectors.shape == (2, 1280) and np.isfinite(vectors).all()


def test_rows_align_with_vectors_and_multi_instance(mini_run, mobilenet):
    vectors, table, spec = load_embeddings(mini_run, "det")
    dets = json.loads((mini_run / "detections" / "detections.json").read_text())
    assert len(table) == len(dets) == len(vectors)
    several = table.image_id.value_counts()
    multi = several[several > 1].index
    assert len(multi) > 0
    rows = table[table.image_id == multi[0]]
    assert rows.instance.tolist() == list(range(len(rows)))
    # any row's vector equals embedding that row's crop directly
    encoder = CnnEncoder(mobilenet, torch.device("cpu"), pool=spec["spec"]["pool"])
    data = load_dataset(RunLayout(mini_run))
    photo = open_photo(data.image_path(data.images.set_index("image_id").path[multi[0]]))
    direct = encoder.encode(photo, rows[["x", "y", "w", "h"]].to_numpy(float))
    assert np.allclose(direct, vectors[rows.index], atol=1e-4)
    assert not np.allclose(direct[0], direct[1], atol=1e-2)


def test_full_gt_det_sets_exist_with_their_sources(mini_run):
    for mode, sources in (("full", {"full"}), ("gt", {"gt"}), ("det", {"detected", "fallback-gt"})):
        vectors, table, info = load_embeddings(mini_run, mode)
        assert set(table.source) == sources and info["mode"] == mode and vectors.dtype == np.float32
        assert vectors.shape[1] == 1280 and len(table) >= 32


def test_embedding_is_deterministic_and_redone_when_its_spec_changes(mini_run, tmp_path, caplog):
    run = copy_run(mini_run, tmp_path / "run")
    first = np.array(load_embeddings(run, "gt")[0])
    embed(EmbedConfig(run=run, mode="gt", backbone="mobilenet_v2", weights=str(MOBILENET), workers=0, force=True))
    assert np.array_equal(np.array(load_embeddings(run, "gt")[0]), first)
    caplog.set_level("INFO")
    embed(EmbedConfig(run=run, mode="gt", backbone="mobilenet_v2", weights=str(MOBILENET), crop_resize="center",
                      workers=0))
    assert "inputs changed (encoder.crop_resize pad → center" in caplog.text
    _, _, info = load_embeddings(run, "gt")
    assert info["spec"]["crop_resize"] == "center"  # never a mix: the whole set was redone


def test_embedding_resumes_after_interruption(mini_run, tmp_path, monkeypatch):
    import cbir.encoders.stage as embed_module

    run = copy_run(mini_run, tmp_path / "run")
    reference = np.array(load_embeddings(run, "full")[0])
    (run / "embeddings" / "full").unlink()
    monkeypatch.setattr(embed_module, "SHARD_IMAGES", 8)
    real = embed_module.embed_rows
    calls = []

    def flaky(rows, *args, **kwargs):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(embed_module, "embed_rows", flaky)
    cfg = EmbedConfig(run=run, mode="full", backbone="mobilenet_v2", weights=str(MOBILENET), workers=0)
    with pytest.raises(CbirError, match="2 of 4 shards are kept"):
        embed(cfg)
    assert not (run / "embeddings" / "full").exists()
    embed(cfg)
    assert calls == [8, 8, 8, 8, 8]  # the 2 finished shards are kept; only the other 2 run again
    assert np.allclose(np.array(load_embeddings(run, "full")[0]), reference, atol=1e-5)


def test_roi_mode_one_pass_per_image(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    vectors, table, info = embed(EmbedConfig(run=run, mode="det", backbone="mobilenet_v2", weights=str(MOBILENET),
                                             roi=True, name="det_roi", workers=0))
    base, base_table, _ = load_embeddings(run, "det")
    assert vectors.shape == base.shape and table.equals(base_table) and info["spec"]["roi"]
    cos = (np.asarray(vectors) * base).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(base, axis=1)
    assert np.median(cos) > 0.5  # the same boxes, seen through a shared feature map


def test_damaged_or_misaligned_files_are_refused(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    rows = run / "embeddings" / "gt" / "rows.parquet"
    table = pd.read_parquet(rows)
    table.iloc[:-1].to_parquet(rows)  # a user's edit or a foreign write: sizes no longer match the record
    with pytest.raises(CbirError, match="damaged .*rows.parquet has"):
        load_embeddings(run, "gt")
    meta_path = run / "embeddings" / "gt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["rows.parquet"] = rows.stat().st_size
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CbirError, match="do not match its table"):
        load_embeddings(run, "gt")


def test_tuning_picks_the_fastest_measured_candidate_and_caches_it(tmp_path, monkeypatch):
    import torch

    from cbir.encoders import tuning

    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path))
    speeds = {("contiguous", 4): 50.0, ("channels_last", 8): 90.0}
    monkeypatch.setattr(tuning, "images_per_second", lambda trunk, device, size, batch, fmt: speeds.get(
        ("channels_last" if fmt == torch.channels_last else "contiguous", batch), 10.0))
    trunk = torch.nn.Conv2d(3, 4, 3)
    chosen = tuning.tune(trunk, "toy", 32, torch.device("cpu"))
    assert (chosen.memory_format, chosen.batch) == ("channels_last", 8) and chosen.rates["contiguous/4"] == 50.0
    monkeypatch.setattr(tuning, "images_per_second", lambda *a: pytest.fail("measured again instead of using the cache"))
    assert tuning.tune(trunk, "toy", 32, torch.device("cpu")) == chosen


def test_tuning_times_the_winner_data_parallel_and_says_when_that_pays(tmp_path, monkeypatch):
    from cbir.encoders import tuning

    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(tuning, "images_per_second", lambda trunk, device, size, batch, fmt: 100.0 if batch == 4 else 10.0)
    chosen = tuning.tune(torch.nn.Conv2d(3, 4, 3), "toy", 32, torch.device("cpu"))
    assert chosen.batch == 4 and chosen.data_parallel_rate == 200.0  # two single-threaded copies, summed
    assert chosen.batch_threads() == 2  # data-parallel beats the model on both threads: side by side
    slower = tuning.Tuning("channels_last", 4, {"channels_last/4": 100.0}, data_parallel_rate=95.0)
    assert slower.batch_threads() == 1  # the decode is spread over every core either way: the faster model wins
    assert tuning.Tuning("contiguous", 4, {"contiguous/4": 100.0}).batch_threads() == 1  # not timed: one at a time


def test_batches_side_by_side_give_the_vectors_of_one_at_a_time(mini_run, mobilenet):
    from cbir.encoders.stage import embed_rows, instances

    layout = RunLayout(mini_run)
    data = load_dataset(layout)
    rows = instances(layout, data, "det")[0].iloc[::-1].head(30)  # several boxes per photo, out of order
    encoder = CnnEncoder(mobilenet, torch.device("cpu"))
    one_at_a_time = embed_rows(rows, data, encoder, 4, 0, threads=1)
    assert np.allclose(embed_rows(rows, data, encoder, 4, 0, threads=2), one_at_a_time, atol=1e-4)
    assert np.allclose(embed_rows(rows, data, encoder, 1, 0, threads=2), one_at_a_time, atol=1e-4)
    assert np.allclose(embed_rows(rows, data, encoder, 3, 0), one_at_a_time, atol=1e-4)  # the tuning's choice
    for k in (0, 7, 29):  # and each vector is its own row's, whatever the order of the rows
        assert np.allclose(embed_rows(rows.iloc[[k]], data, encoder, 1, 0, threads=1)[0], one_at_a_time[k], atol=1e-4)


@pytest.mark.parametrize("roi", [False, True])
def test_a_batch_counts_model_inputs_not_photos(mini_run, mobilenet, roi):
    from cbir.encoders.stage import ImageCrops, instances

    layout = RunLayout(mini_run)
    data = load_dataset(layout)
    rows = instances(layout, data, "det")[0]
    recipe = CnnEncoder(mobilenet, torch.device("cpu"), roi=roi).recipe
    items = ImageCrops(data, rows, recipe)
    groups = items.batches(4)
    inputs = [[1 if roi else len(items.boxes[i]) for i in g] for g in groups]
    assert sum(groups, []) == list(range(len(items)))  # every photo once, in order
    assert max(map(len, items.boxes)) > 1  # the sample has photos with several boxes
    assert all(sum(n) >= 4 > sum(n[:-1]) for n in inputs[:-1]) and 0 < sum(inputs[-1])


@pytest.mark.parametrize("threads", [1, 2])  # decoded ahead on every core, or batches side by side
def test_a_bad_photo_among_inline_batches_is_one_error(mini_run, mobilenet, tmp_path, threads):
    from cbir.encoders.stage import ImageCrops, encoded_batches, instances

    layout = RunLayout(mini_run)
    data = load_dataset(layout)
    rows = instances(layout, data, "full")[0]
    encoder = CnnEncoder(mobilenet, torch.device("cpu"))
    items = ImageCrops(data, rows, encoder.recipe)
    items.paths[9] = tmp_path / "broken.jpg"
    items.paths[9].write_bytes(b"not a jpeg")
    with pytest.raises(CbirError, match="broken.jpg: cannot decode"):
        list(encoded_batches(items, encoder, 2, 0, threads=threads))


def test_fused_trunk_gives_the_same_vectors():
    import torch

    from cbir.encoders.backbones import build_backbone
    from cbir.encoders.cnn import fuse_batch_norm

    trunk = build_backbone("mobilenet_v2", str(MOBILENET)).trunk.eval()
    fused = fuse_batch_norm(trunk)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(trunk(x), fused(x), atol=1e-4, rtol=1e-4)
