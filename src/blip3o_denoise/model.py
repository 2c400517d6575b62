"""The Universal DiT: a diffusion transformer over embedding tokens ``[B, N, D_in]``.

Per block: self-attention (grouped-query, QK-norm, 3-axis rotary embeddings over
(token kind, row, column)), optional cross-attention to the condition tokens, and a SwiGLU
feed-forward; each sub-layer is RMS-normalised and modulated by AdaLN (shift, scale, gate) with
gates initialised at zero, so every block starts as the identity.

The condition ``[B, M, D_cond]`` is projected to the hidden width once per forward
(:meth:`UniversalDiT.prepare_condition`), and during sampling once per generation: the
cross-attention keys and values of every block are cached with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .sphere import normalize

CONDITIONING_MODES = ("aligned", "cross_attention", "both")

# name: (hidden, depth, heads, kv_heads)
PRESETS = {
    "micro": (64, 2, 4, 2),  # tests and smoke runs
    "mini": (256, 4, 4, 2),  # small data, CPU budgets (the real development benchmark's winner)
    "tiny": (384, 6, 6, 2),
    "small": (512, 8, 8, 2),
    "base": (768, 12, 12, 4),
    "large": (1024, 24, 16, 4),
}

# Attention head width inside the wide head (its heads = head_width / HEAD_DIM).
HEAD_DIM = 64

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass
class ModelConfig:
    input_dim: int
    cond_dim: int
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    num_kv_heads: int = 4
    mlp_ratio: float = 8.0 / 3.0
    conditioning: str = "aligned"
    cond_dropout: float = 0.0
    qk_norm: bool = True
    rope_base: float = 100.0
    time_scale: float = 1000.0
    grad_checkpointing: bool = False
    # A zero output layer starts a velocity model at v = 0 (DiT's init). A target or noise model
    # normalises its output to a point, and a zero vector has no direction: no gradient ever flows,
    # so those start from a random output layer instead (see UniversalDiT.__init__).
    zero_init_output: bool = True
    # A flow map also takes a step size d >= 0 (see flowmap.py); d = 0 is exactly the velocity model.
    flow_map: bool = False
    # A flow map distilled over several guidance scales also takes the scale g (g = 1 is exactly the model
    # without it): guidance at one call per jump, chosen at sampling time (see train.Teacher).
    guidance_input: bool = False
    # The wide head (off at 0): head_depth blocks at width head_width after the body, fed the body's
    # output and the noisy input itself, so the output layer is head_width -> input_dim instead of
    # hidden_size -> input_dim (see WideHead).
    head_width: int = 0
    head_depth: int = 0

    def __post_init__(self):
        if self.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning: expected one of {CONDITIONING_MODES}, got {self.conditioning!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout: expected a probability in [0, 1), got {self.cond_dropout}")
        if (self.head_width > 0) != (self.head_depth > 0) or self.head_width < 0 or self.head_depth < 0:
            raise ValueError(f"head_width {self.head_width} and head_depth {self.head_depth}: set both > 0 for a "
                             "wide head, or both 0 for none")
        if self.head_width % HEAD_DIM:
            raise ValueError(f"head_width {self.head_width}: expected a multiple of {HEAD_DIM} (its attention heads "
                             f"are {HEAD_DIM} wide)")

    @property
    def uses_cross_attention(self) -> bool:
        return self.conditioning in ("cross_attention", "both")

    @property
    def uses_aligned(self) -> bool:
        return self.conditioning in ("aligned", "both")

    @property
    def out_width(self) -> int:
        """Width of the features the output layer reads: the head's if there is one, else the body's."""
        return self.head_width or self.hidden_size

    def head_config(self) -> "ModelConfig":
        """The wide head's blocks: self-attention and MLP at head_width, no cross-attention (the
        condition reaches the head through the body's output and the pooled AdaLN vector)."""
        heads = self.head_width // HEAD_DIM
        return replace(self, hidden_size=self.head_width, depth=self.head_depth, num_heads=heads,
                       num_kv_heads=heads // 4 if heads % 4 == 0 else heads, conditioning="aligned",
                       head_width=0, head_depth=0)

    def to_dict(self) -> dict:
        return asdict(self)


