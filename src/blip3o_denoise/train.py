"""The training loop: one process or many (torchrun), checkpoints that resume exactly, EMA, evaluation.

Read top to bottom: :func:`build` makes the model, data and optimizer from a :class:`TrainConfig`;
:func:`train` runs the loop (build, step, log, evaluate, save). Checkpoint files live in
``checkpoint.py``, processes and sharding in ``distributed.py``, logging in ``report.py``.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from .checkpoint import (
    Position, checkpoint_dirs, export_model, load_initial_weights, resume, save_checkpoint, training_state,
)
from .config import AUTO, TrainConfig, auto_learning_rate, auto_time_shift
from .data.dataset import PairDataset, split_indices
from .data.noise import NoiseCollate
from .data.engine_format import check_chunks_present
from .data.objectstore import default_cache_dir, storage_options
from .data.open import open_dataset
from .data.streaming import streaming_loader, streaming_train_set
from .distributed import (
    ResumableSampler, all_ranks_max, barrier, full_model_state, full_optimizer_state, gradient_sync, is_fsdp,
    is_main, process_group, resolve_device, shard, unwrap, world, wrap_for_training,
)
from .evaluate import Baselines, EvalConfig, evaluate, evaluation_cost, fit_baselines, format_results
from .flow import PathSample, flow_loss, path_from, prediction_to_velocity
from .flowmap import consistency_target, sampler_states, teacher_target
from .lock import acquire, command_line, release
from .model import UniversalDiT, config_from_preset
from .phases import earlier_trained_keys, phase_of
from .report import TrainingError, TrainLog

__all__ = ["TrainConfig", "TrainingError", "build", "train", "checkpoint_dirs", "lr_lambda"]

# Loader workers per process on a GPU when --num_workers is left at -1 (auto): each worker collates whole
# batches and draws their noise (about 160 ms of CPU per batch of 64 at the base preset's shapes, the
# device step about 21 ms at 40% MFU on an H100: benchmarks/host_time.py), bounded by the cores per process.
MAX_AUTO_WORKERS = 8


def resolve_workers(requested: int, device: torch.device) -> int:
    """--num_workers, or for -1: none on a CPU (the workers would take the cores the model computes on);
    on a GPU ``min(8, cores per local process - 1)``, at least 1."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, local) - 1))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module, decay: float) -> None:
    """``ema.update_parameters(model)`` with :func:`ema_multi_avg_fn`, the same numbers, without waiting
    for the device: torch's version copies its update count (a CPU tensor) to the device with a blocking
    copy and the update function reads it back; here the count is read on the host, where it lives."""
    n = int(ema.n_averaged)  # a CPU tensor (AveragedModel's buffer is created on the CPU and stays there)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if n == 0:
        for a, b in zip(ema_params, params, strict=True):
            a.copy_(b)
    else:
        ema_multi_avg_fn(decay)(ema_params, params, n)
    for b_ema, b in zip(ema.module.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)
    ema.n_averaged += 1


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
    sampler: ResumableSampler | None  # local data: torch's per-rank sampler, restarted mid-epoch on resume
    steps_per_epoch: int
    total_steps: int
    run_config: dict = field(default_factory=dict)
    light_baselines: Baselines | None = None
    stream: object = None  # a converted (LitData) dataset: its StreamingDataLoader, whose state resumes
    noise: NoiseCollate | None = None  # the loaders' collate: each sample's noise, drawn in the workers
    num_workers: int = 0
    teacher: "Teacher | None" = None  # --distill_from: the frozen velocity model whose ODE gives jump targets


@dataclass
class Teacher:
    """A frozen trained model read as a velocity field (flow-map distillation, ``--distill_from``)."""

    model: torch.nn.Module
    prediction_type: str
    time_eps: float
    guidance: float = 1.0  # --distill_guidance: the velocity is v_u + g (v_c - v_u)

    def velocity(self, cond, drop, autocast, batch_size: int, num_tokens: int, scales: torch.Tensor | None = None):
        """The teacher's velocity field for these samples; their condition is projected once, not per call.
        With guidance (``--distill_guidance``, or a scale per sample in ``scales [B]``), two calls per velocity
        (conditional and null condition), combined as the sampler does; a sample whose condition is dropped
        gets the null velocity (both calls agree)."""
        g = self.guidance if scales is None else scales.to(torch.float32)[:, None, None]
        guided = scales is not None or self.guidance != 1.0  # (no read of the scales from the device)
        with torch.no_grad(), autocast:
            cache = self.model.prepare_condition(cond, batch_size, num_tokens, drop)
            null = None
            if guided:
                null = self.model.prepare_condition(None, batch_size, cond.shape[1] if cond is not None else num_tokens)

        def one(x, t, c):
            with autocast:
                raw = self.model(x, t, cache=c)
            return prediction_to_velocity(raw, x, t, self.prediction_type, self.time_eps, path="sphere")

        def field(x, t):
            v = one(x, t, cache)
            if null is None:
                return v
            vu = one(x, t, null)
            return vu + g * (v - vu)

        return field


