"""Spherical flow matching: noise levels, the slerp path, prediction types and the loss.

Conventions (one everywhere): ``t = 0`` is noise, ``t = 1`` is clean, noise level ``s = 1 - t``.
``x1 = normalize(target)``, ``x0 = normalize(eps)`` with ``eps ~ N(0, I)`` per token, the path is
``x_t = slerp(x0, x1, t)`` and the regression target is its time derivative ``u_t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import sphere

NOISE_SCHEDULES = ("uniform", "cosine", "logit_normal")
PREDICTION_TYPES = ("velocity", "target", "noise")
# sphere: the slerp path and steps on the sphere (the method). euclidean: the straight line
# x_t = (1 - t) x0 + t x1 between the same unit tokens, u_t = x1 - x0, plain Euler/Heun steps,
# normalised once at the end: the A/B counterpart, kept to measure what the sphere buys.
PATHS = ("sphere", "euclidean")


@dataclass
class FlowConfig:
    prediction_type: str = "velocity"
    path: str = "sphere"
    noise_schedule: str = "uniform"
    min_noise_level: float = 0.1
    max_noise_level: float = 0.9
    sphere_constraint_weight: float = 0.1
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # Shift of the law toward noise: s -> a s / (1 + (a - 1) s) (a > 1: more noise; 1: none).
    time_shift: float = 1.0
    # Conversions divide by (1 - t) (target) or t (noise); this floor keeps them finite at the ends.
    time_eps: float = 1e-2

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.path not in PATHS:
            raise ValueError(f"path: expected one of {PATHS}, got {self.path!r}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule: expected one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if not 0.0 <= self.min_noise_level <= self.max_noise_level <= 1.0:
            raise ValueError(
                "min_noise_level/max_noise_level: expected 0 <= min <= max <= 1, got "
                f"{self.min_noise_level}, {self.max_noise_level}"
            )
        if self.sphere_constraint_weight < 0:
            raise ValueError(f"sphere_constraint_weight: expected >= 0, got {self.sphere_constraint_weight}")
        if not (self.time_shift > 0 and math.isfinite(self.time_shift)):
            raise ValueError(f"time_shift: expected a finite number > 0, got {self.time_shift}")
        if self.logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std: expected > 0, got {self.logit_normal_std}")


# Each schedule is a law on s in [0, 1] given by its CDF F and inverse CDF. Sampling inside
# [min, max] draws u uniformly in [F(min), F(max)] and returns F^{-1}(u): the law truncated to the
# interval, not squashed into it. A time shift a composes the law with the monotone map
# f(s) = a s / (1 + (a - 1) s) (f(0) = 0, f(1) = 1), the shift toward noise used for large inputs
# (as in SD3); its CDF is F(f^{-1}(s)), f^{-1}(s) = s / (a - (a - 1) s), so truncation still holds.
def _base_cdf(s: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    if cfg.noise_schedule == "uniform":
        return s
    if cfg.noise_schedule == "cosine":
        # s = sin^2(pi u / 2): arcsine law, denser near both ends of the range.
        return (2.0 / math.pi) * torch.asin(s.clamp(0, 1).sqrt())
    logit = torch.logit(s.clamp(1e-12, 1 - 1e-12))
    return torch.special.ndtr((logit - cfg.logit_normal_mean) / cfg.logit_normal_std)


def _base_inverse_cdf(u: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    if cfg.noise_schedule == "uniform":
        return u
    if cfg.noise_schedule == "cosine":
        return torch.sin(0.5 * math.pi * u) ** 2
    z = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12))
    return torch.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * z)


def _cdf(s: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    a = cfg.time_shift
    return _base_cdf(s / (a - (a - 1.0) * s), cfg)


def _inverse_cdf(u: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    a = cfg.time_shift
    s = _base_inverse_cdf(u, cfg)
    return a * s / (1.0 + (a - 1.0) * s)


def sample_noise_level(
    batch_size: int, cfg: FlowConfig, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Noise levels ``s [B]`` drawn from ``cfg.noise_schedule`` truncated to ``[min, max]``."""
    lo = _cdf(torch.tensor(cfg.min_noise_level, dtype=torch.float64), cfg)
    hi = _cdf(torch.tensor(cfg.max_noise_level, dtype=torch.float64), cfg)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    s = _inverse_cdf(lo + (hi - lo) * u, cfg)
    s = s.clamp(cfg.min_noise_level, cfg.max_noise_level)
    return s.to(device=device, dtype=torch.float32)


