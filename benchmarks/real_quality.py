"""Held-out quality on the real development benchmark, one training recipe per fresh process.

Build the benchmark once (real photos, MobileNetV2 patches -> YOLOv8n patches, 634 train / 158
eval samples, split by photo), then compare recipes under the same seed and step budget:

    sh ../shared/realdata/make.sh /tmp/rd
    python benchmarks/real_quality.py /tmp/rd                       # every recipe below
    python benchmarks/real_quality.py /tmp/rd --recipes default     # the defaults alone

Each recipe trains on DIR/train. The point estimate from pure noise (read as a conditional mean,
and as the older exp-map reading) is scored on every sample of DIR/eval beside the ridge
regression fitted on DIR/train; the sampler (single sample, normalised mean of 4, dispersion
ratio, Frechet distance and k-NN recall, ridge's FD and recall beside) on the first
--sample_eval samples. Prints one table; --output writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each recipe: TrainConfig fields over BASE. "default" is TrainConfig's own defaults (plus the
# benchmark's data, budget and noise range up to 1 for generation).
BASE = dict(task_mode="clip_denoising", min_noise_level=0.0, max_noise_level=1.0, batch_size=16,
            precision="bf16", num_inference_steps=10, eval_every_n_steps=0, save_every_n_steps=0, progress=False,
            log_every_n_steps=50)
TINY = dict(model_size="tiny")
MINI = dict(model_size="mini")  # hidden 256, 4 blocks, 4 heads, 2 kv heads
# "default": TrainConfig's own defaults (learning rate, warmup, noise law and shift, prediction type,
# path) with the mini preset; the others set what they compare explicitly.
RECIPES = {
    "default": dict(model_size="mini"),
    "lr3e-4_uniform": dict(**TINY, learning_rate=3e-4, warmup_steps=100, noise_schedule="uniform", time_shift=1.0),
    "lr1e-3_uniform": dict(**TINY, learning_rate=1e-3, warmup_steps=50, noise_schedule="uniform", time_shift=1.0),
    "lr1e-3_shift3": dict(**TINY, learning_rate=1e-3, warmup_steps=50, noise_schedule="uniform", time_shift=3.0),
    "mini_lr1e-3": dict(learning_rate=1e-3, warmup_steps=50, noise_schedule="uniform", time_shift=1.0, **MINI),
    "mini_shift3": dict(learning_rate=1e-3, warmup_steps=50, noise_schedule="uniform", time_shift=3.0, **MINI),
    "euclidean": dict(path="euclidean", **MINI),
    "mini_shift3_target": dict(learning_rate=1e-3, warmup_steps=50, noise_schedule="uniform", time_shift=3.0,
                               prediction_type="target", **MINI),
    # one change each against "default" (mini, the defaults)
    "logit_normal": dict(noise_schedule="logit_normal", **MINI),
    "logit_normal_m0.5": dict(noise_schedule="logit_normal", logit_normal_mean=0.5, time_shift=1.0, **MINI),
    "cross_attention": dict(conditioning="cross_attention", **MINI),
    "both": dict(conditioning="both", **MINI),
    "warmup0": dict(warmup_steps=0, **MINI),
    "ema_off": dict(ema_decay=0.0, **MINI),
    "weight_decay0.1": dict(weight_decay=0.1, **MINI),
    "cond_dropout0.1": dict(cond_dropout=0.1, **MINI),
    # Tokens wider than the model (issue 23; the wide benchmark DIR/wide: 1280-wide targets): widths
    # below and above the token width, depth cut to keep the cost near mini's, and the wide head.
    "w512_d2": dict(model_size="mini", hidden_size=512, depth=2, num_heads=8, num_kv_heads=2),
    "w1536_d1": dict(model_size="mini", hidden_size=1536, depth=1, num_heads=24, num_kv_heads=4),
    "mini_head1280": dict(head_width=1280, head_depth=1, **MINI),
    # the seed's widths on synthetic data (1024-wide targets)
    "w1280_d1": dict(model_size="mini", hidden_size=1280, depth=1, num_heads=20, num_kv_heads=4),
    "mini_head1024": dict(head_width=1024, head_depth=1, **MINI),
    # the noise shift: a constant against sqrt(N * D / 4096) from the data (default: 3)
    "shift_auto": dict(time_shift=0.0, **MINI),  # 0.0 is "auto" (config.AUTO)
    "shift1": dict(time_shift=1.0, **MINI),
}


def recipe_options(name: str, data: Path, steps: int, out: Path, warmup: int | None) -> dict:
    opts = {**BASE, **RECIPES[name], "chunked_embeddings_dir": str(data / "train"), "eval_dir": str(data / "eval"),
            "holdout_fraction": 0.0, "eval_samples": 8, "max_steps": steps, "output_dir": str(out / name)}
    if warmup is not None:
        opts["warmup_steps"] = warmup
    return opts


def time_steps(name: str, data: Path, out: Path, steps: int = 10, skip: int = 3) -> float:
    """CPU seconds per training step of a recipe (the mean of ``steps - skip`` steps after ``skip`` warm-up
    ones), divided by the threads: the wall time of a step on a machine of its own. CPU time, because on
    a shared machine wall time measures the neighbours as much as the recipe."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from contextlib import nullcontext

    from blip3o_denoise.train import (Position, TrainConfig, build, clip_gradients, epoch_steps, forward_backward,
                                      optimizer_step)

    cfg = TrainConfig(**{**recipe_options(name, data, steps, out / "timing", None), "skip_value_check": True})
    run = build(cfg)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    run.model.train()
    pos, stamps = Position(), []
    while len(stamps) < steps + 1:
        for batches in epoch_steps(run, pos):
            stamps.append(time.process_time())
            forward_backward(run, run.model, batches, pos.epoch, autocast)
            clip_gradients(run)
            optimizer_step(run)
            if len(stamps) == steps + 1:
                break
        pos.epoch += 1
    return (stamps[-1] - stamps[skip]) / (steps - skip) / torch.get_num_threads()


