"""Which few-call objective on the sphere: self-consistency (shortcut) or average velocity (MeanFlow)?

A flow whose exact map is known: a rigid rotation of S^2 about a tilted axis, ``dx/dt = w a x x``.
Its orbits are circles of latitude, not great circles, so a jump along a geodesic
(``exp_x(d w)``) must bend its direction with ``d``: the curved case that a flat-space objective
gets wrong. The same small MLP (inputs x, t, d) is trained three ways for the same number of steps,
the velocity given exactly (no sampling noise, so the objectives alone differ):

- velocity: flow matching only (d = 0), its output read as a jump;
- shortcut: this project's objective (flowmap.py): half of each batch trains a dyadic jump 2d to
  land where two chained jumps of d land, carried back to x_t by the log map;
- meanflow: half of each batch trains the average-velocity identity of MeanFlow, written in the
  tangent space at x_t: ``w* = P(v + d (J_x w . v + dw/dt - dw/dd))``, one Jacobian-vector
  product per sample (torch.func.jvp), d uniform in (0, 1 - t].

Printed: the mean angle (radians) between 1, 2, 4 jumps and the exact end point from t = 0 to 1,
and the median seconds per training step. ``python benchmarks/flowmap_toy.py [--steps 1500]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from torch.func import jvp

from blip3o_denoise import sphere as S
from blip3o_denoise.config import TrainConfig
from blip3o_denoise.flow import FlowConfig, PathSample, flow_loss
from blip3o_denoise.sampling import integrate
from blip3o_denoise.flowmap import draw_consistency
from blip3o_denoise.train import flow_map_targets

AXIS = S.normalize(torch.tensor([0.3, -0.2, 1.0]))
OMEGA = 2.0


def velocity(x):
    return OMEGA * torch.cross(AXIS.expand_as(x), x, dim=-1)


def exact_end(x, angle):
    a = AXIS.expand_as(x)
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    return x * c + torch.cross(a, x, dim=-1) * s + a * (a * x).sum(-1, keepdim=True) * (1 - c)


class Field(torch.nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                     torch.nn.SiLU(), torch.nn.Linear(hidden, 3))

    def raw(self, x, t, d):  # x [B, 3]
        return self.f(torch.cat([x, t[:, None], d[:, None]], -1))

    def forward(self, x, t, cond=None, drop_mask=None, step_size=None):  # the model's signature, [B, 1, 3]
        d = torch.zeros_like(t) if step_size is None else step_size
        return self.raw(x[:, 0], t, d)[:, None]


def batch(step, n=128):
    g = torch.Generator().manual_seed(step)
    x = S.normalize(torch.randn(n, 1, 3, generator=g))
    return x, torch.rand(n, generator=g)


def meanflow_targets(net, x, t, share, step):
    """MeanFlow's identity in the tangent space at x: w* = P_x(v + d (dw/dx v + dw/dt - dw/dd)), no gradient."""
    g = torch.Generator().manual_seed(10_000 + step)
    n = x.shape[0]
    chosen = torch.rand(n, generator=g) < share
    d = torch.where(chosen, torch.rand(n, generator=g) * (1 - t), torch.zeros(n))
    v = velocity(x[:, 0])
    fn = lambda xx, tt, dd: S.project_tangent(xx, net.raw(xx, tt, dd))  # noqa: E731
    with torch.no_grad():
        w, dw = jvp(fn, (x[:, 0], t, d), (v, torch.ones(n), -torch.ones(n)))
    target = S.project_tangent(x[:, 0], v + d[:, None] * dw)
    return target[:, None], d


def train(kind, steps, share=0.5):
    torch.manual_seed(0)
    net = Field()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    cfg = TrainConfig(chunked_embeddings_dir="x", flow_map_share=share, flow_map_min_step=1 / 8,
                      min_noise_level=0.0, max_noise_level=1.0)
    fcfg = FlowConfig(min_noise_level=0.0, max_noise_level=1.0, sphere_constraint_weight=0.0)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        x, t = batch(step)
        path = PathSample(x, x, x, t, velocity(x))
        d = None
        if kind == "shortcut":
            jumps, t_jump = draw_consistency(list(range(step * 128, step * 128 + 128)), cfg.flow_map_share, 1 / 8)
            t = torch.where(jumps > 0, t_jump, t)
            path = PathSample(x, x, x, t, velocity(x))
            path, d = flow_map_targets(net, path, None, None, jumps, cfg, nullcontext())
        elif kind == "meanflow":
            u, d = meanflow_targets(net, x, t, share, step)
            path = PathSample(x, x, x, t, u)
        loss, _ = flow_loss(net(path.x_t, path.t, step_size=d), path, fcfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return net, statistics.median(times)


def jump_error(net, calls, n=512):
    x0 = S.normalize(torch.randn(n, 1, 3, generator=torch.Generator().manual_seed(123)))
    with torch.no_grad():
        fn = lambda x, t, d=None: S.project_tangent(x, net(x, t, step_size=d))  # noqa: E731
        end = integrate(fn, x0, 0.0, calls, "jump")
    return float(torch.arccos((end * exact_end(x0, OMEGA)).sum(-1).clamp(-1, 1)).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ns = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for kind in ("velocity", "shortcut", "meanflow"):
        net, sec = train(kind, ns.steps)
        row = {"objective": kind, **{f"calls_{c}": round(jump_error(net, c), 4) for c in (1, 2, 4)},
               "step_ms": round(1000 * sec, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'objective':<10}{'1 call':>8}{'2 calls':>9}{'4 calls':>9}{'ms/step':>9}  (mean angle to the exact "
          f"end point, rad; {ns.steps} steps)")
    for r in rows:
        print(f"{r['objective']:<10}{r['calls_1']:>8.4f}{r['calls_2']:>9.4f}{r['calls_4']:>9.4f}{r['step_ms']:>9.2f}")


if __name__ == "__main__":
    main()
