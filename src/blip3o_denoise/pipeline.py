"""Using a trained model: ``Denoiser.from_pretrained(path or repo id).generate(...)`` / ``.denoise(...)``, and
sharing it: ``save_pretrained(dir)`` / ``push_to_hub(repo_id)`` (the layout itself lives in ``hub.py``)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import hub
from .checkpoint import resolve_checkpoint
from .model import ModelConfig, UniversalDiT
from .sampling import generate, point_estimate


def resolve_model(path: str | Path, revision: str | None = None) -> Path:
    """:func:`resolve_checkpoint` of a local directory, or of the snapshot of Hub repo ``org/name`` when no such
    directory exists (see :func:`hub.download`)."""
    if not Path(path).exists() and hub.looks_like_repo_id(str(path)):
        return resolve_checkpoint(hub.download(str(path), revision=revision))
    return resolve_checkpoint(path)


class Denoiser:
    """A trained model with its flow settings.

    ``generate(condition)`` samples clean tokens from pure noise; ``denoise(noisy, condition,
    noise_level)`` cleans tokens given at a noise level. Both return unit-norm ``[B, N, D]``.
    """

    def __init__(self, model: UniversalDiT, run_config: dict):
        self.model = model.eval()
        self.config = run_config
        self.prediction_type = run_config["flow"]["prediction_type"]
        self.path = run_config["flow"].get("path", "sphere")
        self.max_noise_level = run_config["flow"]["max_noise_level"]
        # below the lowest trained level the sampler jumps to the clean tokens (see sampling.generate)
        self.min_noise_level = run_config["flow"].get("min_noise_level", 0.0)
        self.num_steps = run_config.get("train", {}).get("num_inference_steps", 50)
        self.solver = run_config.get("train", {}).get("solver", "euler")
        self.tokens = run_config.get("data", {}).get("tokens")  # N of the target; None: any count the model accepts
        self.cond_tokens = run_config.get("data", {}).get("cond_tokens", self.tokens)  # N_c of the condition
        self.source: Path | None = None  # the directory it was loaded from (its run's results.json for the card)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                        revision: str | None = None) -> "Denoiser":
        """Load a directory written by :meth:`save_pretrained`, a run's output directory (``final/``, else the
        newest whole checkpoint), or Hugging Face Hub repo ``org/name`` (at ``revision``; from the local cache
        with ``HF_HUB_OFFLINE=1``)."""
        from .distributed import resolve_device

        device = resolve_device(str(device))  # a device this machine lacks: a ValueError, before any reading
        ck = resolve_model(path, revision)
        try:
            run_config = json.loads((ck / "config.json").read_text())
            model = UniversalDiT(ModelConfig(**run_config["model"]))
            for key in ("flow", "train", "data"):
                if not isinstance(run_config.get(key, {}), dict):
                    raise ValueError(f"'{key}' is not a mapping")
            missing = [k for k in ("prediction_type", "max_noise_level") if k not in run_config["flow"]]
            if missing:
                raise ValueError(f"no flow {', '.join(missing)}")
        except Exception as e:  # torn JSON, missing or mistyped fields
            raise ValueError(f"{ck / 'config.json'}: not a run config this version reads ({type(e).__name__}: "
                             f"{str(e)[:200]})") from e
        weights = ck / ("ema.safetensors" if use_ema and (ck / "ema.safetensors").exists() else "model.safetensors")
        try:
            state = load_file(str(weights))
        except Exception as e:  # truncated or corrupt
            raise ValueError(f"{weights}: unreadable weights ({type(e).__name__}: {str(e)[:200]})") from e
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # sizes or names that do not match config.json
            first = str(e).split("\n\t")[1:2] or [str(e)[:200]]
            raise ValueError(f"{weights}: the weights do not match {ck / 'config.json'} ({first[0].strip()})") from e
        den = cls(model.to(device), run_config)
        den.source = ck
        return den

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the Hub layout into ``directory``: ``config.json`` (the run config), ``model.safetensors`` (the
        weights in use, EMA by default) and a ``README.md`` model card with the run's evaluation when it left a
        ``results.json`` (copied beside them). :meth:`from_pretrained` loads it back bit for bit."""
        return hub.save_pretrained(directory, self.model, self.config, hub.run_results(self.source))

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload blip3o-denoise model") -> str:
        """Upload the :meth:`save_pretrained` layout to Hub model repo ``repo_id`` (created if needed); needs
        ``huggingface_hub`` (the ``hub`` extra) and a login. Returns the commit's URL."""
        with tempfile.TemporaryDirectory() as tmp:
            hub.save_pretrained(tmp, self.model, self.config, hub.run_results(self.source), repo_id=repo_id)
            return hub.push_to_hub(Path(tmp), repo_id, private=private, token=token, commit_message=commit_message)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check(self, noise_level: float) -> float:
        try:  # a Python, NumPy or 0-d torch number; not a string or a bool
            level = float("nan") if isinstance(noise_level, (bool, str, bytes)) else float(noise_level)
        except (TypeError, ValueError, RuntimeError):
            level = float("nan")
        if not 0.0 < level <= 1.0:
            raise ValueError(f"noise_level: expected a number in (0, 1] (0 clean, 1 pure noise), got {noise_level!r}")
        noise_level = level
        if noise_level > self.max_noise_level + 1e-6:
            raise ValueError(
                f"noise level {noise_level} is above the highest level seen in training ({self.max_noise_level}); "
                "the model was never trained there (generation from pure noise needs --max_noise_level 1.0)"
            )
        if noise_level < self.min_noise_level - 1e-6:
            raise ValueError(
                f"noise level {noise_level} is below the lowest level seen in training ({self.min_noise_level}); "
                "the model was never trained there: start from a level in "
                f"[{self.min_noise_level}, {self.max_noise_level}], or train with a lower --min_noise_level"
            )
        return noise_level

    def _tokens(self, x, name: str, width: int, what: str, batch: int | None = None) -> torch.Tensor:
        """``x`` checked to be a finite ``[B, N, width]`` tensor with the trained N (and ``batch`` rows)."""
        tokens = self.cond_tokens if name == "condition" else self.tokens
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor [B, N, {width}], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor [B, N, {width}] (batch, tokens, {what} width), "
                             f"got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty [B, N, {width}] tensor, got shape {tuple(x.shape)}")
        if x.shape[-1] != width:
            raise ValueError(f"{name}: expected width {width} (the model's {what} width), got {x.shape[-1]} "
                             f"(shape {tuple(x.shape)})")
        if tokens is not None and x.shape[1] != tokens:
            raise ValueError(f"{name}: expected {tokens} tokens per sample (what the model was trained on), "
                             f"got {x.shape[1]} (shape {tuple(x.shape)})")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"{name}: expected the condition's batch size {batch}, got {x.shape[0]}")
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            bad = "not floating point" if not x.is_floating_point() else "NaN or inf values"
            raise ValueError(f"{name}: expected finite floating-point values, got {bad}")
        return x.to(self.device)

    def _steps(self, num_steps):
        if num_steps is None:
            return self.num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected a positive integer, got {num_steps!r}")
        return num_steps

    def generate(self, condition: torch.Tensor, num_steps: int | None = None, guidance: float = 1.0,
                 seed: int | None = None, solver: str | None = None, num_tokens: int | None = None) -> torch.Tensor:
        """Sample ``[B, N, D]`` clean tokens for ``condition [B, N_c, D_cond]`` from pure noise.

        ``N`` is ``num_tokens``, by default the target token count of the training data (``N_c`` may
        differ from it with cross-attention conditioning).
        """
        self._check(1.0)
        cond = self._tokens(condition, "condition", self.model.cfg.cond_dim, "condition")
        n = num_tokens if num_tokens is not None else self.tokens if self.tokens is not None else cond.shape[1]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_tokens: expected a positive integer, got {n!r}")
        if n != cond.shape[1] and self.model.cfg.uses_aligned:
            raise ValueError(f"num_tokens: a model with conditioning={self.model.cfg.conditioning!r} generates one "
                             f"token per condition token ({cond.shape[1]}), got {n}")
        steps = self._steps(num_steps)
        _check_guidance(guidance)
        if guidance != 1.0 and self.model.cfg.cond_dropout == 0.0 and not self.model.cfg.guidance_input:
            raise ValueError("guidance != 1 needs a model trained with --cond_dropout > 0 "
                             "(its null condition is untrained), or one distilled with --distill_guidance_scales")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # the noise has the target's shape, drawn here (sampling.generate would take N from the condition)
        noise = torch.randn(cond.shape[0], n, self.model.cfg.input_dim, generator=gen).to(cond.device)
        return generate(self.model, cond, self.prediction_type, steps, solver or self.solver, guidance=guidance,
                        x_start=noise, min_noise_level=self.min_noise_level, path=self.path)

    def denoise(self, noisy: torch.Tensor, condition: torch.Tensor, noise_level: float, num_steps: int | None = None,
                guidance: float = 1.0, solver: str | None = None) -> torch.Tensor:
        """Clean ``noisy [B, N, D]`` given at ``noise_level`` (0 clean .. 1 pure noise; at least the trained
        minimum)."""
        noise_level = self._check(noise_level)
        cond = self._tokens(condition, "condition", self.model.cfg.cond_dim, "condition")
        x = self._tokens(noisy, "noisy", self.model.cfg.input_dim, "input", batch=cond.shape[0])
        steps = self._steps(num_steps)
        _check_guidance(guidance)
        if guidance != 1.0 and self.model.cfg.cond_dropout == 0.0 and not self.model.cfg.guidance_input:
            raise ValueError("guidance != 1 needs a model trained with --cond_dropout > 0 "
                             "(its null condition is untrained), or one distilled with --distill_guidance_scales")
        return generate(self.model, cond, self.prediction_type, steps, solver or self.solver, guidance=guidance,
                        noise_level=noise_level, x_start=x, min_noise_level=min(self.min_noise_level, noise_level),
                        path=self.path)

    def point_estimate(self, noisy: torch.Tensor, condition: torch.Tensor, noise_level: float,
                       rule: str = "posterior_mean") -> torch.Tensor:
        """One model call: ``normalize(E[x1 | noisy, condition])`` for ``noisy [B, N, D]`` at ``noise_level``
        (1 = pure noise: the conditional mean direction of the target). ``rule="exp_map"`` gives the
        older reading ``exp_{x_t}((1 - t) v)``, kept for comparison."""
        noise_level = self._check(noise_level)
        cond = self._tokens(condition, "condition", self.model.cfg.cond_dim, "condition")
        x = self._tokens(noisy, "noisy", self.model.cfg.input_dim, "input", batch=cond.shape[0])
        return point_estimate(self.model, x, cond, noise_level, self.prediction_type, rule=rule, path=self.path)


def _check_guidance(guidance) -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance: expected a finite number (1 = no guidance), got {guidance!r}")
