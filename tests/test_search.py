import json
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pandas as pd
import pytest

from cbir import CbirError
from cbir.encoders.stage import load_embeddings
from cbir.images import open_photo
from cbir.retrieval.index import IndexConfig, auto_factory, build_index
from cbir.retrieval.ingest import remove_images
from cbir.retrieval.query import merged_images, Querier, image_level, query_vectors
from cbir.retrieval.reduce import reduce
from cbir.retrieval.saved import load_index
from conftest import MINI, MOBILENET, copy_run


@pytest.fixture
def run(mini_run, tmp_path):
    return copy_run(mini_run, tmp_path / "run")


def test_pca_is_fitted_on_train_rows_only(run):
    vectors, table, _ = load_embeddings(run, "det")
    train = np.asarray(vectors[(table.split == "train").to_numpy()])
    rng = np.random.default_rng(0)
    shuffled_test = np.asarray(vectors).copy()
    test_rows = (table.split == "test").to_numpy()
    shuffled_test[test_rows] = rng.normal(size=shuffled_test[test_rows].shape) * 10  # junk test rows
    a = reduce(np.asarray(vectors), train, 8, False)
    b = reduce(shuffled_test, train, 8, False)
    assert np.allclose(a[~test_rows], b[~test_rows], atol=1e-5)  # test rows did not move the PCA
    si = build_index(IndexConfig(run=run, embeddings="det", pca=8, factory="Flat"))
    assert si.manifest["train_rows"] == int((~test_rows).sum())
    pca = faiss.downcast_VectorTransform(si.store.index.chain.at(1))
    expected = faiss.PCAMatrix(vectors.shape[1], 8)
    expected.train(faiss.downcast_VectorTransform(si.store.index.chain.at(0)).apply(train))
    assert np.allclose(faiss.vector_to_array(pca.A), faiss.vector_to_array(expected.A), atol=1e-4)


def test_exact_index_equals_bruteforce_numpy(run):
    si = build_index(IndexConfig(run=run, embeddings="full", pca=None, factory="Flat"))
    vectors, _, _ = load_embeddings(run, "full")
    x = np.asarray(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims, ids = si.search(np.asarray(vectors[:5]), 10)
    brute = x[:5] @ x.T
    assert np.array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :10])
    assert np.allclose(sims, np.sort(brute, axis=1)[:, ::-1][:, :10], atol=1e-5)


# floors set from measurements on this data (HNSW32 1.0, IVF16,Flat 1.0, SQ8 0.976, PQ32 0.687): PQ trained on
# ~560 train vectors compresses 16x and pays for it; a broken PCA/ID mapping drops all of them near 0
@pytest.mark.parametrize("factory, floor", [("HNSW32", 0.95), ("IVF16,Flat", 0.95), ("IVF16,SQ8", 0.95),
                                            pytest.param("IVF16,PQ32", 0.6, marks=pytest.mark.slow)])  # PQ training: CI time
def test_approximate_recall_at_10_on_real_embeddings(sample_run, tmp_path, factory, floor):
    vectors, table, _ = load_embeddings(sample_run, "det")
    exact = build_index(IndexConfig(run=sample_run, embeddings="det", name="exact", pca=128, factory="Flat"))
    approx = build_index(IndexConfig(run=sample_run, embeddings="det", name="approx", pca=128, factory=factory))
    queries = np.asarray(vectors[(table.split == "test").to_numpy()][:200])
    _, e = exact.search(queries, 10)
    _, a = approx.search(queries, 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(e, a)])
    assert recall >= floor, f"{factory} recall@10 {recall:.3f} below {floor}"


def test_image_level_keeps_each_image_once_by_best_instance():
    rows = pd.DataFrame({"image_id": [7, 3, 7, 5, 3], "instance": [0, 1, 1, 0, 0],
                         "similarity": [0.9, 0.8, 0.7, 0.6, 0.95]})
    out = image_level(rows)
    assert out.image_id.tolist() == [3, 7, 5]
    assert out.similarity.tolist() == [0.95, 0.9, 0.6] and out.instance.tolist() == [0, 0, 0]


