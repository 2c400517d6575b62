"""The training loop: one process or many (torchrun), checkpoints that resume exactly, EMA, evaluation.

Read top to bottom: :class:`TrainConfig` (every flag), :func:`build`, :func:`train`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler

from .data.dataset import TASK_MODES, TRAINING_MODES, Embeddings, PairDataset, split_indices
from .evaluate import Baselines, EvalConfig, evaluate, evaluation_cost, fit_baselines, format_results
from .flow import NOISE_SCHEDULES, PATHS, PREDICTION_TYPES, FlowConfig, flow_loss, sample_path, sample_seed
from .model import CONDITIONING_MODES, PRESETS, UniversalDiT, config_from_preset
from .sampling import SOLVERS


@dataclass
class TrainConfig:
    # the seed's flags
    task_mode: str = "clip_denoising"
    chunked_embeddings_dir: str = ""
    output_dir: str = "./checkpoints"
    model_size: str = "base"
    training_mode: str = "patch_only"
    batch_size: int = 8
    num_epochs: int = 10
    learning_rate: float = 0.0  # 0: auto, AUTO_LR_AT_256 * 256 / hidden size (see build)
    max_grad_norm: float = 1.0
    sphere_constraint_weight: float = 0.1
    prediction_type: str = "velocity"
    noise_schedule: str = "uniform"
    min_noise_level: float = 0.1
    max_noise_level: float = 0.9
    overfit_test_size: int = 0
    max_shards: int = 0
    debug_mode: bool = False
    # ours
    seed: int = 42
    warmup_steps: int = 100
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.1
    eval_every_n_steps: int = 500
    save_every_n_steps: int = 1000
    keep_checkpoints: int = 2
    num_workers: int = 0
    precision: str = "fp32"
    conditioning: str = "aligned"
    cond_dropout: float = 0.0
    num_inference_steps: int = 10  # Euler: 10 steps reach the 50-step Frechet distance within 10% (README)
    solver: str = "euler"
    resume: bool = False
    max_steps: int = 0
    gradient_accumulation_steps: int = 1
    ema_decay: float = 0.999
    holdout_fraction: float = 0.05
    eval_dir: str = ""
    eval_samples: int = 64
    log_every_n_steps: int = 10
    max_bad_steps: int = 20
    report_to: str = "none"
    device: str = "auto"
    grad_checkpointing: bool = False
    fsdp: bool = False
    compile: bool = False
    hidden_size: int = 0
    depth: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    time_shift: float = 3.0
    path: str = "sphere"
    progress: bool = True
    skip_value_check: bool = False
    ignore_manifest: bool = False

    def __post_init__(self):
        choices = {
            "task_mode": TASK_MODES, "training_mode": TRAINING_MODES, "model_size": tuple(PRESETS),
            "prediction_type": PREDICTION_TYPES, "path": PATHS, "noise_schedule": NOISE_SCHEDULES,
            "conditioning": CONDITIONING_MODES, "precision": ("fp32", "bf16"), "solver": SOLVERS,
            "report_to": ("none", "tensorboard", "wandb"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}: expected one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("batch_size", "num_epochs", "gradient_accumulation_steps", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected a positive integer, got {getattr(self, name)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name}: expected a finite number, got {value}")
        if self.learning_rate < 0:
            raise ValueError(f"--learning_rate: expected > 0 (or 0 for the width-scaled default), got {self.learning_rate}")
        for name in ("eval_samples", "log_every_n_steps", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "keep_checkpoints", "num_workers", "eval_every_n_steps",
                     "save_every_n_steps", "overfit_test_size", "max_shards", "hidden_size", "depth", "num_heads",
                     "num_kv_heads", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: expected >= 0, got {getattr(self, name)}")
        for name, hi in (("ema_decay", "1)"), ("holdout_fraction", "1)"), ("cond_dropout", "1)"),
                         ("min_lr_ratio", "1]")):
            value = getattr(self, name)
            if not (0.0 <= value < 1.0 or (hi == "1]" and value == 1.0)):
                raise ValueError(f"--{name}: expected a value in [0, {hi}, got {value}")
        self.flow_config()  # validates the noise range and weights

    def flow_config(self) -> FlowConfig:
        return FlowConfig(
            prediction_type=self.prediction_type, noise_schedule=self.noise_schedule,
            min_noise_level=self.min_noise_level, max_noise_level=self.max_noise_level,
            sphere_constraint_weight=self.sphere_constraint_weight,
            logit_normal_mean=self.logit_normal_mean, logit_normal_std=self.logit_normal_std,
            time_shift=self.time_shift, path=self.path,
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        """Options from a config file (or parsed flags), each checked and converted to its field's type."""
        kinds = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(cls)}
        unknown = sorted(set(d) - set(kinds))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}")
        return cls(**{k: _coerce(k, v, kinds[k], where) for k, v in d.items()})


