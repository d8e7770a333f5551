import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from cbir import CbirError
from cbir.evaluation.retrieval import EvalConfig, evaluate, load_gallery
from cbir.layout import RunLayout
from cbir.metrics.ranking import (Gallery, RankStats, exact_metrics, first_occurrences, image_sims, rank_metrics,
                                  summarise)
from cbir.retrieval.rerank import Rerank
from conftest import copy_run


def _one(sims, q_labels, g_labels, self_index=None):
    stats = RankStats()
    sims = np.atleast_2d(np.asarray(sims, float))
    self_index = np.full(len(sims), -1) if self_index is None else np.asarray(self_index)
    rank_metrics(sims, np.asarray(q_labels), np.asarray(g_labels), self_index, stats)
    return summarise(stats), stats


def test_hand_made_ranking():
    # ranking by score: labels A B A B A ; query label A -> relevant at ranks 1, 3, 5 (R = 3)
    m, _ = _one([[0.9, 0.8, 0.7, 0.6, 0.5]], ["A"], ["A", "B", "A", "B", "A"])
    assert m["R@1"] == 1 and m["P@1"] == 1 and m["P@5"] == pytest.approx(3 / 5)
    assert m["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert m["R-precision"] == pytest.approx(2 / 3)  # 2 relevant in the top R = 3
    assert m["MAP@R"] == pytest.approx((1 + 2 / 3) / 3)  # precision at relevant ranks within R, / R


def test_first_hit_at_rank_three():
    m, _ = _one([[0.9, 0.8, 0.7, 0.1]], [1], [2, 3, 1, 1])
    assert (m["R@1"], m["R@2"], m["R@4"]) == (0, 0, 1)
    assert m["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert m["R-precision"] == 0 and m["MAP@R"] == 0


def test_query_itself_is_excluded():
    m, _ = _one([[1.0, 0.5, 0.4]], [1], [1, 2, 1], self_index=[0])
    assert m["R@1"] == 0 and m["R@2"] == 1 and m["mAP"] == pytest.approx(0.5)


def test_ties_follow_sklearn_for_ap():
    sims = np.array([[0.5, 0.5, 0.5, 0.2]])
    rel = np.array([1, 0, 1, 0])
    m, _ = _one(sims, [1], rel)
    assert m["mAP"] == pytest.approx(average_precision_score(rel, sims[0]))  # one threshold for the tie: 2/3
    assert m["mAP"] == pytest.approx(2 / 3)
    assert m["R@1"] == 1  # rank metrics break ties by gallery order


def test_classes_of_size_one_are_excluded_and_counted():
    sims = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    m, stats = _one(sims, [1, 1, 2], [1, 1, 2], self_index=[0, 1, 2])
    assert stats.excluded == 1 and m["R@1"] == 1 and m["mAP"] == 1


def test_map_equals_sklearn_per_query_average(sample_run):
    g, _, _ = load_gallery(RunLayout(sample_run), "full", 64, False)
    metrics, _ = exact_metrics(g)
    sims = g.query @ g.query.T
    aps = []
    for i in range(len(g.query)):
        keep = np.arange(len(g.query)) != i
        aps.append(average_precision_score(g.labels[keep] == g.labels[i], sims[i, keep]))
    assert metrics["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_cross_check_with_pytorch_metric_learning(sample_run):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    g, _, _ = load_gallery(RunLayout(sample_run), "full", 64, False)
    metrics, _ = exact_metrics(g)
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              device=torch.device("cpu"), knn_func=None)
    x = torch.from_numpy(np.ascontiguousarray(g.query))
    y = torch.from_numpy(g.labels)
    pml = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
    assert metrics["P@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert metrics["R-precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert metrics["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


def test_det_is_scored_per_image_by_best_instance():
    # image 0 has instances [a, b]; image 1 has [c]; image 2 has [d]
    inst = np.array([[1, 0], [0, 1], [0.6, 0.8], [1, 0]], float)
    g = Gallery(query=inst[[0, 2, 3]], instances=inst, starts=np.array([0, 2, 3]), labels=np.array([1, 2, 1]),
                image_ids=np.array([10, 11, 12]))
    sims = image_sims(np.array([[0, 1.0]]), g)
    assert sims.tolist() == [[1.0, 0.8, 0.0]]  # image 0 wins through its second instance
    m, _ = exact_metrics(g)
    assert m["R@1"] == 1  # image 0 (query [1,0]) finds image 2, same class


def test_first_occurrences():
    rows = np.array([[3, 1, 3, 2, 1], [5, 5, 5, 5, 4]])
    assert first_occurrences(rows).tolist() == [[True, True, False, True, False], [True, False, False, False, True]]


def test_evaluation_refuses_leaked_train_rows(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    rows = run / "embeddings" / "full" / "rows.parquet"
    table = pd.read_parquet(rows)
    table.loc[table.split == "train", "split"] = "test"  # made with another split: train rows as queries
    table.loc[table.index[0], "split"] = "train"
    table.to_parquet(rows)
    meta_path = run / "embeddings" / "full" / "meta.json"  # as if written so: the size record matches
    meta = json.loads(meta_path.read_text())
    meta["files"]["rows.parquet"] = rows.stat().st_size
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CbirError, match="leak"):
        evaluate(EvalConfig(run=run, embeddings=("full",), plots=False))


def test_evaluate_writes_reports_and_scores_an_approximate_index(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    result = evaluate(EvalConfig(run=run, embeddings=("full", "det", "full+det", "nope"), pca=(8, None),
                                 index="HNSW32"))
    m = result.metrics
    # 3 sets x 2 PCA settings: exact, HNSW32, and (by default) exact re-ranked with k-reciprocal
    assert set(m.embeddings) == {"full", "det", "full+det"} and len(m) == 18
    exact = m[(m["index"] == "exact") & (m.rerank == "none")]
    assert len(exact) == 6 and exact["R@1"].between(0, 1).all() and (exact["R@8"] >= exact["R@1"]).all()
    assert m.rerank.str.startswith("kreciprocal").sum() == 6
    assert len(m[m["index"] == "HNSW32"]) == 6 and (m[m["index"] == "HNSW32"]["recall@10 vs exact"] > 0.9).all()
    reports = run / "reports" / "retrieval"
    for name in ("metrics.csv", "comparison.md", "pr_curves.png", "embedding_map_det.png", "grid_det.png",
                 "grid_full_det.png"):
        assert (reports / name).stat().st_size > 0
    comparison = (reports / "comparison.md").read_text()
    assert "| full+det" in comparison and "|   P@1 |" in comparison and "— : not computed" in comparison
    assert "- [pr_curves.png](pr_curves.png)" in comparison and "- [grid_det.png](grid_det.png)" in comparison


def test_a_narrower_evaluate_keeps_the_other_rows(mini_run, tmp_path):
    run = copy_run(mini_run, tmp_path / "run")
    plain = (Rerank(),)
    wide = evaluate(EvalConfig(run=run, embeddings=("full", "det"), pca=(8, None), plots=False, rerank=plain)).metrics
    narrow = evaluate(EvalConfig(run=run, embeddings=("det",), pca=(8,), plots=False, rerank=plain))
    assert len(narrow.computed) == 1 and len(narrow.metrics) == len(wide) == 4
    on_disk = pd.read_csv(run / "reports" / "retrieval" / "metrics.csv")
    assert len(on_disk) == 4 and set(on_disk.embeddings) == {"full", "det"}
    text = (run / "reports" / "retrieval" / "comparison.md").read_text()
    assert text.count("| full ") == 2 and text.count("| det ") == 2


@pytest.mark.parametrize("whiten", [None, 0.5])
def test_served_index_is_scored_with_its_own_reduction(mini_run, tmp_path, whiten):
    from cbir.retrieval.index import IndexConfig, build_index

    run = copy_run(mini_run, tmp_path / "run")
    build_index(IndexConfig(run=run, embeddings="det", pca=8, factory="HNSW32", whiten=whiten))
    result = evaluate(EvalConfig(run=run, embeddings=("det",), pca=(8,), served=("det",), plots=False,
                                 rerank=(Rerank(),), whiten=whiten))
    m = result.computed.set_index(["reduction", "index"])
    served_exact, refit = m.loc[("served:det", "exact")], m.loc[("refit", "exact")]
    # the same data, the same PCA fitted on the same train rows: the served index's reduction agrees
    assert served_exact["MAP@R"] == pytest.approx(refit["MAP@R"], abs=1e-6)
    assert m.loc[("served:det", "HNSW32"), "recall@10 vs exact"] > 0.9
    assert served_exact["pca"] == "8"


def test_sample_quality_floor(sample_run):
    """Real ImageNet features on 10 unseen classes: a retrieval bug shows up as a drop below these floors."""
    result = evaluate(EvalConfig(run=sample_run, embeddings=("full", "det"), pca=(None,), plots=False))
    m = result.computed.set_index(["embeddings", "rerank"])
    assert m.loc[("full", "none"), "R@1"] > 0.8 and m.loc[("det", "none"), "R@1"] > 0.8
    assert m.loc[("full", "none"), "MAP@R"] > 0.35 and m.loc[("full", "none"), "NMI"] > 0.6
    reranked = m.xs(Rerank(method="kreciprocal").label, level="rerank")  # the default re-ranking helps, not hurts
    assert (reranked["MAP@R"] > m.xs("none", level="rerank")["MAP@R"]).all()


def test_retrieval_methods_agree_on_the_same_vectors():
    from cbir.evaluation.methods import method_rows

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 32))
    labels = rng.integers(0, 8, 400)
    x = centres[labels] + rng.normal(size=(400, 32)) * 0.8
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train = centres[rng.integers(0, 8, 800)] + rng.normal(size=(800, 32)) * 0.8
    rows = {r["method"].split(" (")[0]: r for r in method_rows(x, labels, train / np.linalg.norm(train, axis=1,
                                                                                                 keepdims=True))}
    nn, flat = rows["NN"], rows["FAISS Flat"]
    assert nn["R@1"] == pytest.approx(flat["R@1"]) and flat["recall@10 vs exact"] == 1.0
    # R@1 by hand: each point's nearest other point (itself excluded) has its label
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    assert nn["R@1"] == pytest.approx(float((labels[sims.argmax(1)] == labels).mean()))
    assert 0.5 < rows["kNN vote"]["R@1"] <= 1 and rows["FAISS HNSW32"]["recall@10 vs exact"] > 0.9
    ivf = next(r for name, r in rows.items() if name.startswith("FAISS IVF"))
    assert 0.5 < ivf["recall@10 vs exact"] <= 1


@pytest.mark.slow  # umap-learn's numba compilation costs ~20 s a process
def test_maps_by_umap_on_request(sample_run, tmp_path):
    from cbir.metrics.plots import map_methods
    from conftest import copy_run

    run = copy_run(sample_run, tmp_path / "run")
    with pytest.raises(CbirError, match="--maps bogus: choose from pca, tsne, umap"):
        EvalConfig(run=run, maps=("pca", "bogus"))
    assert list(map_methods(("pca", "umap"), 50)) == ["PCA", "UMAP"]
    evaluate(EvalConfig(run=run, embeddings=("full",), pca=(None,), rerank=(Rerank(),), maps=("umap",)))
    assert (run / "reports" / "retrieval" / "embedding_map_full.png").stat().st_size > 10_000