def test_query_returns_instances_and_distinct_images(run):
    si = build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    vectors, table, _ = load_embeddings(run, "det")
    boxes = [{"bbox": [0, 0, 1, 1], "score": 1.0, "source": "detected"}] * 2
    per_box = query_vectors(si, np.asarray(vectors[:2]), boxes, 5)
    merged = merged_images(per_box, 5)
    assert len(per_box) == 2 and all(len(q.neighbours) == 5 for q in per_box)
    assert merged.image_id.is_unique and len(merged) == 5
    assert (np.diff(per_box[0].neighbours.similarity) <= 1e-6).all()


def _search_json(run, *args):
    out = subprocess.run([sys.executable, "-m", "cbir.cli", "search", "--run", str(run), "--json", *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow  # kept out of CI's run (25-minute budget); `make test-all` runs it
def test_saved_index_reloads_and_extends_identically(run, tmp_path):
    build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    photo = sorted((MINI / "images" / "017.Cardinal").glob("*.jpg"))[0]
    # plain search: re-ranking legitimately moves old items once a new photo joins their shortlists
    before = _search_json(run, "--index", "det", "--image", str(photo), "--k", "10", "--rerank", "none")
    assert before["boxes"][0]["source"] == "fallback-full"  # imported boxes: the whole photo is the query
    first = before["boxes"][0]["neighbours"][0]
    assert set(first) == {"image_id", "instance", "class_id", "class_name", "path", "box", "source", "similarity",
                          "category", "itself"}
    own = pd.read_parquet(run / "dataset" / "images.parquet").query("path.str.endswith(@photo.name)").image_id
    assert before["itself"] == int(own.iloc[0])  # a photo of the run: its own rows are marked
    assert all(n["itself"] == (n["image_id"] == before["itself"]) for n in before["boxes"][0]["neighbours"])
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(sorted((MINI / "images" / "014.Indigo_Bunting").glob("*.jpg"))[0], new / "a.jpg")
    (new / "junk.jpg").write_bytes(b"not an image")
    cli = [sys.executable, "-m", "cbir.cli", "index", "--run", str(run), "--name", "det", "--add", str(new)]
    out = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "added 1 instance" in out and "1 unreadable" in out
    subprocess.run(cli, capture_output=True, text=True, check=True)  # idempotent: same photo not added twice
    si = load_index(run, "det")
    assert si.table.split.value_counts()["added"] == 1
    after = _search_json(run, "--index", "det", "--image", str(photo), "--k", "10", "--rerank", "none")
    old = [n for n in after["images"] if n["class_id"] != -1]
    assert [n["image_id"] for n in old] == [n["image_id"] for n in before["images"]][:len(old)]
    assert [n["similarity"] for n in old] == [n["similarity"] for n in before["images"]][:len(old)]


def test_remove_images_keeps_other_ids(run):
    si = build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    victim = int(si.table.image_id.iloc[0])
    kept_ids = si.table.index[si.table.image_id != victim]
    assert remove_images(run, "det", [victim]) >= 1
    again = load_index(run, "det")
    assert victim not in set(again.table.image_id) and list(again.table.index) == list(kept_ids)
    with pytest.raises(CbirError, match="not in index"):
        remove_images(run, "det", [victim])
    build_index(IndexConfig(run=run, embeddings="det", name="hnsw", pca=16, factory="HNSW32"))
    with pytest.raises(CbirError, match="does not support removal"):
        remove_images(run, "hnsw", [int(again.table.image_id.iloc[0])])


def test_bad_queries_get_clear_errors(run, tmp_path):
    si = build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    with pytest.raises(CbirError, match="dim 7"):
        si.search(np.zeros((1, 7), np.float32), 3)
    with pytest.raises(CbirError, match="exceeds the gallery"):
        query_vectors(si, np.zeros((1, 1280), np.float32), [{"bbox": [0] * 4, "score": 0, "source": "x"}], 10_000)
    empty = build_index(IndexConfig(run=run, embeddings="det", name="empty", pca=16, factory="Flat"))
    empty.store.index.reset()
    with pytest.raises(CbirError, match="empty"):
        empty.search(np.zeros((1, 1280), np.float32), 3)
    bad = tmp_path / "x.jpg"
    bad.write_text("hello")
    out = subprocess.run([sys.executable, "-m", "cbir.cli", "search", "--run", str(run), "--index", "det",
                          "--image", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "cannot decode image" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(CbirError, match="FAISS cannot build"):
        build_index(IndexConfig(run=run, embeddings="det", name="bad", factory="NoSuchIndex"))


def test_index_from_another_backbone_is_refused(run, tmp_path):
    build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    meta_path = run / "index" / "det" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["summary"]["embedding_spec"]["weights_fingerprint"] = "0000000000000000"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CbirError, match="not the recorded 0000000000000000"):
        Querier(run, "det")


def test_querier_matches_stored_vectors_for_a_run_photo(run):
    """A photo of the run, queried by file, gets the same vector the embed stage stored for its GT box."""
    build_index(IndexConfig(run=run, embeddings="gt", pca=16, factory="Flat"))
    q = Querier(run, "gt", detector="none")
    split = pd.read_parquet(run / "dataset" / "images.parquet")
    row = split.iloc[20]
    photo = open_photo(MINI / "images" / row.path)
    boxes = q.boxes([photo], names=[row.path.rsplit("/", 1)[1]])[0]
    assert [b["source"] for b in boxes] == ["fallback-full", "gt"]
    per_box, _ = q.query([photo], 3, names=[row.path.rsplit("/", 1)[1]])[0]
    assert per_box[1].neighbours.image_id.iloc[0] == row.image_id
    assert per_box[1].neighbours.similarity.iloc[0] == pytest.approx(1.0, abs=1e-4)
    assert str(MOBILENET.absolute()) == q.spec["weights"]


def test_auto_factory_follows_the_scale_benchmark():
    assert auto_factory(50_000, 256, 25_000) == "Flat"
    assert auto_factory(1_000_000, 256, 500_000) == "IVF4000,SQ8"
    assert auto_factory(1_000_000, 256, 3_900) == "IVF100,SQ8"  # never more lists than train vectors support
    assert auto_factory(100_000_000, 256, 10_000_000).endswith(",PQ64")


def test_pca_auto_chooses_as_documented():
    from cbir.retrieval.reduce import AUTO_MIN_RATIO, AUTO_VARIANCE, resolve_pca

    rng = np.random.default_rng(0)
    assert resolve_pca("auto", rng.standard_normal((AUTO_MIN_RATIO * 64 - 1, 64)))[0] is None  # too few to fit
    isotropic = rng.standard_normal((4000, 64))
    assert resolve_pca("auto", isotropic)[0] is None  # 99 % of the variance needs nearly every dimension
    basis = np.linalg.qr(rng.standard_normal((256, 256)))[0][:, :40]
    low_rank = rng.standard_normal((4000, 40)) * np.linspace(3, 1, 40) @ basis.T + 0.01 * rng.standard_normal((4000, 256))
    used, why = resolve_pca("auto", low_rank + 5 * basis[:, 0])  # off-centre: the chain L2-normalises first
    assert used is not None and used <= 40 and "99%" in why
    x = low_rank + 5 * basis[:, 0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    eigen = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    kept = np.cumsum(eigen) / eigen.sum()
    assert kept[used - 1] >= AUTO_VARIANCE > kept[used - 2]  # the smallest such dimension
    few = isotropic[:40]  # more than the train vectors support: lowered and said; more than the dimension: refused
    assert resolve_pca(50, few) == (40, "50 requested, lowered to 40 (dim 64, 40 train vectors)")
    with pytest.raises(CbirError, match=r"--pca 512: more than the vectors' dimension \(64\)"):
        resolve_pca(512, isotropic)


def test_photos_answered_together_equal_photos_answered_alone(run):
    """Concurrent page requests and `search --image A B C` share one encoder and one store pass; the answers
    must not depend on the company a photo keeps (padding, batch order, per-photo box counts)."""
    build_index(IndexConfig(run=run, embeddings="gt", name="batch", pca=16, factory="Flat"))
    q = Querier(run, "batch", detector="none")
    paths = [sorted((MINI / "images" / c).glob("*.jpg"))[0] for c in ("001.Black_footed_Albatross", "017.Cardinal",
                                                                       "014.Indigo_Bunting")]
    photos = [open_photo(p) for p in paths]
    names = [p.name for p in paths]
    boxes = q.boxes(photos, names=names)
    assert [len(b) for b in boxes] == [2, 2, 2]  # whole photo + GT box of a run photo
    together = q.vectors(photos, boxes)
    alone = [q.vectors([p], [b])[0] for p, b in zip(photos, boxes)]
    for a, b in zip(together, alone):
        assert np.allclose(a, b, atol=1e-5)
    answers = q.query(photos, 5, names=names)
    for photo, name, (per_box, merged) in zip(photos, names, answers):
        single_boxes, single_merged = q.query([photo], 5, names=[name])[0]
        assert merged.image_id.tolist() == single_merged.image_id.tolist()
        assert [b.neighbours.image_id.tolist() for b in per_box] == [b.neighbours.image_id.tolist() for b in single_boxes]


def test_fused_index_is_served_in_its_own_space(run):
    """full+gt as one index: a run photo's query box (whole photo + its GT box) finds its own stored fused
    vector at similarity 1, and the served index scores as the refit fusion does."""
    from cbir.evaluation.retrieval import EvalConfig, evaluate
    from cbir.retrieval.rerank import Rerank

    si = build_index(IndexConfig(run=run, embeddings="full+gt", name="fused", pca=None, factory="Flat"))
    assert si.manifest["mode"] == "full+gt" and si.manifest["embedding_spec"]["encoder"] == "fused"
    assert set(si.manifest["upstream"]) == {"embeddings/full", "embeddings/gt"}
    q = Querier(run, "fused", detector="none")
    row = pd.read_parquet(run / "dataset" / "images.parquet").iloc[20]
    per_box, _ = q.query([open_photo(MINI / "images" / row.path)], 3, names=[row.path.rsplit("/", 1)[1]])[0]
    assert [b.source for b in per_box] == ["fallback-full", "gt"]
    assert per_box[1].neighbours.image_id.iloc[0] == row.image_id
    assert per_box[1].neighbours.similarity.iloc[0] == pytest.approx(1.0, abs=1e-4)
    result = evaluate(EvalConfig(run=run, embeddings=("full+gt",), pca=(None,), served=("fused",), plots=False,
                                 rerank=(Rerank(),)))
    m = result.computed.set_index(["reduction", "index"])
    assert m.loc[("served:fused", "Flat"), "MAP@R"] == pytest.approx(m.loc[("refit", "exact"), "MAP@R"], abs=1e-6)


@pytest.mark.parametrize("shrink", [0.0, 0.5, 1.0])
def test_whitening_shrinks_eigenvalues_toward_their_mean(shrink):
    import faiss

    from cbir.retrieval.reduce import apply_chain, train_chain, transform_prefix

    rng = np.random.default_rng(0)
    train = rng.standard_normal((400, 16)) * np.linspace(3, 0.1, 16) + 0.2  # anisotropic, off-centre
    queries = rng.standard_normal((20, 16))
    index = faiss.index_factory(16, transform_prefix(6, shrink) + "Flat", faiss.METRIC_INNER_PRODUCT)
    train_chain(index, train, shrink)
    got = apply_chain(index, queries)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    x = unit(train)  # the reference: L2norm, PCA (6 top directions), shrunk whitening, L2norm
    eigen, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    eigen, vectors = eigen[::-1][:6], vectors[:, ::-1][:, :6]
    shrunk = (1 - shrink) * eigen + shrink * eigen.mean()
    want = unit(((unit(queries) - x.mean(0)) @ vectors) / np.sqrt(shrunk))
    assert np.allclose(np.abs(got), np.abs(want), atol=1e-4)  # eigenvectors are defined up to sign
