"""Checkpoint files and resuming: ``OUTPUT/checkpoints/step_N`` written through a temporary directory and
renamed into place, rotation, reading with a fallback to an older checkpoint when the newest is damaged,
the RNG and loop position a resume needs to continue bit for bit, and ``OUTPUT/final`` for inference.

Weights are safetensors; ``training_state.pt`` (optimizer, scheduler, RNG, position) holds tensors and
plain values only and is read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .distributed import load_full_model_state, load_full_state
from .phases import record_phase
from .model import ModelConfig

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "training_state.pt", "config.json")


@dataclass
class Position:
    """Where the loop is: optimizer steps taken, the epoch, micro-batches consumed in it."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_nonfinite: int = 0


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, missing); the message names the file."""


# ----------------------------------------------------------------------------- files


def save_weights(state: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.save_file``, with the permissions of any other file this user writes: the library makes
    its files 0600 whatever the umask, which hides a shared run's weights from the user's group."""
    save_file(state, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its directory is renamed in)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and (p / "config.json").exists())


def _remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it out of the ``step_*`` namespace (atomic), so that a process
    killed while deleting leaves a ``.trash_*`` directory (removed at the next save), never a half ``step_*``."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(out_dir: Path, step: int, model_sd: dict, ema_sd: dict, training_state: dict, run_config: dict,
                    keep: int) -> Path:
    """Write ``checkpoints/step_N`` through a temporary directory renamed into place; keep the newest ``keep``."""
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
    save_weights(model_sd, tmp / "model.safetensors")
    save_weights(ema_sd, tmp / "ema.safetensors")
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


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run's output directory (uses ``final/``, else the newest checkpoint) or a checkpoint directory."""
    p = Path(path)
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        return p
    if (p / "final" / "config.json").exists():
        return p / "final"
    ckpts = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if (c / "config.json").exists()]
    damaged = []
    for c in reversed(ckpts):  # the newest checkpoint whose weight files are whole (a killed copy, a bad disk)
        try:
            for name in ("ema.safetensors", "model.safetensors"):
                if (c / name).exists():
                    with safe_open(str(c / name), "pt"):  # the header and the file's length, not the data
                        pass
        except Exception as e:  # a truncated or corrupt safetensors file
            damaged.append(f"{c}: {type(e).__name__}")
            print(f"warning: {c}: unreadable weights ({type(e).__name__}: {str(e)[:120]}); trying an older checkpoint")
            continue
        return c
    if damaged:
        raise ValueError(f"{p}: every checkpoint is damaged ({'; '.join(damaged)})")
    raise FileNotFoundError(f"{p}: no model found "
                            "(expected config.json + model.safetensors, a final/ or a checkpoints/ folder)")


def export_model(out_dir: Path, ema_sd: dict, run_config: dict) -> Path:
    """Write ``OUTPUT/final``: the EMA weights and the config, what ``Denoiser.from_pretrained`` loads."""
    final = Path(out_dir) / "final"
    tmp = Path(out_dir) / f".tmp_final_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(ema_sd, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(run_config, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------- random state


