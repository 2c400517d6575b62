"""The command line: ``blip3o-denoise {train,evaluate,sweep,generate,extract,convert,inspect,make-synthetic,demo}``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

HELP = {
    "task_mode": "eva_denoising (noisy EVA -> EVA, conditioned on EVA) or clip_denoising (noisy CLIP -> CLIP, conditioned on EVA)",
    "chunked_embeddings_dir": "directory of seed .pkl shards or a converted store",
    "output_dir": "where checkpoints, metrics.jsonl, results.json and final/ go",
    "model_size": "preset: micro, mini, tiny, small, base, large (mini: small data or a CPU budget)",
    "training_mode": "patch_only (N = g*g; CLS dropped if present) or cls_patch (N = 1 + g*g, data must have CLS)",
    "batch_size": "samples per step per process (times --gradient_accumulation_steps)",
    "num_epochs": "passes over the training split (ignored when --max_steps is set)",
    "learning_rate": "peak AdamW learning rate (0 = 1e-3 * 256 / hidden size: measured best at width 256, scaled "
                     "by width; tiny 6.7e-4, base 3.3e-4)",
    "max_grad_norm": "gradient clipping threshold (0 disables clipping; the logged norm is the real one)",
    "sphere_constraint_weight": "weight of the penalty: normal component of a predicted velocity, or |pred| - 1 for target/noise",
    "prediction_type": "velocity, target (x1) or noise (x0); all integrate as tangent velocities",
    "noise_schedule": "law of the noise level s in training: uniform, cosine (arcsine), logit_normal",
    "min_noise_level": "lowest noise level s = 1 - t drawn in training",
    "max_noise_level": "highest noise level drawn in training (1.0 is needed for generation from pure noise)",
    "overfit_test_size": "train on exactly K training samples and report whether their cosine passes 0.8",
    "max_shards": "read only the first K shards (0 = all)",
    "debug_mode": "log per-step diagnostics (time range, norms, velocity cosine, grad norm per module) every step",
    "seed": "seed for the model init, data order, noise and the evaluation",
    "warmup_steps": "linear learning-rate warmup steps before cosine decay",
    "weight_decay": "AdamW weight decay (not on norms, biases or the null condition)",
    "min_lr_ratio": "the cosine decay ends at learning_rate * min_lr_ratio",
    "eval_every_n_steps": "held-out evaluation period in steps (0 = only at the end)",
    "save_every_n_steps": "checkpoint period in steps (a checkpoint is always written at the end)",
    "keep_checkpoints": "how many recent checkpoints to keep (0 = keep them all)",
    "num_workers": "DataLoader worker processes",
    "precision": "fp32 or bf16 (autocast; fp32 master weights; RMSNorm in fp32)",
    "conditioning": "aligned (add projected condition token-wise), cross_attention, or both",
    "cond_dropout": "probability in [0, 1) of training with the null condition (enables classifier-free guidance; "
                    "at 0 the null condition is frozen)",
    "num_inference_steps": "ODE steps for evaluation and generation",
    "solver": "euler, heun or midpoint (all step on the sphere with the exponential map)",
    "resume": "continue from the newest complete checkpoint in --output_dir",
    "max_steps": "stop after this many optimizer steps (0 = num_epochs worth)",
    "gradient_accumulation_steps": "micro-batches per optimizer step (no gradient sync on the accumulating ones)",
    "ema_decay": "EMA decay of the weights, in [0, 1); evaluation and final/ use the EMA",
    "holdout_fraction": "share of samples (by key hash) held out for evaluation, never trained on; in [0, 1)",
    "eval_dir": "evaluate on this separate directory instead of the held-out split",
    "eval_samples": "held-out samples used per evaluation (at least 1)",
    "log_every_n_steps": "metrics.jsonl period in steps (at least 1; the first and last steps are always logged)",
    "max_bad_steps": "stop after this many non-finite steps in a row",
    "report_to": "none, tensorboard or wandb (besides metrics.jsonl)",
    "device": "auto (cuda if available), cpu, cuda, cuda:1 ...",
    "grad_checkpointing": "recompute block activations in the backward pass (less memory)",
    "compile": "torch.compile the model (slow first steps, faster after)",
    "fsdp": "shard parameters, gradients and optimizer state across processes (torch's fully_shard; torchrun only)",
    "hidden_size": "override the preset's hidden width (0 = preset)",
    "depth": "override the preset's number of blocks (0 = preset)",
    "num_heads": "override the preset's attention heads (0 = preset)",
    "num_kv_heads": "override the preset's key/value heads (0 = preset)",
    "logit_normal_mean": "mean of the logit-normal noise-level law",
    "logit_normal_std": "std of the logit-normal noise-level law",
    "path": "sphere (slerp path, steps on the sphere: the method) or euclidean (straight line between the same "
            "unit tokens, normalised at the end: the A/B counterpart)",
    "time_shift": "shift the noise-level law toward noise: s -> a s / (1 + (a - 1) s) (1 = no shift; "
                  "3 won on the real development benchmark at N = 256, D = 256)",
    "progress": "show a progress bar (--no_progress hides it)",
    "skip_value_check": "skip the one read of the training and held-out data that finds NaN/inf values before "
                        "training starts",
    "ignore_manifest": "train even when embeddings_manifest.json disagrees with the shards present (a missing shard, "
                       "another total_samples)",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML or JSON file of options; flags given here override it")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            if default:
                p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS, help=HELP[f.name])
            else:
                p.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS, help=HELP[f.name])
            continue
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        p.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, help=f"{HELP[f.name]} (default: {default})")


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--config {p}: file not found")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"--config {p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {p}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {p}: expected a mapping of option names to values")
    return data


def train_config_from_args(ns: argparse.Namespace):
    from .train import TrainConfig

    given = dict(vars(ns))
    given.pop("command", None)
    base = load_config_file(given.pop("config")) if "config" in given else {}
    where = f"--config {getattr(ns, 'config', '')}" if base else "arguments"
    return TrainConfig.from_dict({**base, **given}, where)


def cmd_train(ns) -> int:
    from .train import train

    result = train(train_config_from_args(ns))
    if "overfit_test" in result and not result["overfit_test"]["passed"]:
        return 3
    return 0


def _load_eval_set(ck_config: dict, directory: str, split: str, holdout_fraction: float | None, max_samples: int):
    from .data.dataset import Embeddings, PairDataset, split_indices

    emb = Embeddings(directory)
    tr = ck_config["train"]
    if split == "all":
        idx = list(range(len(emb)))
    else:
        _, idx = split_indices(emb.keys, tr["holdout_fraction"] if holdout_fraction is None else holdout_fraction)
    if max_samples:
        idx = idx[:max_samples]
    if not idx:
        raise ValueError(f"{directory}: no samples in the '{split}' split")
    ds = PairDataset(emb, idx, tr["task_mode"], tr["training_mode"])
    data = ck_config["data"]
    trained = (data["target_dim"], data["cond_dim"], data["tokens"], data.get("cond_tokens", data["tokens"]))
    if (ds.target_dim, ds.cond_dim, ds.tokens, ds.cond_tokens) != trained:
        raise ValueError(
            f"{directory}: data has target width {ds.target_dim}, condition width {ds.cond_dim}, {ds.tokens} target "
            f"and {ds.cond_tokens} condition tokens; the model was trained on {trained[0]}, {trained[1]}, "
            f"{trained[2]} and {trained[3]}"
        )
    return ds


def _refuse_nonfinite(batch: dict, ds, names: tuple[str, ...]) -> None:
    """A ValueError naming the key of the first sample whose ``names`` tensors hold NaN or inf."""
    import torch

    for name in names:
        bad = ~torch.isfinite(batch[name]).flatten(1).all(dim=1)
        if bool(bad.any()):
            i = int(batch["index"][int(bad.nonzero()[0])])
            shard, row = ds.emb.locate(i)
            raise ValueError(
                f"{shard.path}: sample {row} (key {ds.emb.keys[i]!r}) has non-finite values (NaN or inf) in its "
                f"{name}; `blip3o-denoise inspect --check_values` lists such shards"
            )


def _nonfinite_fields(obj, where: str = "") -> list[str]:
    """Paths of the non-finite numbers in a nested result (a NaN must not pass for a score)."""
    import math

    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _nonfinite_fields(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _nonfinite_fields(v, f"{where}[{i}]")]
    return [where] if isinstance(obj, float) and not math.isfinite(obj) else []


def _train_split(cfg: dict, train_dir: str):
    """The training split of a run (for fitting baselines), or None when its data is not here."""
    from .data.dataset import Embeddings, PairDataset, split_indices

    tdir = train_dir or cfg["train"]["chunked_embeddings_dir"]
    if not tdir or not Path(tdir).is_dir():
        return None
    temb = Embeddings(tdir, cfg["train"].get("max_shards") or None)
    tr_idx, _ = split_indices(temb.keys, cfg["train"]["holdout_fraction"])
    return PairDataset(temb, tr_idx, cfg["train"]["task_mode"], cfg["train"]["training_mode"])


def _training_samples(ds, train_set) -> list[str] | None:
    """Keys of the evaluation samples that are in the run's training split (None: that split is unknown here)."""
    if train_set is None:
        return None
    train_keys = {train_set.emb.keys[i] for i in train_set.indices}
    return [ds.emb.keys[i] for i in ds.indices if ds.emb.keys[i] in train_keys]


