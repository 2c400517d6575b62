"""ODE integration on the sphere, classifier-free guidance, and denoising from a noise level.

Time runs forward: from ``t0 = 1 - s_start`` (``s_start = 1`` is pure noise) up to ``t = 1``.
Every step moves along the sphere with the exponential map of a tangent velocity; nothing is
integrated in the ambient space and renormalised afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import sphere
from .flow import prediction_to_target, prediction_to_velocity

# jump: one call per step, the output read as a flow-map jump of the step's size (flowmap.py)
SOLVERS = ("euler", "heun", "midpoint", "jump")

# velocity_fn(x [B, N, D], t [B], d [B] | None) -> tangent vector at x [B, N, D]: the velocity for d None,
# the jump direction of a flow map for a step size d
VelocityFn = Callable[..., torch.Tensor]


def model_calls(solver: str, num_steps: int, t_end: float = 1.0) -> int:
    """Model evaluations of one integration (per sample, without guidance)."""
    if solver == "heun":  # the last step to t = 1 is an Euler step
        return 2 * num_steps - (1 if t_end >= 1.0 else 0)
    return 2 * num_steps if solver == "midpoint" else num_steps


def integrate(
    velocity_fn: VelocityFn, x: torch.Tensor, t_start: float, num_steps: int, solver: str = "euler",
    t_end: float = 1.0, path: str = "sphere",
) -> torch.Tensor:
    """Integrate ``dx/dt = v(x, t)`` on the sphere from ``t_start`` to ``t_end`` (default 1) in ``num_steps``
    equal steps.

    euler: ``x <- exp_x(dt v(x, t))`` (order 1). heun: average of the velocity at ``x`` and at the
    Euler proposal (parallel-transported back to ``x``), order 2; when ``t_end = 1`` its last step is an
    Euler step, so the velocity is never asked for at ``t = 1`` exactly. midpoint: the velocity at
    the half-step point, transported back to ``x``, order 2. jump: ``x <- exp_x(dt w(x, t, dt))``, one
    call per step, exact for an exact flow map at any step count (flowmap.py). ``t_end < 1`` stops early (a model
    trained only down to noise level ``s_min`` is integrated to ``t_end = 1 - s_min``, see :func:`generate`).
    ``path="euclidean"`` (the A/B counterpart of the method): the same solvers as straight steps in the
    ambient space, ``x <- x + dt v``, and no normalisation until the caller's last step.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"start time must be in [0, 1), got {t_start}")
    if not t_start <= t_end <= 1.0:
        raise ValueError(f"end time must be in [start time {t_start}, 1], got {t_end}")
    if t_end == t_start:
        return x
    b = x.shape[0]
    ts = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
    for i in range(num_steps):
        t, dt = float(ts[i]), float(ts[i + 1] - ts[i])
        tb = torch.full((b,), t, device=x.device)
        if solver == "jump":
            x = sphere.normalize(sphere.exp_map(x, dt * velocity_fn(x, tb, torch.full_like(tb, dt))))
            continue
        v = velocity_fn(x, tb)
        if path == "euclidean":
            if solver == "heun" and (i < num_steps - 1 or t_end < 1.0):
                v = 0.5 * (v + velocity_fn(x + dt * v, tb + dt))
            elif solver == "midpoint":
                v = velocity_fn(x + 0.5 * dt * v, tb + 0.5 * dt)
            x = x + dt * v
            continue
        if solver == "heun" and (i < num_steps - 1 or t_end < 1.0):
            x_prop = sphere.exp_map(x, dt * v)
            v2 = velocity_fn(x_prop, tb + dt)
            v = 0.5 * (v + sphere.parallel_transport(x_prop, x, v2))
        elif solver == "midpoint":
            x_mid = sphere.exp_map(x, 0.5 * dt * v)
            v = sphere.parallel_transport(x_mid, x, velocity_fn(x_mid, tb + 0.5 * dt))
        x = sphere.normalize(sphere.exp_map(x, dt * v))
    return x


def model_velocity_fn(
    model, cond: torch.Tensor | None, prediction_type: str, guidance: float = 1.0, time_eps: float = 1e-2,
    num_tokens: int | None = None, path: str = "sphere",
) -> VelocityFn:
    """Wrap a :class:`~blip3o_denoise.model.UniversalDiT` as a tangent velocity field.

    The condition projection and cross-attention keys/values are computed here, once. With
    ``guidance != 1`` the null-condition velocity ``v_u`` is combined as
    ``v_u + guidance (v_c - v_u)``; both are tangent at ``x`` so the result is too.
    """
    b = cond.shape[0] if cond is not None else None
    cache = model.prepare_condition(cond, b, num_tokens)
    null_cache = None
    # a model distilled over guidance scales takes the scale as an input: one call, no null-condition call
    as_input = {}
    if guidance != 1.0 and getattr(getattr(model, "cfg", None), "guidance_input", False):
        as_input = {"guidance": torch.full((b if b is not None else 1,), float(guidance), device=cache.pooled.device)}
    elif guidance != 1.0:
        n = cond.shape[1] if cond is not None else num_tokens
        null_cache = model.prepare_condition(None, b, n)

    def fn(x, t, d=None):
        step = {} if d is None else {"step_size": d}  # only flow maps take a step size
        step.update(as_input)
        v = prediction_to_velocity(model(x, t, cache=cache, **step), x, t, prediction_type, time_eps, path)
        if null_cache is not None:
            vu = prediction_to_velocity(model(x, t, cache=null_cache, **step), x, t, prediction_type, time_eps, path)
            v = vu + guidance * (v - vu)
        return v

    fn.cache, fn.null_cache = cache, null_cache  # for generate's final point estimate (min_noise_level > 0)
    return fn


