"""Synthetic paired embeddings with a learnable, nonlinear, spatially structured relation.

Generative story, per sample, on a ``g x g`` grid (``N = g*g``, or ``1 + g*g`` with a CLS token):

1. A latent field ``z [g, g, k]``: white Gaussian noise smoothed by a 3x3 box filter, so
   neighbouring tokens are correlated. The CLS latent is the grid mean.
2. Condition ("EVA") tokens: ``z W_e`` plus a few large-magnitude channels (real ViT features
   have such outlier channels) plus small Gaussian noise (``cond_noise``).
3. Clean target ("CLIP") direction: ``m = normalize(normalize(normalize(tanh(2 z U) + tanh(2 blur(z) V)) W_c) + o)``:
   nonlinear, and depending on a token's 3x3 neighbourhood (``blur``), not only on the aligned
   condition token; ``o`` adds a few large channels.
4. Target tokens ``y = m + rho * xi / sqrt(Dc)``, ``xi ~ N(0, I)``, with ``rho = target_noise``.

Noise floor: the best any predictor of ``y``'s direction can do is ``m``, which scores
``E cos(m, y) ~= 1 / sqrt(1 + rho^2)`` (0.970 at the default ``rho = 0.25``); a faithful sample
of the conditional scores about the square of that (0.941). The world (``W_e, U, V, W_c``, the
outlier channels) depends only on ``world_seed``, so differently sized datasets and held-out
splits share one relation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .seed_format import write_seed_manifest, write_seed_shard


@dataclass
class SyntheticSpec:
    num_samples: int = 256
    eva_dim: int = 4096
    clip_dim: int = 1024
    tokens: int = 256
    num_shards: int = 1
    latent_dim: int = 32
    feature_dim: int = 64
    target_noise: float = 0.25
    cond_noise: float = 0.05
    outlier_channels: int = 3
    seed: int = 0
    world_seed: int = 1234

    def __post_init__(self):
        g = math.isqrt(self.tokens)
        if g * g != self.tokens and math.isqrt(self.tokens - 1) ** 2 != self.tokens - 1:
            raise ValueError(f"tokens: expected g*g or 1 + g*g (e.g. 256 or 257), got {self.tokens}")
        if self.num_samples < 1 or self.num_shards < 1 or self.num_shards > self.num_samples:
            raise ValueError(f"need 1 <= num_shards <= num_samples, got {self.num_shards} and {self.num_samples}")

    @property
    def include_cls(self) -> bool:
        return math.isqrt(self.tokens) ** 2 != self.tokens

    @property
    def grid(self) -> int:
        return math.isqrt(self.tokens - 1) if self.include_cls else math.isqrt(self.tokens)

    @property
    def best_point_cosine(self) -> float:
        return 1.0 / math.sqrt(1.0 + self.target_noise**2)


class SyntheticWorld:
    """The fixed maps shared by every sample of one ``world_seed``."""

    def __init__(self, spec: SyntheticSpec):
        g = torch.Generator().manual_seed(spec.world_seed)
        k, h = spec.latent_dim, spec.feature_dim
        self.spec = spec
        self.W_e = torch.randn(k, spec.eva_dim, generator=g) / math.sqrt(k)
        self.U = torch.randn(k, h, generator=g) / math.sqrt(k)
        self.V = torch.randn(k, h, generator=g) / math.sqrt(k) * 3.0  # blur shrinks the field: rescale
        self.W_c = torch.randn(h, spec.clip_dim, generator=g) / math.sqrt(h)
        self.eva_outliers = torch.randperm(spec.eva_dim, generator=g)[: spec.outlier_channels]
        self.clip_outliers = torch.randperm(spec.clip_dim, generator=g)[: spec.outlier_channels]

    @staticmethod
    def _blur(z: torch.Tensor) -> torch.Tensor:
        """3x3 box filter over the grid of ``z [n, g, g, k]`` (replicate padding)."""
        x = z.permute(0, 3, 1, 2)
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return x.permute(0, 2, 3, 1)

    def sample(self, n: int, generator: torch.Generator):
        """Return ``(clip [n, N, Dc], eva [n, N, De], clean_direction [n, N, Dc])``."""
        s, g = self.spec, self.spec.grid
        z = self._blur(torch.randn(n, g, g, s.latent_dim, generator=generator) * 3.0)
        zb = self._blur(z)
        z, zb = z.reshape(n, g * g, -1), zb.reshape(n, g * g, -1)
        if s.include_cls:
            z = torch.cat([z.mean(1, keepdim=True), z], dim=1)
            zb = torch.cat([zb.mean(1, keepdim=True), zb], dim=1)
        eva = z @ self.W_e
        eva[..., self.eva_outliers] += 8.0
        eva = eva + s.cond_noise * torch.randn(eva.shape, generator=generator)
        feat = torch.tanh(2 * z @ self.U) + torch.tanh(2 * zb @ self.V)
        m = F.normalize(F.normalize(feat, dim=-1) @ self.W_c, dim=-1)
        m[..., self.clip_outliers] += 0.2
        m = F.normalize(m, dim=-1)
        clip = m + s.target_noise * torch.randn(m.shape, generator=generator) / math.sqrt(s.clip_dim)
        return clip, eva, m


def make_synthetic(out_dir: str | Path, spec: SyntheticSpec, progress: bool = False) -> Path:
    """Write ``spec.num_shards`` seed-format shards and their manifest into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = SyntheticWorld(spec)
    sizes = [spec.num_samples // spec.num_shards + (i < spec.num_samples % spec.num_shards)
             for i in range(spec.num_shards)]
    shards, start = [], 0
    it = range(spec.num_shards)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="make-synthetic", unit="shard")
    for i in it:
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
        clip, eva, _ = world.sample(sizes[i], gen)
        keys = [f"synthetic-{spec.seed}-{start + j:08d}" for j in range(sizes[i])]
        captions = [f"synthetic sample {start + j}" for j in range(sizes[i])]
        path = write_seed_shard(out, i, clip, eva, keys, captions, spec.include_cls, source_tar="synthetic",
                                config=asdict(spec))
        shards.append({"shard_idx": i, "path": path.name, "num_samples": sizes[i]})
        start += sizes[i]
    extra = {
        "synthetic": asdict(spec),
        "best_point_cosine": spec.best_point_cosine,
        "best_sample_cosine": spec.best_point_cosine**2,
        "clip_dim": spec.clip_dim,
        "eva_dim": spec.eva_dim,
    }
    write_seed_manifest(out, shards, spec.tokens, spec.include_cls, extra)
    return out