def _coerce(name: str, value, kind: str, where: str):
    """``value`` as a ``kind`` ("int", "float", "bool", "str"), or a ValueError naming the option and ``where``.

    YAML 1.1 reads ``1e-4`` (no dot) as a string, so numbers written as strings are accepted for
    numeric options; a bool must be a real true/false (a string such as "no" is refused, not guessed).
    """
    def bad(expected: str) -> ValueError:
        return ValueError(f"{where}: {name}: expected {expected}, got {value!r} ({type(value).__name__})")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(value, bool):
        raise bad("a number")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind == "float" else int(value.strip())
        except ValueError:
            raise bad("an integer" if kind == "int" else "a number") from None
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "float":
        if not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    raise TypeError(f"option {name}: unsupported type {kind}")


# ----------------------------------------------------------------------------- helpers


# The learning rate that won on the real development benchmark at hidden size 256 (benchmarks/
# real_quality.py: 1e-3 beat 3e-4 at 256 and 384); other widths scale it by 256 / hidden, the
# usual Adam rule for hidden matrices (tiny 6.7e-4, base 3.3e-4, large 2.5e-4).
AUTO_LR_AT_256 = 1e-3


def auto_learning_rate(hidden_size: int) -> float:
    return AUTO_LR_AT_256 * 256 / hidden_size


