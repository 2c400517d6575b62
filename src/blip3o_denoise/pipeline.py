"""Using a trained model: ``Denoiser.from_pretrained(path).generate(...)`` / ``.denoise(...)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .model import ModelConfig, UniversalDiT
from .sampling import generate, point_estimate


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run's output directory (uses ``final/``, else the newest checkpoint) or a checkpoint directory."""
    p = Path(path)
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        return p
    if (p / "final" / "config.json").exists():
        return p / "final"
    ckpts = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if (c / "config.json").exists()]
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(f"{p}: no model found (expected config.json + model.safetensors, a final/ or a checkpoints/ folder)")


class Denoiser:
    """A trained model with its flow settings.

    ``generate(condition)`` samples clean tokens from pure noise; ``denoise(noisy, condition,
    noise_level)`` cleans tokens given at a noise level. Both return unit-norm ``[B, N, D]``.
    """

    def __init__(self, model: UniversalDiT, run_config: dict):
        self.model = model.eval()
        self.config = run_config
        self.prediction_type = run_config["flow"]["prediction_type"]
        self.max_noise_level = run_config["flow"]["max_noise_level"]
        self.num_steps = run_config.get("train", {}).get("num_inference_steps", 50)
        self.solver = run_config.get("train", {}).get("solver", "euler")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> "Denoiser":
        ck = resolve_checkpoint(path)
        run_config = json.loads((ck / "config.json").read_text())
        model = UniversalDiT(ModelConfig(**run_config["model"]))
        weights = ck / ("ema.safetensors" if use_ema and (ck / "ema.safetensors").exists() else "model.safetensors")
        model.load_state_dict(load_file(str(weights)))
        return cls(model.to(device), run_config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check(self, noise_level: float):
        if noise_level > self.max_noise_level + 1e-6:
            raise ValueError(
                f"noise level {noise_level} is above the highest level seen in training ({self.max_noise_level}); "
                "the model was never trained there (generation from pure noise needs --max_noise_level 1.0)"
            )

    def generate(self, condition: torch.Tensor, num_steps: int | None = None, guidance: float = 1.0,
                 seed: int | None = None, solver: str | None = None) -> torch.Tensor:
        """Sample ``[B, N, D]`` clean tokens for ``condition [B, N, D_cond]`` from pure noise."""
        self._check(1.0)
        if guidance != 1.0 and self.model.cfg.cond_dropout == 0.0:
            raise ValueError("guidance != 1 needs a model trained with --cond_dropout > 0 (its null condition is untrained)")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return generate(self.model, condition.to(self.device), self.prediction_type, num_steps or self.num_steps,
                        solver or self.solver, guidance=guidance, generator=gen)

    def denoise(self, noisy: torch.Tensor, condition: torch.Tensor, noise_level: float, num_steps: int | None = None,
                guidance: float = 1.0, solver: str | None = None) -> torch.Tensor:
        """Clean ``noisy [B, N, D]`` given at ``noise_level`` (0 clean .. 1 pure noise)."""
        self._check(noise_level)
        return generate(self.model, condition.to(self.device), self.prediction_type, num_steps or self.num_steps,
                        solver or self.solver, guidance=guidance, noise_level=noise_level, x_start=noisy.to(self.device))

    def point_estimate(self, noisy: torch.Tensor, condition: torch.Tensor, noise_level: float,
                       rule: str = "posterior_mean") -> torch.Tensor:
        """One model call: ``normalize(E[x1 | noisy, condition])`` for ``noisy [B, N, D]`` at ``noise_level``
        (1 = pure noise: the conditional mean direction of the target). ``rule="exp_map"`` gives the
        older reading ``exp_{x_t}((1 - t) v)``, kept for comparison."""
        self._check(noise_level)
        return point_estimate(self.model, noisy.to(self.device), condition.to(self.device), noise_level,
                              self.prediction_type, rule=rule)
