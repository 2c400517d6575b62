"""Metrics and evaluation runs on held-out samples, always beside baselines on the same samples.

Denoising from noise level ``s``: the input is ``slerp(x0, x1, 1 - s)``; the model integrates
from ``t = 1 - s`` to 1. Baseline: the noisy input itself (identity). A model that does not beat
it has learned nothing. We also report the model's one-evaluation point estimate.

Generation from pure noise (only when training reached ``s = 1``). Baseline: the training set's
mean direction (one unit vector for every token).
"""

from __future__ import annotations

import math
import time

import torch

from . import sphere
from .sampling import generate, noise_to_level, point_estimate

QUALITY_THRESHOLDS = {"eva_denoising": (0.7, 0.8, 0.9), "clip_denoising": (0.6, 0.7, 0.8)}
DEFAULT_NOISE_LEVELS = (0.3, 0.5, 0.7, 0.9)


def token_metrics(pred: torch.Tensor, target: torch.Tensor, thresholds=(0.6, 0.7, 0.8)) -> dict:
    """Metrics of ``pred [B, N, D]`` against ``target [B, N, D]``.

    cosine: per-token cosine averaged over tokens (per image), then mean / std over images.
    pooled_cosine: cosine of the mean-pooled tokens per image. angular_distance: mean per-token
    angle in radians. sphere_violation: mean ``| |pred| - 1 |`` of the raw output.
    quality_ratio_T: share of images whose cosine exceeds T.
    """
    pred, target = pred.float(), target.float()
    cos_tok = (sphere.normalize(pred) * sphere.normalize(target)).sum(-1).clamp(-1, 1)
    per_image = cos_tok.mean(dim=1)
    pooled = torch.nn.functional.cosine_similarity(pred.mean(1), target.mean(1), dim=-1)
    out = {
        "cosine_mean": float(per_image.mean()),
        "cosine_std": float(per_image.std(unbiased=False)),
        "pooled_cosine_mean": float(pooled.mean()),
        "angular_distance_mean": float(torch.arccos(cos_tok).mean()),
        "sphere_violation_mean": float(sphere.sphere_violation(pred).mean()),
        "num_images": int(pred.shape[0]),
    }
    for t in thresholds:
        out[f"quality_ratio_{t:g}"] = float((per_image > t).float().mean())
    return out


def mean_direction(targets: torch.Tensor) -> torch.Tensor:
    """Unit mean of unit tokens over samples and positions ``[D]``."""
    return sphere.normalize(sphere.normalize(targets.float()).mean(dim=(0, 1)))


@torch.no_grad()
def evaluate(
    model, batch: dict, prediction_type: str, task_mode: str, min_noise_level: float, max_noise_level: float,
    num_steps: int = 50, solver: str = "euler", noise_levels=DEFAULT_NOISE_LEVELS, train_mean: torch.Tensor | None = None,
    seed: int = 0, batch_size: int = 64, guidance: float = 1.0,
) -> dict:
    """Evaluate on ``batch = {"target": [B, N, D], "condition": [B, N, De]}`` (held-out samples).

    Returns a dict following the schema in the README: ``generation`` (or ``generation_skipped``)
    and ``denoising`` keyed by noise level, each with the model's metrics and its baselines.
    """
    started = time.time()
    model.eval()
    device = next(model.parameters()).device
    target, cond = batch["target"].to(device), batch["condition"].to(device)
    thresholds = QUALITY_THRESHOLDS[task_mode]
    gen = torch.Generator().manual_seed(seed)
    result: dict = {"task_mode": task_mode, "num_images": int(target.shape[0]), "num_steps": num_steps, "solver": solver}

    def chunked(fn, *tensors):
        outs = [fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, tensors[0].shape[0], batch_size)]
        return torch.cat(outs)

    if max_noise_level >= 1.0 - 1e-6:
        gen_out = chunked(
            lambda c: generate(model, c, prediction_type, num_steps, solver, guidance=guidance, generator=gen), cond
        )
        entry = {"model": token_metrics(gen_out, target, thresholds), "baselines": {}}
        if train_mean is not None:
            m = train_mean.to(device).expand_as(target)
            entry["baselines"]["mean_direction"] = token_metrics(m, target, thresholds)
        result["generation"] = entry
    else:
        result["generation_skipped"] = (
            f"training drew noise levels only up to {max_noise_level}; generation from pure noise (level 1) "
            "needs --max_noise_level 1.0"
        )
    result["denoising"] = {}
    skipped = []
    for s in noise_levels:
        if not (min_noise_level - 1e-6 <= s <= max_noise_level + 1e-6):
            skipped.append(s)
            continue
        noisy = noise_to_level(target, s, gen)
        out = chunked(
            lambda x, c: generate(model, c, prediction_type, num_steps, solver, guidance=guidance, noise_level=s, x_start=x),
            noisy, cond,
        )
        point = chunked(lambda x, c: point_estimate(model, x, c, s, prediction_type), noisy, cond)
        result["denoising"][f"{s:g}"] = {
            "model": token_metrics(out, target, thresholds),
            "point_estimate": token_metrics(point, target, thresholds),
            "baselines": {"identity": token_metrics(noisy, target, thresholds)},
        }
    if skipped:
        result["denoising_skipped_levels"] = skipped
    result["seconds"] = round(time.time() - started, 2)
    return result


def format_results(result: dict) -> str:
    """A plain-text table of the model beside its baselines."""
    lines = [f"{'setting':<22}{'model':>10}{'point est.':>12}{'baseline':>12}  baseline name"]
    if "generation" in result:
        g = result["generation"]
        name, base = next(iter(g["baselines"].items()), ("-", None))
        lines.append(
            f"{'generation (s=1)':<22}{g['model']['cosine_mean']:>10.4f}{'':>12}"
            f"{(base['cosine_mean'] if base else float('nan')):>12.4f}  {name}"
        )
    else:
        lines.append(f"generation: {result.get('generation_skipped', 'not run')}")
    for s, d in result.get("denoising", {}).items():
        lines.append(
            f"{'denoise s=' + s:<22}{d['model']['cosine_mean']:>10.4f}{d['point_estimate']['cosine_mean']:>12.4f}"
            f"{d['baselines']['identity']['cosine_mean']:>12.4f}  identity (noisy input)"
        )
    return "\n".join(lines)
