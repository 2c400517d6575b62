"""Baselines fitted on the training split: mean direction, per-position mean, per-token ridge.

The ridge regression maps a condition token ``[De]`` to a target token ``[Dt]`` (one map shared
by all positions, with a bias). It is fitted in closed form from streamed sufficient statistics,
so memory is ``O(De^2 + De Dt)`` (134 MB for De = 4096 in float64) whatever the number of
samples; the regularisation is chosen on a validation part of the training split by held-out
cosine (one linear solve per candidate), then the map is refitted on training + validation.
"""

from __future__ import annotations

import torch

from .sphere import normalize

DEFAULT_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def mean_baselines(token_sum: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the sum ``[N, D]`` of unit target tokens over ``count`` samples: the unit mean per position
    ``[N, D]`` and the mean direction ``[D]`` (the unit mean of those per-position directions)."""
    per_position = normalize(token_sum / count)
    return per_position, normalize(per_position.mean(0))


class RidgeStats:
    """Streaming sufficient statistics for ``y ~ [x, 1] W``: ``A = sum z z^T``, ``B = sum z y^T``."""

    def __init__(self, in_dim: int, out_dim: int):
        self.A = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
        self.B = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens ``x [..., De]``, ``y [..., Dt]`` (flattened over leading dims)."""
        z = _with_bias(x.reshape(-1, x.shape[-1]).double())
        self.A += z.T @ z
        self.B += z.T @ y.reshape(-1, y.shape[-1]).double()
        self.count += z.shape[0]


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def solve_ridge(stats: RidgeStats, lam: float) -> torch.Tensor:
    """``W = (A + lam * n * I') ^-1 B`` with the bias unpenalised; ``lam`` is per token (scaled by n)."""
    d = stats.A.shape[0]
    reg = torch.full((d,), lam * max(stats.count, 1), dtype=torch.float64)
    reg[-1] = 0.0
    return torch.linalg.solve(stats.A + torch.diag(reg), stats.B)


class Ridge:
    def __init__(self, W: torch.Tensor, lam: float, val_cosine: dict | None = None):
        self.W, self.lam, self.val_cosine = W, lam, val_cosine or {}

    def predict(self, cond: torch.Tensor) -> torch.Tensor:
        """Unit-norm predictions ``[..., Dt]`` for conditions ``[..., De]``."""
        lead = cond.shape[:-1]
        z = _with_bias(normalize(cond.float()).reshape(-1, cond.shape[-1]).double())
        return normalize((z @ self.W).float()).reshape(*lead, -1)


def fit_ridge(batches, val_batches, lambdas=DEFAULT_LAMBDAS) -> Ridge:
    """Fit on ``batches`` (an iterable of ``(cond [B, N, De], target [B, N, Dt])``), choose lambda
    on ``val_batches`` by mean token cosine, then refit on both with the chosen lambda."""
    stats = None
    for cond, target in batches:
        if stats is None:
            stats = RidgeStats(cond.shape[-1], target.shape[-1])
        stats.update(normalize(cond.float()), normalize(target.float()))
    if stats is None:
        raise ValueError("ridge baseline: no training samples")
    val = list(val_batches)
    scores = {}
    for lam in lambdas:
        model = Ridge(solve_ridge(stats, lam), lam)
        if val:
            cos = [(model.predict(c) * normalize(t.float())).sum(-1).mean() for c, t in val]
            scores[lam] = float(torch.stack(cos).mean())
    best = max(scores, key=scores.get) if scores else lambdas[len(lambdas) // 2]
    for cond, target in val:
        stats.update(normalize(cond.float()), normalize(target.float()))
    return Ridge(solve_ridge(stats, best), best, scores)