def run_one(name: str, data: Path, steps: int, out: Path, eval_steps: int, sample_eval: int,
            reuse: bool = False, warmup: int | None = None) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from blip3o_denoise.data.dataset import Embeddings, PairDataset
    from blip3o_denoise.evaluate import EvalConfig, evaluate, fit_baselines
    from blip3o_denoise.pipeline import Denoiser
    from blip3o_denoise.train import TrainConfig, train

    cfg = TrainConfig(**recipe_options(name, data, steps, out, warmup))
    done = out / name / "train_seconds.txt"
    if reuse and done.exists():  # evaluate an earlier run of this recipe again
        train_s = float(done.read_text())
    else:
        t0 = time.time()
        train(cfg)
        train_s = time.time() - t0
        done.write_text(f"{train_s:.1f}")
    den = Denoiser.from_pretrained(out / name)
    ev = Embeddings(str(data / "eval"))
    batch = PairDataset(ev, list(range(len(ev))), cfg.task_mode, cfg.training_mode).stack()
    tr = Embeddings(str(data / "train"))
    baselines = fit_baselines(PairDataset(tr, list(range(len(tr))), cfg.task_mode, cfg.training_mode))
    # The point estimate (one model call per sample) on every eval sample; the sampler's numbers
    # (K samples, an ODE each) on the first --sample_eval samples, beside ridge on the same ones.
    from blip3o_denoise.sampling import point_estimate

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch["target"].shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        pts = {rule: torch.cat([point_estimate(den.model, noise[i:i + 32], batch["condition"][i:i + 32], 1.0,
                                               den.prediction_type, rule=rule, path=den.path).float()
                                for i in range(0, len(noise), 32)]) for rule in ("posterior_mean", "exp_map")}
    cos = {rule: float((p * batch["target"]).sum(-1).mean()) for rule, p in pts.items()}
    ridge_all = float((baselines.ridge.predict(batch["condition"]) * batch["target"]).sum(-1).mean())
    sub = {k: v[:sample_eval] for k, v in batch.items()}
    ecfg = EvalConfig(num_steps=eval_steps, sample_counts=(1, 4), noise_levels=(), precision=cfg.precision,
                      path=den.path)
    t1 = time.time()
    res = evaluate(den.model, sub, den.prediction_type, cfg.task_mode, 0.0, 1.0, ecfg, baselines)
    g = res["generation"]
    ridge = g["baselines"]["ridge"]
    return {
        "recipe": name, "options": RECIPES[name], "train_seconds": round(train_s, 1), "steps": steps,
        "warmup_steps": cfg.warmup_steps, "time_shift": cfg.time_shift,
        "eval_seconds": round(time.time() - t1, 1), "eval_samples": len(noise), "sample_eval": res["num_images"],
        "point": cos["posterior_mean"], "point_exp_map": cos["exp_map"], "ridge": ridge_all,
        "point_sub": g["point_estimate"]["cosine_mean"],
        "mean_of_4": g["mean_of_k"]["4"], "single": g["model"]["cosine_mean"], "dispersion": g["dispersion_ratio"],
        "fd": g["distribution"]["frechet_distance"], "recall": g["distribution"]["recall"],
        "ridge_sub": ridge["cosine_mean"], "ridge_fd": ridge["distribution"]["frechet_distance"],
        "ridge_recall": ridge["distribution"]["recall"],
    }


