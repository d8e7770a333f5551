"""COCO: the reader's checks, the ONNX adapter on real images, set-to-set relevance and aggregation against
references, and the multi-object / person-search stage end to end on a slice of the real COCO sample."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import product

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score

from cbir import CbirError
from cbir.datasets.coco import assign_split
from cbir.datasets.prepare import PrepareConfig, prepare
from cbir.metrics.sets import AGGREGATIONS, BoxSets, category_counts, image_scores, ranking_metrics, relevance
from conftest import MOBILENET, SHARED, predict, serve_page

COCO = SHARED / "data" / "coco_sample"
SSD = SHARED / "weights" / "coco_ssd_mobilenet_v1_quant.onnx"
LABELS = SHARED / "weights" / "coco_ssd_mobilenet_v1_quant.labels.txt"
CATEGORY_NAMES = {c["name"] for c in json.loads((COCO / "instances.json").read_text())["categories"]}


def _cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "cbir.cli", *map(str, args)], capture_output=True, text=True)
    assert not check or out.returncode == 0, out.stderr[-2000:]
    return out


def _subset(tmp_path, n_images: int, edit=None):
    """The first n real COCO images (by id) with all their annotations, optionally edited, as a new file."""
    data = json.loads((COCO / "instances.json").read_text())
    keep = sorted(im["id"] for im in data["images"])[:n_images]
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    if edit:
        edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


# ---------------------------------------------------------------- relevance, aggregation, metrics

def test_relevance_definitions_on_hand_made_object_sets():
    person, dog, car = 1, 18, 3
    query = [[person, person, dog]]
    gallery = [[person], [dog, person, car], [car], [person, person, dog], []]
    counts_q = category_counts(query, [person, car, dog])
    counts_g = category_counts(gallery, [person, car, dog])
    assert relevance(counts_q, counts_g, "selection").tolist() == [[1, 1, 0, 1, 0]]
    assert relevance(counts_q, counts_g, "aggregation").tolist() == [[0, 1, 0, 1, 0]]
    weighted = relevance(counts_q, counts_g, "weighted")[0]
    # multiset Jaccard: {p,p,d} vs {p} = 1/3; vs {d,p,c} = 2/4; vs {c} = 0; identical = 1; empty = 0
    assert np.allclose(weighted, [1 / 3, 2 / 4, 0, 1, 0])
    empty_query = category_counts([[]], [person, car, dog])
    assert relevance(empty_query, counts_g, "aggregation").sum() == 0  # no objects: nothing is "all of them"


def _greedy_reference(s: np.ndarray) -> float:
    s = s.astype(float).copy()
    total = 0.0
    for _ in range(min(s.shape)):
        i, j = np.unravel_index(np.argmax(s), s.shape)
        total += s[i, j]
        s[i, :] = -np.inf
        s[:, j] = -np.inf
    return total


def _reference(q: list[np.ndarray], g: list[np.ndarray], how: str) -> np.ndarray:
    out = np.zeros((len(q), len(g)))
    for a, b in product(range(len(q)), range(len(g))):
        s = q[a] @ g[b].T
        out[a, b] = {"max": lambda: s.max(), "mean-best": lambda: s.max(1).mean(),
                     "symmetric": lambda: (s.max(1).mean() + s.max(0).mean()) / 2,
                     "assignment": lambda: _greedy_reference(s) / len(q[a])}[how]()
    return out


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregation_equals_a_brute_force_reference(how):
    rng = np.random.default_rng(3)

    def sets(n):
        groups = [rng.normal(size=(rng.integers(1, 6), 8)).astype(np.float32) for _ in range(n)]
        flat = np.concatenate(groups)
        return groups, BoxSets(flat, np.r_[0, np.cumsum([len(x) for x in groups])[:-1]])

    (qg, qs), (gg, gs) = sets(7), sets(11)
    assert np.allclose(image_scores(qs, gs, how), _reference(qg, gg, how), atol=1e-4)


def test_blocks_and_shortlists_do_not_change_the_scores():
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 7, 40)
    vectors = rng.normal(size=(counts.sum(), 16)).astype(np.float32)
    sets = BoxSets(vectors, np.r_[0, np.cumsum(counts)[:-1]])
    for how in AGGREGATIONS:  # blocks of a few query boxes give what one block gives
        assert np.allclose(image_scores(sets, sets, how, box_chunk=5), image_scores(sets, sets, how), atol=1e-5)
    exact = image_scores(sets, sets, "assignment")  # gallery of 40 < the default shortlist: exact
    short = image_scores(sets, sets, "assignment", shortlist=8)
    top = np.argsort(-image_scores(sets, sets, "mean-best"), 1, kind="stable")[:, :8]
    assert np.allclose(np.take_along_axis(short, top, 1), np.take_along_axis(exact, top, 1))
    rest = np.ones_like(short, bool)
    np.put_along_axis(rest, top, False, 1)
    assert (short[rest].max() < np.take_along_axis(short, top, 1).min())  # the shortlist ranks first


def test_assignment_uses_each_box_once():
    # two query dogs, one gallery dog: mean-best counts the one dog twice, assignment once
    q = BoxSets(np.array([[1, 0], [1, 0]], np.float32), np.array([0]))
    g = BoxSets(np.array([[1, 0], [0, 1]], np.float32), np.array([0]))
    assert image_scores(q, g, "mean-best")[0, 0] == pytest.approx(1.0)
    assert image_scores(q, g, "assignment")[0, 0] == pytest.approx(0.5)


def test_ranking_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.random((20, 30))
    binary = (rng.random((20, 30)) < 0.3).astype(float)
    binary[0] = 0  # no relevant item: left out and counted
    graded = binary * rng.random((20, 30))
    m = ranking_metrics(scores, binary, graded=False)
    kept = binary.sum(1) > 0
    assert m["excluded queries"] == 1 and m["queries"] == 19
    assert m["mAP"] == pytest.approx(np.mean([average_precision_score(b, s) for b, s in
                                              zip(binary[kept], scores[kept])]))
    order = np.argsort(-scores, 1)
    assert m["P@5"] == pytest.approx(np.take_along_axis(binary, order, 1)[kept, :5].mean())
    g = ranking_metrics(scores, graded, graded=True)
    assert "mAP" not in g
    assert g["nDCG@10"] == pytest.approx(np.mean([ndcg_score([r], [s], k=10) for r, s in
                                                  zip(graded[kept], scores[kept])]))
    assert g["nDCG"] == pytest.approx(ndcg_score(graded[kept], scores[kept]))
    excluded = np.zeros_like(binary, bool)
    excluded[:, 0] = True  # e.g. each query's own image
    assert ranking_metrics(scores, binary, False, excluded)["mAP"] == pytest.approx(
        np.mean([average_precision_score(b[1:], s[1:]) for b, s in zip(binary, scores) if b[1:].any()]))


# ---------------------------------------------------------------- the reader

def test_crowds_left_out_and_empty_images_kept(tmp_path):
    path, data = _subset(tmp_path, 441)
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    result = prepare(PrepareConfig(run=tmp_path / "run", root=path, dataset="coco", images=COCO / "images",
                                   captions=COCO / "captions.json", split="coco_split", workers=2))
    s = result.dataset.meta["summary"]
    assert crowd == 39 and s["crowd_skipped"] == 39 and s["instances"] == 3763 - 39
    assert s["images"] == 441 and s["images_without_objects"] == 2 and (s["train"], s["test"]) == (288, 153)
    images = result.dataset.images.set_index("image_id")
    assert images.class_name[250] == "(no objects)" and images.class_name[508] == "(no objects)"
    gt = json.loads((tmp_path / "run" / "dataset" / "gt_coco.json").read_text())
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 39  # COCOeval still sees the crowd regions
    assert len(gt["categories"]) == 80
    captions = __import__("pandas").read_parquet(tmp_path / "run" / "dataset" / "captions.parquet")
    assert len(captions) == 780 and captions.image_id.nunique() == 156


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][3].update(category_id=999), r"annotations\[3\]: category_id 999 is not in categories"),
    (lambda d: d["annotations"][5].update(image_id=-7), r"annotations\[5\]: image_id -7 is not in images"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2, float("nan"), 4]), r"annotations\[2\]: bbox .* finite"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 0, 4]), r"annotations\[1\]: bbox .* zero or negative"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"images\[10\]: duplicate image id"),
    (lambda d: d["images"][4].update(width="640"), r"images\[4\]: width/height"),
])
def test_bad_coco_records_get_one_line_naming_them(tmp_path, edit, message):
    path, _ = _subset(tmp_path, 10, edit)
    cfg = dict(run=tmp_path / "run", root=path, dataset="coco", images=COCO / "images", split="random:0.5",
               workers=1)
    with pytest.raises(CbirError, match=message):
        prepare(PrepareConfig(**cfg))
    kept = prepare(PrepareConfig(**cfg, skip_bad=True))  # --skip-bad drops the record and lists it
    listed = (tmp_path / "run" / "dataset" / "bad_images.txt").read_text()
    assert kept.dataset.meta["summary"]["bad_images"] >= 1 and "instances.json" in listed


@pytest.mark.slow  # the bad-input corpus covers non-COCO JSON in CI
def test_cli_refuses_a_non_coco_file_in_one_line(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps([{"id": 1}]))
    out = _cli("prepare", "--coco", path, "--images", COCO / "images", "--out", tmp_path / "run", check=False)
    assert out.returncode == 2 and "not COCO instances" in out.stderr and "Traceback" not in out.stderr
    out = _cli("prepare", "--cub", tmp_path, "--images", COCO / "images", "--out", tmp_path / "r2", check=False)
    assert out.returncode == 2 and "go with --coco" in out.stderr


def test_random_split_is_reproducible_and_independent_of_the_subset():
    import pandas as pd

    ids = pd.DataFrame({"image_id": np.arange(1, 2001)})
    full = assign_split(ids, "random:0.3")
    part = assign_split(ids.iloc[::7].reset_index(drop=True), "random:0.3")
    assert (part.to_numpy() == full.iloc[::7].to_numpy()).all()
    assert 0.25 < (full == "train").mean() < 0.35
    assert not (assign_split(ids, "random:0.3:1") == full).all()  # the seed matters
    with pytest.raises(CbirError, match="unknown for COCO"):
        assign_split(ids, "song")


# ---------------------------------------------------------------- the ONNX adapter

@pytest.fixture(scope="module")
def ssd():
    pytest.importorskip("onnxruntime")
    from cbir.detection import build_detector

    return build_detector(f"onnx:{SSD}", "", device=None, labels=str(LABELS))


def test_onnx_ssd_boxes_on_a_real_image_match_the_known_output(ssd):
    from cbir.detection import build_detector
    from cbir.images import open_photo

    photo = open_photo(COCO / "images" / "000000000036.jpg")  # a woman with an umbrella, 481 x 640
    found = ssd.detect([photo])[0]
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
    assert found[0]["category_id"] == 28  # umbrella, the best box
    top = next(d for d in found if d["category_id"] == 1)
    assert top["score"] == pytest.approx(0.7188, abs=1e-3)
    # ymin, xmin, ymax, xmax normalised → x, y, w, h in original pixels (recorded from this model)
    assert np.allclose(top["bbox"], [172.3, 149.9, 295.6, 483.0], atol=0.6)
    assert all(d["bbox"][0] >= 0 and d["bbox"][0] + d["bbox"][2] <= photo.width + 0.01 for d in found)
    plain = build_detector(f"onnx:{SSD}", "", device=None).detect([photo])[0]
    # the label file maps names onto COCO ids ("T.V." is tv); its ids equal the model's own numbering
    assert [d["category_id"] for d in plain] == [d["category_id"] for d in found]


def test_onnx_torchvision_layout_boxes_are_scaled_back(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from cbir.detection.onnx_detector import OnnxDetector
    from cbir.images import open_photo

    # a model with torchvision's signature: image [3, 200, 300] in; boxes (x0, y0, x1, y1 in input pixels),
    # labels, scores out — constants, so the adapter's scaling is what is tested
    boxes = helper.make_tensor("b", TensorProto.FLOAT, [2, 4], [30, 20, 150, 100, -5, 0, 310, 210])
    nodes = [helper.make_node("Constant", [], ["boxes"], value=boxes),
             helper.make_node("Constant", [], ["labels"], value=helper.make_tensor("l", TensorProto.INT64, [2], [1, 18])),
             helper.make_node("Constant", [], ["scores"], value=helper.make_tensor("s", TensorProto.FLOAT, [2], [0.6, 0.9]))]
    graph = helper.make_graph(nodes, "tv", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [3, 200, 300])],
                              [helper.make_tensor_value_info(n, t, [None] + ([4] if n == "boxes" else []))
                               for n, t in (("boxes", TensorProto.FLOAT), ("labels", TensorProto.INT64),
                                            ("scores", TensorProto.FLOAT))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "tv.onnx"
    onnx.save(model, path)
    detector = OnnxDetector(str(path))
    assert detector.layout == "torchvision"
    photo = open_photo(COCO / "images" / "000000000036.jpg")  # 481 x 640: scale 481/300, 640/200
    found = detector.detect([photo])[0]
    assert [d["category_id"] for d in found] == [18, 1]  # best first
    sx, sy = 481 / 300, 640 / 200
    assert np.allclose(found[1]["bbox"], [30 * sx, 20 * sy, 120 * sx, 80 * sy], atol=0.02)
    assert np.allclose(found[0]["bbox"], [0, 0, 481, 640], atol=0.02)  # clipped to the photo


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    tmp = tmp_path_factory.mktemp("coco")
    path, _ = _subset(tmp, 90)
    run = tmp / "run"
    _cli("prepare", "--coco", path, "--images", COCO / "images", "--split", "random:0.5", "--out", run)
    _cli("detect", "--run", run, "--detector", f"onnx:{SSD}", "--labels", LABELS, "--fallback", "full",
         "--evaluate")
    for mode in ("full", "gt", "det"):
        _cli("embed", "--run", run, "--mode", mode, "--backbone", "mobilenet_v2", "--weights", MOBILENET)
    return run


def test_detection_report_has_per_category_ap(coco_run):
    report = json.loads((coco_run / "reports" / "detection" / "detection.json").read_text())
    person = report["per_category"]["1"]
    assert person["name"] == "person" and person["gt"] > 50 and 0 < person["AP50"] <= 1
    assert re.search(r"\| person +\| +\d+ \|", (coco_run / "reports" / "detection" / "detection.md").read_text())
    eda = (coco_run / "eda" / "report.md").read_text()
    assert "Objects per image" in eda and (coco_run / "eda" / "objects.png").exists()


def test_multi_object_report_beats_random_order(coco_run):
    out = _cli("evaluate-objects", "--run", coco_run)
    assert "reports/objects" in out.stdout
    import pandas as pd

    m = pd.read_csv(coco_run / "reports" / "objects" / "metrics.csv")
    assert set(m.relevance) == {"selection", "aggregation", "weighted"}
    assert set(m[m.embeddings == "det"].aggregation) == set(AGGREGATIONS)
    assert set(m[m.embeddings == "full"].aggregation) == {"image"}
    chance = m[m.embeddings == "random order"].set_index("relevance")
    for name in ("full", "gt", "det"):
        best = m[(m.embeddings == name) & (m.relevance == "weighted")]["nDCG@10"].max()
        assert best > chance.loc["weighted", "nDCG@10"] + 0.1, name
    person = json.loads((coco_run / "reports" / "objects" / "person.json").read_text())
    det = next(p for p in person if p["embeddings"] == "det")
    assert det["query boxes"] > 10 and 0 < det["P@10 neighbour is a real person"] <= 1
    assert (coco_run / "reports" / "objects" / "person_grid.png").stat().st_size > 10_000


@pytest.mark.slow  # kept out of CI's run (25-minute budget); `make test-all` runs it
def test_person_search_returns_persons_only(coco_run):
    _cli("index", "--run", coco_run, "--embeddings", "det")
    photo = COCO / "images" / "000000000036.jpg"
    doc = json.loads(_cli("search", "--run", coco_run, "--index", "det", "--image", photo, "--category", "person",
                          "--k", "5", "--json").stdout)
    assert doc["boxes"] and all(b["category"] == "person" for b in doc["boxes"])
    assert all(n["category"] == "person" for b in doc["boxes"] for n in b["neighbours"])
    everything = json.loads(_cli("search", "--run", coco_run, "--index", "det", "--image", photo, "--k", "5",
                                 "--json").stdout)
    assert len({n["category"] for b in everything["boxes"] for n in b["neighbours"]}) > 1
    out = _cli("search", "--run", coco_run, "--index", "det", "--image", photo, "--category", "zebra-ish",
               check=False)
    assert out.returncode == 2 and "not a category of this run" in out.stderr


def test_page_names_each_detected_box_by_category(coco_run):
    _cli("index", "--run", coco_run, "--embeddings", "det")
    with serve_page(coco_run, "det", detector="run") as url:
        _, status, choice, gallery, _ = predict(url, COCO / "images" / "000000000036.jpg", k=4)
    assert "box(es)" in status
    names = [c[0] for c in choice["choices"]]  # the box picker names each box's kind
    assert len(names) >= 2 and names[0].startswith("box 1 · umbrella ")
    assert any(n.split(" · ")[1].startswith("person ") for n in names)
    # neighbour cards are named by the matching box's category, not by its photo's label
    assert len(gallery) == 4 and all(g["caption"].split(" · ")[0].removeprefix("itself: ") in CATEGORY_NAMES
                                          for g in gallery)


def test_learning_on_boxes_uses_categories_and_joins_the_multi_object_table(coco_run):
    out = _cli("train-embedder", "--run", coco_run, "--embeddings", "gt", "--epochs", "3")
    assert "category labels" in out.stdout and "image-disjoint" in out.stdout
    _cli("evaluate-objects", "--run", coco_run, "--embeddings", "gt,gt@multisimilarity", "--category", "none")
    import pandas as pd

    m = pd.read_csv(coco_run / "reports" / "objects" / "metrics.csv")
    assert set(m.embeddings) == {"gt", "gt@multisimilarity", "random order"}
    assert set(m[m.embeddings == "gt@multisimilarity"].aggregation) == set(AGGREGATIONS)
