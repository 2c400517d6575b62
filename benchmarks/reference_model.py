"""A re-implementation of the *original* research design, for speed comparison only.

Written here from the seed README's description, not used anywhere in the package. What makes it
the original design:

- every block has its own condition projection ``D_cond -> H`` (4096 -> H), recomputed at every
  forward, and so at every sampling step;
- attention written by hand (``softmax(q k^T / sqrt(d)) v``, materialising the score matrix), with
  as many key/value heads as query heads;
- a sampler that calls the full model (condition included) at each step.

It keeps the same width, depth, head count, SwiGLU feed-forward and AdaLN modulation as our model,
so that a side-by-side timing compares the designs, not the sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class HandAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(self, x, src):
        b, n, _ = x.shape
        m = src.shape[1]
        q = self.q(x).view(b, n, self.heads, self.hd).transpose(1, 2)
        k = self.k(src).view(b, m, self.heads, self.hd).transpose(1, 2)
        v = self.v(src).view(b, m, self.heads, self.hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, -1))


class RefBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, cond_dim: int):
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, hidden)  # per block: the design we replaced
        self.n1, self.n2, self.n3 = (nn.LayerNorm(hidden, elementwise_affine=False) for _ in range(3))
        self.attn = HandAttention(hidden, heads)
        self.cross = HandAttention(hidden, heads)
        inner = int(math.ceil(hidden * 8 / 3 / 32) * 32)
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        self.ada = nn.Linear(hidden, 9 * hidden)

    def forward(self, x, c, cond):
        sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3 = self.ada(F.silu(c)).unsqueeze(1).chunk(9, -1)
        h = self.n1(x) * (1 + sc1) + sh1
        x = x + g1 * self.attn(h, h)
        cond_h = self.cond_proj(cond)
        x = x + g2 * self.cross(self.n2(x) * (1 + sc2) + sh2, cond_h)
        gate, up = self.gate_up(self.n3(x) * (1 + sc3) + sh3).chunk(2, -1)
        return x + g3 * self.down(F.silu(gate) * up)


class ReferenceDiT(nn.Module):
    def __init__(self, input_dim: int, cond_dim: int, hidden: int, depth: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(input_dim, hidden)
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(RefBlock(hidden, heads, cond_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out = nn.Linear(hidden, input_dim)

    def forward(self, x, t, cond):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        args = t[:, None].float() * freqs[None]  # raw t in [0, 1], as the research code did
        c = self.t_embed(torch.cat([args.cos(), args.sin()], -1))
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, c, cond)
        return self.out(self.norm(h))


@torch.inference_mode()
def reference_generate(model, cond, num_steps: int, input_dim: int):
    """Euler steps that call the whole model (condition projections included) every step."""
    b, n = cond.shape[:2]
    x = F.normalize(torch.randn(b, n, input_dim), dim=-1)
    for i in range(num_steps):
        t = torch.full((b,), i / num_steps)
        v = model(x, t, cond)
        x = F.normalize(x + v / num_steps, dim=-1)
    return x
