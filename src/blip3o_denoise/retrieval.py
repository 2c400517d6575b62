"""Retrieval and geometry: does a prediction pick out its own image among held-out candidates?

Score of a prediction ``p`` against a candidate target ``y`` (both ``[N, D]``): the mean over the
N positions of the token cosine, the per-image cosine that ``evaluate.token_metrics`` reports. It
is one matrix product of the flattened, token-normalised tensors divided by N.

- forward (prediction -> image): the rank of target i among the pool's targets, by score(p_i, .)
- backward (image -> prediction): the rank of p_i among the pool's predictions, by score(., y_i)

Ties count as a random order among the tied candidates, in expectation: with g candidates
scoring higher and m tied with the correct one, the rank is ``g + 1 + m / 2`` and the chance of
being in the top k is ``clamp(k - g, 0, m + 1) / (m + 1)``. So a predictor that says the same
thing for every image (the mean direction) scores chance backward, not a perfect 1.0.

Pools follow the brain-decoding protocol: all samples when there are at most ``pool_size``;
otherwise ``draws`` pools of ``pool_size`` drawn without replacement from a seeded generator.
Intervals (95%): over the draws, the mean +- 1.96 standard errors of the draws; for one pool,
the Wilson interval of the proportion over its queries (mean rank: +- 1.96 standard errors).

Geometry: the pairwise similarity matrix of the predictions (same score, prediction against
prediction) against that of the true targets, off the diagonal: mean absolute difference and
Pearson correlation. A predictor that collapses toward the mean has similarities near 1 and
scores badly here even when its cosine to the truth is high.

Memory is bounded by the pool, not the number of samples: only pool x pool scores are formed,
``block`` rows at a time.
"""

from __future__ import annotations

import math
import time

import torch

from . import sphere

TOP_K = (1, 5)
Z95 = 1.959964
TIE_TOLERANCE = 1e-6


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[P, N, D]`` -> token-normalised and flattened ``[P, N * D]`` in float32."""
    return sphere.normalize(x.float()).reshape(x.shape[0], -1)


def score_matrix(preds: torch.Tensor, targets: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``[P, N, D]`` x ``[Q, N, D]`` -> ``[P, Q]``: mean token cosine of every pair, ``block`` rows at a time."""
    if preds.shape[1:] != targets.shape[1:]:
        raise ValueError(f"retrieval needs predictions and targets of one shape per sample: {tuple(preds.shape[1:])} "
                         f"vs {tuple(targets.shape[1:])}")
    t = _flat(targets)
    rows = [_flat(preds[i:i + block]) @ t.T for i in range(0, preds.shape[0], block)]
    return torch.cat(rows) / preds.shape[1]


def ranks(scores: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query of a square ``[P, P]`` score matrix whose diagonal holds the correct pairs.

    ``dim=1``: queries are rows (forward); ``dim=0``: queries are columns (backward). Returns
    ``(higher, tied)``: how many candidates score above the correct one, and how many tie with it.
    """
    s = scores if dim == 1 else scores.T
    correct = s.diagonal().unsqueeze(1)
    tied = ((s - correct).abs() <= TIE_TOLERANCE).sum(1) - 1
    higher = (s > correct + TIE_TOLERANCE).sum(1)
    return higher, tied


def expected_rank(higher: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    """1-based rank under a random order of ties (1 is a hit)."""
    return higher.double() + 1 + tied.double() / 2


def top_k_hits(higher: torch.Tensor, tied: torch.Tensor, k: int) -> torch.Tensor:
    """Per query, the probability of being among the top ``k`` under a random order of ties."""
    return ((k - higher).clamp(min=0).clamp(max=tied + 1)).double() / (tied + 1).double()


def draw_pools(n: int, pool_size: int = 300, draws: int = 30, seed: int = 0) -> list[torch.Tensor]:
    """All ``n`` samples as one pool when ``n <= pool_size``; otherwise ``draws`` seeded pools of ``pool_size``."""
    if n <= pool_size:
        return [torch.arange(n)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[:pool_size].sort().values for _ in range(draws)]


def wilson_interval(p: float, n: int) -> list[float]:
    """95% Wilson score interval of a proportion ``p`` over ``n`` trials."""
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest count c with P(Binomial(n, p) <= c) >= q."""
    if p >= 1.0:
        return n
    total = 0.0
    for c in range(n + 1):
        log_pmf = (math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)
                   + c * math.log(p) + (n - c) * math.log1p(-p))
        total += math.exp(log_pmf)
        if total >= q:
            return c
    return n


def chance_interval(pool_size: int, num_pools: int, k: int = 1) -> list[float]:
    """The central 95% range of top-``k`` accuracy for random predictions (each query hits with
    probability k / pool_size; the draws treated as independent)."""
    trials = pool_size * num_pools
    p = min(1.0, k / pool_size)
    return [binomial_quantile(trials, p, 0.025) / trials, binomial_quantile(trials, p, 0.975) / trials]


def _summarise(per_pool: list[float], per_query: torch.Tensor, proportion: bool) -> dict:
    """Mean and 95% interval: over the draws when there are several pools, else over the queries."""
    if len(per_pool) > 1:
        m = sum(per_pool) / len(per_pool)
        se = (sum((v - m) ** 2 for v in per_pool) / (len(per_pool) - 1)) ** 0.5 / len(per_pool) ** 0.5
        return {"mean": m, "ci95": [m - Z95 * se, m + Z95 * se]}
    m = float(per_query.mean())
    if proportion:
        return {"mean": m, "ci95": wilson_interval(m, per_query.numel())}
    se = float(per_query.std()) / per_query.numel() ** 0.5 if per_query.numel() > 1 else 0.0
    return {"mean": m, "ci95": [m - Z95 * se, m + Z95 * se]}