def config_from_preset(name: str, input_dim: int, cond_dim: int, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model_size: expected one of {tuple(PRESETS)}, got {name!r}")
    h, d, nh, kv = PRESETS[name]
    base = dict(hidden_size=h, depth=d, num_heads=nh, num_kv_heads=kv)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(input_dim=input_dim, cond_dim=cond_dim, **base)


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32 (bf16 loses too much in the mean of squares)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm accumulates in float32 for bf16/fp16 inputs (the same result as upcasting
        # by hand, to the last bit) and is a fused kernel: faster and no float32 copy.
        w = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def grid_positions(num_tokens: int, device=None) -> torch.Tensor:
    """Positions ``[N, 3]`` = (kind, row, column) for a square patch grid, optionally CLS first.

    Patches have kind 0 and their row-major grid coordinates; a CLS token has kind 1 and sits at
    the grid centre. Raises for token counts that are neither ``g*g`` nor ``1 + g*g``.
    """
    g = math.isqrt(num_tokens)
    has_cls = False
    if g * g != num_tokens:
        g = math.isqrt(num_tokens - 1)
        has_cls = g * g == num_tokens - 1 and g > 0
        if not has_cls:
            raise ValueError(
                f"{num_tokens} tokens: expected a square patch grid (g*g tokens) or a CLS token "
                "followed by one (1 + g*g tokens)"
            )
    idx = torch.arange(g * g, device=device)
    patches = torch.stack([torch.zeros_like(idx), idx // g, idx % g], dim=-1).float()
    if not has_cls:
        return patches
    centre = (g - 1) / 2.0
    cls = torch.tensor([[1.0, centre, centre]], device=device)
    return torch.cat([cls, patches], dim=0)


class Rope3D(nn.Module):
    """Rotary embeddings over three axes (kind, row, column).

    The head dimension's ``head_dim / 2`` rotation pairs are split: an eighth (at least one) for
    the kind axis, the rest evenly between rows and columns. The logit between two tokens then
    depends only on their offset along each axis.
    """

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        pairs = head_dim // 2
        kind = max(1, pairs // 8)
        row = (pairs - kind) // 2
        col = pairs - kind - row
        freqs, axis = [], []
        for a, n in enumerate((kind, row, col)):
            freqs.append(base ** (-torch.arange(n, dtype=torch.float64) / max(n, 1)))
            axis += [a] * n
        self.register_buffer("freqs", torch.cat(freqs).float(), persistent=False)
        self.register_buffer("axis", torch.tensor(axis), persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[N, head_dim/2]`` for positions ``[N, 3]``."""
        ang = positions[:, self.axis] * self.freqs
        return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, h, N, hd]`` in pairs (first half, second half of the head dim).

    Angles are computed in float32; the rotation runs in ``x``'s dtype (positions are small grid
    coordinates, so bf16 cos/sin lose nothing that matters and we avoid two copies per call).
    """
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _sdpa(q, k, v):
    if q.shape[1] != k.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Grouped-query attention; keys/values come from ``x`` (self) or from a cached source."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def keys_values(self, src: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """``src [B, M, H]`` -> (k, v) each ``[B, kv_heads, M, head_dim]``."""
        b, m, _ = src.shape
        k, v = self.kv(src).view(b, m, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = self.k_norm(k)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v

    def forward(self, x: torch.Tensor, rope_q, kv=None, rope_k=None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2))
        if rope_q is not None:
            q = apply_rope(q, *rope_q)
        k, v = kv if kv is not None else self.keys_values(x, rope_k if rope_k is not None else rope_q)
        out = _sdpa(q, k.to(q.dtype), v.to(q.dtype))
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        inner = int(math.ceil(hidden * ratio / 32) * 32)
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.cross = cfg.uses_cross_attention
        self.norm_attn = RMSNorm(h, affine=False)
        self.attn = Attention(h, cfg.num_heads, cfg.num_kv_heads, cfg.qk_norm)
        if self.cross:
            self.norm_cross = RMSNorm(h, affine=False)
            self.cross_attn = Attention(h, cfg.num_heads, cfg.num_kv_heads, cfg.qk_norm)
        self.norm_mlp = RMSNorm(h, affine=False)
        self.mlp = SwiGLU(h, cfg.mlp_ratio)
        self.n_mod = 3 * (3 if self.cross else 2)
        self.ada = nn.Linear(h, self.n_mod * h)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, rope, cross_kv=None):
        mods = self.ada(F.silu(c)).unsqueeze(1).chunk(self.n_mod, dim=-1)
        sh, sc, g = mods[0:3]
        x = x + g * self.attn(_modulate(self.norm_attn(x), sh, sc), rope)
        if self.cross:
            sh, sc, g = mods[3:6]
            x = x + g * self.cross_attn(_modulate(self.norm_cross(x), sh, sc), rope, kv=cross_kv)
        sh, sc, g = mods[-3:]
        return x + g * self.mlp(_modulate(self.norm_mlp(x), sh, sc))


def timestep_features(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
    """Sinusoidal features of ``t * scale`` ``[B, dim]``.

    Scaling t in [0, 1] to [0, 1000] spreads it over the frequencies: raw t in [0, 1] with a
    10000 period leaves t = 0 and t = 1 nearly identical (cosine ~0.97).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class WideHead(nn.Module):
    """Blocks at width ``W >= D`` between the body (width ``H``) and the output layer.

    With only the body, the output ``out: H -> D`` puts every predicted velocity of a token in an
    H-dimensional subspace; the noise-removing part of the velocity is full-rank in the noisy input,
    so a model narrower than its tokens cannot fit it (RAE, 2025). The head reads the noisy tokens
    again at full width (``x_in: D -> W``) beside the body's output (``body_in: H -> W``), so the
    map from input to output can reach rank ``min(W, D)``. Its blocks start as the identity.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.head_config()
        self.body_norm = RMSNorm(cfg.hidden_size, affine=False)
        self.body_in = nn.Linear(cfg.hidden_size, hc.hidden_size)
        self.x_in = nn.Linear(cfg.input_dim, hc.hidden_size)
        self.cond = nn.Linear(cfg.hidden_size, hc.hidden_size)
        self.rope = Rope3D(HEAD_DIM, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(hc) for _ in range(hc.depth))

    def forward(self, x, x_scaled, c, positions, grad_checkpointing: bool = False):
        """Body output ``x [B, N, H]``, input ``x_scaled [B, N, D]`` (unit variance), ``c [B, H]`` ->
        ``[B, N, W]``."""
        h = self.body_in(self.body_norm(x)) + self.x_in(x_scaled.to(self.x_in.weight.dtype))
        ch = self.cond(c)
        rope = self.rope.angles(positions)
        for blk in self.blocks:
            h = checkpoint(blk, h, ch, rope, None, use_reentrant=False) if grad_checkpointing else blk(h, ch, rope)
        return h


@dataclass
class ConditionCache:
    """The projected condition and every block's cross-attention keys/values."""

    tokens: torch.Tensor  # [B, M, H]
    pooled: torch.Tensor  # [B, H]
    cross_kv: list = field(default_factory=list)


class UniversalDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.x_embed = nn.Linear(cfg.input_dim, h)
        self.cond_embed = nn.Linear(cfg.cond_dim, h)
        self.cond_pool = nn.Linear(h, h)
        # Without condition dropout the null condition never enters the loss: it is frozen, so DDP does not
        # wait for a gradient that never comes. It stays a parameter, so every checkpoint has one layout.
        self.null_cond = nn.Parameter(torch.randn(h) * 0.02, requires_grad=cfg.cond_dropout > 0)
        self.t_freq_dim = 256
        self.t_embed = nn.Sequential(nn.Linear(self.t_freq_dim, h), nn.SiLU(), nn.Linear(h, h))
        if cfg.flow_map:
            # zero last layer: a flow map made from a trained velocity model starts as that model at every d
            self.step_embed = nn.Sequential(nn.Linear(self.t_freq_dim, h), nn.SiLU(), nn.Linear(h, h))
            nn.init.zeros_(self.step_embed[2].weight)
            nn.init.zeros_(self.step_embed[2].bias)
        if cfg.guidance_input:  # zero last layer, as the step embedding: a new input changes nothing at first
            self.guidance_embed = nn.Sequential(nn.Linear(self.t_freq_dim, h), nn.SiLU(), nn.Linear(h, h))
            nn.init.zeros_(self.guidance_embed[2].weight)
            nn.init.zeros_(self.guidance_embed[2].bias)
        self.rope = Rope3D(h // cfg.num_heads, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        w = cfg.out_width
        self.final_norm = RMSNorm(w, affine=False)
        self.final_ada = nn.Linear(h, 2 * w)
        self.out = nn.Linear(w, cfg.input_dim)
        for m in (self.final_ada, self.out) if cfg.zero_init_output else (self.final_ada,):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        # Built last, so a model without a head draws its initial weights exactly as before the head existed.
        self.head = WideHead(cfg) if cfg.head_width else None

    # Inputs are unit tokens whose coordinates are ~1/sqrt(D); rescale them to unit variance so
    # the projections see the same scale at every width, and scale outputs back the same way.
    def prepare_condition(
        self, cond: torch.Tensor | None, batch_size: int | None = None, num_tokens: int | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> ConditionCache:
        """Project the condition ``[B, M, D_cond]`` once; ``None`` gives the learned null condition.

        ``drop_mask [B]`` (bool) replaces the condition of those samples with the null one.
        """
        if cond is None:
            if batch_size is None or num_tokens is None:
                raise ValueError("the null condition needs batch_size and num_tokens")
            tokens = self.null_cond.expand(batch_size, num_tokens, -1)
        else:
            if cond.shape[-1] != self.cfg.cond_dim:
                raise ValueError(f"condition width {cond.shape[-1]} != model cond_dim {self.cfg.cond_dim}")
            c = normalize(cond.float()) * math.sqrt(self.cfg.cond_dim)
            tokens = self.cond_embed(c.to(self.cond_embed.weight.dtype))
            if drop_mask is not None:
                tokens = torch.where(drop_mask[:, None, None], self.null_cond.to(tokens.dtype), tokens)
        pooled = self.cond_pool(tokens.mean(dim=1))
        cache = ConditionCache(tokens=tokens, pooled=pooled)
        if self.cfg.uses_cross_attention:
            cos_sin = self.rope.angles(grid_positions(tokens.shape[1], tokens.device))
            cache.cross_kv = [blk.cross_attn.keys_values(tokens, cos_sin) for blk in self.blocks]
        return cache

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
        cache: ConditionCache | None = None, drop_mask: torch.Tensor | None = None,
        step_size: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_t [B, N, D_in]``, ``t [B]``, ``cond [B, M, D_cond]`` -> raw prediction ``[B, N, D_in]`` (float32).

        In training mode with ``cond_dropout > 0`` a random share of samples gets the null condition.
        ``step_size [B]`` (flow maps only; None is 0): the jump the output is read for (flowmap.py).
        ``guidance [B]`` (models with ``guidance_input`` only; None is 1): the guidance scale of the jump.
        """
        b, n, d = x_t.shape
        if d != self.cfg.input_dim:
            raise ValueError(f"input width {d} != model input_dim {self.cfg.input_dim}")
        if cache is None:
            if drop_mask is None and self.training and self.cfg.cond_dropout > 0 and cond is not None:
                drop_mask = torch.rand(b, device=x_t.device) < self.cfg.cond_dropout
            cache = self.prepare_condition(cond, b, n, drop_mask)
        x_scaled = x_t.float() * math.sqrt(d)
        x = self.x_embed(x_scaled.to(self.x_embed.weight.dtype))
        if self.cfg.uses_aligned:
            if cache.tokens.shape[1] != n:
                raise ValueError(
                    f"conditioning='aligned' adds condition tokens to input tokens one to one: got {n} input "
                    f"tokens and {cache.tokens.shape[1]} condition tokens (use conditioning='cross_attention')"
                )
            x = x + cache.tokens
        c = self.t_embed(timestep_features(t.expand(b) if t.dim() == 0 else t, self.t_freq_dim, self.cfg.time_scale))
        c = c + cache.pooled + self.step_embedding(step_size, b, c.device) + self.guidance_embedding(guidance, b,
                                                                                                       c.device)
        positions = grid_positions(n, x.device)
        rope = self.rope.angles(positions)
        for i, blk in enumerate(self.blocks):
            kv = cache.cross_kv[i] if blk.cross else None
            if self.cfg.grad_checkpointing and self.training:
                x = checkpoint(blk, x, c, rope, kv, use_reentrant=False)
            else:
                x = blk(x, c, rope, kv)
        if self.head is not None:
            x = self.head(x, x_scaled, c, positions, self.cfg.grad_checkpointing and self.training)
        shift, scale = self.final_ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        out = self.out(_modulate(self.final_norm(x), shift, scale))
        return out.float() / math.sqrt(d)

    def guidance_embedding(self, guidance: torch.Tensor | None, b: int, device) -> torch.Tensor | float:
        """``e(g) - e(1)`` ``[B, H]``: exactly 0 at ``g = 1``. 0 for a model without the guidance input."""
        if guidance is None:
            return 0.0
        if not self.cfg.guidance_input:
            if bool((guidance != 1).any()):
                raise ValueError("this model takes no guidance scale as input (distil one with "
                                 "--distill_guidance_scales)")
            return 0.0
        # features of g / 10: scales 0-10 map to the timestep range [0, 1]
        return self._offset_embedding(self.guidance_embed, guidance, 1.0, b, device, divisor=10.0)

    def step_embedding(self, step_size: torch.Tensor | None, b: int, device) -> torch.Tensor | float:
        """``e(d) - e(0)`` ``[B, H]``: exactly 0 at ``d = 0``, so the instantaneous velocity is the same
        network, trained by the same loss, whatever the jumps learn. 0 for a model without flow maps."""
        if step_size is None:
            return 0.0
        if not self.cfg.flow_map:
            if bool((step_size != 0).any()):
                raise ValueError("this model was trained without flow maps: it takes no step size "
                                 "(train or fine-tune with --flow_map_share > 0)")
            return 0.0
        return self._offset_embedding(self.step_embed, step_size, 0.0, b, device)

    def _offset_embedding(self, embed: nn.Module, values: torch.Tensor, neutral: float, b: int, device,
                          divisor: float = 1.0) -> torch.Tensor:
        """``embed(f(v)) - embed(f(neutral))`` ``[B, H]`` for sinusoidal features ``f`` of ``v / divisor``: exactly
        zero where ``v`` is the neutral value, in one pass of the embedding."""
        v = (values.expand(b) if values.dim() == 0 else values).to(device)
        v = torch.cat([v, torch.full((1,), neutral, device=device, dtype=v.dtype)])
        feats = timestep_features(v / divisor if divisor != 1.0 else v, self.t_freq_dim, self.cfg.time_scale)
        e = embed(feats.to(embed[0].weight.dtype))
        return e[:-1] - e[-1:]