@torch.inference_mode()
def generate(
    model, cond: torch.Tensor, prediction_type: str, num_steps: int = 50, solver: str = "euler",
    guidance: float = 1.0, noise_level: float = 1.0, x_start: torch.Tensor | None = None,
    generator: torch.Generator | None = None, time_eps: float = 1e-2, min_noise_level: float = 0.0,
    path: str = "sphere", num_tokens: int | None = None,
) -> torch.Tensor:
    """Sample clean tokens ``[B, N, D_in]`` for ``cond [B, N_c, D_cond]`` (``N = N_c`` unless ``num_tokens``).

    From pure noise (``noise_level = 1``, ``x_start = None``) or from ``x_start`` at noise level
    ``noise_level`` (denoising). Returns unit-norm tokens.

    ``min_noise_level``: the lowest noise level the model was trained on. Above 0, the ODE stops
    there (``t_end = 1 - min_noise_level``, never querying the model below it) and the last move
    to ``t = 1`` is the point estimate from that level (:func:`flow.prediction_to_target`, default
    rule; with guidance, on the guided raw output ``p_u + w (p_c - p_u)``).
    """
    if not 0.0 <= min_noise_level <= noise_level:
        raise ValueError(f"noise level {noise_level} is below min_noise_level {min_noise_level} "
                         "(the lowest noise level the model was trained on)")
    # N of the target: from x_start, else num_tokens, else the condition's (cross-attention allows N != N_c)
    b = cond.shape[0]
    n = x_start.shape[1] if x_start is not None else num_tokens or cond.shape[1]
    if x_start is None:
        if noise_level != 1.0:
            raise ValueError("x_start is required when noise_level < 1 (denoising a given input)")
        eps = torch.randn(b, n, model.cfg.input_dim, generator=generator)
        x_start = eps.to(cond.device)
    # a point of the euclidean path inside the ball is a valid input; pure noise starts on the sphere
    x = x_start.float() if path == "euclidean" and noise_level < 1.0 else sphere.normalize(x_start.float())
    fn = model_velocity_fn(model, cond, prediction_type, guidance, time_eps, num_tokens=n, path=path)
    t_end = 1.0 - min_noise_level
    x = integrate(fn, x, 1.0 - noise_level, num_steps, solver, t_end=t_end, path=path)
    if min_noise_level == 0.0:
        return sphere.normalize(x)
    t = torch.full((b,), t_end, device=x.device)
    pred = model(x, t, cache=fn.cache)
    if fn.null_cache is not None:
        pred_u = model(x, t, cache=fn.null_cache)
        pred = pred_u + guidance * (pred - pred_u)
    return prediction_to_target(pred, x, t, prediction_type, time_eps, path=path)


@torch.inference_mode()
def point_estimate(
    model, x_t: torch.Tensor, cond: torch.Tensor, noise_level: float, prediction_type: str, time_eps: float = 1e-2,
    rule: str = "posterior_mean", path: str = "sphere",
) -> torch.Tensor:
    """The clean tokens predicted from one model evaluation at noise level ``noise_level``.

    ``rule``: ``posterior_mean`` (``normalize(E[x1 | x_t, c])``, the default) or ``exp_map``; see
    :func:`blip3o_denoise.flow.prediction_to_target`.
    """
    b = x_t.shape[0]
    t = torch.full((b,), 1.0 - noise_level, device=x_t.device)
    x_t = x_t.float() if path == "euclidean" and noise_level < 1.0 else sphere.normalize(x_t.float())
    return prediction_to_target(model(x_t, t, cond), x_t, t, prediction_type, time_eps, rule, path)


def noise_to_level(x1: torch.Tensor, noise_level: float, generator: torch.Generator | None = None,
                   path: str = "sphere") -> torch.Tensor:
    """Corrupt clean tokens to noise level ``s`` with fresh sphere noise ``x0``: ``slerp(x0, x1, 1 - s)``
    (euclidean path: ``s x0 + (1 - s) x1``)."""
    x1 = sphere.normalize(x1.float())
    x0 = sphere.normalize(torch.randn(x1.shape, generator=generator)).to(x1.device)
    if path == "euclidean":
        return noise_level * x0 + (1.0 - noise_level) * x1
    return sphere.slerp(x0, x1, 1.0 - noise_level)