@dataclass
class PathSample:
    x0: torch.Tensor  # noise on the sphere [B, N, D]
    x1: torch.Tensor  # clean target on the sphere [B, N, D]
    x_t: torch.Tensor  # point on the path [B, N, D]
    t: torch.Tensor  # time [B]
    u_t: torch.Tensor  # velocity target, tangent at x_t [B, N, D]


def sample_noise(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
    """Uniform noise on the sphere per token: ``normalize(N(0, I))``."""
    eps = torch.randn(shape, generator=generator, dtype=dtype)
    return sphere.normalize(eps).to(device)


def draw_sample(seed: int, shape, cfg: FlowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's noise level ``s [1]`` and noise ``x0 [*shape]``, drawn on the CPU from its own seed.

    The level is drawn first, then the noise, from one generator: what a sample gets depends only on
    its seed, never on the batch, process or device it lands in. Training draws these in the data
    loader's workers (:class:`~blip3o_denoise.data.noise.NoiseCollate`)."""
    g = torch.Generator().manual_seed(int(seed))
    level = sample_noise_level(1, cfg, g)
    return level, sample_noise(shape, g)


def path_from(target: torch.Tensor, x0: torch.Tensor, noise_level: torch.Tensor, cfg: FlowConfig) -> PathSample:
    """The path point of ``target [B, N, D]`` for given noise ``x0`` (on the sphere) and levels ``s [B]``."""
    x1 = sphere.normalize(target.float())
    x0 = x0.to(target.device)
    t = 1.0 - noise_level.to(device=target.device, dtype=torch.float32)
    if cfg.path == "euclidean":
        tb = sphere.broadcast_time(t, x1)
        return PathSample(x0, x1, (1.0 - tb) * x0 + tb * x1, t, x1 - x0)
    return PathSample(x0, x1, sphere.slerp(x0, x1, t), t, sphere.slerp_velocity(x0, x1, t))


def sample_path(
    target: torch.Tensor,
    cfg: FlowConfig,
    generator: torch.Generator | None = None,
    noise_level: torch.Tensor | None = None,
    sample_seeds: torch.Tensor | None = None,
) -> PathSample:
    """Draw noise and a time for each sample of ``target [B, N, D]`` and return the path point.

    Random draws are made on the CPU (so runs repeat across devices) and moved to ``target``'s
    device: from ``generator``, or, with ``sample_seeds [B]``, from one generator per sample
    (:func:`draw_sample`), so a sample's noise does not depend on which batch or process it lands in.
    """
    if sample_seeds is not None and noise_level is None:
        draws = [draw_sample(seed, target.shape[1:], cfg) for seed in sample_seeds]
        noise_level = torch.cat([level for level, _ in draws])
        x0 = torch.stack([x for _, x in draws])
    elif sample_seeds is not None:
        x0 = torch.stack([sample_noise(target.shape[1:], torch.Generator().manual_seed(int(seed)))
                          for seed in sample_seeds])
    else:
        if noise_level is None:
            noise_level = sample_noise_level(target.shape[0], cfg, generator)
        x0 = sample_noise(target.shape, generator)
    return path_from(target, x0, noise_level, cfg)


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's draws in one epoch (a fixed integer mix, the same everywhere)."""
    h = (run_seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    h ^= h >> 31
    return h % (1 << 63)


def prediction_to_velocity(
    pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str, time_eps: float = 1e-2,
    path: str = "sphere",
) -> torch.Tensor:
    """Convert a model output into a velocity at ``x_t`` (tangent on the sphere path).

    sphere: velocity ``P_{x_t} pred``; target ``log_{x_t}(x1_hat) / (1 - t)``; noise
    ``-log_{x_t}(x0_hat) / t``. euclidean: ``pred``; ``(x1_hat - x_t) / (1 - t)``;
    ``(x_t - x0_hat) / t``. ``1 - t`` and ``t`` floored at ``time_eps``; predicted points normalised.
    """
    pred = pred.float()
    t = sphere.broadcast_time(t, x_t)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if path == "euclidean":
        if prediction_type == "velocity":
            return pred
        if prediction_type == "target":
            return (sphere.normalize(pred) - x_t) / (1.0 - t).clamp_min(time_eps)
        return (x_t - sphere.normalize(pred)) / t.clamp_min(time_eps)
    if prediction_type == "velocity":
        return sphere.project_tangent(x_t, pred)
    if prediction_type == "target":
        return sphere.log_map(x_t, sphere.normalize(pred)) / (1.0 - t).clamp_min(time_eps)
    return -sphere.log_map(x_t, sphere.normalize(pred)) / t.clamp_min(time_eps)


POINT_ESTIMATES = ("posterior_mean", "exp_map")


def posterior_mean_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """``E[x1 | x_t, c]`` (unnormalised) read off a regression velocity ``v = E[u_t | x_t, c]``.

    For one pair at angle ``theta`` the path gives, exactly,
    ``x1 = cos((1 - t) theta) x_t + sin((1 - t) theta) / theta * u_t``: linear in ``u_t``. Uniform
    noise is independent of the data, so in dimension D its angle to any target is
    ``pi/2 + O(1/sqrt(D))``; with ``theta = pi/2`` the expectation passes through the linear map:
    ``E[x1 | x_t] ~ cos(phi) x_t + sin(phi) / (pi/2) * v``, ``phi = (1 - t) pi/2``. Exact for
    ``theta = pi/2``; the per-token error is O(1/sqrt(D)). Its norm (at most 1) says how tight
    the posterior is; at ``t = 0`` the estimate is the direction of ``v``.
    """
    t = sphere.broadcast_time(t, x_t)
    phi = (1.0 - t) * (0.5 * math.pi)
    return torch.cos(phi) * x_t + torch.sin(phi) * (2.0 / math.pi) * v


def prediction_to_target(
    pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str, time_eps: float = 1e-2,
    rule: str = "posterior_mean", path: str = "sphere",
) -> torch.Tensor:
    """The model's one-evaluation estimate of the clean tokens ``x1`` (the point estimate).

    target: ``normalize(pred)``. velocity / noise (converted to a velocity ``v`` first):
    ``rule="posterior_mean"`` (default) returns ``normalize(E[x1 | x_t, c])`` read off ``v`` (see
    :func:`posterior_mean_from_velocity`); ``rule="exp_map"`` returns ``exp_{x_t}((1 - t) v)``,
    which reads ``|v|`` as the remaining angle: exact only when the posterior is a point mass, and
    left partly on the noise when it is spread (``|E[u_t]|`` shrinks as the posterior spreads).
    On the euclidean path both rules are ``normalize(x_t + (1 - t) v)``: exact there, the path is linear.
    """
    if rule not in POINT_ESTIMATES:
        raise ValueError(f"point estimate rule: expected one of {POINT_ESTIMATES}, got {rule!r}")
    if prediction_type == "target":
        return sphere.normalize(pred.float())
    v = prediction_to_velocity(pred, x_t, t, prediction_type, time_eps, path)
    if path == "euclidean":
        return sphere.normalize(x_t + (1.0 - sphere.broadcast_time(t, x_t)) * v)
    if rule == "posterior_mean":
        return sphere.normalize(posterior_mean_from_velocity(v, x_t, t))
    t = sphere.broadcast_time(t, x_t)
    return sphere.exp_map(x_t, (1.0 - t) * v)


def sphere_penalty(pred: torch.Tensor, x_t: torch.Tensor, prediction_type: str, path: str = "sphere") -> torch.Tensor:
    """Per-token penalty ``[B, N]`` keeping raw outputs meaningful on the sphere.

    velocity: squared normal component ``<pred, x_t>^2`` (a velocity must be tangent);
    target / noise: ``(|pred| - 1)^2`` (a predicted point must be on the sphere).
    """
    pred = pred.float()
    if prediction_type == "velocity":
        if path == "euclidean":  # a straight-line velocity has no constraint
            return torch.zeros(pred.shape[:-1], device=pred.device)
        return (pred * x_t).sum(-1) ** 2
    return (pred.norm(dim=-1) - 1.0) ** 2


def flow_loss(pred: torch.Tensor, path: PathSample, cfg: FlowConfig):
    """Loss and its parts.

    ``mse``: squared error between the tangent velocity implied by ``pred`` and ``u_t``, summed
    over D (so it reads as a squared angle per unit time) and averaged over tokens.
    Total: ``mse + sphere_constraint_weight * penalty``.
    """
    v = prediction_to_velocity(pred, path.x_t, path.t, cfg.prediction_type, cfg.time_eps, cfg.path)
    mse = ((v - path.u_t) ** 2).sum(-1)
    pen = sphere_penalty(pred, path.x_t, cfg.prediction_type, cfg.path)
    mse, pen = mse.mean(), pen.mean()
    total = mse + cfg.sphere_constraint_weight * pen
    return total, {"mse": mse.detach(), "sphere_penalty": pen.detach()}
