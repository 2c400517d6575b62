import math

import pytest
import torch

from blip3o_denoise import flow as F
from blip3o_denoise import sphere as S


def draw(schedule, n=20000, lo=0.0, hi=1.0, **kw):
    cfg = F.FlowConfig(noise_schedule=schedule, min_noise_level=lo, max_noise_level=hi, **kw)
    return F.sample_noise_level(n, cfg, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("schedule", F.NOISE_SCHEDULES)
def test_noise_levels_inside_range(schedule):
    s = draw(schedule, lo=0.2, hi=0.7)
    assert s.min() >= 0.2 and s.max() <= 0.7
    # the truncated law still covers the interval
    assert s.min() < 0.22 and s.max() > 0.68


def test_schedules_have_their_laws():
    u, c, ln = draw("uniform"), draw("cosine"), draw("logit_normal")
    # uniform: a quarter of the mass in each quarter
    assert abs(float((u < 0.25).float().mean()) - 0.25) < 0.02
    # cosine (arcsine law): P(s < 0.1) = 2/pi asin(sqrt 0.1) ~ 0.205, more mass at the ends
    assert abs(float((c < 0.1).float().mean()) - 2 / math.pi * math.asin(math.sqrt(0.1))) < 0.02
    # logit-normal(0, 1): concentrated in the middle; median 0.5
    assert float(((ln > 0.25) & (ln < 0.75)).float().mean()) > 0.7
    assert abs(float(ln.median()) - 0.5) < 0.02
    shifted = draw("logit_normal", logit_normal_mean=1.0)
    assert abs(float(shifted.median()) - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02


def test_bad_config_named():
    with pytest.raises(ValueError, match="noise_schedule"):
        F.FlowConfig(noise_schedule="linear")
    with pytest.raises(ValueError, match="prediction_type"):
        F.FlowConfig(prediction_type="eps")
    with pytest.raises(ValueError, match="min_noise_level"):
        F.FlowConfig(min_noise_level=0.8, max_noise_level=0.2)


def test_sample_path_is_on_the_slerp_with_t_dependent_target():
    target = torch.randn(4, 16, 32) * 3.0
    cfg = F.FlowConfig()
    s = torch.tensor([0.1, 0.4, 0.6, 0.9])
    p = F.sample_path(target, cfg, torch.Generator().manual_seed(1), noise_level=s)
    assert torch.allclose(p.t, 1 - s)
    assert torch.allclose(p.x1, S.normalize(target))
    assert torch.allclose(p.x_t, S.slerp(p.x0, p.x1, p.t))
    assert torch.allclose(p.u_t, S.slerp_velocity(p.x0, p.x1, p.t))
    assert S.sphere_violation(p.x0).max() < 1e-5


@pytest.mark.parametrize("ptype", F.PREDICTION_TYPES)
def test_perfect_prediction_converts_to_true_velocity_and_zero_loss(ptype):
    target = torch.randn(3, 8, 64)
    cfg = F.FlowConfig(prediction_type=ptype)
    p = F.sample_path(target, cfg, torch.Generator().manual_seed(2), noise_level=torch.tensor([0.2, 0.5, 0.8]))
    perfect = {"velocity": p.u_t, "target": p.x1, "noise": p.x0}[ptype]
    v = F.prediction_to_velocity(perfect, p.x_t, p.t, ptype)
    assert torch.allclose(v, p.u_t, atol=1e-5)
    loss, parts = F.flow_loss(perfect, p, cfg)
    assert loss < 1e-8
    assert torch.allclose(F.prediction_to_target(perfect, p.x_t, p.t, ptype, rule="exp_map"), p.x1, atol=1e-5)


def test_prediction_types_differ_on_the_same_output():
    target = torch.randn(2, 4, 32)
    p = F.sample_path(target, F.FlowConfig(), torch.Generator().manual_seed(3))
    out = torch.randn_like(target)
    vs = [F.prediction_to_velocity(out, p.x_t, p.t, k) for k in F.PREDICTION_TYPES]
    assert not torch.allclose(vs[0], vs[1]) and not torch.allclose(vs[1], vs[2])
    for v in vs:
        assert (v * p.x_t).sum(-1).abs().max() < 1e-4


def test_sphere_penalty_means_something_per_type():
    target = torch.randn(2, 4, 32)
    p = F.sample_path(target, F.FlowConfig(), torch.Generator().manual_seed(4))
    # velocity: a normal component is penalised, the tangent part is not
    assert F.sphere_penalty(p.u_t, p.x_t, "velocity").max() < 1e-10
    assert torch.allclose(F.sphere_penalty(p.u_t + 0.5 * p.x_t, p.x_t, "velocity"), torch.full((2, 4), 0.25), atol=1e-5)
    # target / noise: distance from unit norm
    assert F.sphere_penalty(p.x1, p.x_t, "target").max() < 1e-10
    assert torch.allclose(F.sphere_penalty(2 * p.x1, p.x_t, "noise"), torch.ones(2, 4), atol=1e-5)


def test_sphere_constraint_weight_changes_loss():
    target = torch.randn(2, 4, 32)
    p = F.sample_path(target, F.FlowConfig(), torch.Generator().manual_seed(5))
    pred = p.u_t + 0.3 * p.x_t
    l0, parts = F.flow_loss(pred, p, F.FlowConfig(sphere_constraint_weight=0.0))
    l1, _ = F.flow_loss(pred, p, F.FlowConfig(sphere_constraint_weight=1.0))
    assert l0 < 1e-8  # projected velocity is exact
    assert torch.allclose(l1 - l0, parts["sphere_penalty"], atol=1e-6)
    assert parts["sphere_penalty"] > 0.08


def test_loss_gradient_flows():
    target = torch.randn(2, 4, 16)
    p = F.sample_path(target, F.FlowConfig(), torch.Generator().manual_seed(6))
    for k in F.PREDICTION_TYPES:
        pred = torch.randn(2, 4, 16, requires_grad=True)
        loss, _ = F.flow_loss(pred, p, F.FlowConfig(prediction_type=k))
        loss.backward()
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_per_sample_seeds_make_noise_independent_of_batching():
    target = torch.randn(4, 8, 32)
    cfg = F.FlowConfig()
    seeds = [F.sample_seed(0, 1, i) for i in range(4)]
    whole = F.sample_path(target, cfg, sample_seeds=seeds)
    halves = [F.sample_path(target[i:i + 2], cfg, sample_seeds=seeds[i:i + 2]) for i in (0, 2)]
    assert torch.equal(whole.x0, torch.cat([h.x0 for h in halves]))
    assert torch.equal(whole.t, torch.cat([h.t for h in halves]))
    assert len({F.sample_seed(0, e, i) for e in range(3) for i in range(100)}) == 300
    other = F.sample_path(target, cfg, sample_seeds=[F.sample_seed(0, 2, i) for i in range(4)])
    assert not torch.equal(whole.x0, other.x0)


def _mixture_posterior(x_t, t, targets):
    """Exact ``E[x1 | x_t]`` and ``E[u_t | x_t]`` when ``x1`` is uniform over ``targets [K, D]``.

    Given ``x1``, uniform noise puts ``theta`` at density ``~ sin^{D-2}(theta)``, and ``x_t`` sits at
    angle ``psi = (1 - t) theta`` from ``x1``; the surface density of ``x_t`` is therefore
    ``~ sin^{D-2}(psi / (1 - t)) / sin^{D-2}(psi)`` (zero past the antipode).
    """
    d = targets.shape[-1]
    psi = torch.arccos((x_t @ targets.T).clamp(-1, 1))
    theta = psi / (1 - t)
    logw = (d - 2) * (torch.log(torch.sin(theta).clamp_min(1e-300)) - torch.log(torch.sin(psi)))
    logw[theta >= math.pi] = -float("inf")
    w = torch.softmax(logw, -1)
    k = targets.shape[0]
    logs = S.log_map(x_t[:, None].expand(-1, k, -1), targets[None].expand(x_t.shape[0], -1, -1)) / (1 - t)
    return w @ targets, (w[..., None] * logs).sum(1), w


@pytest.mark.parametrize("t", [0.0, 0.02, 0.05, 0.3, 0.7])
def test_posterior_mean_point_estimate_recovers_a_spread_posterior(t):
    """The exact marginal velocity of an 8-point mixture gives back normalize(E[x1 | x_t]) (cosine
    > 0.99 at D = 1024, the O(1/sqrt(D)) approximation); the exp-map reading does not while the
    posterior is spread (small t), and both agree once it is a point mass."""
    g = torch.Generator().manual_seed(0)
    d, k, n = 1024, 8, 200
    dt = torch.float64
    base = S.normalize(torch.randn(d, generator=g, dtype=dt))
    targets = S.normalize(base + S.normalize(torch.randn(k, d, generator=g, dtype=dt)))
    x1 = targets[torch.randint(0, k, (n,), generator=g)]
    x0 = S.normalize(torch.randn(n, d, generator=g, dtype=dt))
    tt = torch.full((n,), t, dtype=dt)
    x_t = S.slerp(x0, x1, tt)
    ex1, ev, w = _mixture_posterior(x_t, t, targets)
    ref = S.normalize(ex1)
    pm = F.prediction_to_target(ev, x_t, tt, "velocity")
    em = F.prediction_to_target(ev, x_t, tt, "velocity", rule="exp_map")
    pm_cos, em_cos = (pm * ref).sum(-1), (em * ref).sum(-1)
    assert pm_cos.min() > 0.99
    spread = float(ex1.norm(dim=-1).mean())
    if t <= 0.02:
        assert spread < 0.8  # the posterior really is spread here
        assert em_cos.mean() < pm_cos.mean() - 0.04
    if t >= 0.3:
        assert spread > 0.999 and em_cos.min() > 0.999


def test_time_shift_moves_the_law_toward_noise_and_stays_truncated():
    plain = draw("uniform", lo=0.1, hi=0.9)
    shifted = draw("uniform", lo=0.1, hi=0.9, time_shift=3.0)
    assert shifted.min() >= 0.1 and shifted.max() <= 0.9
    assert shifted.mean() > plain.mean() + 0.1
    # the shifted law's CDF is F(f^-1(s)): check it against the empirical CDF on [0, 1]
    full = draw("uniform", time_shift=3.0)
    for s in (0.25, 0.5, 0.75):
        expected = s / (3.0 - 2.0 * s)
        assert abs(float((full <= s).float().mean()) - expected) < 0.01
    with pytest.raises(ValueError, match="time_shift"):
        F.FlowConfig(time_shift=0.0)

LAWS = {  # the full laws' CDFs on [0, 1], written out independently of flow.py
    "uniform": lambda s: s,
    "cosine": lambda s: 2 / math.pi * torch.asin(s.clamp(0, 1).sqrt()),
    "logit_normal": lambda s: torch.special.ndtr(torch.logit(s.clamp(1e-12, 1 - 1e-12))),
}


@pytest.mark.parametrize("schedule", F.NOISE_SCHEDULES)
def test_sub_interval_law_is_truncated_not_squashed(schedule):
    """On [0.2, 0.6] the draws follow F truncated, (F(s) - F(lo)) / (F(hi) - F(lo)), and not the full law
    mapped affinely into the interval, F((s - lo) / (hi - lo)) (the two coincide only for uniform)."""
    lo, hi = 0.2, 0.6
    s = draw(schedule, n=20000, lo=lo, hi=hi).double().sort().values
    cdf = LAWS[schedule]
    emp_hi = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
    emp_lo = emp_hi - 1.0 / len(s)

    def ks(model_cdf):
        return float(torch.maximum((emp_hi - model_cdf).abs(), (emp_lo - model_cdf).abs()).max())

    flo, fhi = cdf(torch.tensor(lo, dtype=torch.float64)), cdf(torch.tensor(hi, dtype=torch.float64))
    truncated = ks((cdf(s) - flo) / (fhi - flo))
    squashed = ks(cdf((s - lo) / (hi - lo)))
    assert truncated < 0.02, truncated
    if schedule != "uniform":
        assert squashed > 0.08, squashed


@pytest.mark.parametrize("ptype", F.PREDICTION_TYPES)
def test_euclidean_path_is_the_straight_line_and_converts_exactly(ptype):
    target = torch.randn(3, 8, 64)
    cfg = F.FlowConfig(prediction_type=ptype, path="euclidean")
    p = F.sample_path(target, cfg, torch.Generator().manual_seed(2), noise_level=torch.tensor([0.2, 0.5, 0.8]))
    t = p.t[:, None, None]
    assert torch.allclose(p.x_t, (1 - t) * p.x0 + t * p.x1, atol=1e-6)
    assert torch.allclose(p.u_t, p.x1 - p.x0)
    perfect = {"velocity": p.u_t, "target": p.x1, "noise": p.x0}[ptype]
    loss, _ = F.flow_loss(perfect, p, cfg)
    assert loss < 1e-8
    # the straight path is linear in (x_t, u_t): the point estimate is exact
    assert torch.allclose(F.prediction_to_target(perfect, p.x_t, p.t, ptype, path="euclidean"), p.x1, atol=1e-5)
    # the sphere reading of the same numbers is something else
    sphere_loss, _ = F.flow_loss(perfect, p, F.FlowConfig(prediction_type=ptype))
    assert sphere_loss > 1e-3


def test_euclidean_integration_lands_on_the_target_with_the_exact_field():
    from blip3o_denoise.sampling import integrate

    g = torch.Generator().manual_seed(0)
    x1 = S.normalize(torch.randn(2, 4, 32, generator=g))
    x0 = S.normalize(torch.randn(2, 4, 32, generator=g))
    for solver in ("euler", "heun", "midpoint"):
        out = integrate(lambda x, t: (x1 - x) / (1 - t[:, None, None]).clamp_min(1e-6), x0, 0.0, 5, solver,
                        path="euclidean")
        assert torch.allclose(out, x1, atol=1e-5)
        # the midway point is inside the ball, not on the sphere: no renormalisation on the way
        mid = integrate(lambda x, t: (x1 - x) / (1 - t[:, None, None]), x0, 0.0, 2, solver, t_end=0.5,
                        path="euclidean")
        assert mid.norm(dim=-1).max() < 0.99
