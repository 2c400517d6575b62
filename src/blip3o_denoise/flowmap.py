"""Flow maps on the per-token sphere: one model call jumps from time ``t`` to ``t + d``.

The network takes a step size ``d >= 0`` beside ``t``. Its output, converted to a tangent vector
``w`` at ``x_t`` exactly as a velocity is (``flow.prediction_to_velocity``), jumps along the
sphere:

    X(x_t, t, d) = exp_{x_t}(d w(x_t, t, d))

``d = 0`` is the instantaneous velocity: same loss (flow matching on ``u_t``), same network (the
step embedding is exactly zero at ``d = 0``, model.step_embedding).

Self-consistency (shortcut models, stated on the sphere): one jump of ``2d`` lands where two
chained jumps of ``d`` land. The target is built without gradient and carried back to ``x_t`` by
the log map, so it is a tangent vector at ``x_t``, never an ambient difference:

    x_mid = X(x_t, t, d),   x_end = X(x_mid, t + d, d),   w* = log_{x_t}(x_end) / (2d)
    loss  = | w(x_t, t, 2d) - w* |^2   (summed over D, averaged over tokens)

For the exact flow map of the ODE, ``X(., t, 2d)`` is the composition of two ``d`` maps, and
``exp_{x_t}(2d w*) = x_end`` (the log map inverts the exp map below angle pi), so the loss is zero.
The jumps ``2d`` are dyadic, ``2^-k`` down to ``min_step``, each trained from the start times of
its own grid (multiples of ``2d``, where the sampler starts its jumps); the two half jumps of the
smallest one use ``d = 0`` (the velocity), so the recursion is anchored on flow matching.

Distillation (``--distill_from``): the target of a jump is where a trained velocity model (the
teacher, frozen) lands when its ODE is solved over the same interval, ``n`` midpoint steps of size
``h = 2d / n`` on the sphere:

    x_end = ODE_teacher(x_t, t -> t + 2d),   w* = log_{x_t}(x_end) / (2d)

Every jump size is tied to the teacher's ODE directly, so no error is passed from smaller jumps to
larger ones (the self-consistency recursion's weakness when the model is far from exact).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import sphere

# field(x [B, N, D], t [B], d [B]) -> tangent vector w at x [B, N, D]
JumpField = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SEED_SALT = 0x2545F4914F6CDD1D  # the flow-map draws of a sample: a stream apart from its noise


def jump(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``exp_x(d w)`` per sample: ``x, w [B, N, D]``, ``d [B]`` (or a number)."""
    if not torch.is_tensor(d):
        d = torch.full((x.shape[0],), float(d), device=x.device)
    return sphere.normalize(sphere.exp_map(x, sphere.broadcast_time(d, x) * w))


def dyadic_steps(min_step: float) -> list[float]:
    """The jumps trained for self-consistency: 1, 1/2, ... down to ``min_step`` (a power of 2)."""
    steps = [1.0]
    while steps[-1] / 2 >= min_step * (1 - 1e-9):
        steps.append(steps[-1] / 2)
    return steps


def draw_consistency(seeds: list[int], share: float, min_step: float, t_lo: float = 0.0,
                     t_hi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the jump ``2d`` it trains for self-consistency (0: it trains flow matching) and the
    time it trains it from (NaN for flow matching).

    A sample trains a jump with probability ``share``; the jump is drawn uniformly from the dyadic
    jumps, and its start time uniformly from that jump's grid ``t = k 2d`` inside ``[t_lo, t_hi - 2d]``:
    the times the jump solver starts its steps from (``n`` calls start at ``0, 1/n, 2/n ...``), so the
    jumps a sampler takes are the jumps trained, the largest ones included (a time drawn from a
    continuous law would almost never allow a jump of 1). No start time fits: flow matching.
    Draws depend only on the sample's seed: the same on any batch, rank, worker or resume.
    """
    steps = dyadic_steps(min_step)
    two_d = torch.zeros(len(seeds), dtype=torch.float32)
    t = torch.full((len(seeds),), float("nan"), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed ^ SEED_SALT)
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        if u[0] >= share:
            continue
        step = steps[min(int(u[1] * len(steps)), len(steps) - 1)]
        grid = [k * step for k in range(round(1 / step)) if k * step >= t_lo - 1e-9 and k * step + step <= t_hi + 1e-9]
        if grid:
            two_d[i], t[i] = step, grid[min(int(u[2] * len(grid)), len(grid) - 1)]
    return two_d, t


@torch.no_grad()
def consistency_target(field: JumpField, x_t: torch.Tensor, t: torch.Tensor, two_d: torch.Tensor,
                       min_step: float) -> torch.Tensor:
    """``w* = log_{x_t}(X(X(x_t, t, d), t + d, d)) / (2d)`` ``[B, N, D]``, tangent at ``x_t``, no gradient.

    Half jumps below ``min_step`` are taken with the velocity (step size input 0).
    """
    d = two_d / 2
    d_in = torch.where(d < min_step * (1 - 1e-9), torch.zeros_like(d), d)
    x_mid = jump(x_t, field(x_t, t, d_in), d)
    x_end = jump(x_mid, field(x_mid, t + d, d_in), d)
    return sphere.log_map(x_t, x_end) / sphere.broadcast_time(two_d, x_t)


@torch.no_grad()
def teacher_target(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor,
                   t: torch.Tensor, two_d: torch.Tensor, steps: int) -> torch.Tensor:
    """``w* = log_{x_t}(x_end) / (2d)`` ``[B, N, D]``: ``x_end`` solves the teacher's ODE ``dx/dt = v(x, t)``
    from ``t`` to ``t + 2d`` per sample, in ``steps`` midpoint steps (two teacher calls each; the velocity at
    the half-step point is carried back to ``x`` by parallel transport, as ``sampling.integrate`` does). The
    teacher is never asked for the velocity at the interval's end (``t = 1`` for the last jump)."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    h = two_d / steps
    x = x_t
    for k in range(steps):
        tk = t + k * h
        v = velocity(x, tk)
        x_mid = jump(x, v, h / 2)
        v = sphere.parallel_transport(x_mid, x, velocity(x_mid, tk + h / 2))
        x = jump(x, v, h)
    return sphere.log_map(x_t, x) / sphere.broadcast_time(two_d, x_t)


@torch.no_grad()
def sampler_states(field: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   x0: torch.Tensor, t: torch.Tensor, two_d: torch.Tensor) -> torch.Tensor:
    """Where the jump sampler stands at time ``t`` ``[B, N, D]``: from the noise ``x0`` at ``t = 0``, ``t / 2d``
    jumps of ``2d`` of the model itself (no gradient), as ``1 / 2d`` calls of ``--solver jump`` pass through
    ``t``. ``field(x, t, d, rows)`` is the model's jump direction for the samples ``rows`` of the batch; ``t``
    must lie on its jump's grid (``flowmap.draw_consistency``)."""
    k = torch.round(t / two_d).long()
    x = x0.clone()
    for i in range(int(k.max()) if len(k) else 0):
        rows = torch.nonzero(k > i).flatten()
        xs, d = x[rows], two_d[rows]
        x[rows] = jump(xs, field(xs, i * d, d, rows), d).to(x.dtype)
    return x


def consistency_error(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared tangent error ``[B]``: summed over D, averaged over tokens."""
    return ((w.float() - target.float()) ** 2).sum(-1).mean(-1)
