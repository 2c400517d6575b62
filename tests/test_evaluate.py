import math

import numpy as np
import torch

from blip3o_denoise import sphere as S
from blip3o_denoise.baselines import RidgeStats, fit_ridge, solve_ridge
from blip3o_denoise.distribution import PCABasis, frechet_distance, knn_precision_recall
from blip3o_denoise.evaluate import (
    dispersion_ratio, diversity, mean_of_k_cosine, rating, token_metrics,
)


def conditional_world(b=64, n=16, d=256, spread=1.0, seed=0):
    """x1 = normalize(mu + spread * xi / sqrt(d)) with mu a unit mean per (sample, token): known spread."""
    g = torch.Generator().manual_seed(seed)
    mu = S.normalize(torch.randn(b, n, d, generator=g))

    def draw():
        return S.normalize(mu + spread * torch.randn(b, n, d, generator=g) / math.sqrt(d))

    return mu, draw


def test_exact_sampler_has_dispersion_ratio_near_one_and_collapsed_sampler_above():
    mu, draw = conditional_world(spread=1.0)
    target = draw()
    samples = torch.stack([draw() for _ in range(8)])  # exact: draws from the true conditional
    # m = E[x1 | c]: estimated by a large average; its direction is the best point estimate
    m = torch.stack([draw() for _ in range(400)]).mean(0)
    point = S.normalize(m)
    single = token_metrics(samples[0], target)["cosine_mean"]
    point_cos = token_metrics(point, target)["cosine_mean"]
    m_norm = float(m.norm(dim=-1).mean())
    # theory: single ~ |m|^2, point ~ |m|, mean of K ~ |m|^2 / sqrt(|m|^2 + (1 - |m|^2) / K)
    assert abs(single - m_norm**2) < 0.02 and abs(point_cos - m_norm) < 0.02
    k4 = m_norm**2 / math.sqrt(m_norm**2 + (1 - m_norm**2) / 4)
    assert abs(mean_of_k_cosine(samples, target, 4) - k4) < 0.02
    calibrated = dispersion_ratio(single, point_cos)
    assert abs(calibrated - 1.0) < 0.05
    collapsed = torch.stack([point] * 8)
    collapsed_ratio = dispersion_ratio(token_metrics(collapsed[0], target)["cosine_mean"], point_cos)
    assert collapsed_ratio > 1.3
    assert diversity(collapsed) > 0.999 and diversity(samples) < 0.6


def test_ridge_matches_numpy_least_squares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(12, 5, generator=g, dtype=torch.float64) + 0.3
         + 0.1 * torch.randn(200, 5, generator=g, dtype=torch.float64))
    stats = RidgeStats(12, 5)
    for i in range(0, 200, 37):  # streamed in uneven chunks
        stats.update(x[i:i + 37], y[i:i + 37])
    lam = 0.05
    W = solve_ridge(stats, lam).numpy()
    z = np.concatenate([x.numpy(), np.ones((200, 1))], axis=1)
    reg = np.sqrt(lam * 200) * np.eye(13)[:12]  # the bias column is not penalised
    ref = np.linalg.lstsq(np.concatenate([z, reg]), np.concatenate([y.numpy(), np.zeros((12, 5))]), rcond=None)[0]
    assert np.allclose(W, ref, atol=1e-8)


def test_fit_ridge_chooses_lambda_on_validation_and_predicts_unit_tokens():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(16, 8, generator=g)
    def batch(seed):
        gg = torch.Generator().manual_seed(seed)
        c = torch.randn(4, 10, 16, generator=gg)
        return c, S.normalize(c @ A) + 0.05 * torch.randn(4, 10, 8, generator=gg)
    r = fit_ridge((batch(i) for i in range(10)), [batch(100)], lambdas=(1e-4, 10.0, 1e4))
    assert r.lam == 1e-4 and r.val_cosine[1e-4] > r.val_cosine[1e4]
    c, t = batch(200)
    pred = r.predict(c)
    assert torch.allclose(pred.norm(dim=-1), torch.ones(4, 10), atol=1e-5)
    assert (pred * S.normalize(t)).sum(-1).mean() > 0.95


def test_frechet_distance_zero_on_itself_and_grows_with_shift():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3000, 8, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    b = a + torch.tensor([0.5] + [0.0] * 7, dtype=torch.float64)
    assert abs(frechet_distance(a, b) - 0.25) < 1e-6  # pure mean shift: |delta|^2
    c = a + torch.tensor([1.0] + [0.0] * 7, dtype=torch.float64)
    assert frechet_distance(a, c) > frechet_distance(a, b)
    # different covariance: FD = sum (sqrt(s1) - sqrt(s2))^2 per axis for diagonal covariances
    d = a * 2.0
    assert abs(frechet_distance(a, d) - 8 * (1 - 2) ** 2) < 0.5