def _eval_config(ns, den):
    from .evaluate import EvalConfig

    return EvalConfig(
        num_steps=ns.num_inference_steps or den.num_steps, solver=ns.solver or den.solver,
        noise_levels=tuple(float(x) for x in ns.noise_levels.split(",")) if ns.noise_levels else (),
        sample_counts=tuple(int(k) for k in ns.sample_counts.split(",")), guidance=ns.guidance, seed=ns.seed,
        distribution=not ns.no_distribution, pca_dim=ns.pca_dim,
        precision=ns.precision or den.config["train"].get("precision", "fp32"), progress=not ns.no_progress,
        path=den.path,
    )


def cmd_evaluate(ns) -> int:
    import time

    from .evaluate import evaluate, fit_baselines, format_results
    from .pipeline import Denoiser

    started = time.time()
    den = Denoiser.from_pretrained(ns.checkpoint, device=ns.device)
    cfg = den.config
    ds = _load_eval_set(cfg, ns.chunked_embeddings_dir, ns.split, ns.holdout_fraction, ns.num_samples)
    batch = ds.stack()  # the held-out samples are read once, for every metric
    _refuse_nonfinite(batch, ds, ("condition", "target"))
    train_set = _train_split(cfg, ns.train_dir)
    in_training = _training_samples(ds, train_set)
    if in_training and not ns.allow_train_samples:
        raise ValueError(
            f"{ns.chunked_embeddings_dir}: {len(in_training)} of the {len(ds)} evaluation samples were in the run's "
            f"training split (e.g. key {in_training[0]!r}; split '{ns.split}', holdout fraction "
            f"{cfg['train']['holdout_fraction'] if ns.holdout_fraction is None else ns.holdout_fraction}, the run's "
            f"{cfg['train']['holdout_fraction']}): their scores are not held-out scores. Evaluate the held-out split "
            "(--split heldout, the run's --holdout_fraction) or another directory, or pass --allow_train_samples to "
            "score them anyway, labelled as not held out"
        )
    ridge = not ns.no_ridge and ds.cond_tokens == ds.tokens  # the ridge map pairs tokens position by position
    baselines = fit_baselines(train_set, ridge=ridge, pca_dim=ns.pca_dim) if train_set is not None else None
    if baselines is None:
        print("note: the training data is not available here (--train_dir): no fitted baselines")
    flow = cfg["flow"]
    result = evaluate(den.model, batch, flow["prediction_type"], cfg["train"]["task_mode"],
                            flow["min_noise_level"], flow["max_noise_level"], _eval_config(ns, den), baselines)
    bad = _nonfinite_fields(result)
    if bad:
        raise ValueError(f"evaluation gave non-finite values in {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''} (NaN/inf in the training data of the baselines, or a "
                         "diverged model?): no results written")
    result["checkpoint"] = str(ns.checkpoint)
    result["data"] = {"directory": ns.chunked_embeddings_dir, "split": ns.split}
    # True: no evaluation sample is in the run's training split; None: the training data is not here to check
    result["held_out"] = None if in_training is None else not in_training
    result["train_samples_in_evaluation"] = None if in_training is None else len(in_training)
    result["total_seconds"] = round(time.time() - started, 2)
    print(format_results(result))
    if in_training:
        print(f"NOT HELD OUT: {len(in_training)} of {len(ds)} evaluation samples were in the run's training split "
              "(--allow_train_samples); these scores overstate held-out quality")
    elif in_training is None:
        print("held out: not checked (the run's training data is not here; --train_dir)")
    print(f"evaluation took {result['total_seconds']:.1f} s ({result['seconds']:.1f} s sampling and metrics)")
    if ns.output:
        Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output).write_text(json.dumps(result, indent=2))
        print(f"wrote {ns.output}")
    return 0


