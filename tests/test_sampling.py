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
    """With the true flow-matching field toward x1, v = log_x(x1) / (1 - t), every solver hits x1."""
    g = torch.Generator().manual_seed(1)
    x1 = S.normalize(torch.randn(2, 8, 4096, generator=g))
    x0 = S.normalize(torch.randn(2, 8, 4096, generator=g))
    v = lambda x, t: S.log_map(x, x1) / (1 - t).clamp_min(1e-6).view(-1, 1, 1)
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
