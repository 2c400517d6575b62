"""Evaluation on held-out samples, always beside baselines on the same samples.

Denoising from noise level ``s``: the input is ``slerp(x0, x1, 1 - s)``; the model integrates
from ``t = 1 - s`` to 1 (a deterministic ODE, so one output per input). Baseline: the noisy input
itself (identity); a model that does not beat it has learned nothing. The verdict for denoising
uses the point estimate: the clean tokens predicted from one model evaluation.

Generation from pure noise (only when training reached ``s = 1``). A generator is not a
regressor: with ``m = E[x1 | condition]``, a faithful sample scores about ``|m|^2`` against the
true target, the normalised mean of K samples about ``|m|^2 / sqrt(|m|^2 + (1 - |m|^2) / K)``
and the point estimate ``m / |m|`` scores ``|m|``. So we report all three, the dispersion ratio
``single / point^2`` (about 1 when calibrated, well above 1 when samples collapse onto the mean,
below 1 when over-dispersed), the diversity of samples, and distribution metrics, beside the mean
direction, the per-position mean and a ridge regression fitted on the training split.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import sphere
from .baselines import Ridge, fit_ridge, mean_baselines
from .distribution import PCABasis, distribution_metrics
from .flow import POINT_ESTIMATES, prediction_to_target
from .retrieval import evaluate_retrieval, format_retrieval
from .sampling import generate, noise_to_level

QUALITY_THRESHOLDS = {"eva_denoising": (0.7, 0.8, 0.9), "clip_denoising": (0.6, 0.7, 0.8)}
# the seed README's ratings: (excellent, good, fair)
RATINGS = {"eva_denoising": (0.8, 0.7, 0.5), "clip_denoising": (0.7, 0.6, 0.4)}
DEFAULT_NOISE_LEVELS = (0.3, 0.5, 0.7, 0.9)
# A model "beats" a baseline only when its mean per-image cosine is higher by more than this and by more
# than two standard errors of the paired per-image difference: a copy of the input plus noise is not a win.
MIN_MARGIN = 0.005


@dataclass
class EvalConfig:
    num_steps: int = 10
    solver: str = "euler"
    noise_levels: tuple = DEFAULT_NOISE_LEVELS
    sample_counts: tuple = (1, 2, 4, 8)  # K for the normalised mean of K generated samples
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 64  # rows per model call: conditions x K samples for generation
    precision: str = "fp32"  # "bf16": model calls under bf16 autocast (metrics stay in float32)
    path: str = "sphere"  # the run's flow path (flow.PATHS)
    progress: bool = False
    distribution: bool = True
    pca_dim: int = 64
    knn_k: int = 3
    max_tokens: int = 2048
    retrieval: bool = True
    retrieval_pool: int = 300  # candidates per pool (all held-out samples when there are fewer)
    retrieval_draws: int = 30  # seeded pools drawn when there are more samples than retrieval_pool


@dataclass
class Baselines:
    """What is fitted on the training split, once per evaluation run."""

    mean_direction: torch.Tensor  # [D]
    per_position: torch.Tensor | None = None  # [N, D]
    ridge: Ridge | None = None
    pca: PCABasis | None = None
    info: dict = field(default_factory=dict)


def fit_baselines(train_set, max_samples: int = 512, ridge: bool = True, pca_dim: int = 64,
                  val_fraction: float = 0.1, chunk: int = 16, ridge_tokens_per_sample: int = 64) -> Baselines:
    """Fit the baselines on up to ``max_samples`` training samples, reading ``chunk`` at a time.

    The ridge map is shared by all positions, so it is fitted on ``ridge_tokens_per_sample``
    evenly spaced tokens of each sample (bounded time at 4096-wide conditions).
    """
    n = len(train_set)
    step = max(1, n // max_samples)
    positions = list(range(0, n, step))[:max_samples]
    n_val = max(1, int(len(positions) * val_fraction)) if ridge and len(positions) > 1 else 0
    fit_pos, val_pos = positions[n_val:], positions[:n_val]
    started = time.time()
    sum_tok, count = None, 0
    pca_tokens = []

    def batches(pos):
        for i in range(0, len(pos), chunk):
            b = train_set.stack(pos[i:i + chunk])
            yield b["condition"], b["target"]

    def thin(x):
        return x[:, :: max(1, x.shape[1] // ridge_tokens_per_sample)]

    def fit_batches():
        nonlocal sum_tok, count
        for cond, target in batches(fit_pos):
            t = sphere.normalize(target.float())
            sum_tok = t.sum(0) if sum_tok is None else sum_tok + t.sum(0)
            count += t.shape[0]
            if len(pca_tokens) < 8:
                pca_tokens.append(t[:, :: max(1, t.shape[1] // 64)].reshape(-1, t.shape[-1]))
            yield thin(cond), thin(target)

    r = fit_ridge(fit_batches(), ((thin(c), thin(t)) for c, t in batches(val_pos))) if ridge else None
    if r is None:
        for _ in fit_batches():
            pass
    per_pos, mean_dir = mean_baselines(sum_tok, count)
    pca = PCABasis.fit(torch.cat(pca_tokens), pca_dim) if pca_tokens else None
    info = {"train_samples": len(fit_pos), "val_samples": len(val_pos), "seconds": round(time.time() - started, 2)}
    if r is not None:
        info.update(ridge_lambda=r.lam, ridge_val_cosine={f"{k:g}": v for k, v in r.val_cosine.items()})
    return Baselines(mean_dir, per_pos, r, pca, info)


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


def mean_of_k_cosine(samples: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Cosine of the normalised mean of the first ``k`` samples ``[K, B, N, D]`` to the target."""
    m = sphere.normalize(sphere.normalize(samples[:k].float()).mean(0))
    return float((m * sphere.normalize(target.float())).sum(-1).mean())