def load_teacher(cfg: TrainConfig, data_cfg: dict, device: torch.device) -> Teacher:
    """The run or model given to ``--distill_from``, checked against this run's data before any training."""
    from .pipeline import Denoiser

    try:
        den = Denoiser.from_pretrained(cfg.distill_from, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--distill_from {cfg.distill_from}: {e}") from e
    m, flow = den.model.cfg, den.config["flow"]
    wrong = [f"{name} {have} (this run's data: {want})" for name, have, want in (
        ("target width", m.input_dim, data_cfg["target_dim"]), ("condition width", m.cond_dim, data_cfg["cond_dim"]),
        ("conditioning", m.conditioning, cfg.conditioning)) if have != want]
    if (flow.get("min_noise_level", 0.0), flow["max_noise_level"]) != (0.0, 1.0):
        wrong.append(f"noise levels {flow.get('min_noise_level', 0.0)}-{flow['max_noise_level']} (its ODE is solved "
                     "from t = 0 to t = 1: it must be trained with --min_noise_level 0.0 --max_noise_level 1.0)")
    if cfg.distill_guidance != 1.0 and m.cond_dropout == 0:
        wrong.append(f"--distill_guidance {cfg.distill_guidance:g} needs a teacher trained with --cond_dropout > 0 "
                     "(it has no unconditional prediction to guide with)")
    if cfg.distill_guidance_scales and m.cond_dropout == 0:
        wrong.append(f"--distill_guidance_scales {cfg.distill_guidance_scales} needs a teacher trained with "
                     "--cond_dropout > 0 (it has no unconditional prediction to guide with)")
    if den.path != "sphere":
        wrong.append(f"path {den.path} (flow maps jump on the sphere)")
    if wrong:
        raise ValueError(f"--distill_from {cfg.distill_from}: the teacher does not fit this run: {'; '.join(wrong)}")
    model = den.model.to(device).eval().requires_grad_(False)
    return Teacher(model, den.prediction_type, flow.get("time_eps", 1e-2), cfg.distill_guidance)


@dataclass
class Splits:
    """The training split, the held-out samples evaluated during training, and the overfit set (if any)."""

    train: PairDataset
    eval: PairDataset
    overfit: PairDataset | None
    format: str  # "seed", "store" or "litdata"
    num_heldout: int
    stream: object = None  # "litdata": the training part as a shuffled, rank-partitioned stream


def remote_options(cfg: TrainConfig) -> dict:
    return dict(cache_dir=cfg.cache_dir, max_cache_size=cfg.max_cache_size, endpoint_url=cfg.endpoint_url)


def build_data(cfg: TrainConfig) -> Splits:
    """Open the data, split it by key hash (or take --eval_dir), and check it before training starts."""
    emb = open_dataset(cfg.chunked_embeddings_dir, cfg.max_shards or None, not cfg.ignore_manifest,
                       **remote_options(cfg))
    if emb.format == "litdata" and cfg.overfit_test_size:
        raise ValueError(f"--overfit_test_size trains on the first K training samples of a shard directory or "
                         f"store; {cfg.chunked_embeddings_dir} is a converted (streamed) dataset")
    train_idx, held_idx = split_indices(emb.keys, cfg.holdout_fraction)
    if cfg.eval_dir:
        eval_emb = open_dataset(cfg.eval_dir, None, not cfg.ignore_manifest, **remote_options(cfg))
        overlap = set(eval_emb.keys) & {emb.keys[i] for i in train_idx}
        if overlap:
            raise ValueError(f"--eval_dir {cfg.eval_dir}: {len(overlap)} sample keys also appear in the training "
                             f"split (e.g. {sorted(overlap)[0]!r})")
        held_idx = list(range(len(eval_emb)))
    else:
        eval_emb = emb
    # One read of the data: a NaN sample is named now, not met as a NaN loss later. A converted dataset
    # was checked when it was converted (and its chunks carry checksums): it is not read in full here.
    if not cfg.skip_value_check:
        for e in {id(emb): emb, id(eval_emb): eval_emb}.values():
            if e.format != "litdata":
                e.check_finite()
    if not train_idx:
        raise ValueError(
            f"{cfg.chunked_embeddings_dir}: no training samples: --holdout_fraction {cfg.holdout_fraction} holds out "
            f"all {len(emb)} samples; lower it, or use more data"
        )
    if not held_idx:
        raise ValueError(
            f"{cfg.chunked_embeddings_dir}: no held-out samples (holdout_fraction={cfg.holdout_fraction}, "
            f"{len(emb)} samples); raise --holdout_fraction or pass --eval_dir"
        )
    overfit_set = None
    if cfg.overfit_test_size:
        if cfg.overfit_test_size > len(train_idx):
            raise ValueError(f"--overfit_test_size {cfg.overfit_test_size} exceeds the {len(train_idx)} "
                             "training samples")
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
    stream = None
    if eval_emb.format == "litdata":  # read only when training ends: a missing chunk is named now
        for part in ("train", "eval") if cfg.eval_dir else ("eval",):  # --eval_dir: every sample is evaluated
            check_chunks_present(cfg.eval_dir or cfg.chunked_embeddings_dir, part, storage_options(cfg.endpoint_url))
    if emb.format == "litdata":  # the same training samples, streamed (the split was made when converting)
        stream = streaming_train_set(
            cfg.chunked_embeddings_dir, cfg.task_mode, cfg.training_mode, cfg.holdout_fraction, cfg.seed,
            cache_dir=cfg.cache_dir or default_cache_dir(), max_cache_size=cfg.max_cache_size,
            storage_options=storage_options(cfg.endpoint_url))
    return Splits(train_set, eval_set, overfit_set, emb.format, len(held_idx), stream)


def build(cfg: TrainConfig) -> Run:
    """Data, model, EMA, optimizer, schedule and sampler of a run (nothing is trained yet)."""
    if not cfg.chunked_embeddings_dir:
        raise ValueError("--chunked_embeddings_dir is required")
    device = resolve_device(cfg.device)
    rank, world_size = world()
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    train_set = data.train

    mcfg = config_from_preset(
        cfg.model_size, train_set.target_dim, train_set.cond_dim, conditioning=cfg.conditioning,
        cond_dropout=cfg.cond_dropout, grad_checkpointing=cfg.grad_checkpointing,
        zero_init_output=cfg.prediction_type == "velocity", hidden_size=cfg.hidden_size or None,
        depth=cfg.depth or None, num_heads=cfg.num_heads or None,
        num_kv_heads=cfg.num_kv_heads or None, flow_map=cfg.flow_map_share > 0, head_width=cfg.head_width,
        guidance_input=bool(cfg.guidance_scales()),
        head_depth=cfg.head_depth,
    )
    if cfg.learning_rate == 0:  # resolved here, so the run's config, resume and logs carry the number
        cfg.learning_rate = auto_learning_rate(mcfg.hidden_size)
    if cfg.time_shift == AUTO:
        cfg.time_shift = auto_time_shift(train_set.tokens, train_set.target_dim)
    model = UniversalDiT(mcfg).to(device)
    if cfg.init_from:
        load_initial_weights(model, cfg.init_from)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay))
    if cfg.fsdp:
        shard(model, ema.module)
    fused = device.type in ("cuda", "cpu")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 or n.endswith("null_cond") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), fused=fused,
    )
    sampler = stream = None
    workers = resolve_workers(cfg.num_workers, device)
    noise = NoiseCollate(cfg.flow_config(), cfg.seed, cfg.cond_dropout, flow_map_share=cfg.flow_map_share,
                         flow_map_min_step=cfg.flow_map_min_step, guidance_scales=cfg.guidance_scales())
    if data.stream is not None:  # LitData: whole batches, equal on every rank (drop_last)
        stream = make_stream_loader(data.stream, cfg.batch_size, workers, device, noise)
        micro_per_epoch = len(stream)
    else:
        sampler = ResumableSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                   drop_last=False)
        micro_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    # An epoch is a whole number of optimizer steps: leftover micro-batches that cannot fill an
    # accumulation are dropped for that epoch (the next epoch reshuffles), so no step mixes epochs.
    steps_per_epoch = micro_per_epoch // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(train_set)} training samples per process make {micro_per_epoch} batches of {cfg.batch_size}, "
            f"fewer than --gradient_accumulation_steps {cfg.gradient_accumulation_steps}: lower one of them"
            + (f" (--holdout_fraction {cfg.holdout_fraction} holds out {data.num_heldout} of the "
               f"{data.num_heldout + len(train_set)} samples: lower it, or use more data)" if not cfg.eval_dir else "")
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
            "format": data.format, "num_train": len(train_set), "num_heldout": data.num_heldout,
        },
    }
    run_config["train_phases"] = [phase_of(run_config["train"])]
    teacher = load_teacher(cfg, run_config["data"], device) if cfg.distill_from else None
    return Run(cfg, device, train_set, data.eval, data.overfit, model, ema, optimizer, scheduler, sampler,
               steps_per_epoch, total_steps, run_config, stream=stream, noise=noise, num_workers=workers,
               teacher=teacher)