def cmd_sweep(ns) -> int:
    from .sweep import run_sweep

    run_sweep(ns)
    return 0


def cmd_generate(ns) -> int:
    import torch
    from safetensors.torch import save_file

    from .pipeline import Denoiser

    den = Denoiser.from_pretrained(ns.checkpoint, device=ns.device)
    ds = _load_eval_set(den.config, ns.chunked_embeddings_dir, ns.split, None, ns.max_samples)
    outs, keys = [], []
    for i in range(0, len(ds), ns.batch_size):
        batch = ds.stack(list(range(i, min(i + ns.batch_size, len(ds)))))
        _refuse_nonfinite(batch, ds, ("condition",))
        outs.append(den.generate(batch["condition"], num_steps=ns.num_steps, guidance=ns.guidance,
                                 seed=ns.seed + i).cpu())
        if not bool(torch.isfinite(outs[-1]).all()):
            raise ValueError(f"the model generated non-finite values for samples {i}..{i + len(outs[-1]) - 1}: "
                             "nothing written (a diverged checkpoint?)")
        keys += [ds.emb.keys[int(j)] for j in batch["index"]]
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": torch.cat(outs).contiguous()}, str(out),
              metadata={"keys": json.dumps(keys), "task_mode": den.config["train"]["task_mode"]})
    print(f"wrote {len(keys)} generated samples to {out}")
    return 0