def diversity(samples: torch.Tensor) -> float | None:
    """Mean pairwise per-token cosine between samples of the same condition ``[K, B, N, D]`` (None when K < 2)."""
    s = sphere.normalize(samples.float())
    k = s.shape[0]
    if k < 2:
        return None
    total = sum(float((s[i] * s[j]).sum(-1).mean()) for i in range(k) for j in range(i + 1, k))
    return total / (k * (k - 1) / 2)


def dispersion_ratio(single_cosine: float, point_cosine: float) -> float | None:
    """``single / point^2``: ~1 calibrated sampler, > 1 collapsed toward the mean, < 1 over-dispersed.

    None when the point estimate carries no signal (cosine <= 0.05): the ratio means nothing then.
    """
    if point_cosine <= 0.05:
        return None
    return single_cosine / point_cosine**2


def generation_verdict(entry: dict) -> dict:
    """Judge a generator by calibration and distribution, not by single-sample cosine alone."""
    ratio = entry["dispersion_ratio"]
    calib = ("no signal" if ratio is None else "calibrated" if 0.8 <= ratio <= 1.25
             else "collapsed toward the mean" if ratio > 1.25 else "over-dispersed")
    out = {"sampler": calib}
    ridge = entry["baselines"].get("ridge")
    if ridge is not None:
        out["point_estimate_beats_ridge"] = entry["point_estimate"]["cosine_mean"] > ridge["cosine_mean"]
        if "distribution" in entry and "distribution" in ridge:
            out["closer_in_distribution_than_ridge"] = (
                entry["distribution"]["frechet_distance"] < ridge["distribution"]["frechet_distance"])
    retrieval = entry.get("retrieval", {}).get("predictors", {})
    if "baseline: ridge" in retrieval:
        ridge_top1 = retrieval["baseline: ridge"]["forward"]["top1"]["mean"]
        for name in ("point_estimate", "single_sample"):
            out[f"{name}_retrieves_better_than_ridge"] = retrieval[name]["forward"]["top1"]["mean"] > ridge_top1
    return out


