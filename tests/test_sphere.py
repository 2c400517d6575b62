import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3o_denoise import sphere as S


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return S.normalize(torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def reference_slerp64(x0, x1, t):
    x0, x1 = x0.double(), x1.double()
    t = S.broadcast_time(t, x0).double()
    theta = torch.arccos((x0 * x1).sum(-1, keepdim=True).clamp(-1, 1))
    s = torch.sin(theta)
    xt = (torch.sin((1 - t) * theta) * x0 + torch.sin(t * theta) * x1) / s
    ut = theta * (torch.cos(t * theta) * x1 - torch.cos((1 - t) * theta) * x0) / s
    return xt, ut


def test_endpoints_and_unit_norm():
    x0, x1 = unit(3, 5, 64, seed=1), unit(3, 5, 64, seed=2)
    assert torch.allclose(S.slerp(x0, x1, torch.zeros(3)), x0, atol=1e-6)
    assert torch.allclose(S.slerp(x0, x1, torch.ones(3)), x1, atol=1e-6)
    xt = S.slerp(x0, x1, torch.rand(3))
    assert S.sphere_violation(xt).max() < 1e-6


def test_time_broadcast_forms_agree():
    x0, x1 = unit(4, 7, 32, seed=1), unit(4, 7, 32, seed=2)
    t = torch.rand(4)
    a = S.slerp(x0, x1, t)
    b = S.slerp(x0, x1, t.view(4, 1, 1))
    c = torch.stack([S.slerp(x0[i], x1[i], float(t[i])) for i in range(4)])
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-7)


def test_velocity_is_time_derivative_finite_difference():
    x0, x1 = unit(6, 16, 128, seed=3, dtype=torch.float64), unit(6, 16, 128, seed=4, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    fd = (S.slerp(x0, x1, t + h) - S.slerp(x0, x1, t - h)) / (2 * h)
    assert torch.allclose(S.slerp_velocity(x0, x1, t), fd, atol=1e-7)


def test_velocity_tangent_norm_theta_and_log_form():
    x0, x1 = unit(2, 9, 256, seed=5), unit(2, 9, 256, seed=6)
    t = torch.tensor([0.2, 0.7])
    xt, ut = S.slerp(x0, x1, t), S.slerp_velocity(x0, x1, t)
    assert (ut * xt).sum(-1).abs().max() < 1e-5
    theta = S.geodesic_distance(x0, x1)
    assert torch.allclose(ut.norm(dim=-1), theta, atol=1e-5)
    # u_t = log_{x_t}(x1) / (1 - t): the target the original code got wrong (it used log_{x0}(x1)).
    assert torch.allclose(ut, S.log_map(xt, x1) / (1 - t).view(2, 1, 1), atol=1e-5)
    assert not torch.allclose(ut, S.log_map(x0, x1), atol=1e-2)


def test_float32_accuracy_at_4096():
    x0, x1 = unit(4, 64, 4096, seed=7), unit(4, 64, 4096, seed=8)
    t = torch.tensor([0.01, 0.3, 0.8, 0.99])
    ref_x, ref_u = reference_slerp64(x0, x1, t)
    assert (S.slerp(x0, x1, t).double() - ref_x).abs().max() <= 1e-5
    assert (S.slerp_velocity(x0, x1, t).double() - ref_u).abs().max() <= 1e-5


def test_small_angle_limit_no_nan():
    x0 = unit(3, 4096, seed=9)
    for eps in (0.0, 1e-9, 1e-6, 1e-3):
        x1 = S.normalize(x0 + eps * unit(3, 4096, seed=10))
        t = torch.tensor([0.0, 0.5, 1.0])
        xt, ut = S.slerp(x0, x1, t), S.slerp_velocity(x0, x1, t)
        assert torch.isfinite(xt).all() and torch.isfinite(ut).all()
        assert torch.allclose(xt, x0, atol=2 * eps + 1e-6)
        assert ut.norm(dim=-1).max() <= 2 * eps + 1e-5
    x = unit(2, 64)
    assert torch.equal(S.exp_map(x, torch.zeros_like(x)), x)
    assert torch.equal(S.log_map(x, x), torch.zeros_like(x))


def test_antipodal_finite_documented_direction():
    x0 = unit(5, 4096, seed=11)
    x1 = -x0
    t = torch.full((5,), 0.5)
    xt, ut = S.slerp(x0, x1, t), S.slerp_velocity(x0, x1, t)
    assert torch.isfinite(xt).all() and torch.isfinite(ut).all()
    assert torch.allclose(ut.norm(dim=-1), torch.full((5,), math.pi), atol=1e-4)
    # the midpoint is orthogonal to both ends, and lies along the fallback direction e_k projected
    assert (xt * x0).sum(-1).abs().max() < 1e-5
    k = x0.abs().argmin(-1)
    e = torch.zeros_like(x0)
    e[torch.arange(5), k] = 1.0
    expected = S.normalize(S.project_tangent(x0, e))
    assert torch.allclose(xt, expected, atol=1e-5)
    assert torch.allclose(S.slerp(x0, x1, torch.ones(5)), x1, atol=1e-5)


def test_exp_log_roundtrip_and_projection():
    x, y = unit(8, 512, seed=12), unit(8, 512, seed=13)
    v = S.log_map(x, y)
    assert torch.allclose(S.exp_map(x, v), y, atol=1e-5)
    w = torch.randn(8, 512)
    p = S.project_tangent(x, w)
    assert (p * x).sum(-1).abs().max() < 1e-5
    assert torch.allclose(S.project_tangent(x, p), p, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dim=st.integers(2, 300),
    t=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_properties_random_shapes(lead, dim, t, seed):
    x0, x1 = unit(*lead, dim, seed=seed), unit(*lead, dim, seed=seed + 1)
    xt = S.slerp(x0, x1, t)
    ut = S.slerp_velocity(x0, x1, t)
    assert xt.shape == x0.shape and ut.shape == x0.shape
    assert S.sphere_violation(xt).max() < 1e-5
    assert (ut * xt).sum(-1).abs().max() < 1e-4
    theta = S.geodesic_distance(x0, x1)
    assert torch.allclose(ut.norm(dim=-1), theta, atol=1e-4)
    # geodesic: distance from x0 to x_t is t * theta
    assert torch.allclose(S.geodesic_distance(x0, xt), t * theta, atol=1e-3)
    assert torch.allclose(S.exp_map(x0, S.log_map(x0, x1)), x1, atol=1e-4)


def test_broadcast_time_rejects_higher_rank():
    with pytest.raises(ValueError):
        S.broadcast_time(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4))


def test_parallel_transport_keeps_norm_tangency_and_maps_geodesic_direction():
    x, y = unit(4, 6, 128, seed=20), unit(4, 6, 128, seed=21)
    v = S.project_tangent(x, torch.randn(4, 6, 128))
    w = S.parallel_transport(x, y, v)
    assert (w * y).sum(-1).abs().max() < 1e-5
    assert torch.allclose(w.norm(dim=-1), v.norm(dim=-1), atol=1e-5)
    # the geodesic's own velocity is carried to the geodesic's velocity at the far end
    assert torch.allclose(S.parallel_transport(x, y, S.log_map(x, y)), -S.log_map(y, x), atol=1e-5)
    # round trip
    assert torch.allclose(S.parallel_transport(y, x, w), v, atol=1e-5)