# ----------------------------------------------------------------------------- evaluation


def eval_model(run: Run):
    """The EMA model as a plain module on rank 0 (under FSDP its weights are gathered: collective)."""
    if not is_fsdp(run.ema.module):
        return run.ema.module
    sd = full_model_state(run.ema.module)
    if not is_main():
        return None
    model = UniversalDiT(unwrap(run.model).cfg).to(run.device)
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


# Sampling steps of the final in-training evaluation are lowered to fit its budget, never below this (or the
# asked number, if smaller): a huge --num_inference_steps must not make the evaluation cost more than training.
FINAL_EVAL_MIN_STEPS = 10


def final_eval_steps(cfg: TrainConfig, total_steps: int, ecfg: EvalConfig) -> int:
    """Sampling steps of the final in-training evaluation: ``ecfg.num_steps``, halved while its 8-sample floor
    would cost more than :data:`FINAL_EVAL_SHARE` of the training compute (not below FINAL_EVAL_MIN_STEPS)."""
    budget = FINAL_EVAL_SHARE * 3 * total_steps * cfg.batch_size * cfg.gradient_accumulation_steps
    floor, steps = min(ecfg.num_steps, FINAL_EVAL_MIN_STEPS), ecfg.num_steps
    gen = cfg.max_noise_level >= 1.0 - 1e-6
    while steps > floor and 8 * evaluation_cost(replace(ecfg, num_steps=steps), gen, cfg.min_noise_level,
                                                cfg.max_noise_level) > budget:
        steps = max(floor, steps // 2)
    return steps


def run_evaluation(run: Run, step: int, model, final: bool = False) -> dict:
    """Held-out evaluation with the EMA weights: light during training, bounded at the end."""
    cfg = run.cfg
    common = dict(num_steps=cfg.num_inference_steps, solver=cfg.solver, seed=cfg.seed, precision=cfg.precision,
                  progress=cfg.progress, path=cfg.path)
    n = len(run.eval_set)
    if final:  # the ridge baseline maps a condition token to the target token at the same position
        baselines = fit_baselines(run.train_set, ridge=run.train_set.cond_tokens == run.train_set.tokens)
        ecfg = EvalConfig(sample_counts=FINAL_SAMPLE_COUNTS, **common)
        ecfg.num_steps = final_eval_steps(cfg, run.total_steps, ecfg)
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
        fewer = (f", {ecfg.num_steps} sampling steps instead of {cfg.num_inference_steps} (the evaluation's budget "
                 f"is {FINAL_EVAL_SHARE:.0%} of the training compute)" if ecfg.num_steps < cfg.num_inference_steps
                 else "")
        res["note"] = (f"in-training evaluation on {res['num_images']} of {len(run.eval_set)} held-out samples "
                       f"(K = {', '.join(map(str, FINAL_SAMPLE_COUNTS))}{fewer}); the full one: blip3o-denoise "
                       "evaluate")
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


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict:
    """Train as configured; return the final evaluation (also written to OUTPUT/results.json)."""
    if "://" in cfg.output_dir:  # Path() would make "s3://b/run" a local folder "s3:/b/run"
        raise ValueError(f"--output_dir {cfg.output_dir}: a local directory is needed (checkpoints are written "
                         "locally; the training data may be s3://)")
    device = resolve_device(cfg.device)  # a device this machine lacks is refused before anything starts
    with process_group(cfg.device), one_writer(cfg.output_dir, device):
        return _train(cfg)


@contextmanager
def one_writer(output_dir: str, device: torch.device):
    """Rank 0 holds the output directory's lock for the run; every rank stops if it cannot (collective)."""
    held, err = None, None
    if is_main():
        try:
            held = acquire(output_dir, command_line(), "--output_dir")
        except FileExistsError as e:
            err = e
    try:
        if bool(all_ranks_max(torch.tensor(float(err is not None), device=device))):
            raise err or FileExistsError(f"{output_dir}: rank 0 could not lock the output directory")
        yield
    finally:
        if held is not None:
            release(*held)


def _train(cfg: TrainConfig) -> dict:
    out, main = Path(cfg.output_dir), is_main()
    if cfg.device == "auto" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run = build(cfg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    pos = start_position(run, out, print if main else lambda msg: None)
    model = wrap_for_training(run.model, run.device, cfg.fsdp, cfg.compile)
    log = TrainLog(out, cfg.report_to, run.run_config, pos.step if cfg.resume else None, main, cfg.progress,
                   pos.step, run.total_steps, cfg.log_every_n_steps, cfg.debug_mode)
    log.say(f"model: {cfg.model_size} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters), "
            f"conditioning={cfg.conditioning}, train samples={len(run.train_set)}, held-out={len(run.eval_set)}, "
            f"steps={run.total_steps}")
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    bad_in_a_row = 0
    model.train()
    while pos.step < run.total_steps:
        for batches in epoch_steps(run, pos):
            step = train_step(run, model, batches, pos.epoch, autocast)
            pos.batch_in_epoch += len(batches)
            log.samples += step.samples
            if step.problem:
                bad_in_a_row = skip_step(run, pos, bad_in_a_row + 1, step.problem, log.say)
                continue
            bad_in_a_row = 0
            pos.step += 1
            log.step(pos.step, pos.epoch, step.parts, step.grad_norm, step.lr, pos.skipped_nonfinite, step.diag)
            if pos.step >= run.total_steps:
                break
            if cfg.eval_every_n_steps and pos.step % cfg.eval_every_n_steps == 0:
                evaluate_now(run, pos.step, log)
            if cfg.save_every_n_steps and pos.step % cfg.save_every_n_steps == 0:
                save(run, out, pos)
        else:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
    log.close()
    save(run, out, pos)
    return finish(run, out, pos, log)


def start_position(run: Run, out: Path, say) -> Position:
    """Step 0, or where the newest intact checkpoint left off (--resume); a fresh run refuses a directory
    that holds an earlier run's checkpoints."""
    if run.cfg.resume:
        pos = resume(out, run.cfg, run.run_config, run.model, run.ema, run.optimizer, run.scheduler, say,
                     stream=run.stream)
        if pos.step > run.total_steps:  # nothing to train, and finishing would relabel the run's outputs
            what = f"--max_steps {run.cfg.max_steps}" if run.cfg.max_steps else f"--num_epochs {run.cfg.num_epochs}"
            raise ValueError(f"{what}: the run is already at step {pos.step} (its newest checkpoint), past the "
                             f"{run.total_steps} steps asked for: nothing would be trained. Resume with more steps, "
                             "or use the checkpoint as it is")
        drop_earlier_training_samples(run, say)
        return pos
    if is_main() and checkpoint_dirs(out):
        raise FileExistsError(f"{out}: holds checkpoints from an earlier run; pass --resume to continue it or "
                              "choose a new --output_dir")
    return Position()


def drop_earlier_training_samples(run: Run, say) -> None:
    """After a resume that changed the split: held-out samples that an earlier phase trained on leave the
    evaluation set (they are training samples for good)."""
    ev = run.eval_set
    keys = [ev.emb.keys[i] for i in ev.indices]

    def open_dir(path, max_shards):
        try:
            return open_dataset(path, max_shards, **remote_options(run.cfg))
        except (OSError, ValueError):
            return None

    trained = earlier_trained_keys(run.run_config, keys, run.train_set.emb, open_dir)
    if not trained:
        return
    ev.indices = [i for i, k in zip(ev.indices, keys) if k not in trained]
    if not ev.indices:
        raise ValueError(f"--holdout_fraction {run.cfg.holdout_fraction}: every held-out sample was trained on in an "
                         "earlier phase of this run (before a resume with another split); nothing is left to "
                         "evaluate: resume with the earlier split or pass --eval_dir")
    say(f"note: {len(trained)} held-out samples were trained on before this resume changed the split; they are "
        f"not evaluated ({len(ev.indices)} left)")


def epoch_steps(run: Run, pos: Position):
    """The rest of epoch ``pos.epoch`` from micro-batch ``pos.batch_in_epoch`` on, as lists of
    ``gradient_accumulation_steps`` micro-batches. An epoch is a whole number of optimizer steps: leftover
    micro-batches that cannot fill a step are dropped for that epoch (the next one reshuffles)."""
    cfg, accum = run.cfg, run.cfg.gradient_accumulation_steps
    run.noise.epoch = pos.epoch  # before the loader's iterator (and its workers) exist
    if run.stream is not None:
        loader = run.stream  # resumed: its loaded state continues the epoch
        if not loader.restore:
            if pos.batch_in_epoch:  # resumed from a state at the end of the epoch: nothing left in it
                return
            loader.current_epoch = pos.epoch  # a new epoch: LitData shuffles by its epoch counter, kept equal to ours
    else:
        run.sampler.set_epoch(pos.epoch)
        run.sampler.skip = pos.batch_in_epoch * cfg.batch_size
        loader = make_loader(run.train_set, cfg.batch_size, run.sampler, run.num_workers, run.device, run.noise,
                             cfg.seed + pos.epoch)
    left, group = run.steps_per_epoch * accum - pos.batch_in_epoch, []
    for batch in loader:
        if left == 0:
            if run.stream is None:
                return
            continue  # LitData ends its epoch only when iterated to the end (else a resumed one replays)
        group.append(batch)
        left -= 1
        if len(group) == accum:
            yield group
            group = []


def make_loader(dataset, batch_size: int, sampler, num_workers: int, device: torch.device, collate: NoiseCollate,
                seed: int) -> DataLoader:
    """The training loader: workers collate batches and draw each sample's noise (``collate``); batches are
    in pinned memory when (and only when) the device is CUDA, so they are copied without blocking."""
    # The loader gets its own generator: creating an iterator must not draw from the global RNG,
    # or a resumed run (which creates one mid-epoch) would diverge from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=device.type == "cuda", drop_last=False,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def make_stream_loader(dataset, batch_size: int, num_workers: int, device: torch.device, collate: NoiseCollate):
    """:func:`make_loader` for a converted (LitData) dataset: its resumable StreamingDataLoader."""
    return streaming_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda", collate_fn=collate)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``; from pinned memory the copies are queued, the host does not wait."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_backward(run: Run, model, batches: list[dict], epoch: int, autocast):
    """Forward and backward of one optimizer step's micro-batches (gradients synchronised on the last).

    Returns the step's mean ``[loss, mse, sphere_penalty]`` and whether some micro-batch's loss was not
    finite on this rank (both tensors on the device: nothing is read back here), the last micro-batch's
    ``(pred, path)`` and the number of samples. Each sample's noise, noise level and condition dropout
    come with the batch, drawn in the loader from (seed, epoch, sample index): the same with 1 or 8
    processes, any batch size or number of workers, and after a resume.
    """
    cfg, flow_cfg, accum = run.cfg, run.cfg.flow_config(), len(batches)
    parts_sum, samples = torch.zeros(3, device=run.device), 0
    bad = torch.zeros((), dtype=torch.bool, device=run.device)
    for k, batch in enumerate(batches):
        b = to_device(batch, run.device)
        path = path_from(b["target"], b["noise"], b["noise_level"], flow_cfg)
        step_size = None
        if cfg.flow_map_share > 0:
            path, step_size = flow_map_targets(model, path, b["condition"], b.get("drop"), batch["step"], cfg,
                                               autocast, run.teacher, b.get("guidance"))
        with gradient_sync(model, cfg.fsdp, sync=k == accum - 1):
            with autocast:
                extra = {"guidance": b["guidance"]} if "guidance" in b else {}  # only models that take it
                pred = model(path.x_t, path.t, b["condition"], drop_mask=b.get("drop"), step_size=step_size, **extra)
            loss, parts = flow_loss(pred, path, flow_cfg)
            # A non-finite loss in any micro-batch drops the whole step. The backward pass still runs:
            # under DDP / FSDP every rank must take part in the gradient reduction.
            bad = bad | ~torch.isfinite(loss)
            (loss / accum).backward()
        parts_sum += torch.stack([loss.detach().float(), parts["mse"].float(), parts["sphere_penalty"].float()]) / accum
        samples += b["target"].shape[0]
    return parts_sum, bad, (pred, path), samples


def flow_map_targets(model, path: PathSample, cond, drop, two_d: torch.Tensor, cfg: TrainConfig, autocast,
                     teacher: Teacher | None = None, guidance: torch.Tensor | None = None):
    """The flow-map part of a step (flowmap.py): ``two_d [B]`` is the jump each sample trains (drawn
    with its noise, :func:`flowmap.draw_consistency`; 0: flow matching). For those samples ``u_t`` is
    replaced by the jump target ``w*``, without gradient: two chained jumps of ``d`` of the model itself,
    or with a ``teacher`` where its ODE lands over the same interval (``--distill_steps``). Returns
    the path with the mixed targets and the step sizes on the device, so the loss stays
    :func:`flow.flow_loss` on one forward of the whole batch."""
    idx = torch.nonzero(two_d > 0).flatten()  # the loader's CPU tensor: no read from the device
    two_d = two_d.to(path.t.device, non_blocking=True)
    if len(idx) == 0:
        return path, two_d
    idx_d = idx.to(path.t.device)
    c = cond[idx_d] if cond is not None else None
    dm = drop[idx_d] if drop is not None else None
    # The no-gradient calls below differ in number between processes (each has its own jump samples), so they
    # bypass the DDP wrapper, whose forward is collective (it broadcasts buffers); the weights are the same.
    model = unwrap(model)

    def field(x, t, d):
        with autocast:
            raw = model(x, t, c, drop_mask=dm, step_size=d)
        return prediction_to_velocity(raw, x, t, cfg.prediction_type, path=cfg.path)

    gs = guidance[idx_d] if guidance is not None else None  # each jump sample's guidance scale

    def rows_field(x, t, d, rows):  # the same, for some of the jump samples (at their guidance scales)
        extra = {"guidance": gs[rows]} if gs is not None else {}
        with autocast:
            raw = model(x, t, c[rows] if c is not None else None, drop_mask=dm[rows] if dm is not None else None,
                        step_size=d, **extra)
        return prediction_to_velocity(raw, x, t, cfg.prediction_type, path=cfg.path)

    x_t, t = path.x_t[idx_d], path.t[idx_d]
    if cfg.flow_map_start == "jumps":  # start where the sampler's own jumps stand, not on the data's path
        x_t = sampler_states(rows_field, path.x0[idx_d], t, two_d[idx_d]).to(path.x_t.dtype)
    if teacher is not None:
        w = teacher_target(teacher.velocity(c, dm, autocast, x_t.shape[0], x_t.shape[1], gs), x_t, t, two_d[idx_d],
                           cfg.distill_steps)
    else:
        w = consistency_target(field, x_t, t, two_d[idx_d], cfg.flow_map_min_step)
    u = path.u_t.clone()
    u[idx_d] = w.to(u.dtype)
    if cfg.flow_map_start == "jumps":
        xs = path.x_t.clone()
        xs[idx_d] = x_t
        return replace(path, x_t=xs, u_t=u), two_d
    return replace(path, u_t=u), two_d


@dataclass
class Step:
    """What one optimizer step did: ``problem`` is None, or "loss" / "gradient" when it was skipped."""

    parts: torch.Tensor
    grad_norm: torch.Tensor
    problem: str | None
    lr: float
    samples: int
    diag: dict | None = None


def train_step(run: Run, model, batches: list[dict], epoch: int, autocast) -> Step:
    """Forward, backward, clipping and (unless a loss or the gradient is not finite) the update."""
    parts, bad_loss, last, samples = forward_backward(run, model, batches, epoch, autocast)
    diag = None
    if run.cfg.debug_mode and is_main():
        diag = _diagnostics(run.model, *last, run.cfg.flow_config())
    grad_norm = clip_gradients(run)
    flags = torch.stack([bad_loss, ~torch.isfinite(grad_norm)]).float()
    # The step's one host-device synchronisation: the host must know whether the update is applied, to
    # count steps, advance the schedule and the EMA, and stop after --max_bad_steps. Every rank decides
    # the same (the MAX is reduced on the device; the gradient norm is already global).
    bad_loss_any, bad_grad = all_ranks_max(flags).tolist()
    if bad_loss_any or bad_grad:
        return Step(parts, grad_norm, "loss" if bad_loss_any else "gradient", 0.0, samples, diag)
    return Step(parts, grad_norm, None, optimizer_step(run), samples, diag)


def clip_gradients(run: Run) -> torch.Tensor:
    """Clip to --max_grad_norm (0: no clipping) and return the norm before clipping."""
    limit = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), limit)
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP


