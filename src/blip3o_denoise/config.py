"""Every training option in one place: :class:`TrainConfig` holds its type, default and help text
(the command line's parser is generated from it), and checks values before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .data.dataset import TASK_MODES, TRAINING_MODES
from .flow import NOISE_SCHEDULES, PATHS, PREDICTION_TYPES, FlowConfig
from .model import CONDITIONING_MODES, HEAD_DIM, PRESETS
from .sampling import SOLVERS


def opt(default, help: str):
    """A config field with its command-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # the seed's flags
    task_mode: str = opt("clip_denoising", "eva_denoising (noisy EVA -> EVA, conditioned on EVA) or clip_denoising "
                                           "(noisy CLIP -> CLIP, conditioned on EVA)")
    chunked_embeddings_dir: str = opt("", "directory of seed .pkl shards or a converted store")
    output_dir: str = opt("./checkpoints", "where checkpoints, metrics.jsonl, results.json and final/ go")
    model_size: str = opt("base", "preset: micro, mini, tiny, small, base, large (mini: small data or a CPU budget)")
    training_mode: str = opt("patch_only", "patch_only (N = g*g; CLS dropped if present) or cls_patch (N = 1 + g*g, "
                                           "data must have CLS)")
    batch_size: int = opt(8, "samples per step per process (times --gradient_accumulation_steps)")
    num_epochs: int = opt(10, "passes over the training split (ignored when --max_steps is set)")
    learning_rate: float = opt(0.0, "peak AdamW learning rate (0 = 1e-3 * 256 / hidden size: measured best at width "
                                    "256, scaled by width; tiny 6.7e-4, base 3.3e-4)")
    max_grad_norm: float = opt(1.0, "gradient clipping threshold (0 disables clipping; the logged norm is the real "
                                    "one)")
    sphere_constraint_weight: float = opt(0.1, "weight of the penalty: normal component of a predicted velocity, or "
                                               "|pred| - 1 for target/noise")
    prediction_type: str = opt("velocity", "velocity, target (x1) or noise (x0); all integrate as tangent velocities")
    noise_schedule: str = opt("uniform", "law of the noise level s in training: uniform, cosine (arcsine), "
                                         "logit_normal")
    min_noise_level: float = opt(0.1, "lowest noise level s = 1 - t drawn in training")
    max_noise_level: float = opt(0.9, "highest noise level drawn in training (1.0 is needed for generation from pure "
                                      "noise)")
    overfit_test_size: int = opt(0, "train on exactly K training samples and report whether their cosine passes 0.8")
    max_shards: int = opt(0, "read only the first K shards (0 = all)")
    debug_mode: bool = opt(False, "log per-step diagnostics (time range, norms, velocity cosine, grad norm per "
                                  "module) every step")
    # ours
    seed: int = opt(42, "seed for the model init, data order, noise and the evaluation")
    warmup_steps: int = opt(100, "linear learning-rate warmup steps before cosine decay")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on norms, biases or the null condition)")
    min_lr_ratio: float = opt(0.1, "the cosine decay ends at learning_rate * min_lr_ratio")
    eval_every_n_steps: int = opt(500, "held-out evaluation period in steps (0 = only at the end)")
    save_every_n_steps: int = opt(1000, "checkpoint period in steps (a checkpoint is always written at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (0 = keep them all)")
    num_workers: int = opt(-1, "DataLoader worker processes per process; they collate batches and draw each "
                               "sample's noise (-1: auto, 0 on a CPU, min(8, CPU cores per process - 1) on a GPU)")
    precision: str = opt("fp32", "fp32 or bf16 (autocast; fp32 master weights; RMSNorm in fp32)")
    conditioning: str = opt("aligned", "aligned (add projected condition token-wise), cross_attention, or both")
    cond_dropout: float = opt(0.0, "probability in [0, 1) of training with the null condition (enables classifier-"
                                   "free guidance; at 0 the null condition is frozen)")
    num_inference_steps: int = opt(10, "ODE steps for evaluation and generation")
    solver: str = opt("auto", "euler, heun or midpoint (all step on the sphere with the exponential map); jump: one "
                              "model call per step, read as a flow-map jump (needs --flow_map_share > 0); auto: jump "
                              "for a flow map, else euler")
    resume: bool = opt(False, "continue from the newest complete checkpoint in --output_dir")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = num_epochs worth)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step (no gradient sync on the accumulating"
                                              " ones)")
    ema_decay: float = opt(0.999, "EMA decay of the weights, in [0, 1); evaluation and final/ use the EMA")
    holdout_fraction: float = opt(0.05, "share of samples (by key hash) held out for evaluation, never trained on; in"
                                        " [0, 1)")
    eval_dir: str = opt("", "evaluate on this separate directory instead of the held-out split")
    eval_samples: int = opt(64, "held-out samples used per evaluation (at least 1)")
    log_every_n_steps: int = opt(10, "metrics.jsonl period in steps (at least 1; the first and last steps are always "
                                     "logged)")
    max_bad_steps: int = opt(20, "stop after this many non-finite steps in a row")
    report_to: str = opt("none", "none, tensorboard or wandb (besides metrics.jsonl)")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:1 ...")
    grad_checkpointing: bool = opt(False, "recompute block activations in the backward pass (less memory)")
    fsdp: bool = opt(False, "shard parameters, gradients and optimizer state across processes (torch's fully_shard; "
                            "torchrun only)")
    compile: bool = opt(False, "torch.compile the model (slow first steps, faster after)")
    hidden_size: int = opt(0, "override the preset's hidden width (0 = preset)")
    depth: int = opt(0, "override the preset's number of blocks (0 = preset)")
    num_heads: int = opt(0, "override the preset's attention heads (0 = preset)")
    num_kv_heads: int = opt(0, "override the preset's key/value heads (0 = preset)")
    head_width: int = opt(0, f"wide head: width of --head_depth blocks after the body, a multiple of {HEAD_DIM}, at "
                             "least the token width to lift the hidden-width bottleneck of the output (0 = no head)")
    head_depth: int = opt(0, "wide head: number of blocks at --head_width (0 = no head)")
    logit_normal_mean: float = opt(0.0, "mean of the logit-normal noise-level law")
    logit_normal_std: float = opt(1.0, "std of the logit-normal noise-level law")
    time_shift: float = opt(3.0, "shift the noise-level law toward noise: s -> a s / (1 + (a - 1) s) (1 = no shift; 3"
                                 " won on the real development benchmark at N = 256, D = 256; auto (or 0) = "
                                 "sqrt(N * D / 4096) from the training data's token count N and width D)")
    path: str = opt("sphere", "sphere (slerp path, steps on the sphere: the method) or euclidean (straight line "
                              "between the same unit tokens, normalised at the end: the A/B counterpart)")
    flow_map_share: float = opt(0.0, "share of each batch trained for self-consistency of flow-map jumps (0 = an "
                                     "ordinary velocity model; > 0: the model also takes a step size and samples "
                                     "in 1-4 calls with --solver jump)")
    flow_map_min_step: float = opt(1.0 / 128, "smallest flow-map jump trained (a power of 2: 1/128 trains jumps 1, "
                                              "1/2, ..., 1/128)")
    distill_from: str = opt("", "flow maps: take each jump's target from this trained run's ODE (distillation from "
                                 "a velocity model, the teacher) instead of two chained jumps of the model itself")
    flow_map_start: str = opt("path", "where a flow-map jump trains from: path (the noise-data path at its start "
                                      "time) or jumps (where the model's own jumps from the sample's noise stand at "
                                      "that time: the states the jump sampler meets, no gradient)")
    distill_steps: int = opt(2, "teacher midpoint steps per distilled jump (2 teacher calls each, whatever the jump's "
                                "size; 4 measured no better)")
    distill_guidance: float = opt(1.0, "classifier-free guidance scale of the teacher's ODE, baked into the distilled "
                                       "jumps (1 = none; needs a teacher trained with --cond_dropout > 0; sample the "
                                       "result with guidance 1: no second call per step)")
    distill_guidance_scales: str = opt("", "guidance scales to distil at once, e.g. 1,1.5,2,3: each jump sample draws "
                                          "one, the teacher's ODE is guided by it and the model takes it as an input, "
                                          "so the scale is chosen at sampling time at one call per jump (needs a "
                                          "teacher trained with --cond_dropout > 0)")
    init_from: str = opt("", "start from the weights of this run or checkpoint (fine-tuning, e.g. a velocity model "
                             "into a flow map); the optimizer starts fresh")
    progress: bool = opt(True, "show a progress bar (--no_progress hides it)")
    skip_value_check: bool = opt(False, "skip the one read of the training and held-out data that finds NaN/inf "
                                        "values before training starts")
    ignore_manifest: bool = opt(False, "train even when embeddings_manifest.json disagrees with the shards present (a"
                                       " missing shard, another total_samples)")
    # data in object storage (a dataset from `convert --format litdata`, local or s3://)
    cache_dir: str = opt("", "local cache for a remote dataset's chunks (default: $BLIP3O_CACHE_DIR or "
                             "~/.cache/blip3o-denoise/remote)")
    max_cache_size: str = opt("50GB", "upper bound of that cache, e.g. 200GB (LitData evicts the oldest chunks)")
    endpoint_url: str = opt("", "S3-compatible endpoint (MinIO, Ceph ...); default: $AWS_ENDPOINT_URL, else AWS")

    def __post_init__(self):
        choices = {
            "task_mode": TASK_MODES, "training_mode": TRAINING_MODES, "model_size": tuple(PRESETS),
            "prediction_type": PREDICTION_TYPES, "path": PATHS, "noise_schedule": NOISE_SCHEDULES,
            "conditioning": CONDITIONING_MODES, "precision": ("fp32", "bf16"), "solver": (*SOLVERS, "auto"),
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
            raise ValueError(
                f"--learning_rate: expected > 0 (or 0 for the width-scaled default), got {self.learning_rate}")
        for name in ("eval_samples", "log_every_n_steps", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected a positive integer, got {getattr(self, name)}")
        if self.num_workers < -1:
            raise ValueError(f"--num_workers: expected >= 0, or -1 for auto, got {self.num_workers}")
        for name in ("max_steps", "warmup_steps", "keep_checkpoints", "eval_every_n_steps",
                     "save_every_n_steps", "overfit_test_size", "max_shards", "hidden_size", "depth", "num_heads",
                     "num_kv_heads", "max_grad_norm", "weight_decay", "head_width", "head_depth", "time_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: expected >= 0, got {getattr(self, name)}")
        for name, hi in (("ema_decay", "1)"), ("holdout_fraction", "1)"), ("cond_dropout", "1)"),
                         ("min_lr_ratio", "1]")):
            value = getattr(self, name)
            if not (0.0 <= value < 1.0 or (hi == "1]" and value == 1.0)):
                raise ValueError(f"--{name}: expected a value in [0, {hi}, got {value}")
        if not 0.0 <= self.flow_map_share < 1.0:
            raise ValueError(f"--flow_map_share: expected a share in [0, 1) (the rest trains flow matching), got "
                             f"{self.flow_map_share}")
        k = math.log2(self.flow_map_min_step) if self.flow_map_min_step > 0 else 0.5
        if not (0 < self.flow_map_min_step <= 1 and k == int(k)):
            raise ValueError(f"--flow_map_min_step: expected a power of 2 in (0, 1] such as 1/128 = 0.0078125, got "
                             f"{self.flow_map_min_step}")
        if self.solver == "auto":  # resolved here, so the run's config and resume carry the solver used
            self.solver = "jump" if self.flow_map_share > 0 else "euler"
        if self.flow_map_share > 0 and self.path != "sphere":
            raise ValueError("--flow_map_share: flow-map jumps are exp-map jumps on the sphere (--path sphere)")
        if self.flow_map_share > 0 and (self.min_noise_level != 0.0 or self.max_noise_level != 1.0):
            raise ValueError(f"--flow_map_share: flow-map jumps run from pure noise (t = 0) to clean tokens (t = 1) on "
                             f"a grid of both: they need --min_noise_level 0.0 --max_noise_level 1.0, got "
                             f"{self.min_noise_level} and {self.max_noise_level}")
        if self.flow_map_share > 0 and self.fsdp:
            raise ValueError("--fsdp with --flow_map_share: not supported; the no-gradient calls that build the jump "
                             "targets differ in number between processes and every FSDP forward is collective. Use "
                             "DDP (torchrun without --fsdp)")
        if self.distill_from and self.flow_map_share == 0:
            raise ValueError("--distill_from trains flow-map jumps: it needs --flow_map_share > 0 (the share of "
                             "each batch distilled)")
        if self.flow_map_start not in ("path", "jumps"):
            raise ValueError(f"--flow_map_start: expected path or jumps, got {self.flow_map_start!r}")
        if not (math.isfinite(self.distill_guidance) and self.distill_guidance >= 0):
            raise ValueError(f"--distill_guidance: expected a finite scale >= 0, got {self.distill_guidance}")
        if self.distill_guidance != 1.0 and not self.distill_from:
            raise ValueError("--distill_guidance is the teacher's guidance: it needs --distill_from")
        if self.distill_guidance_scales:
            scales = self.guidance_scales()
            if not self.distill_from or self.distill_guidance != 1.0:
                raise ValueError("--distill_guidance_scales: needs --distill_from, and replaces --distill_guidance "
                                 "(leave it at 1)")
            if not scales or any(not (math.isfinite(g) and g >= 0) for g in scales):
                raise ValueError(f"--distill_guidance_scales: expected finite scales >= 0, got "
                                 f"{self.distill_guidance_scales!r}")
        if self.distill_steps < 1:
            raise ValueError(f"--distill_steps: expected >= 1, got {self.distill_steps}")
        if self.solver == "jump" and self.flow_map_share == 0:
            raise ValueError("--solver jump reads model calls as flow-map jumps: it needs --flow_map_share > 0")
        if (self.head_width > 0) != (self.head_depth > 0) or self.head_width % HEAD_DIM:
            raise ValueError(f"--head_width {self.head_width} --head_depth {self.head_depth}: expected both 0 (no head)"
                             f" or both > 0 with --head_width a multiple of {HEAD_DIM}")
        self.flow_config(validate_only=True)  # validates the noise range and weights

    def guidance_scales(self) -> tuple[float, ...]:
        """``--distill_guidance_scales`` as numbers (empty: none)."""
        try:
            return tuple(float(g) for g in self.distill_guidance_scales.split(",") if g.strip())
        except ValueError:
            raise ValueError(f"--distill_guidance_scales: expected numbers separated by commas, got "
                             f"{self.distill_guidance_scales!r}") from None

    def flow_config(self, validate_only: bool = False) -> FlowConfig:
        if self.time_shift == AUTO and not validate_only:
            raise ValueError("--time_shift auto is resolved from the data when the run is built (train.build)")
        return FlowConfig(
            prediction_type=self.prediction_type, noise_schedule=self.noise_schedule,
            min_noise_level=self.min_noise_level, max_noise_level=self.max_noise_level,
            sphere_constraint_weight=self.sphere_constraint_weight,
            logit_normal_mean=self.logit_normal_mean, logit_normal_std=self.logit_normal_std,
            time_shift=1.0 if self.time_shift == AUTO else self.time_shift, path=self.path,
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        """Options from a config file (or parsed flags), each checked and converted to its field's type."""
        kinds = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(cls)}
        unknown = sorted(set(d) - set(kinds))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}")
        return cls(**{k: _coerce(k, v, kinds[k], where) for k, v in d.items()})


# Options whose value "auto" is stored as AUTO and resolved from the data when the run is built.
AUTO = 0.0
AUTO_OPTIONS = ("time_shift",)


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
    if name in AUTO_OPTIONS and value == "auto":
        return AUTO
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


# The learning rate that won on the real development benchmark at hidden size 256 (benchmarks/
# real_quality.py: 1e-3 beat 3e-4 at 256 and 384); other widths scale it by 256 / hidden, the
# usual Adam rule for hidden matrices (tiny 6.7e-4, base 3.3e-4, large 2.5e-4).
AUTO_LR_AT_256 = 1e-3


def auto_learning_rate(hidden_size: int) -> float:
    return AUTO_LR_AT_256 * 256 / hidden_size


def auto_time_shift(tokens: int, width: int) -> float:
    """``sqrt(N * D / 4096)``: the shift that keeps the signal-to-noise law of N tokens of width D
    where it is for 4096 numbers (RAE's dimension-dependent shift; 8 for 256 CLIP tokens of 1024)."""
    return math.sqrt(tokens * width / 4096)