def test_knn_precision_recall_sees_collapse():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(500, 4, generator=g)
    same = torch.randn(500, 4, generator=g)
    p, r = knn_precision_recall(real, same, k=3)
    assert p > 0.8 and r > 0.8
    collapsed = torch.zeros(500, 4) + 0.01 * torch.randn(500, 4, generator=g)
    p, r = knn_precision_recall(real, collapsed, k=3)
    assert p > 0.8 and r < 0.2  # realistic points, no coverage


def test_pca_basis_projects_onto_top_directions():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 1, 32, generator=g) * torch.tensor([5.0, 3.0] + [0.1] * 30)
    basis = PCABasis.fit(x, dim=2)
    assert basis.components.shape == (32, 2)
    top = basis.components.abs().argmax(dim=0).tolist()
    assert sorted(top) == [0, 1]


def test_ratings_follow_the_seed_thresholds():
    assert rating(0.85, "eva_denoising") == "excellent" and rating(0.75, "eva_denoising") == "good"
    assert rating(0.65, "clip_denoising") == "good" and rating(0.3, "clip_denoising") == "poor"


def test_generation_verdict():
    from blip3o_denoise.evaluate import generation_verdict

    def entry(ratio, point, ridge, fd, fd_ridge):
        return {"dispersion_ratio": ratio, "point_estimate": {"cosine_mean": point},
                "distribution": {"frechet_distance": fd},
                "baselines": {"ridge": {"cosine_mean": ridge, "distribution": {"frechet_distance": fd_ridge}}}}

    v = generation_verdict(entry(1.02, 0.9, 0.8, 0.01, 0.1))
    assert v == {"sampler": "calibrated", "point_estimate_beats_ridge": True, "closer_in_distribution_than_ridge": True}
    assert generation_verdict(entry(1.6, 0.7, 0.8, 0.2, 0.1))["sampler"] == "collapsed toward the mean"
    assert generation_verdict(entry(0.5, 0.7, 0.8, 0.2, 0.1))["sampler"] == "over-dispersed"
    assert generation_verdict(entry(None, 0.0, 0.8, 0.2, 0.1))["sampler"] == "no signal"


def _micro_model(d=16, dc=24, seed=0):
    from blip3o_denoise.model import UniversalDiT, config_from_preset

    torch.manual_seed(seed)
    model = UniversalDiT(config_from_preset("micro", d, dc, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1))
    # AdaLN-zero starts with zero output: give the final layer weights so outputs depend on the input
    for p in model.parameters():
        if p.dim() >= 2 and float(p.detach().abs().max()) == 0.0:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _batch(b=6, n=4, d=16, dc=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"target": S.normalize(torch.randn(b, n, d, generator=g)), "condition": torch.randn(b, n, dc, generator=g)}


def test_evaluate_batches_k_samples_and_reports_both_point_readings():
    from blip3o_denoise.evaluate import EvalConfig, evaluate

    model, batch = _micro_model(), _batch()
    cfg = EvalConfig(num_steps=3, noise_levels=(0.5,), sample_counts=(1, 4), distribution=False, batch_size=8)
    a = evaluate(model, batch, "velocity", "clip_denoising", 0.0, 1.0, cfg)
    b = evaluate(model, batch, "velocity", "clip_denoising", 0.0, 1.0, cfg)
    g = a["generation"]
    assert g["mean_of_k"] == b["generation"]["mean_of_k"]  # seeded: repeatable
    # the K samples of one condition come from different noise: not all equal
    assert g["diversity"] < 0.999
    assert set(g["mean_of_k"]) == {"1", "4"}
    for part in (g, a["denoising"]["0.5"]):
        assert part["point_estimate"]["cosine_mean"] != part["point_estimate_exp_map"]["cosine_mean"]
    assert g["dispersion_ratio"] == dispersion_ratio(g["model"]["cosine_mean"], g["point_estimate"]["cosine_mean"])


def test_evaluate_bf16_is_close_to_fp32_and_labelled():
    from blip3o_denoise.evaluate import EvalConfig, evaluate

    model, batch = _micro_model(), _batch()
    res = {p: evaluate(model, batch, "velocity", "clip_denoising", 0.0, 1.0,
                       EvalConfig(num_steps=3, noise_levels=(0.5,), sample_counts=(1,), distribution=False,
                                  precision=p)) for p in ("fp32", "bf16")}
    assert res["bf16"]["precision"] == "bf16" and res["fp32"]["precision"] == "fp32"
    for key in ("model", "point_estimate"):
        a, b = (res[p]["denoising"]["0.5"][key]["cosine_mean"] for p in ("fp32", "bf16"))
        assert a != b and abs(a - b) < 0.02


def test_eva_denoising_reports_the_copy_the_condition_baseline():
    from blip3o_denoise.evaluate import EvalConfig, evaluate

    model = _micro_model(d=16, dc=16)
    t = _batch(d=16, dc=16)["target"]
    res = evaluate(model, {"target": t, "condition": t}, "velocity", "eva_denoising", 0.0, 0.9,
                   EvalConfig(num_steps=2, noise_levels=(0.5,), distribution=False))
    copy = res["denoising"]["0.5"]["baselines"]["copy_condition"]["cosine_mean"]
    assert abs(copy - 1.0) < 1e-5
    from blip3o_denoise.evaluate import format_results

    assert "copying the condition scores 1.0000" in format_results(res)


