"""Per-token geometry on the unit sphere S^{D-1}.

Every function works over the last dimension only, with any leading shape ``[..., D]``.
Inputs called ``x``, ``x0``, ``x1`` are expected to be unit vectors (see :func:`normalize`).

Time ``t`` broadcasts from the left: a ``[B]`` tensor for ``[B, N, D]`` inputs is read as
``[B, 1, 1]``; a tensor that already has the input's rank, a Python float or a 0-d tensor is
used as it is.

Numerics. Angles come from ``atan2(|x1 - <x0,x1> x0|, <x0,x1>)``, which stays accurate at both
small angles and near-antipodal pairs (``arccos`` of a rounded dot product loses half the digits
there). Every ``sin(a)/a`` ratio goes through ``torch.sinc`` so there is no 0/0 at ``theta = 0``.

Antipodal pairs (``x1 = -x0``): every great circle through ``x0`` reaches ``x1``, so the geodesic
direction is not defined. We pick a deterministic one: the unit tangent obtained by projecting
the basis vector ``e_k`` onto the tangent space of ``x0``, where ``k`` is the coordinate of
``x0`` with the smallest magnitude (so the projection is never degenerate). This is used
whenever ``|x1 - <x0,x1> x0|`` is below ``_ANTIPODAL_EPS`` and ``<x0, x1> < 0``. Pairs that are
nearly (not exactly) antipodal are inherently ill-conditioned: the direction of the geodesic
depends on rounding in the input at the level of ``eps / sin(theta)``.
"""

from __future__ import annotations

import math

import torch

_NORM_EPS = 1e-12
_ANTIPODAL_EPS = 1e-6

__all__ = [
    "normalize",
    "project_tangent",
    "geodesic_distance",
    "log_map",
    "exp_map",
    "slerp",
    "slerp_velocity",
    "broadcast_time",
    "sphere_violation",
    "parallel_transport",
]


def normalize(x: torch.Tensor, eps: float = _NORM_EPS) -> torch.Tensor:
    """Scale each token ``[..., D]`` to unit L2 norm (a zero vector stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def broadcast_time(t, like: torch.Tensor) -> torch.Tensor:
    """Return ``t`` shaped to broadcast against ``like`` from the left.

    ``t`` of shape ``[B]`` against ``[B, N, D]`` becomes ``[B, 1, 1]``; ``[B, N]`` becomes
    ``[B, N, 1]``. Floats and 0-d tensors become 0-d tensors on ``like``'s device and dtype.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() > like.dim():
        raise ValueError(f"time has rank {t.dim()} but the points have rank {like.dim()}")
    return t.reshape(tuple(t.shape) + (1,) * (like.dim() - t.dim()))


def project_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``v`` onto the tangent space at unit ``x``: ``v - <v, x> x``."""
    return v - (v * x).sum(dim=-1, keepdim=True) * x


def _sinc(a: torch.Tensor) -> torch.Tensor:
    """Unnormalised sinc, ``sin(a) / a`` with value 1 at 0."""
    return torch.sinc(a / math.pi)


def _fallback_direction(x: torch.Tensor) -> torch.Tensor:
    """A deterministic unit tangent at ``x``: ``e_k`` projected, ``k = argmin_k |x_k|``."""
    k = x.abs().argmin(dim=-1, keepdim=True)
    e = torch.zeros_like(x).scatter_(-1, k, 1.0)
    return normalize(project_tangent(x, e))


def host_reads_are_free(x: torch.Tensor) -> bool:
    """Whether reading a value of ``x`` into Python costs nothing more than the read (a CPU tensor),
    rather than a wait for the device to finish its queued work."""
    return x.device.type == "cpu"


def _angle_and_direction(x0: torch.Tensor, x1: torch.Tensor):
    """Angle ``theta [..., 1]`` between unit tokens and the unit tangent ``u`` at ``x0`` toward ``x1``.

    ``x1 = cos(theta) x0 + sin(theta) u``. For ``theta = 0`` the direction is irrelevant (it is
    always multiplied by ``sin(t theta) = 0`` or ``theta = 0``); for antipodal pairs it is the
    documented fallback direction.
    """
    c = (x0 * x1).sum(dim=-1, keepdim=True)
    w = x1 - c * x0
    w_norm = w.norm(dim=-1, keepdim=True)
    theta = torch.atan2(w_norm, c)
    degenerate = w_norm <= _ANTIPODAL_EPS
    u = w / w_norm.clamp_min(_NORM_EPS)
    antipodal = degenerate & (c < 0)
    # Asking whether any pair is antipodal reads a value back from the device, which on an accelerator
    # stalls the host (in training, at every path and loss): there the fallback is always computed and
    # selected on the device instead (the same numbers: ``where`` keeps ``u`` wherever no pair is antipodal).
    if not host_reads_are_free(x0) or bool(antipodal.any()):
        u = torch.where(antipodal, _fallback_direction(x0), u)
    return theta, u


def geodesic_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Great-circle angle in ``[0, pi]`` between unit tokens, shape ``[...]``."""
    theta, _ = _angle_and_direction(x, y)
    return theta.squeeze(-1)


def log_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logarithm map: the tangent vector at ``x`` pointing to ``y`` with norm ``theta``."""
    theta, u = _angle_and_direction(x, y)
    return theta * u


def exp_map(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exponential map ``cos(|v|) x + sin(|v|) v / |v|`` for a tangent ``v`` at unit ``x``."""
    n = v.norm(dim=-1, keepdim=True)
    return torch.cos(n) * x + _sinc(n) * v


def parallel_transport(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Move the tangent vector ``v`` at ``x`` to ``y`` along the geodesic, keeping its norm.

    With ``u`` the unit direction from ``x`` toward ``y`` and ``theta`` their angle, the ``u``
    component turns into the geodesic's direction at ``y`` and the rest is unchanged:
    ``v - <v, u> (sin(theta) x + (1 - cos(theta)) u)``.
    """
    theta, u = _angle_and_direction(x, y)
    return v - (v * u).sum(-1, keepdim=True) * (torch.sin(theta) * x + (1 - torch.cos(theta)) * u)


def slerp(x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
    """Point at time ``t`` on the geodesic from ``x0`` (t=0) to ``x1`` (t=1).

    Equals ``[sin((1-t) theta) x0 + sin(t theta) x1] / sin(theta)`` away from the singular
    cases, written as ``cos(t theta) x0 + sin(t theta) u`` to stay finite everywhere.
    """
    t = broadcast_time(t, x0)
    theta, u = _angle_and_direction(x0, x1)
    return torch.cos(t * theta) * x0 + torch.sin(t * theta) * u


def slerp_velocity(x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
    """Time derivative of :func:`slerp` at ``t``: a tangent vector at ``x_t`` of norm ``theta``.

    Equals ``theta [cos(t theta) x1 - cos((1-t) theta) x0] / sin(theta)`` and
    ``log_{x_t}(x1) / (1 - t)``.
    """
    t = broadcast_time(t, x0)
    theta, u = _angle_and_direction(x0, x1)
    return theta * (torch.cos(t * theta) * u - torch.sin(t * theta) * x0)


def sphere_violation(x: torch.Tensor) -> torch.Tensor:
    """Per-token ``| |x| - 1 |``, shape ``[...]``."""
    return (x.norm(dim=-1) - 1.0).abs()
