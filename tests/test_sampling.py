import math

import pytest
import torch

from blip3o_denoise import sphere as S
from blip3o_denoise.sampling import SOLVERS, integrate


def rotation_problem(seed=0, dim=64, theta=2.0):
    """A field on the whole sphere with a known non-geodesic-speed solution.

    v(x, t) = phi'(t) R x with R the rotation generator of the (a, b) plane and
    phi(t) = theta (exp(2t) - 1) / (exp(2) - 1) (no polynomial, so no solver is exact by luck):
    from x(0) = a the exact solution is cos(phi) a + sin(phi) b, landing on x1 at t = 1.
    """
    g = torch.Generator().manual_seed(seed)
    a = S.normalize(torch.randn(3, 4, dim, generator=g, dtype=torch.float64))
    b = S.normalize(S.project_tangent(a, torch.randn(3, 4, dim, generator=g, dtype=torch.float64)))
    x1 = math.cos(theta) * a + math.sin(theta) * b

    def v(x, t):
        rx = (x * a).sum(-1, keepdim=True) * b - (x * b).sum(-1, keepdim=True) * a
        return (2 * theta * torch.exp(2 * t) / (math.exp(2) - 1)).view(-1, 1, 1) * rx

    return a, x1, v


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_solvers_land_on_target_at_their_order(solver, order):
    a, x1, v = rotation_problem()
    errs = []
    for n in (8, 16, 32, 64):
        x = integrate(v, a, 0.0, n, solver)
        errs.append((x - x1).norm(dim=-1).max().item())
        assert S.sphere_violation(x).max() < 1e-10
    assert errs[-1] < (0.05 if order == 1 else 2e-3)
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert abs(rates[-1] - order) < 0.3, rates


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_conditional_field_lands_on_x1(solver):
    """With the true flow-matching field toward x1, v = log_x(x1) / (1 - t), every solver hits x1 (a point-mass
    posterior: the field is also its own exact flow map, so jumps of any size land too)."""
    g = torch.Generator().manual_seed(1)
    x1 = S.normalize(torch.randn(2, 8, 4096, generator=g))
    x0 = S.normalize(torch.randn(2, 8, 4096, generator=g))
    v = lambda x, t, d=None: S.log_map(x, x1) / (1 - t).clamp_min(1e-6).view(-1, 1, 1)  # noqa: E731
    for t0 in (0.0, 0.5):
        x = integrate(v, S.slerp(x0, x1, t0), t0, 10, solver)
        assert (x - x1).norm(dim=-1).max() < 1e-4


def test_integrate_rejects_bad_arguments():
    x = S.normalize(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="solver"):
        integrate(lambda x, t: x, x, 0.0, 4, "rk4")
    with pytest.raises(ValueError, match="num_steps"):
        integrate(lambda x, t: x, x, 0.0, 0)
    with pytest.raises(ValueError, match="start time"):
        integrate(lambda x, t: x, x, 1.0, 4)


def test_condition_projected_once_per_generation_with_and_without_guidance():
    from blip3o_denoise.model import ModelConfig, UniversalDiT
    from blip3o_denoise.sampling import generate

    for mode in ("aligned", "cross_attention", "both"):
        m = UniversalDiT(ModelConfig(input_dim=8, cond_dim=12, hidden_size=32, depth=2, num_heads=4, num_kv_heads=2,
                                     conditioning=mode, cond_dropout=0.1)).eval()
        calls = {"cond": 0, "kv": 0}
        m.cond_embed.register_forward_hook(lambda *a: calls.__setitem__("cond", calls["cond"] + 1))
        if m.cfg.uses_cross_attention:
            m.blocks[0].cross_attn.kv.register_forward_hook(lambda *a: calls.__setitem__("kv", calls["kv"] + 1))
        for guidance, kv_calls in ((1.0, 1), (2.0, 2)):  # guidance adds the null condition's keys/values, once
            calls.update(cond=0, kv=0)
            out = generate(m, torch.randn(2, 16, 12), "velocity", num_steps=7, guidance=guidance)
            assert out.shape == (2, 16, 8)
            assert calls["cond"] == 1
            assert calls["kv"] == (kv_calls if m.cfg.uses_cross_attention else 0)


def test_guidance_changes_samples_and_one_means_conditional():
    from blip3o_denoise.sampling import generate

    m = _perturbed_guidance_model()
    c = torch.randn(2, 16, 12)
    g = lambda w: generate(m, c, "velocity", num_steps=4, guidance=w, generator=torch.Generator().manual_seed(0))
    # guidance 1: the plain conditional flow, integrated here without the guidance code
    from blip3o_denoise.flow import prediction_to_velocity
    from blip3o_denoise.sampling import integrate

    x0 = S.normalize(torch.randn(2, 16, m.cfg.input_dim, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        plain = S.normalize(integrate(lambda x, t: prediction_to_velocity(m(x, t, c), x, t, "velocity"), x0, 0.0, 4))
    assert torch.allclose(g(1.0), plain, atol=1e-5)
    assert not torch.allclose(g(3.0), plain, atol=1e-4)


@pytest.mark.parametrize("ptype", ["velocity", "target", "noise"])
def test_guidance_is_the_cfg_formula_on_velocities(ptype):
    """guided = v_u + w (v_c - v_u), with v_c and v_u computed separately here; w = 1 is v_c exactly."""
    from blip3o_denoise.flow import prediction_to_velocity
    from blip3o_denoise.sampling import model_velocity_fn

    m = _perturbed_guidance_model()
    with torch.no_grad():
        m.null_cond.copy_(torch.randn_like(m.null_cond))  # a null condition far from any real one
    c = torch.randn(2, 16, 12)
    x = S.normalize(torch.randn(2, 16, 8))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        v_c = prediction_to_velocity(m(x, t, c), x, t, ptype)
        v_u = prediction_to_velocity(m(x, t, None), x, t, ptype)
        assert (v_c - v_u).norm() > 0.1 * v_c.norm()  # the two really differ, so the formula is tested
        assert torch.equal(model_velocity_fn(m, c, ptype, guidance=1.0)(x, t), v_c)
        for w in (0.0, 2.5, 4.0):
            guided = model_velocity_fn(m, c, ptype, guidance=w)(x, t)
            assert torch.allclose(guided, v_u + w * (v_c - v_u), atol=1e-5), w


def _perturbed_guidance_model():
    """A small model trained-for-guidance in shape (cond_dropout > 0) with every weight nudged off its
    init, so conditional and null-condition outputs differ."""
    from blip3o_denoise.model import ModelConfig, UniversalDiT

    torch.manual_seed(0)
    m = UniversalDiT(ModelConfig(input_dim=8, cond_dim=12, hidden_size=32, depth=2, num_heads=4, num_kv_heads=2,
                                 cond_dropout=0.1)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m