class DivergenceWatch:
    """Finite divergence: the logged loss above ``factor`` x the median of the last ``window`` logged
    losses for ``patience`` logs in a row. Non-finite steps are skipped elsewhere; this catches a run
    that stays finite but blows up. Events go to the console and to ``results.json["divergence"]``."""

    def __init__(self, factor: float = 100.0, window: int = 50, patience: int = 3):
        self.factor, self.patience = factor, patience
        self.history: collections.deque = collections.deque(maxlen=window)
        self.in_a_row = 0
        self.events: list[dict] = []

    def update(self, step: int, loss: float) -> dict | None:
        median = statistics.median(self.history) if len(self.history) >= 5 else None
        if median is not None and loss > self.factor * median:
            self.in_a_row += 1
        else:
            self.in_a_row = 0
            self.history.append(loss)  # a spike never enters the reference it is judged against
        if self.in_a_row != self.patience:
            return None
        event = {"step": step, "loss": loss, "running_median": median, "factor": self.factor}
        self.events.append(event)
        return event


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user can act on (it diverged, an optional package is
    missing). The command line prints it as one ``error:`` line."""


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device; a ValueError (naming the flag) for one this machine does not have."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (this torch {torch.__version__} "
                             f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'}); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (equal per-rank lengths, per-epoch reshuffle) that can start mid-epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self):
        it = list(super().__iter__())
        return iter(it[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
        "python": torch.from_numpy(np.frombuffer(json.dumps(random.getstate()[1]).encode(), dtype=np.uint8).copy()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = json.loads(bytes(state["numpy"].numpy()).decode())
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(json.loads(bytes(state["python"].numpy()).decode())), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def ema_multi_avg_fn(decay: float):
    """EMA update with warmup: the decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.

    A fixed 0.999 would leave the EMA at its random initialisation for the first thousand steps,
    which makes short runs (and their evaluations) meaningless.
    """

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def _all_ranks_true(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over the processes (collective), so that every rank skips the same steps."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(0.0 if flag else 1.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t == 0)


def _unwrap(model):
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its directory is renamed in)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "config.json").exists())


def _is_fsdp(module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def full_model_state(module) -> dict:
    """The module's complete state dict on the CPU. Collective under FSDP (every rank must call it;
    rank 0 receives the tensors)."""
    if _is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().contiguous() for k, v in _unwrap(module).state_dict().items()}


def full_optimizer_state(model, optimizer) -> dict:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(model, optimizer, model_sd: dict, optim_sd: dict) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
        # parameters that never received a gradient (the null condition without --cond_dropout)
        # have no optimizer state, in the checkpoint or here
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        _unwrap(model).load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "training_state.pt", "config.json")


def _remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it out of the ``step_*`` namespace (atomic), so that a process
    killed while deleting leaves a ``.trash_*`` directory (removed at the next save), never a half ``step_*``."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(out_dir: Path, step: int, model_sd: dict, ema_sd: dict, training_state: dict, run_config: dict,
                    keep: int) -> Path:
    """Write ``checkpoints/step_N`` through a temporary directory renamed into place."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    # left by a process killed while writing or deleting: half-written temporaries, trash, and step_*
    # directories without config.json (emptied by a delete that an older version did in place)
    for stale in [*root.glob(".tmp_step_*"), *root.glob(".trash_*"),
                  *(p for p in root.glob("step_*") if p.is_dir() and not (p / "config.json").exists())]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    tmp.mkdir()
    save_file(model_sd, str(tmp / "model.safetensors"))
    save_file(ema_sd, str(tmp / "ema.safetensors"))
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "config.json").write_text(json.dumps(run_config, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        _remove_dir(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        _remove_dir(old)
    return final


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, missing); the message names the file."""


def read_checkpoint(ck: Path) -> tuple[dict, dict, dict, dict]:
    """``(run_config, training_state, model_sd, ema_sd)`` of checkpoint ``ck``, every file read in full before
    anything is loaded into a model; a :class:`CheckpointError` naming the first unreadable file."""
    def read(name, fn):
        path = ck / name
        try:
            return fn(path)
        except Exception as e:  # truncated safetensors, a torn pickle stream, bad JSON, a missing file
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]})") from e

    run_config = read("config.json", lambda p: json.loads(p.read_text()))
    state = read("training_state.pt", lambda p: torch.load(p, weights_only=True))
    missing = [k for k in ("optimizer", "scheduler", "ema_n_averaged", "rng", "step", "epoch", "batch_in_epoch")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{ck / 'training_state.pt'}: unreadable (no {', '.join(missing)})")
    model_sd = read("model.safetensors", lambda p: load_file(str(p)))
    ema_sd = read("ema.safetensors", lambda p: load_file(str(p)))
    return run_config, state, model_sd, ema_sd


def export_model(out_dir: Path, ema_sd: dict, run_config: dict) -> Path:
    """Write ``OUTPUT/final``: the EMA weights and the config, what ``Denoiser.from_pretrained`` loads."""
    final = Path(out_dir) / "final"
    tmp = Path(out_dir) / f".tmp_final_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(ema_sd, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(run_config, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------- building


@dataclass
class Run:
    cfg: TrainConfig
    device: torch.device
    train_set: PairDataset
    eval_set: PairDataset
    overfit_set: PairDataset | None
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ResumableSampler
    steps_per_epoch: int
    total_steps: int
    run_config: dict = field(default_factory=dict)
    light_baselines: Baselines | None = None


def build(cfg: TrainConfig) -> Run:
    if not cfg.chunked_embeddings_dir:
        raise ValueError("--chunked_embeddings_dir is required")
    device = resolve_device(cfg.device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(cfg.seed)
    emb = Embeddings(cfg.chunked_embeddings_dir, cfg.max_shards or None, check_manifest=not cfg.ignore_manifest)
    train_idx, held_idx = split_indices(emb.keys, cfg.holdout_fraction)
    if cfg.eval_dir:
        eval_emb = Embeddings(cfg.eval_dir, check_manifest=not cfg.ignore_manifest)
        overlap = set(eval_emb.keys) & {emb.keys[i] for i in train_idx}
        if overlap:
            raise ValueError(f"--eval_dir {cfg.eval_dir}: {len(overlap)} sample keys also appear in the training split (e.g. {sorted(overlap)[0]!r})")
        held_idx = list(range(len(eval_emb)))
    else:
        eval_emb = emb
    if not cfg.skip_value_check:  # one read of the data: a NaN sample is named now, not met as a NaN loss later
        emb.check_finite()
        if eval_emb is not emb:
            eval_emb.check_finite()
    if not held_idx:
        raise ValueError(
            f"{cfg.chunked_embeddings_dir}: no held-out samples (holdout_fraction={cfg.holdout_fraction}, {len(emb)} samples); "
            "raise --holdout_fraction or pass --eval_dir"
        )
    overfit_set = None
    if cfg.overfit_test_size:
        if cfg.overfit_test_size > len(train_idx):
            raise ValueError(f"--overfit_test_size {cfg.overfit_test_size} exceeds the {len(train_idx)} training samples")
        train_idx = train_idx[: cfg.overfit_test_size]
    train_set = PairDataset(emb, train_idx, cfg.task_mode, cfg.training_mode)
    if cfg.overfit_test_size:
        overfit_set = train_set
    eval_set = PairDataset(eval_emb, held_idx[: cfg.eval_samples], cfg.task_mode, cfg.training_mode)
    shape = (train_set.target_dim, train_set.cond_dim, train_set.tokens, train_set.cond_tokens)
    if (eval_set.target_dim, eval_set.cond_dim, eval_set.tokens, eval_set.cond_tokens) != shape:
        raise ValueError(f"--eval_dir {cfg.eval_dir}: widths or token count differ from the training data")
    if train_set.cond_tokens != train_set.tokens and cfg.conditioning != "cross_attention":
        raise ValueError(
            f"--conditioning {cfg.conditioning}: {cfg.chunked_embeddings_dir} pairs {train_set.cond_tokens} condition "
            f"tokens with {train_set.tokens} target tokens, and '{cfg.conditioning}' adds condition tokens to target "
            "tokens one to one: use --conditioning cross_attention"
        )

    mcfg = config_from_preset(
        cfg.model_size, train_set.target_dim, train_set.cond_dim, conditioning=cfg.conditioning,
        cond_dropout=cfg.cond_dropout, grad_checkpointing=cfg.grad_checkpointing,
        zero_init_output=cfg.prediction_type == "velocity", hidden_size=cfg.hidden_size or None,
        depth=cfg.depth or None, num_heads=cfg.num_heads or None,
        num_kv_heads=cfg.num_kv_heads or None,
    )
    if cfg.learning_rate == 0:  # resolved here, so the run's config, resume and logs carry the number
        cfg.learning_rate = auto_learning_rate(mcfg.hidden_size)
    model = UniversalDiT(mcfg).to(device)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay))
    if cfg.fsdp:
        if not dist.is_initialized():
            raise ValueError("--fsdp shards the model across processes: launch with torchrun and more than one process")
        from torch.distributed.fsdp import fully_shard

        # the EMA copy is sharded exactly like the model, so its update is a local lerp of shards
        for m in (model, ema.module):
            for blk in m.blocks:
                fully_shard(blk)
            fully_shard(m)
    fused = device.type in ("cuda", "cpu")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 or n.endswith("null_cond") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), fused=fused,
    )
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False)
    # An epoch is a whole number of optimizer steps: leftover micro-batches that cannot fill an
    # accumulation are dropped for that epoch (the next epoch reshuffles), so no step mixes epochs.
    micro_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    steps_per_epoch = micro_per_epoch // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(train_set)} training samples per process make {micro_per_epoch} batches of {cfg.batch_size}, fewer than "
            f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}: lower one of them"
        )
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    run_config = {
        "train": asdict(cfg),
        "model": mcfg.to_dict(),
        "flow": asdict(cfg.flow_config()),
        "data": {
            "tokens": train_set.tokens, "target_dim": train_set.target_dim, "cond_dim": train_set.cond_dim,
            "cond_tokens": train_set.cond_tokens,
            "format": emb.format, "num_train": len(train_set), "num_heldout": len(held_idx),
        },
    }
    return Run(cfg, device, train_set, eval_set, overfit_set, model, ema, optimizer, scheduler, sampler,
               steps_per_epoch, total_steps, run_config)


# ----------------------------------------------------------------------------- the loop


class _Reporter:
    """metrics.jsonl always; TensorBoard or Weights & Biases when asked for (and installed).

    On a resume from step ``resume_step`` the records a killed run wrote after that step (which the
    resumed run replays) are dropped first, with a line torn by the kill, so every step appears once.
    """

    def __init__(self, out_dir: Path, report_to: str, config: dict, resume_step: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if resume_step is not None:
            self._truncate_after(resume_step)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainingError("--report_to tensorboard needs `pip install blip3o-denoise[tensorboard]`") from e
            purge = resume_step + 1 if resume_step is not None else None  # hide the replayed steps' events
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise TrainingError("--report_to wandb needs `pip install blip3o-denoise[wandb]` "
                                    "(WANDB_MODE=offline works)") from e
            self.wandb = wandb.init(project="blip3o-denoise", config=config, dir=str(out_dir))

    def _truncate_after(self, step: int) -> None:
        """Keep the records of steps <= ``step`` (not a final evaluation at ``step``: it is redone)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            if rec["step"] < step or (rec["step"] == step and not rec.get("final")):
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def eval_model(run: Run):
    """The EMA model as a plain module on rank 0 (under FSDP its weights are gathered: collective)."""
    if not _is_fsdp(run.ema.module):
        return run.ema.module
    sd = full_model_state(run.ema.module)
    if not is_main():
        return None
    model = UniversalDiT(_unwrap(run.model).cfg).to(run.device)
    model.load_state_dict(sd)
    return model


# Sample counts K of the final in-training evaluation (`evaluate` reports 1, 2, 4, 8 by default).
FINAL_SAMPLE_COUNTS = (1, 4)
# The final in-training evaluation costs at most this share of the training compute (in sample
# forwards; a training step costs about 3 forwards per sample), and never fewer than 8 samples.
FINAL_EVAL_SHARE = 0.1


def final_eval_samples(cfg: TrainConfig, total_steps: int, ecfg: EvalConfig, available: int) -> int:
    """How many held-out samples the final in-training evaluation uses (deterministic: counted in
    model calls, not seconds). The full evaluation is ``blip3o-denoise evaluate``."""
    train_calls = 3 * total_steps * cfg.batch_size * cfg.gradient_accumulation_steps
    per_sample = max(1, evaluation_cost(ecfg, cfg.max_noise_level >= 1.0 - 1e-6, cfg.min_noise_level,
                                        cfg.max_noise_level))
    return min(available, max(8, int(FINAL_EVAL_SHARE * train_calls / per_sample)))


def run_evaluation(run: Run, step: int, model, final: bool = False) -> dict:
    """Held-out evaluation with the EMA weights: light during training, bounded at the end."""
    cfg = run.cfg
    common = dict(num_steps=cfg.num_inference_steps, solver=cfg.solver, seed=cfg.seed, precision=cfg.precision,
                  progress=cfg.progress, path=cfg.path)
    n = len(run.eval_set)
    if final:  # the ridge baseline maps a condition token to the target token at the same position
        baselines = fit_baselines(run.train_set, ridge=run.train_set.cond_tokens == run.train_set.tokens)
        ecfg = EvalConfig(sample_counts=FINAL_SAMPLE_COUNTS, **common)
        n = final_eval_samples(cfg, run.total_steps, ecfg, n)
    else:
        if run.light_baselines is None:
            run.light_baselines = fit_baselines(run.train_set, max_samples=128, ridge=False)
        baselines = run.light_baselines
        levels = (0.5,) if cfg.max_noise_level >= 1 else (0.5, cfg.max_noise_level)
        ecfg = EvalConfig(noise_levels=levels, sample_counts=(1,), distribution=False, **common)
    res = evaluate(model, run.eval_set.stack(list(range(n))), cfg.prediction_type, cfg.task_mode,
                         cfg.min_noise_level, cfg.max_noise_level, ecfg, baselines)
    res["step"] = step
    if final:
        res["note"] = (f"in-training evaluation on {res['num_images']} of {len(run.eval_set)} held-out samples "
                       f"(K = {', '.join(map(str, FINAL_SAMPLE_COUNTS))}); the full one: blip3o-denoise evaluate")
    if run.overfit_set is not None:
        res["overfit_test"] = overfit_check(run, model)
    return res


def overfit_check(run: Run, model) -> dict:
    """Cosine on the K training samples themselves, from pure noise if trained to level 1, else from the
    max level. Judged on the point estimate (one model call: what the network has memorised, as the
    denoising verdicts are); the ODE sample's cosine is reported beside it (it adds integration error:
    at the seed's widths, 10 Euler steps from s = 0.9 lose ~0.05 against the point estimate)."""
    cfg = run.cfg
    level = 1.0 if cfg.max_noise_level >= 1.0 - 1e-6 else cfg.max_noise_level
    ecfg = EvalConfig(num_steps=cfg.num_inference_steps, solver=cfg.solver, seed=cfg.seed, noise_levels=(level,),
                      sample_counts=(1,), distribution=False, path=cfg.path)
    res = evaluate(model, run.overfit_set.stack(), cfg.prediction_type, cfg.task_mode, cfg.min_noise_level,
                   cfg.max_noise_level, ecfg)
    part = res["generation"] if level == 1.0 else res["denoising"][f"{level:g}"]
    cos = part["point_estimate"]["cosine_mean"]
    return {"samples": len(run.overfit_set), "noise_level": level, "cosine": cos,
            "ode_cosine": part["model"]["cosine_mean"], "threshold": 0.8, "passed": cos > 0.8}


# Options that may change on --resume without changing what is trained.
_RESUME_FREE = {
    "resume", "progress", "output_dir", "eval_every_n_steps", "save_every_n_steps", "log_every_n_steps",
    "keep_checkpoints", "max_steps", "num_epochs", "num_workers", "report_to", "device", "compile", "eval_samples",
    "eval_dir", "debug_mode", "max_bad_steps", "num_inference_steps", "solver", "chunked_embeddings_dir",
}


def resume_changes(saved: dict, current: dict) -> dict:
    """Options that differ between a checkpoint's run and the resuming one, and change the training."""
    return {k: (saved[k], current[k]) for k in sorted(saved) if k in current and k not in _RESUME_FREE and saved[k] != current[k]}


def apply_optimizer_options(optimizer, scheduler, cfg: TrainConfig) -> None:
    """After loading a checkpoint: follow ``cfg``'s learning rate, warmup, decay floor and weight decay
    from the current step on (the loaded optimizer and scheduler carry the values they were saved with).

    The schedule's lambda already reads ``cfg``; its base learning rates and the groups' weight decay
    come from the checkpoint and are set here. With unchanged options this changes nothing.
    """
    groups = optimizer.param_groups  # built as [decayed, not decayed]
    for g, wd in zip(groups, (cfg.weight_decay, 0.0)):
        g["initial_lr"] = cfg.learning_rate
        g["weight_decay"] = wd
    scheduler.base_lrs = [cfg.learning_rate for _ in groups]
    for g, fn in zip(groups, scheduler.lr_lambdas):
        g["lr"] = cfg.learning_rate * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]


# Options that define the model's parameters or what it predicts: a checkpoint with other values
# cannot be resumed (its weights would not load, or would silently mean something else).
_RESUME_FIXED = ("task_mode", "training_mode", "model_size", "conditioning", "prediction_type", "path",
                 "hidden_size", "depth", "num_heads", "num_kv_heads")
# Model config entries that change neither the parameters nor their meaning.
_MODEL_FREE = ("cond_dropout", "grad_checkpointing")


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Differences between a checkpoint's run config and the resuming run's that make resuming wrong,
    each as ``"name old -> new"`` (flags as ``--name``, derived model settings as ``model name``)."""
    out = []
    st, ct = saved.get("train", {}), current.get("train", {})
    for k in _RESUME_FIXED:
        if k in st and k in ct and st[k] != ct[k]:
            out.append(f"--{k} {st[k]!r} -> {ct[k]!r}")
    sm, cm = saved.get("model", {}), current.get("model", {})
    for k in sorted(set(sm) | set(cm)):
        if k not in _MODEL_FREE and sm.get(k) != cm.get(k):
            out.append(f"model {k} {sm.get(k)!r} -> {cm.get(k)!r}")
    return out


def train(cfg: TrainConfig) -> dict:
    """Train as configured; return the final evaluation (also written to OUTPUT/results.json)."""
    resolve_device(cfg.device)  # a device this machine lacks is refused before anything starts
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        return _train(cfg)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig) -> dict:
    out = Path(cfg.output_dir)
    if cfg.device == "auto" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = build(cfg)
    main = is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    step, epoch, batch_in_epoch = 0, 0, 0
    counters = {"skipped_nonfinite": 0}

    resume_step = None
    if cfg.resume:
        ckpts = checkpoint_dirs(out)
        ck, unreadable = None, []
        for cand in reversed(ckpts):  # newest first; a corrupt one is reported and the previous one tried
            try:
                saved_config, st, model_sd, ema_sd = read_checkpoint(cand)
            except CheckpointError as e:
                unreadable.append(str(e))
                if main:
                    print(f"warning: {e}; trying the previous checkpoint")
                continue
            ck = cand
            break
        if ckpts and ck is None:
            raise ValueError(f"--resume: no intact checkpoint in {out / 'checkpoints'}: " + "; ".join(unreadable))
        if ck is not None:
            conflicts = resume_conflicts(saved_config, run.run_config)
            if conflicts:
                raise ValueError(
                    f"{ck}: cannot resume with a different model or task: " + ", ".join(conflicts)
                    + ". Resume with the checkpoint's options, or train the new setting in a new --output_dir"
                )
            if bool(st.get("fsdp", False)) != cfg.fsdp:
                raise ValueError(f"{ck}: written with --fsdp {'on' if st.get('fsdp') else 'off'}; resume with the same setting")
            load_full_state(run.model, run.optimizer, model_sd, st["optimizer"])
            if _is_fsdp(run.ema.module):
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(run.ema.module, ema_sd, options=StateDictOptions(full_state_dict=True))
            else:
                run.ema.module.load_state_dict(ema_sd)
            run.scheduler.load_state_dict(st["scheduler"])
            apply_optimizer_options(run.optimizer, run.scheduler, cfg)
            run.ema.n_averaged.copy_(st["ema_n_averaged"])
            _set_rng_state(st["rng"])
            step, epoch, batch_in_epoch = int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"])
            counters["skipped_nonfinite"] = int(st.get("skipped_nonfinite", 0))
            resume_step = step
            if main:
                skipped = f" (skipping {len(unreadable)} unreadable newer checkpoint(s))" if unreadable else ""
                print(f"resumed from {ck} at step {step} (epoch {epoch}, batch {batch_in_epoch}){skipped}")
                changed = resume_changes(saved_config.get("train", {}), asdict(cfg))
                if changed:
                    print("warning: resuming with changed options, so this is no longer the same run as an "
                          "uninterrupted one: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                          + "; the new values apply from this step on")
        elif main:
            print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
    elif main and checkpoint_dirs(out):
        raise FileExistsError(f"{out}: holds checkpoints from an earlier run; pass --resume to continue it or choose a new --output_dir")

    model = run.model
    if dist.is_initialized() and not cfg.fsdp:
        model = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    flow_cfg = cfg.flow_config()
    reporter = _Reporter(out, cfg.report_to, run.run_config, resume_step) if main else None
    if main:
        n_params = sum(p.numel() for p in run.model.parameters())
        print(f"model: {cfg.model_size} ({n_params / 1e6:.2f}M parameters), conditioning={cfg.conditioning}, "
              f"train samples={len(run.train_set)}, held-out={len(run.eval_set)}, steps={run.total_steps}")
    autocast = (
        torch.autocast(run.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    )
    bar = None
    if main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=run.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    accum = cfg.gradient_accumulation_steps
    bad_in_a_row = 0
    watch = DivergenceWatch()
    t_last, samples_since = time.time(), 0
    model.train()

    def make_loader(ep: int, skip_batches: int):
        run.sampler.set_epoch(ep)
        run.sampler.skip = skip_batches * cfg.batch_size
        # The loader gets its own generator: creating an iterator must not draw from the global RNG,
        # or a resumed run (which creates one mid-epoch) would diverge from an uninterrupted one.
        return DataLoader(run.train_set, batch_size=cfg.batch_size, sampler=run.sampler, num_workers=cfg.num_workers,
                          pin_memory=run.device.type == "cuda", drop_last=False, persistent_workers=False,
                          generator=torch.Generator().manual_seed(cfg.seed + ep))

    while step < run.total_steps:
        loader = make_loader(epoch, batch_in_epoch)
        micro, step_parts, step_finite = 0, None, True
        for batch in loader:
            if batch_in_epoch >= run.steps_per_epoch * accum:
                break
            target = batch["target"].to(run.device, non_blocking=True)
            cond = batch["condition"].to(run.device, non_blocking=True)
            # Noise, noise level and condition dropout of a sample depend only on (seed, epoch,
            # sample index): the same with 1 or 8 processes, any batch size, and after a resume.
            seeds = [sample_seed(cfg.seed, epoch, int(i)) for i in batch["index"]]
            path = sample_path(target, flow_cfg, sample_seeds=seeds)
            drop = None
            if cfg.cond_dropout > 0:
                drop = torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(sd ^ 0x5DEECE66D))) < cfg.cond_dropout
                                     for sd in seeds], device=run.device)
            last_micro = micro == accum - 1
            sync = nullcontext() if (last_micro or not isinstance(model, DDP)) else model.no_sync()
            if cfg.fsdp:
                model.set_requires_gradient_sync(last_micro)
            with sync:
                with autocast:
                    pred = model(path.x_t, path.t, cond, drop_mask=drop)
                loss, parts = flow_loss(pred, path, flow_cfg)
                # A non-finite loss in any micro-batch drops the whole step (below). The backward pass
                # still runs: under DDP / FSDP every rank must take part in the gradient reduction.
                step_finite = step_finite and bool(torch.isfinite(loss))
                (loss / accum).backward()
            # what is logged is the step's loss: the mean over its micro-batches
            part_sum = torch.stack([loss.detach().float(), parts["mse"].float(), parts["sphere_penalty"].float()]) / accum
            step_parts = part_sum if micro == 0 else step_parts + part_sum
            micro += 1
            batch_in_epoch += 1
            samples_since += target.shape[0]
            if not last_micro:
                continue
            micro = 0
            finite = _all_ranks_true(step_finite, run.device)
            step_finite = True
            diag = _diagnostics(run.model, pred, path, flow_cfg) if cfg.debug_mode and main else None
            grad_norm = torch.nn.utils.clip_grad_norm_(
                run.model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            )
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if not finite or not bool(torch.isfinite(grad_norm)):
                run.optimizer.zero_grad(set_to_none=True)
                counters["skipped_nonfinite"] += 1
                bad_in_a_row += 1
                if main:
                    print(f"step {step}: non-finite {'loss' if not finite else 'gradient'}; update skipped "
                          f"({counters['skipped_nonfinite']} so far)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{bad_in_a_row} non-finite steps in a row at step {step}: stopping. Lower --learning_rate, "
                        "keep --max_grad_norm > 0, or check the data with `blip3o-denoise inspect`"
                    )
                continue
            bad_in_a_row = 0
            lr = run.optimizer.param_groups[0]["lr"]
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            run.ema.update_parameters(run.model)
            step += 1

            log_now = step % cfg.log_every_n_steps == 0 or step == 1 or cfg.debug_mode or step == run.total_steps
            if log_now:  # every rank takes part in the averaging, only rank 0 writes
                logged = step_parts.clone()
                if dist.is_initialized():
                    dist.all_reduce(logged)
                    logged /= dist.get_world_size()
            if main and log_now:
                now = time.time()
                world = dist.get_world_size() if dist.is_initialized() else 1
                if (event := watch.update(step, float(logged[0]))) is not None:
                    (bar.write if bar is not None else print)(
                        f"warning: step {step}: loss {event['loss']:.4g} is above {event['factor']:g}x its running "
                        f"median {event['running_median']:.4g} for {watch.patience} logged steps in a row: the run "
                        "is diverging (lower --learning_rate?); recorded in results.json")
                record = {
                    "step": step, "epoch": epoch, "loss": float(logged[0]), "mse": float(logged[1]),
                    "sphere_penalty": float(logged[2]), "grad_norm": float(grad_norm),
                    "lr": lr, "samples_per_s": samples_since * world / max(now - t_last, 1e-9),
                    "skipped_nonfinite": counters["skipped_nonfinite"],
                }
                if diag is not None:
                    record["debug"] = diag
                reporter.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.0f}")
                if cfg.debug_mode:
                    print(json.dumps(record))
                t_last, samples_since = now, 0
            if bar is not None:
                bar.update(1)
            if cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0 and step < run.total_steps:
                ema_model = eval_model(run)  # collective under FSDP
                if main:
                    last_eval = run_evaluation(run, step, ema_model)
                    reporter.log({"step": step, "eval": last_eval})
                    (bar.write if bar is not None else print)(f"step {step}\n" + format_results(last_eval))
                if dist.is_initialized():
                    dist.barrier()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < run.total_steps:
                _save(run, out, step, epoch, batch_in_epoch, counters)
            if step >= run.total_steps:
                break
        if step >= run.total_steps:
            break
        epoch += 1
        batch_in_epoch = 0

    if bar is not None:
        bar.close()
    _save(run, out, step, epoch, batch_in_epoch, counters)
    ema_model = eval_model(run)
    result = {}
    if main:
        export_model(out, full_model_state(ema_model), run.run_config)
        result = run_evaluation(run, step, ema_model, final=True)
        result["skipped_nonfinite"] = counters["skipped_nonfinite"]
        result["divergence"] = watch.events
        reporter.log({"step": step, "eval": result, "final": True})
        reporter.close()
        (out / "results.json").write_text(json.dumps(result, indent=2))
        print(format_results(result))
        if "overfit_test" in result:
            o = result["overfit_test"]
            print(f"overfit test on {o['samples']} samples (noise level {o['noise_level']:g}): point-estimate cosine "
                  f"{o['cosine']:.4f} (ODE sample {o['ode_cosine']:.4f}) -> {'PASSED' if o['passed'] else 'FAILED'} "
                  f"(threshold {o['threshold']})")
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's evaluation, then all leave together
    return result


def _save(run: Run, out: Path, step: int, epoch: int, batch_in_epoch: int, counters) -> None:
    """Gather the full state (collective under FSDP) and write it from rank 0."""
    model_sd = full_model_state(run.model)
    ema_sd = full_model_state(run.ema.module)
    optim_sd = full_optimizer_state(run.model, run.optimizer)
    if is_main():
        state = {
            "optimizer": optim_sd, "scheduler": run.scheduler.state_dict(), "ema_n_averaged": run.ema.n_averaged.detach().cpu(),
            "rng": _rng_state(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "skipped_nonfinite": counters["skipped_nonfinite"], "fsdp": run.cfg.fsdp,
        }
        save_checkpoint(out, step, model_sd, ema_sd, state, run.run_config, run.cfg.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def _diagnostics(model, pred, path, flow_cfg) -> dict:
    """Per-step numbers for --debug_mode: where the error is, and whether anything is blowing up."""
    from .flow import prediction_to_velocity

    v = prediction_to_velocity(pred.detach(), path.x_t, path.t, flow_cfg.prediction_type, flow_cfg.time_eps,
                               flow_cfg.path)
    cos = torch.nn.functional.cosine_similarity(v.flatten(1), path.u_t.flatten(1), dim=1)
    grads = {}
    for name, p in _unwrap(model).named_parameters():
        if p.grad is not None:
            top = name.split(".")[0]
            grads[top] = grads.get(top, 0.0) + float(p.grad.float().pow(2).sum())
    return {
        "t_mean": float(path.t.mean()), "t_min": float(path.t.min()), "t_max": float(path.t.max()),
        "pred_norm_mean": float(pred.detach().float().norm(dim=-1).mean()),
        "target_velocity_norm_mean": float(path.u_t.norm(dim=-1).mean()),
        "velocity_cosine_mean": float(cos.mean()),
        "grad_norm_by_module": {k: math.sqrt(v) for k, v in grads.items()},
    }
