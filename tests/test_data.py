import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cbir import CbirError
from cbir.datasets import load_dataset
from cbir.datasets.cub import assign_split, read_cub
from cbir.datasets.prepare import PrepareConfig, prepare
from cbir.images import load_rgb
from cbir.layout import RunLayout
from conftest import FULL_ANNOTATIONS, MINI_SPLIT, SAMPLE


@pytest.mark.parametrize("split, train, test", [("song", 5864, 5924), ("official", 5994, 5794)])
def test_split_counts_on_full_annotations(split, train, test):
    df, _ = read_cub(FULL_ANNOTATIONS)
    assert len(df) == 11788
    counts = assign_split(df, split).value_counts()
    assert (counts["train"], counts["test"]) == (train, test)


def test_song_split_is_class_disjoint():
    df, _ = read_cub(FULL_ANNOTATIONS)
    s = assign_split(df, "song")
    assert df.class_id[s == "train"].max() == 100 and df.class_id[s == "test"].min() == 101


def test_subset_keeps_original_ids_and_class_ranges():
    df, _ = read_cub(SAMPLE)
    assert len(df) == 1115 and df.image_id.max() > 1115 - 1  # ids are CUB's own, not renumbered
    s = assign_split(df, "classes:1-10/11-20")
    assert set(df.class_id[s == "train"]) == set(range(1, 11))
    assert set(df.class_id[s == "test"]) == set(range(11, 21))


def test_song_split_on_subset_says_use_classes():
    with pytest.raises(CbirError, match="classes:"):
        assign_split(read_cub(SAMPLE)[0], "song")


def test_overlapping_class_ranges_rejected():
    with pytest.raises(CbirError, match="both train and test"):
        assign_split(read_cub(SAMPLE)[0], "classes:1-10/10-20")


def test_prepare_sample_writes_images_instances_coco_and_eda(sample_run):
    data = load_dataset(RunLayout(sample_run))
    assert len(data.images) == 1115 and len(data.instances) == 1115
    assert list(data.images.columns) == ["image_id", "path", "class_id", "class_name", "split", "width", "height",
                                         "mode"]
    split = data.instances.merge(data.images, on="image_id")
    assert ((split.x >= 0) & (split.x + split.w <= split.width + 1e-6)).all()
    coco = COCO(str(sample_run / "dataset" / "gt_coco.json"))
    assert len(coco.getAnnIds()) == 1115 and coco.getCatIds() == [16]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[int(split.image_id[0])]))[0]
    assert ann["bbox"] == pytest.approx(split.loc[0, ["x", "y", "w", "h"]].tolist())
    report = (sample_run / "eda" / "report.md").read_text()
    for png in ("class_counts.png", "image_sizes.png", "boxes.png", "box_centres.png", "samples.png"):
        assert png in report and Image.open(sample_run / "eda" / png).size[0] > 300
    manifest = json.loads((sample_run / "manifest.json").read_text())
    assert manifest["artifacts"]["dataset"]["summary"]["train"] == len(data.images.query("split == 'train'"))
    assert json.loads((sample_run / "dataset" / "meta.json").read_text())["inputs"]["split"] == "classes:1-10/11-20"


def test_greyscale_photo_is_counted_and_decoded_rgb(mini_run):
    split = load_dataset(RunLayout(mini_run)).images
    grey = split[split["mode"] == "L"]
    assert grey.image_id.tolist() == [448]


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_load_rgb_converts_every_mode(tmp_path, mode):
    src = Image.new("RGB", (40, 30), (200, 30, 10)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        src = src.convert("I;16")
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    src.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_load_rgb_applies_exif_rotation(tmp_path):
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    out = load_rgb(tmp_path / "r.jpg")
    assert out.size == (20, 60)
    assert np.asarray(out)[:10, :, 0].mean() > 200  # the strip is now on top


def test_truncated_jpeg_stops_prepare_naming_the_file(mini_copy, tmp_path):
    victim = sorted((mini_copy / "images").rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:2000])
    with pytest.raises(CbirError, match=victim.name):
        prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1))
    result = prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, skip_bad=True, workers=1))
    assert len(result.dataset.images) == 31
    assert victim.name in (tmp_path / "run" / "dataset" / "bad_images.txt").read_text()


def test_missing_image_file_is_a_bad_image(mini_copy, tmp_path):
    victim = sorted((mini_copy / "images").rglob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(CbirError, match="1 bad image"):
        prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1))


def test_box_outside_image_is_clipped_and_counted(mini_copy, tmp_path):
    lines = (mini_copy / "bounding_boxes.txt").read_text().splitlines()
    first_id = lines[0].split()[0]
    lines[0] = f"{first_id} -20.0 -5.0 5000.0 4000.0"
    (mini_copy / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    result = prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1))
    row = result.dataset.instances.merge(result.dataset.images, on="image_id").set_index("image_id").loc[int(first_id)]
    assert result.clipped == 1
    assert (row.x, row.y, row.w, row.h) == (0, 0, row.width, row.height)


def test_box_entirely_outside_is_rejected(mini_copy, tmp_path):
    lines = (mini_copy / "bounding_boxes.txt").read_text().splitlines()
    lines[1] = f"{lines[1].split()[0]} 9000.0 9000.0 10.0 10.0"
    (mini_copy / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CbirError, match="empty after clipping"):
        prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1))


def test_malformed_line_names_file_and_line(mini_copy, tmp_path):
    path = mini_copy / "bounding_boxes.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].split()[0] + " 1.0 abc 3.0 4.0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CbirError, match=r"bounding_boxes.txt:5: malformed"):
        prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1))
    result = prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1, skip_bad=True))
    assert len(result.bad) == 1 and "bounding_boxes.txt:5: malformed" in result.bad[0]
    image_id = int(lines[4].split()[0])
    assert image_id not in set(result.dataset.images.image_id)  # dropped from every table, not half-kept
    assert len(result.dataset.images) == 31 and (tmp_path / "run/dataset/bad_images.txt").read_text() == result.bad[0] + "\n"


def test_missing_annotation_file(mini_copy, tmp_path):
    (mini_copy / "train_test_split.txt").unlink()
    with pytest.raises(CbirError, match="train_test_split.txt: missing"):
        prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1))


def test_mismatched_annotation_files(mini_copy, tmp_path):
    path = mini_copy / "image_class_labels.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(CbirError, match="image_class_labels.txt: image id 909 is missing"):
        prepare(PrepareConfig(run=tmp_path / "run", root=mini_copy, split=MINI_SPLIT, workers=1))
