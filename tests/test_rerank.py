"""Re-ranking against straightforward per-item references (Zhong et al.'s loops for k-reciprocal), and
its effect on real sample embeddings, served from a saved index."""

import numpy as np
import pytest

from cbir import CbirError
from cbir.retrieval.index import IndexConfig, build_index
from cbir.retrieval.rerank import Rerank, _min_sums, kreciprocal, parse_methods, rerank_matrix


def _unit(rng, n, d=16, clusters=4):
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_kreciprocal(sims, k1, k2, lam):
    """Zhong et al.'s re_ranking, item by item, over one set of items."""
    n = len(sims)
    dist = np.maximum(2 - 2 * sims.astype(np.float32), 0)
    dist = (dist / dist.max(axis=0)).T
    rank = np.argsort(dist, axis=1, kind="stable")
    V = np.zeros_like(dist)
    for i in range(n):
        forward = rank[i, :k1 + 1]
        recip = forward[np.where(rank[forward, :k1 + 1] == i)[0]]
        expansion = recip
        half = int(np.around(k1 / 2))
        for c in recip:
            c_forward = rank[c, :half + 1]
            c_recip = c_forward[np.where(rank[c_forward, :half + 1] == c)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.zeros_like(dist)
    for i in range(n):
        shared = np.array([np.minimum(V[i], V[g]).sum() for g in range(n)])
        jaccard[i] = 1 - shared / (2 - shared)
    return 1 - (jaccard * (1 - lam) + dist * lam)


def test_kreciprocal_equals_the_reference_loops():
    rng = np.random.default_rng(0)
    x = _unit(rng, 60)
    cfg = Rerank(method="kreciprocal", k1=8, k2=3, lam=0.3)
    assert np.allclose(kreciprocal(x @ x.T, cfg), reference_kreciprocal(x @ x.T, 8, 3, 0.3), atol=1e-5)


@pytest.mark.parametrize("n, per_row", [(40, 30), (300, 4)])  # dense (a shortlist) and sparse (a gallery) routes
def test_jaccard_min_sums_equal_the_pairwise_definition(n, per_row):
    rng = np.random.default_rng(n)
    weights = np.zeros((n, n), np.float32)
    for row in weights:
        row[rng.choice(n, per_row, replace=False)] = rng.random(per_row)
    weights /= weights.sum(1, keepdims=True)
    expected = np.minimum(weights[:, None, :], weights[None, :, :]).sum(-1)
    assert np.allclose(_min_sums(weights), expected, atol=1e-6)


def test_query_expansion_and_database_augmentation_equal_per_item_sums():
    rng = np.random.default_rng(1)
    database, queries = _unit(rng, 50), _unit(rng, 7)
    cfg = Rerank(method="aqe", k=3, alpha=3.0)
    expected = []
    for q in queries:
        sims = database @ q
        top = np.argsort(-sims)[:3]
        new = q + sum(max(sims[j], 0) ** 3 * database[j] for j in top)
        expected.append(database @ (new / np.linalg.norm(new)))
    assert np.allclose(rerank_matrix(cfg, queries, database), np.array(expected), atol=1e-5)
    augmented = []
    for v in database:
        sims = database @ v
        top = np.argsort(-sims)[:3]  # itself first
        new = sum(max(sims[j], 0) ** 3 * database[j] for j in top)
        augmented.append(new / np.linalg.norm(new))
    assert np.allclose(rerank_matrix(Rerank(method="dba"), queries, database), queries @ np.array(augmented).T,
                       atol=1e-5)


def test_a_query_never_expands_with_itself():
    rng = np.random.default_rng(2)
    database = _unit(rng, 30)
    rows = np.arange(5)
    own = rerank_matrix(Rerank(method="aqe", k=2), database[rows], database, query_rows=rows)
    without = []
    for i in rows:
        sims = database @ database[i]
        sims[i] = -np.inf
        top = np.argsort(-sims)[:2]
        new = database[i] + sum(sims[j] ** 3 * database[j] for j in top)
        without.append(database @ (new / np.linalg.norm(new)))
    assert np.allclose(own, np.array(without), atol=1e-5)


def test_bad_method_is_one_line():
    with pytest.raises(CbirError, match="--rerank 'qe'"):
        parse_methods("none,qe")


def test_served_reranking_reorders_the_shortlist_and_lifts_map_at_r(sample_run):
    from cbir.evaluation.retrieval import EvalConfig, evaluate

    build_index(IndexConfig(run=sample_run, embeddings="det", name="rr", pca=128, factory="Flat"))
    result = evaluate(EvalConfig(run=sample_run, embeddings=(), served=("rr",), plots=False,
                                 rerank=(Rerank(), Rerank(method="kreciprocal"))))
    rows = result.computed.set_index(["index", "rerank"])
    plain, served = rows.loc[("Flat", "none")], rows.loc[("Flat", Rerank(method="kreciprocal").label)]
    assert plain["MAP@R"] == pytest.approx(rows.loc[("exact", "none")]["MAP@R"], abs=1e-9)  # same ranking
    assert served["MAP@R"] > plain["MAP@R"] + 0.05 and served["R@1"] >= plain["R@1"] - 0.005
