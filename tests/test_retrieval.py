"""Retrieval and geometry (retrieval.py): each test builds a case whose answer is known."""

import math

import torch

from blip3o_denoise import sphere
from blip3o_denoise.retrieval import (chance_interval, draw_pools, evaluate_retrieval, ranks, score_matrix,
                                      top_k_hits)


def targets(b=40, n=4, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sphere.normalize(torch.randn(b, n, d, generator=g))


def fwd(r, name, key="top1"):
    return r["predictors"][name]["forward"][key]["mean"]


def bwd(r, name, key="top1"):
    return r["predictors"][name]["backward"][key]["mean"]


def test_score_matrix_is_the_mean_token_cosine_in_any_block_size():
    a, b = targets(9, seed=1), targets(7, seed=2)
    direct = torch.einsum("pnd,qnd->pqn", a, b).mean(-1)
    for block in (1, 4, 128):
        assert torch.allclose(score_matrix(2.5 * a, b, block=block), direct, atol=1e-6)  # scale does not matter


def test_the_truth_retrieves_itself_with_perfect_geometry():
    y = targets()
    r = evaluate_retrieval({"truth": y}, y)
    assert r["pool_size"] == 40 and r["num_pools"] == 1
    for direction in (fwd, bwd):
        assert direction(r, "truth") == 1.0 and direction(r, "truth", "top5") == 1.0
        assert direction(r, "truth", "mean_rank") == 1.0
    geo = r["predictors"]["truth"]["geometry"]
    assert geo["similarity_mae"] < 1e-6 and geo["similarity_correlation"] > 0.999999


def test_one_swapped_pair_loses_exactly_those_two():
    y = targets()
    pred = y.clone()
    pred[[3, 7]] = y[[7, 3]]
    higher, tied = ranks(score_matrix(pred, y), 1)
    missed = torch.nonzero(top_k_hits(higher, tied, 1) < 1).flatten().tolist()
    assert missed == [3, 7]
    r = evaluate_retrieval({"swapped": pred}, y)
    assert fwd(r, "swapped") == 38 / 40 and bwd(r, "swapped") == 38 / 40
    others = [i for i in range(40) if i not in (3, 7)]
    assert higher[others].eq(0).all() and tied[others].eq(0).all()  # everyone else still ranks first


def test_forward_and_backward_differ_on_an_asymmetric_case():
    # prediction 1 leans toward target 0: as a query it picks target 0 (forward miss), but target 1 still
    # finds prediction 1 first among the predictions (backward hit), and target 0 still prefers prediction 0
    y = targets()
    pred = y.clone()
    pred[1] = sphere.normalize(y[0] + 0.5 * y[1])
    r = evaluate_retrieval({"leaning": pred}, y)
    assert fwd(r, "leaning") == 39 / 40
    assert bwd(r, "leaning") == 1.0


def test_a_constant_prediction_scores_chance_backward_through_ties():
    y = targets()
    constant = sphere.normalize(y.mean(0, keepdim=True)).expand_as(y)
    r = evaluate_retrieval({"constant": constant}, y)
    assert abs(bwd(r, "constant") - 1 / 40) < 1e-12  # 40-way tie: a hit with probability 1/40, not 1.0
    assert abs(bwd(r, "constant", "top5") - 5 / 40) < 1e-12
    assert bwd(r, "constant", "mean_rank") == 20.5
    assert r["chance"]["top1"] == 1 / 40 and r["chance"]["mean_rank"] == 20.5


def test_random_predictions_land_in_the_chance_interval():
    y = targets(300, d=32, seed=3)
    noise = targets(300, d=32, seed=4)
    r = evaluate_retrieval({"random": noise}, y)
    lo, hi = r["chance"]["top1_random_range95"]
    assert lo <= fwd(r, "random") <= hi and lo <= bwd(r, "random") <= hi
    assert hi < 0.02  # the interval is tight enough to tell a real predictor from chance
    assert abs(fwd(r, "random", "mean_rank") - 150.5) < 30
    # chance_interval is the binomial's central 95%: P(X <= 2) < 0.975 <= P(X <= 3) for X ~ Binomial(300, 1/300)
    cdf = [sum(math.comb(300, c) * (1 / 300) ** c * (299 / 300) ** (300 - c) for c in range(k + 1)) for k in range(5)]
    assert cdf[2] < 0.975 <= cdf[3] and cdf[0] >= 0.025
    assert chance_interval(300, 1) == [0.0, 3 / 300]


def test_pools_are_drawn_from_the_seed_above_the_pool_size():
    a, b, c = draw_pools(1000, 300, 30, seed=5), draw_pools(1000, 300, 30, seed=5), draw_pools(1000, 300, 30, seed=6)
    assert len(a) == 30 and all(len(p) == 300 and len(set(p.tolist())) == 300 for p in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len(draw_pools(300, 300, 30)) == 1  # up to the pool size: all samples, one pool

    y = targets(330, n=2, d=16, seed=7)
    pred = sphere.normalize(y + 2.5 * targets(330, n=2, d=16, seed=8))
    r1 = evaluate_retrieval({"p": pred}, y, seed=5)
    r2 = evaluate_retrieval({"p": pred}, y, seed=5)
    assert r1["num_pools"] == 30 and r1["pool_size"] == 300
    assert r1["predictors"] == r2["predictors"]
    f = r1["predictors"]["p"]["forward"]["top1"]
    assert f["ci95"][0] < f["mean"] < f["ci95"][1]  # an interval over the draws, not a point


def test_geometry_sees_a_collapse_that_cosine_rewards():
    # targets spread around a common direction; the collapsed predictor says the common direction for all,
    # the sample-like predictor is drawn from the targets' own law with a little information about each target
    g = torch.Generator().manual_seed(9)

    def unit(*shape):
        return sphere.normalize(torch.randn(*shape, generator=g))

    mu, z = unit(1, 4, 64), unit(60, 4, 64)
    y = sphere.normalize(mu + 0.8 * z)
    collapsed = sphere.normalize(mu + 0.05 * unit(60, 4, 64))
    sample = sphere.normalize(mu + 0.8 * sphere.normalize(z + 4.0 * unit(60, 4, 64)))
    cos = {name: float((p * y).sum(-1).mean()) for name, p in (("collapsed", collapsed), ("sample", sample))}
    assert cos["collapsed"] > cos["sample"]  # cosine prefers the collapse ...
    r = evaluate_retrieval({"collapsed": collapsed, "sample": sample}, y)
    geo = {name: r["predictors"][name]["geometry"] for name in ("collapsed", "sample")}
    assert geo["collapsed"]["similarity_mae"] > 3 * geo["sample"]["similarity_mae"]  # ... geometry does not
    assert fwd(r, "sample") > fwd(r, "collapsed")


def test_details_keep_the_first_pool_for_pictures():
    y = targets()
    details = {}
    evaluate_retrieval({"truth": y}, y, details=details)
    assert details["pool"].tolist() == list(range(40))
    assert details["scores"]["truth"].shape == (40, 40)
    assert torch.allclose(details["scores"]["truth"].diagonal(), torch.ones(40), atol=1e-5)