def margin_over(pred: torch.Tensor, base: torch.Tensor, target: torch.Tensor) -> dict:
    """Whether ``pred`` beats ``base`` (both ``[B, N, D]`` against ``target``) by more than sampling noise:
    the mean paired per-image cosine difference, the margin it needed, and the verdict."""
    def per_image(x):
        return (sphere.normalize(x.float()) * sphere.normalize(target.float())).sum(-1).clamp(-1, 1).mean(1)

    diff = per_image(pred) - per_image(base)
    if diff.numel() < 2:  # no spread to measure: not shown
        return {"difference": float(diff.mean()), "required": None, "beats": False}
    need = max(MIN_MARGIN, 2 * float(diff.std() / math.sqrt(diff.numel())))
    return {"difference": float(diff.mean()), "required": need, "beats": float(diff.mean()) > need}


def rating(cos: float, task_mode: str) -> str:
    excellent, good, fair = RATINGS[task_mode]
    return "excellent" if cos > excellent else "good" if cos > good else "fair" if cos > fair else "poor"


def evaluation_cost(cfg: EvalConfig, generation: bool, min_noise_level: float, max_noise_level: float) -> int:
    """Model calls per held-out sample (each one sample-forward): to size an evaluation against training."""
    calls = (max(cfg.sample_counts) * cfg.num_steps + 1) if generation else 0
    levels = [s for s in cfg.noise_levels if min_noise_level - 1e-6 <= s <= max_noise_level + 1e-6]
    return calls + len(levels) * (cfg.num_steps + 1)


