"""Held-out quality on the real development benchmark, one training recipe per fresh process.

Build the benchmark once (real photos, MobileNetV2 patches -> YOLOv8n patches, 634 train / 158
eval samples, split by photo), then compare recipes under the same seed and step budget:

    sh ../shared/realdata/make.sh /tmp/rd
    python benchmarks/real_quality.py /tmp/rd                       # every recipe below
    python benchmarks/real_quality.py /tmp/rd --recipes default     # the defaults alone

Each recipe trains on DIR/train and is evaluated on every sample of DIR/eval: generation from
pure noise (single sample, normalised mean of 4, the point estimate read as a conditional mean
and as the older exp-map reading, dispersion ratio, Frechet distance and k-NN recall) beside the
ridge regression fitted on DIR/train. Prints one table; --output writes the JSON.
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
BASE = dict(task_mode="clip_denoising", model_size="tiny", min_noise_level=0.0, max_noise_level=1.0, batch_size=16,
            precision="bf16", eval_every_n_steps=0, save_every_n_steps=0, progress=False, log_every_n_steps=50)
RECIPES = {
    "default": {},
    "lr3e-4_uniform": dict(learning_rate=3e-4, warmup_steps=100, noise_schedule="uniform"),
    "lr1e-3_uniform": dict(learning_rate=1e-3, warmup_steps=50, noise_schedule="uniform"),
    "lr1e-3_lognorm1": dict(learning_rate=1e-3, warmup_steps=50, noise_schedule="logit_normal", logit_normal_mean=1.0),
    "lr1e-3_target": dict(learning_rate=1e-3, warmup_steps=50, prediction_type="target"),
    "w256d4_lr1e-3": dict(learning_rate=1e-3, warmup_steps=50, model_size="micro", hidden_size=256, depth=4,
                          num_heads=4, num_kv_heads=2),
}


def run_one(name: str, data: Path, steps: int, out: Path, eval_steps: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from blip3o_denoise.data.dataset import Embeddings, PairDataset
    from blip3o_denoise.evaluate import EvalConfig, evaluate, fit_baselines
    from blip3o_denoise.pipeline import Denoiser
    from blip3o_denoise.train import TrainConfig, train

    opts = {**BASE, **RECIPES[name], "chunked_embeddings_dir": str(data / "train"), "eval_dir": str(data / "eval"),
            "holdout_fraction": 0.0, "eval_samples": 16, "max_steps": steps, "output_dir": str(out / name)}
    cfg = TrainConfig(**opts)
    t0 = time.time()
    train(cfg)
    train_s = time.time() - t0
    den = Denoiser.from_pretrained(out / name)
    ev = Embeddings(str(data / "eval"))
    batch = PairDataset(ev, list(range(len(ev))), cfg.task_mode, cfg.training_mode).stack()
    tr = Embeddings(str(data / "train"))
    baselines = fit_baselines(PairDataset(tr, list(range(len(tr))), cfg.task_mode, cfg.training_mode))
    ecfg = EvalConfig(num_steps=eval_steps, sample_counts=(1, 4), noise_levels=(0.5,), precision=cfg.precision)
    t1 = time.time()
    res = evaluate(den.model, batch, den.prediction_type, cfg.task_mode, 0.0, 1.0, ecfg, baselines)
    g = res["generation"]
    ridge = g["baselines"]["ridge"]
    return {
        "recipe": name, "options": RECIPES[name], "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.time() - t1, 1), "eval_samples": res["num_images"],
        "point": g["point_estimate"]["cosine_mean"], "point_exp_map": g["point_estimate_exp_map"]["cosine_mean"],
        "mean_of_4": g["mean_of_k"]["4"], "single": g["model"]["cosine_mean"], "dispersion": g["dispersion_ratio"],
        "fd": g["distribution"]["frechet_distance"], "recall": g["distribution"]["recall"],
        "ridge": ridge["cosine_mean"], "ridge_fd": ridge["distribution"]["frechet_distance"],
        "ridge_recall": ridge["distribution"]["recall"],
        "denoise_0.5_point": res["denoising"]["0.5"]["point_estimate"]["cosine_mean"],
        "denoise_0.5_identity": res["denoising"]["0.5"]["baselines"]["identity"]["cosine_mean"],
    }


def table(rows: list[dict]) -> str:
    head = (f"{'recipe':<20}{'train s':>8}{'point':>8}{'(exp)':>8}{'mean4':>8}{'single':>8}{'disp':>7}"
            f"{'FD':>8}{'recall':>8}{'ridge':>8}{'r.FD':>8}{'r.rec':>7}")
    lines = [head]
    for r in rows:
        disp = f"{r['dispersion']:.2f}" if r["dispersion"] is not None else "n/a"
        lines.append(f"{r['recipe']:<20}{r['train_seconds']:>8.0f}{r['point']:>8.4f}{r['point_exp_map']:>8.4f}"
                     f"{r['mean_of_4']:>8.4f}{r['single']:>8.4f}{disp:>7}{r['fd']:>8.4f}{r['recall']:>8.3f}"
                     f"{r['ridge']:>8.4f}{r['ridge_fd']:>8.4f}{r['ridge_recall']:>7.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="the directory make.sh wrote (train/, eval/)")
    ap.add_argument("--recipes", default="all", help=f"comma-separated, from: {', '.join(RECIPES)}")
    ap.add_argument("--steps", type=int, default=400, help="training steps per recipe")
    ap.add_argument("--eval_steps", type=int, default=20, help="sampling steps in the evaluation")
    ap.add_argument("--output", default="", help="write the rows as JSON here")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one recipe in this process
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "eval").is_dir():
        sys.exit(f"{data}: expected train/ and eval/ (run sh ../shared/realdata/make.sh {data})")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="real_quality_"))
    if args.one:
        row = run_one(args.one, data, args.steps, work, args.eval_steps)
        print("ROW " + json.dumps(row))
        return
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"--recipes: unknown {unknown}; known: {', '.join(RECIPES)}")
    rows = []
    for name in names:  # one fresh process per recipe
        cmd = [sys.executable, __file__, str(data), "--one", name, "--steps", str(args.steps),
               "--eval_steps", str(args.eval_steps), "--workdir", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode != 0 or not found:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(found[-1][4:]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nreal development benchmark, {args.steps} steps per recipe, batch {BASE['batch_size']}, "
          f"{args.eval_steps} sampling steps, all {rows[0]['eval_samples'] if rows else 0} eval samples")
    print(table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
