"""Option checks of the commands other than ``train`` (whose options :class:`TrainConfig` checks): a value
that would fake a metric or be silently reinterpreted (``--max_samples -1`` read as ``[:-1]``, ``--pca_dim 0``
giving a Frechet distance of 0) is a ValueError naming the flag, before anything is loaded."""

from __future__ import annotations

import math
import os
from pathlib import Path

# command -> flag -> the smallest value it takes (None: the flag was not given / means the default)
MINIMUM = {
    "evaluate": {"num_samples": 0, "num_inference_steps": 1, "pca_dim": 1},
    "sweep": {"num_samples": 0, "k": 1},
    "generate": {"max_samples": 0, "batch_size": 1, "num_steps": 1},
    "extract": {"batch_size": 1, "num_workers": 0, "shard_size": 1, "max_images": 0},
    "convert": {"chunk": 1, "chunk_samples": 1, "max_shards": 0},
    "make-synthetic": {"num_samples": 1, "eva_dim": 1, "clip_dim": 1, "tokens": 1, "num_shards": 1},
    "demo": {"steps": 1},
}


def number_list(flag: str, text: str, kind=float, low: float = 0.0, high: float = math.inf,
                low_open: bool = False) -> tuple:
    """``text`` as comma-separated numbers in [low, high] (``low_open``: (low, high]); a ValueError naming
    ``flag`` otherwise."""
    what = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--{flag} {text}: expected comma-separated {kind.__name__}s in {what}") from None
    for v in values:
        if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
            raise ValueError(f"--{flag} {text}: {v:g} is outside {what}")
    return values


# flags that take a local path only (a Path() of "s3://b/x" is "s3:/b/x": a local folder named "s3:")
LOCAL_ONLY = {"evaluate": ("checkpoint", "output"), "sweep": ("checkpoint", "output"),
              "generate": ("checkpoint", "output"), "extract": ("images", "output"), "inspect": ("dir",),
              "make-synthetic": ("out",), "demo": ("output_dir",), "convert": ("src",)}


def check_local_paths(ns) -> None:
    """An ``s3://`` (or other URL) value of a flag that reads or writes local files only, named as it was given."""
    for name in LOCAL_ONLY.get(ns.command, ()):
        value = str(getattr(ns, name, "") or "")
        if "://" in value:
            flag = name if name in ("dir", "out", "src") else f"--{name}"
            raise ValueError(f"{flag} {value}: a local path is needed here (object storage is read by "
                             "--chunked_embeddings_dir, --train_dir and --eval_dir, and written by convert "
                             "--format litdata)")


def check_options(ns) -> None:
    """Refuse out-of-range options of ``ns.command`` (an argparse namespace)."""
    check_local_paths(ns)
    for name, low in MINIMUM.get(ns.command, {}).items():
        value = getattr(ns, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name} {value}: expected an integer >= {low}")
    if ns.command in ("evaluate", "generate", "sweep") and ns.output:
        check_output_file("output", ns.output)
    if ns.command == "evaluate":
        if ns.noise_levels:
            number_list("noise_levels", ns.noise_levels, low=0.0, high=1.0, low_open=True)
        number_list("sample_counts", ns.sample_counts, int, low=1)
    if ns.command == "sweep":
        number_list("steps", ns.steps, int, low=1)
        number_list("guidance_scales", ns.guidance_scales, low=-math.inf)
    if ns.command in ("evaluate", "generate") and not math.isfinite(ns.guidance):
        raise ValueError(f"--guidance {ns.guidance:g}: expected a finite number")
    if ns.command == "make-synthetic" and not (math.isfinite(ns.target_noise) and ns.target_noise >= 0):
        raise ValueError(f"--target_noise {ns.target_noise:g}: expected a finite number >= 0 (the noise's scale)")
    if ns.command == "convert" and ns.holdout_fraction is not None and not 0 <= ns.holdout_fraction < 1:
        raise ValueError(f"--holdout_fraction {ns.holdout_fraction:g}: expected a value in [0, 1)")


def check_guidance(guidance: float, model_cfg, checkpoint: str) -> None:
    """Guidance other than 1 mixes in an unconditional prediction that a model trained without condition
    dropout never learned: its outputs would be garbage scored as if meaningful."""
    if guidance != 1.0 and model_cfg.cond_dropout == 0 and not getattr(model_cfg, "guidance_input", False):
        raise ValueError(f"--guidance {guidance:g}: {checkpoint} was trained without condition dropout "
                         "(--cond_dropout 0), so it has no unconditional prediction to guide with; use --guidance 1")


def check_output_file(flag: str, path: str) -> None:
    """Before the work: ``path`` must be writable as a file (not a directory, no file where a folder is)."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"--{flag} {p}: is a directory; expected a file path")
    for parent in p.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NotADirectoryError(f"--{flag} {p}: {parent} is not a directory")
            break


def write_atomically(path: str | Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place: a full disk or a kill
    leaves the old file (or none), never a truncated one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