def cmd_extract(ns) -> int:
    from .extract import ExtractConfig, extract

    cfg = ExtractConfig(images=ns.images, output=ns.output, target_model=ns.target_model, condition_model=ns.condition_model,
                        layer=ns.layer, training_mode=ns.training_mode, batch_size=ns.batch_size, num_workers=ns.num_workers,
                        device=ns.device, precision=ns.precision, format=ns.format, store_dtype=ns.store_dtype,
                        shard_size=ns.shard_size, trust_remote_code=ns.trust_remote_code, max_images=ns.max_images,
                        progress=not ns.no_progress)
    try:
        s = extract(cfg)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['output']}: {s['encoded_this_run']} images encoded this run ({s['images_per_s']:.1f} images/s), "
          f"{s['skipped']} skipped (listed in the manifest), {s['images']} inputs in all")
    return 0


def cmd_convert(ns) -> int:
    from .data.store import convert

    m = convert(ns.src, ns.dst, dtype=ns.dtype, chunk=ns.chunk, max_shards=ns.max_shards or None,
                progress=not ns.no_progress, ignore_manifest=ns.ignore_manifest)
    print(f"{ns.dst}: {m['total_samples']} samples in {len(m['shards'])} shards ({m['dtype']}, N={m['tokens']}, "
          f"clip {m['clip_dim']}, eva {m['eva_dim']})")
    return 0