def _direction(higher_tied_by_pool: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    out = {}
    for k in TOP_K:
        hits = [top_k_hits(h, t, k) for h, t in higher_tied_by_pool]
        out[f"top{k}"] = _summarise([float(x.mean()) for x in hits], torch.cat(hits), proportion=True)
    rk = [expected_rank(h, t) for h, t in higher_tied_by_pool]
    out["mean_rank"] = _summarise([float(x.mean()) for x in rk], torch.cat(rk), proportion=False)
    return out


def geometry(pred_pred: torch.Tensor, true_true: torch.Tensor) -> dict:
    """Off-diagonal similarity matrices of the predictions and of the targets: MAE and Pearson r."""
    off = ~torch.eye(pred_pred.shape[0], dtype=torch.bool, device=pred_pred.device)
    a, b = pred_pred[off].double(), true_true[off].double()
    if a.numel() == 0:
        return {"similarity_mae": None, "similarity_correlation": None}
    ac, bc = a - a.mean(), b - b.mean()
    denom = float(ac.norm() * bc.norm())
    return {"similarity_mae": float((a - b).abs().mean()),
            "similarity_correlation": float((ac * bc).sum()) / denom if denom > 1e-12 else None}


def evaluate_retrieval(preds: dict[str, torch.Tensor], target: torch.Tensor, pool_size: int = 300, draws: int = 30,
                       seed: int = 0, details: dict | None = None) -> dict:
    """Retrieval and geometry of every predictor in ``preds`` (name -> ``[B, N, D]``) against ``target``.

    Every predictor is scored on the same pools. With ``details`` (a dict), the first pool's
    score matrices are left there for pictures: ``pool`` (sample indices), ``scores`` (name ->
    ``[P, P]``, rows predictions, columns targets), ``true_similarity`` ``[P, P]``.
    """
    started = time.time()
    n = target.shape[0]
    pools = draw_pools(n, pool_size, draws, seed)
    p = len(pools[0])
    out = {
        "pool_size": p, "num_pools": len(pools), "seed": seed,
        "chance": {"top1": 1 / p, "top5": min(1.0, 5 / p), "mean_rank": (p + 1) / 2,
                   "top1_random_range95": chance_interval(p, len(pools), 1)},
        "predictors": {},
    }
    true_sims = [score_matrix(target[idx], target[idx]) for idx in pools]
    if details is not None:
        details.update(pool=pools[0], scores={}, true_similarity=true_sims[0].cpu())
    for name, pred in preds.items():
        fwd, bwd, geo = [], [], []
        for idx, true_sim in zip(pools, true_sims):
            s = score_matrix(pred[idx], target[idx])
            fwd.append(ranks(s, 1))
            bwd.append(ranks(s, 0))
            geo.append(geometry(score_matrix(pred[idx], pred[idx]), true_sim))
            if details is not None and len(fwd) == 1:
                details["scores"][name] = s.cpu()
        mae = [g["similarity_mae"] for g in geo if g["similarity_mae"] is not None]
        corr = [g["similarity_correlation"] for g in geo if g["similarity_correlation"] is not None]
        out["predictors"][name] = {
            "forward": _direction(fwd),
            "backward": _direction(bwd),
            "geometry": {"similarity_mae": sum(mae) / len(mae) if mae else None,
                         "similarity_correlation": sum(corr) / len(corr) if corr else None},
        }
    out["seconds"] = round(time.time() - started, 3)
    return out


def format_retrieval(r: dict) -> list[str]:
    """Table lines: top-1 / top-5 / mean rank forward and backward, geometry, per predictor."""
    pools = "one pool of all" if r["num_pools"] == 1 else f"{r['num_pools']} seeded pools of"
    lo, hi = r["chance"]["top1_random_range95"]
    lines = [f"retrieval among {r['pool_size']} held-out images ({pools} {r['pool_size']}; chance top-1 "
             f"{r['chance']['top1']:.4f}, random predictions land in [{lo:.4f}, {hi:.4f}]; "
             f"chance mean rank {r['chance']['mean_rank']:.1f})",
             f"  {'':<28}{'fwd top-1':>10}{'top-5':>7}{'rank':>7}{'bwd top-1':>11}{'top-5':>7}{'rank':>7}"
             f"{'sim. MAE':>10}{'sim. r':>8}"]
    for name, e in r["predictors"].items():
        f, b, g = e["forward"], e["backward"], e["geometry"]
        mae = "n/a" if g["similarity_mae"] is None else f"{g['similarity_mae']:.4f}"
        corr = "n/a" if g["similarity_correlation"] is None else f"{g['similarity_correlation']:.3f}"
        lines.append(f"  {name.replace('_', ' '):<28}{f['top1']['mean']:>10.3f}{f['top5']['mean']:>7.3f}"
                     f"{f['mean_rank']['mean']:>7.1f}{b['top1']['mean']:>11.3f}{b['top5']['mean']:>7.3f}"
                     f"{b['mean_rank']['mean']:>7.1f}{mae:>10}{corr:>8}")
    return lines