def test_final_in_training_evaluation_is_bounded_by_training_compute():
    from blip3o_denoise.evaluate import EvalConfig, evaluation_cost
    from blip3o_denoise.train import FINAL_SAMPLE_COUNTS, TrainConfig, final_eval_samples

    cfg = TrainConfig(chunked_embeddings_dir="x", batch_size=16, min_noise_level=0.0, max_noise_level=1.0,
                      num_inference_steps=20)
    ecfg = EvalConfig(num_steps=20, sample_counts=FINAL_SAMPLE_COUNTS)
    per_sample = evaluation_cost(ecfg, True, 0.0, 1.0)
    assert per_sample == 4 * 20 + 1 + 4 * 21
    # 2000 steps x 16 samples x 3 forwards = 96000 sample-forwards; 10% of that buys 58 samples
    assert final_eval_samples(cfg, 2000, ecfg, 500) == int(0.1 * 96000 / per_sample)
    assert final_eval_samples(cfg, 2000, ecfg, 30) == 30  # never more than there are
    assert final_eval_samples(cfg, 10, ecfg, 500) == 8  # a floor, so a short run still reports something


def test_final_evaluation_budget_holds_with_huge_sampling_steps(tmp_path):
    """--num_inference_steps 100000 must not make the final in-training evaluation cost more than 10% of
    training: its steps are lowered (and the note says so), down to at most 10."""
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.evaluate import EvalConfig, evaluation_cost
    from blip3o_denoise.train import FINAL_SAMPLE_COUNTS, TrainConfig, final_eval_steps, train

    cfg = TrainConfig(chunked_embeddings_dir="x", batch_size=16, max_noise_level=1.0, num_inference_steps=100000)
    ecfg = EvalConfig(num_steps=100000, sample_counts=FINAL_SAMPLE_COUNTS)
    steps = final_eval_steps(cfg, 20000, ecfg)
    assert 10 <= steps < 100000
    cost = 8 * evaluation_cost(EvalConfig(num_steps=steps, sample_counts=FINAL_SAMPLE_COUNTS), True, 0.0, 1.0)
    assert cost <= 0.1 * 3 * 20000 * 16 < 8 * evaluation_cost(
        EvalConfig(num_steps=steps * 2, sample_counts=FINAL_SAMPLE_COUNTS), True, 0.0, 1.0)
    assert final_eval_steps(cfg, 20000, EvalConfig(num_steps=20, sample_counts=FINAL_SAMPLE_COUNTS)) == 20
    d = tmp_path / "d"
    make_synthetic(d, SyntheticSpec(num_samples=24, eva_dim=16, clip_dim=8, tokens=16))
    res = train(TrainConfig(chunked_embeddings_dir=str(d), output_dir=str(tmp_path / "o"), model_size="micro",
                            batch_size=8, max_steps=2, max_noise_level=1.0, num_inference_steps=100000,
                            holdout_fraction=0.3, eval_every_n_steps=0, save_every_n_steps=0, progress=False))
    assert res["num_steps"] == 10 and "10 sampling steps instead of 100000" in res["note"]


def test_sweep_reports_distribution_per_solver_and_steps():
    from blip3o_denoise.distribution import PCABasis
    from blip3o_denoise.sweep import sweep

    model, batch = _micro_model(), _batch()
    pca = PCABasis.fit(batch["target"].reshape(-1, 16), 8)
    res = sweep(model, batch, "velocity", [1, 3], [1.0], k=2, solvers=("euler", "heun"), pca=pca)
    assert [(r["solver"], r["steps"]) for r in res["rows"]] == [("euler", 1), ("euler", 3), ("heun", 1), ("heun", 3)]
    for r in res["rows"]:
        assert r["frechet_distance"] >= 0 and 0 <= r["recall"] <= 1 and "mean_of_2" in r
    # one step of euler and heun is the same step (heun's last step is an euler step)
    assert res["rows"][0]["frechet_distance"] == res["rows"][2]["frechet_distance"]
    assert res["rows"][0]["top1_forward"] == res["rows"][2]["top1_forward"]
    assert all(r["point_top1_forward"] == res["rows"][0]["point_top1_forward"] for r in res["rows"])
    assert res["rows"][1]["frechet_distance"] != res["rows"][3]["frechet_distance"]


def test_steps_to_match_picks_the_fewest_steps_within_tolerance():
    from blip3o_denoise.sweep import steps_to_match

    rows = [{"solver": "euler", "guidance": 1.0, "steps": s, "frechet_distance": fd}
            for s, fd in ((1, 0.5), (4, 0.109), (10, 0.104), (50, 0.1))]
    assert steps_to_match(rows) == {"euler, w=1": 4}
    assert steps_to_match(rows, tolerance=0.05) == {"euler, w=1": 10}