def table(rows: list[dict]) -> str:
    head = (f"{'recipe':<20}{'steps':>6}{'train s':>8}{'point':>8}{'(exp)':>8}{'ridge':>8}{'mean4':>8}{'single':>8}"
            f"{'disp':>7}{'FD':>8}{'recall':>8}{'r.FD':>8}{'r.rec':>7}")
    lines = [head]
    for r in rows:
        disp = f"{r['dispersion']:.2f}" if r["dispersion"] is not None else "n/a"
        lines.append(f"{r['recipe']:<20}{r.get('steps', 0):>6}{r['train_seconds']:>8.0f}{r['point']:>8.4f}"
                     f"{r['point_exp_map']:>8.4f}{r['ridge']:>8.4f}{r['mean_of_4']:>8.4f}{r['single']:>8.4f}{disp:>7}{r['fd']:>8.4f}"
                     f"{r['recall']:>8.3f}{r['ridge_fd']:>8.4f}{r['ridge_recall']:>7.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="the directory make.sh wrote (train/, eval/)")
    ap.add_argument("--recipes", default="all", help=f"comma-separated, from: {', '.join(RECIPES)}")
    ap.add_argument("--steps", type=int, default=400, help="training steps per recipe")
    ap.add_argument("--eval_steps", type=int, default=10, help="sampling steps in the evaluation")
    ap.add_argument("--sample_eval", type=int, default=64, help="eval samples for the sampler's metrics")
    ap.add_argument("--output", default="", help="write the rows as JSON here")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--reuse", action="store_true", help="evaluate runs already trained in --workdir again")
    ap.add_argument("--budget_seconds", type=float, default=0,
                    help="equal training cost: time each recipe's steps (CPU seconds / threads), then give it the "
                         "steps that fill this many seconds (overrides --steps; warmup = min(100, steps / 5))")
    ap.add_argument("--step_seconds", default="",
                    help="with --budget_seconds: seconds per step measured earlier, as name=seconds,... (those "
                         "recipes are not timed again); --time_only prints them for a list of recipes")
    ap.add_argument("--warmup_steps", type=int, default=None, help="override every recipe's warmup")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one recipe in this process
    ap.add_argument("--time_only", action="store_true", help="only time each recipe's steps, one after another")
    ap.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "eval").is_dir():
        sys.exit(f"{data}: expected train/ and eval/ (run sh ../shared/realdata/make.sh {data})")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="real_quality_"))
    if args.one and args.time_only:
        print(f"STEP_SECONDS {time_steps(args.one, data, work)}")
        return
    if args.one:
        row = run_one(args.one, data, args.steps, work, args.eval_steps, args.sample_eval, args.reuse, args.warmup)
        print("ROW " + json.dumps(row))
        return
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"--recipes: unknown {unknown}; known: {', '.join(RECIPES)}")
    warm = [] if args.warmup_steps is None else ["--warmup", str(args.warmup_steps)]
    rows, steps, warmup = [], {n: args.steps for n in names}, {n: warm for n in names}
    step_s = {k: float(v) for k, v in (kv.split("=") for kv in args.step_seconds.split(",") if kv)}
    if args.budget_seconds or args.time_only:  # every recipe timed alone, one after another, before any trains
        for name in names:
            if name in step_s:
                continue
            proc = subprocess.run([sys.executable, __file__, str(data), "--one", name, "--time_only", "--workdir",
                                   str(work)], capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("STEP_SECONDS ")]
            if proc.returncode != 0 or not found:
                sys.exit(f"{name}: timing failed\n{proc.stderr[-2000:]}")
            step_s[name] = float(found[-1].split()[1])
            print(f"{name}: {step_s[name]:.3f} s/step alone", flush=True)
        if args.time_only:
            print("--step_seconds " + ",".join(f"{n}={step_s[n]:.3f}" for n in names))
            return
        for name in names:
            steps[name] = max(10, round(args.budget_seconds / step_s[name]))
            warmup[name] = ["--warmup", str(min(100, steps[name] // 5))]
            print(f"{name}: {step_s[name]:.3f} s/step -> {steps[name]} steps in {args.budget_seconds:.0f} s",
                  flush=True)
    for name in names:  # one fresh process per recipe
        cmd = [sys.executable, __file__, str(data), "--one", name, "--steps", str(steps[name]),
               "--eval_steps", str(args.eval_steps), "--sample_eval", str(args.sample_eval),
               "--workdir", str(work)] + (["--reuse"] if args.reuse else []) + warmup[name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode != 0 or not found:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append({**json.loads(found[-1][4:]), "step_seconds": step_s.get(name)})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    budget = (f"an equal budget of {args.budget_seconds:.0f} s of training per recipe (steps = budget / seconds per "
              "step timed alone)" if args.budget_seconds else f"{args.steps} steps per recipe")
    print(f"\nreal development benchmark, {budget}, batch {BASE['batch_size']}; point estimate "
          f"and ridge on all {rows[0]['eval_samples'] if rows else 0} eval samples, the sampler ({args.eval_steps} "
          f"steps) and its ridge columns on the first {args.sample_eval}")
    print(table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