def skip_step(run: Run, pos: Position, bad_in_a_row: int, what: str, say) -> int:
    """Drop a step whose loss or gradient is not finite; stop after --max_bad_steps in a row."""
    run.optimizer.zero_grad(set_to_none=True)
    pos.skipped_nonfinite += 1
    say(f"step {pos.step}: non-finite {what}; update skipped ({pos.skipped_nonfinite} so far)")
    if bad_in_a_row >= run.cfg.max_bad_steps:
        raise TrainingError(
            f"{bad_in_a_row} non-finite steps in a row at step {pos.step}: stopping. Lower --learning_rate, "
            "keep --max_grad_norm > 0, or check the data with `blip3o-denoise inspect`"
        )
    return bad_in_a_row


def optimizer_step(run: Run) -> float:
    """Apply the accumulated gradients, advance the schedule and the EMA; return the learning rate used."""
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    update_ema(run.ema, run.model, run.cfg.ema_decay)
    return lr


def evaluate_now(run: Run, step: int, log: TrainLog) -> None:
    """The light held-out evaluation during training (rank 0; the others wait)."""
    ema_model = eval_model(run)  # collective under FSDP
    if is_main():
        res = run_evaluation(run, step, ema_model)
        log.record({"step": step, "eval": res})
        log.say(f"step {step}\n" + format_results(res))
    barrier()