@torch.no_grad()
def evaluate(
    model, batch: dict, prediction_type: str, task_mode: str, min_noise_level: float, max_noise_level: float,
    cfg: EvalConfig | None = None, baselines: Baselines | None = None, details: dict | None = None,
) -> dict:
    """Evaluate on ``batch = {"target": [B, N, D], "condition": [B, N, De]}`` (held-out samples,
    read once by the caller). Returns the dict documented in docs/evaluation.md (the results file).

    With ``details`` (a dict), the first retrieval pool's score matrices are left there for
    pictures (``retrieval.evaluate_retrieval``).

    The K samples of a condition are drawn in one batched call (``[K * b]`` rows), model calls run
    under ``cfg.precision``; metrics are computed in float32.
    """
    cfg = cfg or EvalConfig()
    started = time.time()
    model.eval()
    device = next(model.parameters()).device
    target, cond = batch["target"].to(device), batch["condition"].to(device)
    thresholds = QUALITY_THRESHOLDS[task_mode]
    gen = torch.Generator().manual_seed(cfg.seed)
    result: dict = {"task_mode": task_mode, "num_images": int(target.shape[0]), "num_steps": cfg.num_steps,
                    "solver": cfg.solver, "guidance": cfg.guidance, "precision": cfg.precision}
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
    generation = max_noise_level >= 1.0 - 1e-6
    levels = [s for s in cfg.noise_levels if min_noise_level - 1e-6 <= s <= max_noise_level + 1e-6]
    k_max = max(cfg.sample_counts)
    n = target.shape[0]
    bar = tqdm(total=n * evaluation_cost(cfg, generation, min_noise_level, max_noise_level), desc="evaluate",
               unit="call", disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0)

    def chunked(fn, *tensors, rows=cfg.batch_size, calls=1):
        outs = []
        for i in range(0, tensors[0].shape[0], rows):
            parts = [t[i:i + rows] for t in tensors]
            with autocast:
                outs.append(fn(*parts).float())
            bar.update(parts[0].shape[0] * calls)
        return torch.cat(outs)

    def k_samples(c):  # [b, N, Dc] -> [K, b, N, D], the K samples of each condition in one call
        x = generate(model, c.repeat(k_max, 1, 1), prediction_type, cfg.num_steps, cfg.solver,
                     guidance=cfg.guidance, generator=gen, min_noise_level=min_noise_level, path=cfg.path,
                     num_tokens=target.shape[1])
        return x.reshape(k_max, c.shape[0], *x.shape[1:]).transpose(0, 1)

    def points(x, s):  # one model call, both readings of it: {rule: [B, N, D]}
        def both(a, c):
            t = torch.full((a.shape[0],), 1.0 - s, device=a.device)
            a = a.float() if cfg.path == "euclidean" and s < 1.0 else sphere.normalize(a.float())
            pred = model(a, t, c)
            return torch.stack([prediction_to_target(pred, a, t, prediction_type, rule=r, path=cfg.path)
                                for r in POINT_ESTIMATES], 1)

        out = chunked(both, x, cond)
        return {rule: out[:, i] for i, rule in enumerate(POINT_ESTIMATES)}

    def dist(x):
        if not (cfg.distribution and baselines is not None and baselines.pca is not None):
            return None
        return distribution_metrics(x, target, baselines.pca, cfg.knn_k, cfg.max_tokens, cfg.seed)

    if generation:
        rows = max(1, cfg.batch_size // k_max)
        samples = chunked(k_samples, cond, rows=rows, calls=k_max * cfg.num_steps).transpose(0, 1)
        noise = sphere.normalize(torch.randn(target.shape, generator=gen)).to(device)
        pts = points(noise, 1.0)
        single = token_metrics(samples[0], target, thresholds)
        pe = token_metrics(pts["posterior_mean"], target, thresholds)
        entry = {
            "model": single,
            "mean_of_k": {str(k): mean_of_k_cosine(samples, target, k) for k in cfg.sample_counts},
            "point_estimate": pe,
            "point_estimate_exp_map": token_metrics(pts["exp_map"], target, thresholds),
            "dispersion_ratio": dispersion_ratio(single["cosine_mean"], pe["cosine_mean"]),
            "diversity": diversity(samples),
            "baselines": {},
        }
        if (d := dist(samples[0])) is not None:
            entry["distribution"] = d
        # every predictor of the clean tokens, scored by retrieval and geometry on the same pools
        predictors = {"point_estimate": pts["posterior_mean"], "single_sample": samples[0],
                      f"mean_of_{k_max}": sphere.normalize(sphere.normalize(samples).mean(0))}
        if k_max == 1:
            del predictors["mean_of_1"]
        if baselines is not None:
            base = {"mean_direction": baselines.mean_direction.to(device).expand_as(target)}
            if baselines.per_position is not None and baselines.per_position.shape[0] == target.shape[1]:
                base["per_position_mean"] = baselines.per_position.to(device).expand_as(target)
            if baselines.ridge is not None and cond.shape[1] == target.shape[1]:  # ridge maps token to token
                base["ridge"] = baselines.ridge.predict(cond.cpu()).to(device)
            for name, pred in base.items():
                entry["baselines"][name] = token_metrics(pred, target, thresholds)
            if "ridge" in base and (d := dist(base["ridge"])) is not None:
                entry["baselines"]["ridge"]["distribution"] = d
            predictors.update({f"baseline: {name}": pred for name, pred in base.items()})
        if cfg.retrieval:
            r = evaluate_retrieval(predictors, target, cfg.retrieval_pool, cfg.retrieval_draws, cfg.seed, details)
            entry["retrieval"] = r
        entry["verdict"] = generation_verdict(entry)
        result["generation"] = entry
    else:
        result["generation_skipped"] = (
            f"training drew noise levels only up to {max_noise_level}; generation from pure noise (level 1) "
            "needs --max_noise_level 1.0"
        )
    result["denoising"] = {}
    for s in levels:
        noisy = noise_to_level(target, s, gen, cfg.path)
        out = chunked(
            lambda x, c: generate(model, c, prediction_type, cfg.num_steps, cfg.solver, guidance=cfg.guidance,
                                  noise_level=s, x_start=x, min_noise_level=min_noise_level, path=cfg.path),
            noisy, cond, calls=cfg.num_steps,
        )
        pts = points(noisy, s)
        pe = token_metrics(pts["posterior_mean"], target, thresholds)
        identity = token_metrics(noisy, target, thresholds)
        margin = margin_over(pts["posterior_mean"], noisy, target)
        entry = {
            "model": token_metrics(out, target, thresholds),
            "point_estimate": pe,
            "point_estimate_exp_map": token_metrics(pts["exp_map"], target, thresholds),
            "rating": rating(pe["cosine_mean"], task_mode) if margin["beats"] else "not better than identity",
            "beats_identity": margin["beats"],
            "identity_margin": margin,
            "baselines": {"identity": identity},
        }
        if task_mode == "eva_denoising" and cond.shape == target.shape:
            # the condition is the clean target itself: copying it is a perfect answer, not denoising
            entry["baselines"]["copy_condition"] = token_metrics(cond, target, thresholds)
        result["denoising"][f"{s:g}"] = entry
    bar.close()
    skipped = [s for s in cfg.noise_levels if s not in levels]
    if skipped:
        result["denoising_skipped_levels"] = skipped
    if baselines is not None:
        result["baselines_fit"] = baselines.info
    result["seconds"] = round(time.time() - started, 2)
    if "retrieval" in result.get("generation", {}):
        r = result["generation"]["retrieval"]
        r["share_of_evaluation_time"] = round(r["seconds"] / max(result["seconds"], 1e-9), 4)
    return result


def _num(x, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_results(result: dict) -> str:
    """A plain-text table of the model beside its baselines."""
    lines = []
    if "generation" in result:
        g = result["generation"]
        lines.append("generation from pure noise (cosine to the held-out target)")
        row = [("single sample", g["model"]["cosine_mean"])]
        row += [(f"mean of {k}", v) for k, v in g["mean_of_k"].items() if k != "1"]
        row.append(("point estimate", g["point_estimate"]["cosine_mean"]))
        row += [(f"baseline: {name}", m["cosine_mean"]) for name, m in g["baselines"].items()]
        for name, v in row:
            lines.append(f"  {name:<34}{v:>8.4f}")
        ratio = g["dispersion_ratio"]
        ratio_text = f"{ratio:>8.3f}" if ratio is not None else "     n/a"
        lines.append(f"  {'dispersion ratio (single/point^2)':<34}{ratio_text}   diversity {_num(g['diversity'])}   "
                     f"sampler: {g['verdict']['sampler']}")
        if "distribution" in g:
            d = g["distribution"]
            lines.append(f"  {'distribution (model)':<34} FD {d['frechet_distance']:.4f}  "
                         f"precision {d['precision']:.3f}  recall {d['recall']:.3f}")
            rd = g["baselines"].get("ridge", {}).get("distribution")
            if rd:
                lines.append(f"  {'distribution (ridge)':<34} FD {rd['frechet_distance']:.4f}  "
                             f"precision {rd['precision']:.3f}  recall {rd['recall']:.3f}")
        if "retrieval" in g:
            lines += format_retrieval(g["retrieval"])
    else:
        lines.append(f"generation: {result.get('generation_skipped', 'not run')}")
    if result.get("denoising"):
        lines.append(f"{'denoising':<22}{'model':>10}{'point est.':>12}{'identity':>10}  verdict (point estimate)")
        for s, d in result["denoising"].items():
            m = d.get("identity_margin", {})
            need = m.get("required", MIN_MARGIN)
            verdict = d["rating"] if d["beats_identity"] else (
                f"NOT better than the noisy input (by {m.get('difference', 0):+.4f}; "
                + ("one image: too few to tell)" if need is None else f"a win needs > {need:.4f})"))
            if "copy_condition" in d["baselines"]:  # eva_denoising: the condition is the clean target
                verdict += (f"; copying the condition scores {d['baselines']['copy_condition']['cosine_mean']:.4f} "
                            "(the condition is the clean target)")
            lines.append(f"{'  from s=' + s:<22}{d['model']['cosine_mean']:>10.4f}"
                         f"{d['point_estimate']['cosine_mean']:>12.4f}"
                         f"{d['baselines']['identity']['cosine_mean']:>10.4f}  {verdict}")
    return "\n".join(lines)


def nonfinite_fields(obj, where: str = "") -> list[str]:
    """Paths of the non-finite numbers in a nested result (a NaN must not pass for a score)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_fields(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_fields(v, f"{where}[{i}]")]
    return [where] if isinstance(obj, float) and not math.isfinite(obj) else []