def cmd_inspect(ns) -> int:
    from .data.inspect import inspect_dataset

    report = inspect_dataset(ns.dir, check_values=ns.check_values, verify=ns.verify)
    print(json.dumps(report, indent=2) if ns.json else report["text"])
    return 1 if report["failed_shards"] or report["problems"] else 0


def cmd_make_synthetic(ns) -> int:
    from .data.synthetic import SyntheticSpec, make_synthetic

    spec = SyntheticSpec(num_samples=ns.num_samples, eva_dim=ns.eva_dim, clip_dim=ns.clip_dim, tokens=ns.tokens,
                         num_shards=ns.num_shards, seed=ns.seed, target_noise=ns.target_noise)
    make_synthetic(ns.out, spec, progress=True)
    print(f"{ns.out}: {spec.num_samples} samples, N={spec.tokens}, eva {spec.eva_dim}, clip {spec.clip_dim}; "
          f"best achievable point cosine {spec.best_point_cosine:.4f}")
    return 0


def cmd_demo(ns) -> int:
    from .demo import run_demo

    ok = run_demo(ns.output_dir, quick=ns.quick, steps=ns.steps)
    return 0 if ok else 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip3o-denoise", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    add_train_arguments(sub.add_parser("train", help="train a model", argument_default=argparse.SUPPRESS))

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on held-out samples beside baselines")
    e.add_argument("--checkpoint", required=True, help="a run's output directory or a checkpoint directory")
    e.add_argument("--chunked_embeddings_dir", required=True)
    e.add_argument("--output", default="", help="write the results JSON here")
    e.add_argument("--split", choices=("heldout", "all"), default="heldout",
                   help="heldout: the key-hash held-out split (same rule as training); all: every sample (a separate directory)")
    e.add_argument("--holdout_fraction", type=float, default=None, help="default: the training run's")
    e.add_argument("--num_samples", type=int, default=256)
    e.add_argument("--num_inference_steps", type=int, default=0, help="default: the training run's")
    e.add_argument("--solver", default="", help="default: the training run's")
    e.add_argument("--noise_levels", default="0.3,0.5,0.7,0.9")
    e.add_argument("--guidance", type=float, default=1.0)
    e.add_argument("--sample_counts", default="1,2,4,8", help="K values for the normalised mean of K generated samples")
    e.add_argument("--train_dir", default="", help="training data for the fitted baselines (default: the run's)")
    e.add_argument("--allow_train_samples", action="store_true",
                   help="score samples of the run's training split too (refused otherwise); the results say "
                        "held_out: false")
    e.add_argument("--no_ridge", action="store_true", help="skip the ridge baseline")
    e.add_argument("--no_distribution", action="store_true", help="skip Frechet distance and k-NN precision/recall")
    e.add_argument("--pca_dim", type=int, default=64, help="PCA dimension of the distribution metrics")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="model calls in fp32 or under bf16 autocast (default: the training run's)")
    e.add_argument("--no_progress", action="store_true", help="hide the progress bar")

    w = sub.add_parser("sweep", help="cosine (point estimate, single sample, mean of K) against sampling steps and guidance")
    w.add_argument("--checkpoint", required=True)
    w.add_argument("--chunked_embeddings_dir", required=True)
    w.add_argument("--output", required=True, help="JSON file; a PNG plot is written beside it")
    w.add_argument("--steps", default="1,2,4,10,25,50")
    w.add_argument("--guidance_scales", default="1", help="e.g. 1,1.5,2,3 (needs a model trained with --cond_dropout)")
    w.add_argument("--k", type=int, default=4, help="samples per condition for the mean-of-K cosine")
    w.add_argument("--num_samples", type=int, default=64)
    w.add_argument("--split", choices=("heldout", "all"), default="heldout")
    w.add_argument("--solver", default="", help="one or more of euler,heun,midpoint (default: the training run's)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--device", default="cpu")
    w.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: the training run's")

    g = sub.add_parser("generate", help="generate target embeddings for the conditions in a directory")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--chunked_embeddings_dir", required=True)
    g.add_argument("--output", required=True, help=".safetensors file: 'embeddings' [B, N, D], keys in the metadata")
    g.add_argument("--split", choices=("heldout", "all"), default="all")
    g.add_argument("--max_samples", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--num_steps", type=int, default=None)
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")

    x = sub.add_parser("extract", help="images -> paired patch embeddings of two encoders -> store or seed shards")
    x.add_argument("--images", required=True, help="a folder of images (recursive, optional .txt captions) or WebDataset .tar shards")
    x.add_argument("--output", required=True)
    x.add_argument("--target_model", required=True, help="the encoder whose tokens are generated (the seed's CLIP), hub name or directory")
    x.add_argument("--condition_model", required=True, help="the conditioning encoder (the seed's EVA-CLIP), hub name or directory")
    x.add_argument("--layer", type=int, default=-1, help="hidden layer to take tokens from (-1: the last)")
    x.add_argument("--training_mode", choices=("patch_only", "cls_patch"), default="patch_only")
    x.add_argument("--batch_size", type=int, default=32)
    x.add_argument("--num_workers", type=int, default=2, help="DataLoader workers decoding images")
    x.add_argument("--device", default="auto")
    x.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"), default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    x.add_argument("--format", choices=("store", "seed"), default="store")
    x.add_argument("--store_dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    x.add_argument("--shard_size", type=int, default=512, help="input images per shard")
    x.add_argument("--trust_remote_code", action="store_true", help="allow models that ship their own code (e.g. EVA-CLIP-8B)")
    x.add_argument("--max_images", type=int, default=0)
    x.add_argument("--no_progress", action="store_true")

    c = sub.add_parser("convert", help="convert seed .pkl shards into a streaming store")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    c.add_argument("--chunk", type=int, default=16, help="samples held in memory at once")
    c.add_argument("--max_shards", type=int, default=0)
    c.add_argument("--no_progress", action="store_true")
    c.add_argument("--ignore_manifest", action="store_true",
                   help="convert even when embeddings_manifest.json disagrees with the shards present")

    i = sub.add_parser("inspect", help="summarise a dataset directory and list shards that fail validation")
    i.add_argument("dir")
    i.add_argument("--check_values", action="store_true", help="read every value to find NaN/inf (slow on big data)")
    i.add_argument("--verify", action="store_true", help="recompute store checksums")
    i.add_argument("--json", action="store_true")

    m = sub.add_parser("make-synthetic", help="write synthetic seed-format shards with a known noise floor")
    m.add_argument("out")
    m.add_argument("--num_samples", type=int, default=256)
    m.add_argument("--eva_dim", type=int, default=4096)
    m.add_argument("--clip_dim", type=int, default=1024)
    m.add_argument("--tokens", type=int, default=256)
    m.add_argument("--num_shards", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--target_noise", type=float, default=0.25)

    d = sub.add_parser("demo", help="synthetic data -> train a tiny model -> held-out evaluation beside baselines -> plot")
    d.add_argument("--output_dir", default="demo_output")
    d.add_argument("--steps", type=int, default=1500, help="training steps (1500: about 2.5 minutes on 2 CPU cores)")
    d.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    return p


COMMANDS = {
    "train": cmd_train, "evaluate": cmd_evaluate, "sweep": cmd_sweep, "generate": cmd_generate, "extract": cmd_extract, "convert": cmd_convert,
    "inspect": cmd_inspect, "make-synthetic": cmd_make_synthetic, "demo": cmd_demo,
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault, not the program's: printed as one line, no traceback."""
    import yaml

    from .data.safe_pickle import UnsafePickleError
    from .train import TrainingError

    return (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
            UnsafePickleError, yaml.YAMLError, TrainingError)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error is one ``error: ...`` line on stderr and exit code 2 (with the
    traceback too under --debug_mode)."""
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        if getattr(ns, "debug_mode", False):
            import traceback

            traceback.print_exc()
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