def save(run: Run, out: Path, pos: Position) -> None:
    """Gather the full state (collective under FSDP) and write a checkpoint from rank 0."""
    model_sd = full_model_state(run.model)
    ema_sd = full_model_state(run.ema.module)
    optim_sd = full_optimizer_state(run.model, run.optimizer)
    if is_main():
        state = training_state(optim_sd, run.scheduler, run.ema, pos, run.cfg.fsdp, run.stream)
        save_checkpoint(out, pos.step, model_sd, ema_sd, state, run.run_config, run.cfg.keep_checkpoints)
    barrier()


def finish(run: Run, out: Path, pos: Position, log: TrainLog) -> dict:
    """Export ``final/``, run the bounded final evaluation, write ``results.json`` (rank 0)."""
    ema_model = eval_model(run)
    result = {}
    if is_main():
        export_model(out, full_model_state(ema_model), run.run_config)
        result = run_evaluation(run, pos.step, ema_model, final=True)
        result["skipped_nonfinite"] = pos.skipped_nonfinite
        result["divergence"] = log.watch.events
        log.record({"step": pos.step, "eval": result, "final": True})
        log.finish()
        (out / "results.json").write_text(json.dumps(result, indent=2))
        print(format_results(result))
        if "overfit_test" in result:
            o = result["overfit_test"]
            print(f"overfit test on {o['samples']} samples (noise level {o['noise_level']:g}): point-estimate cosine "
                  f"{o['cosine']:.4f} (ODE sample {o['ode_cosine']:.4f}) -> {'PASSED' if o['passed'] else 'FAILED'} "
                  f"(threshold {o['threshold']})")
    barrier()  # the other ranks wait for rank 0's evaluation, then all leave together
    return result


@torch.no_grad()
def _diagnostics(model, pred, path, flow_cfg) -> dict:
    """Per-step numbers for --debug_mode: where the error is, and whether anything is blowing up."""
    from .flow import prediction_to_velocity

    v = prediction_to_velocity(pred.detach(), path.x_t, path.t, flow_cfg.prediction_type, flow_cfg.time_eps,
                               flow_cfg.path)
    cos = torch.nn.functional.cosine_similarity(v.flatten(1), path.u_t.flatten(1), dim=1)
    grads = {}
    for name, p in unwrap(model).named_parameters():
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