def rng_state() -> dict:
    """The torch, numpy, Python (and CUDA) generators as tensors, loadable with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "numpy": _json_tensor(numpy_state),
             "python": _json_tensor(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = _from_json_tensor(state["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(_from_json_tensor(state["python"])), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _json_tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(json.dumps(value).encode(), dtype=np.uint8).copy())


def _from_json_tensor(t: torch.Tensor):
    return json.loads(bytes(t.numpy()).decode())


# ----------------------------------------------------------------------------- resuming


# Options that may change on --resume without changing what is trained.
_RESUME_FREE = {
    "resume", "progress", "output_dir", "eval_every_n_steps", "save_every_n_steps", "log_every_n_steps",
    "keep_checkpoints", "max_steps", "num_epochs", "num_workers", "report_to", "device", "compile", "eval_samples",
    "eval_dir", "debug_mode", "max_bad_steps", "num_inference_steps", "solver", "chunked_embeddings_dir",
    "cache_dir", "max_cache_size", "endpoint_url",
}
# Options that define the model's parameters or what it predicts: a checkpoint with other values
# cannot be resumed (its weights would not load, or would silently mean something else).
_RESUME_FIXED = ("task_mode", "training_mode", "model_size", "conditioning", "prediction_type", "path",
                 "hidden_size", "depth", "num_heads", "num_kv_heads", "head_width", "head_depth")
MODEL_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}
# Model config entries that change neither the parameters nor their meaning.
_MODEL_FREE = ("cond_dropout", "grad_checkpointing")


def resume_changes(saved: dict, current: dict) -> dict:
    """Options that differ between a checkpoint's run and the resuming one, and change the training."""
    return {k: (saved[k], current[k]) for k in sorted(saved)
            if k in current and k not in _RESUME_FREE and saved[k] != current[k]}


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Differences between a checkpoint's run config and the resuming run's that make resuming wrong,
    each as ``"name old -> new"`` (flags as ``--name``, derived model settings as ``model name``)."""
    out = []
    st, ct = saved.get("train", {}), current.get("train", {})
    for k in _RESUME_FIXED:
        if k in st and k in ct and st[k] != ct[k]:
            out.append(f"--{k} {st[k]!r} -> {ct[k]!r}")
    # an entry a checkpoint lacks was added later, and its default is what that checkpoint was trained with
    sm, cm = {**MODEL_DEFAULTS, **saved.get("model", {})}, {**MODEL_DEFAULTS, **current.get("model", {})}
    for k in sorted(set(sm) | set(cm)):
        if k not in _MODEL_FREE and sm.get(k) != cm.get(k):
            out.append(f"model {k} {sm.get(k)!r} -> {cm.get(k)!r}")
    return out


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


def newest_intact(out: Path, say) -> tuple[Path, tuple, list[str]] | None:
    """The newest checkpoint that reads in full, its contents, and the errors of newer damaged ones
    (each reported through ``say``); None when there is no checkpoint; a ValueError when none is intact."""
    ckpts, unreadable = checkpoint_dirs(out), []
    for cand in reversed(ckpts):
        try:
            return cand, read_checkpoint(cand), unreadable
        except CheckpointError as e:
            unreadable.append(str(e))
            say(f"warning: {e}; trying the previous checkpoint")
    if ckpts:
        raise ValueError(f"--resume: no intact checkpoint in {out / 'checkpoints'}: " + "; ".join(unreadable))
    return None


def resume(out: Path, cfg: TrainConfig, run_config: dict, model, ema, optimizer, scheduler, say,
           stream=None) -> Position:
    """Load the newest intact checkpoint of ``out`` into the model, EMA, optimizer, scheduler, RNGs and (for
    a converted dataset) the streaming loader ``stream``, and return where the loop stands; a fresh
    :class:`Position` when there is none. ``say`` prints (rank 0)."""
    found = newest_intact(out, say)
    if found is None:
        say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        return Position()
    ck, (saved_config, st, model_sd, ema_sd), unreadable = found
    conflicts = resume_conflicts(saved_config, run_config)
    if conflicts:
        raise ValueError(
            f"{ck}: cannot resume with a different model or task: " + ", ".join(conflicts)
            + ". Resume with the checkpoint's options, or train the new setting in a new --output_dir"
        )
    if bool(st.get("fsdp", False)) != cfg.fsdp:
        raise ValueError(f"{ck}: written with --fsdp {'on' if st.get('fsdp') else 'off'}; resume with the same setting")
    if (st.get("stream") is None) != (stream is None):
        kinds = ("a converted (streamed) dataset", "a shard directory or store")
        raise ValueError(f"{ck}: written while training from {kinds[st.get('stream') is None]}; this run reads "
                         f"{kinds[stream is None]}, whose position in the epoch cannot be carried over: resume "
                         "from the same kind of dataset, or train in a new --output_dir")
    load_full_state(model, optimizer, model_sd, st["optimizer"])
    load_full_model_state(ema.module, ema_sd)
    scheduler.load_state_dict(st["scheduler"])
    apply_optimizer_options(optimizer, scheduler, cfg)
    ema.n_averaged.copy_(st["ema_n_averaged"])
    set_rng_state(st["rng"])
    if stream is not None:
        stream.load_state_dict(stream_state(st["stream"], stream, ck, say))
    record_phase(saved_config, run_config, int(st["step"]))
    pos = Position(int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"]), int(st.get("skipped_nonfinite", 0)))
    skipped = f" (skipping {len(unreadable)} unreadable newer checkpoint(s))" if unreadable else ""
    say(f"resumed from {ck} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch_in_epoch}){skipped}")
    changed = resume_changes(saved_config.get("train", {}), asdict(cfg))
    if changed:
        say("warning: resuming with changed options, so this is no longer the same run as an uninterrupted one: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + "; the new values apply from this step on")
    return pos


def stream_state(saved: dict, stream, ck: Path, say) -> dict:
    """The saved LitData loader state for this run's loader: the same dataset URL is required (the epoch's
    order is tied to it); the cache directory may have moved (a requeued job, another node), so the state
    is pointed at this run's. Other processes, workers or batch size resume elastically (no sample twice or
    missed in the epoch, but another order than an uninterrupted run), which is said."""
    state = copy.deepcopy(saved)
    d, here = state["dataset"], stream.dataset.input_dir
    if d.get("input_dir_url") != here.url:
        raise ValueError(f"{ck}: streamed from {d.get('input_dir_url') or d.get('input_dir_path')}; this run reads "
                         f"{here.url or here.path}: resume from the same dataset location")
    d["input_dir_path"] = here.path
    world = int(os.environ.get("WORLD_SIZE", "1"))
    now = {"world_size": world, "num_workers": stream.num_workers or 1, "batch_size": stream.batch_size}
    changed = {k: (d.get(k), v) for k, v in now.items() if d.get(k) != v}
    if changed:
        say("warning: the streamed epoch resumes with other " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
            changed.items()) + ": LitData re-partitions the rest of the epoch (no sample repeated or skipped), "
            "so the order differs from an uninterrupted run")
    return state


def training_state(optim_sd: dict, scheduler, ema, pos: Position, fsdp: bool, stream=None) -> dict:
    """What ``training_state.pt`` holds besides the weights (``stream``: LitData's loader, whose state
    dict of plain values locates the run in its shuffled epoch)."""
    return {
        "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "ema_n_averaged": ema.n_averaged.detach().cpu(),
        "rng": rng_state(), "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
        "skipped_nonfinite": pos.skipped_nonfinite, "fsdp": fsdp,
        "stream": stream.state_dict() if stream is not None else None,
    }


# Model options that may differ between the run given to --init_from and the new run: they change
# training, not the weights' layout. flow_map adds the step embedding and guidance_input the guidance
# embedding, both starting at zero.
INIT_FROM_FREE = {"flow_map", "grad_checkpointing", "cond_dropout", "guidance_input"}


def load_initial_weights(model, path: str | Path) -> Path:
    """Copy the weights (EMA where saved) of a run or checkpoint at ``path`` into ``model``.

    The architecture must match; a velocity model may start a flow map (its step embedding is new
    and starts at zero, so the new model begins as the old one at every step size). Returns the
    weight file read.
    """
    ck = resolve_checkpoint(path)
    mine = model.cfg.to_dict()
    # a run saved before an option existed has that option's default (as in resume)
    defaults = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}
    saved = {**defaults, **json.loads((ck / "config.json").read_text())["model"]}
    differ = sorted(k for k in set(saved) | set(mine) if k not in INIT_FROM_FREE and saved.get(k) != mine.get(k))
    if differ:
        raise ValueError(f"--init_from {path}: its model differs from this run's in "
                         + ", ".join(f"{k} ({saved.get(k)!r} there, {mine.get(k)!r} here)" for k in differ))
    weights = ck / ("ema.safetensors" if (ck / "ema.safetensors").exists() else "model.safetensors")
    state = load_file(str(weights))
    own = model.state_dict()
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"--init_from {weights}: tensors this model does not have: {extra[:5]} (a flow map cannot "
                         "start an ordinary model)")
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(("step_embed.", "guidance_embed.")))
    if missing:
        raise ValueError(f"--init_from {weights}: tensors missing for this model: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    return weights
