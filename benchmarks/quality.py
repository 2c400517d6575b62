"""Held-out quality under a fixed training budget, beside fitted baselines.

Writes a synthetic dataset (seed format; default: 800 samples, N = 64, EVA width 1024, CLIP width
512, target noise 0.25 so the best possible point estimate scores 0.970), trains a small model for
--steps steps, and prints held-out generation cosine (single sample, mean of K, point estimate)
and distribution metrics beside the mean direction, the per-position mean and a ridge regression
fitted on the training split, plus denoising against the identity baseline.

    python benchmarks/quality.py --steps 1500
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=800)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--eva_dim", type=int, default=1024)
    ap.add_argument("--clip_dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--prediction_type", default="velocity")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.evaluate import format_results
    from blip3o_denoise.train import TrainConfig, train

    root = Path(args.out or tempfile.mkdtemp(prefix="quality_"))
    spec = SyntheticSpec(num_samples=args.samples, eva_dim=args.eva_dim, clip_dim=args.clip_dim, tokens=args.tokens,
                         num_shards=2)
    make_synthetic(root / "data", spec)
    cfg = TrainConfig(
        task_mode="clip_denoising", chunked_embeddings_dir=str(root / "data"), output_dir=str(root / "run"),
        model_size="micro", hidden_size=args.hidden, depth=args.depth, num_heads=4, num_kv_heads=2, batch_size=32,
        learning_rate=1e-3, warmup_steps=50, min_noise_level=0.0, max_noise_level=1.0, max_steps=args.steps,
        eval_every_n_steps=0, save_every_n_steps=0, num_inference_steps=20, holdout_fraction=0.1, eval_samples=64,
        precision="bf16", ema_decay=0.995, prediction_type=args.prediction_type, progress=False,
    )
    started = time.time()
    res = train(cfg)
    elapsed = time.time() - started
    g = res["generation"]
    print(f"\n{args.samples} samples, N={args.tokens}, EVA {args.eva_dim} -> CLIP {args.clip_dim}, "
          f"hidden {args.hidden} x {args.depth} blocks, {args.steps} steps, {elapsed:.0f} s (training + evaluation); "
          f"best possible point cosine {spec.best_point_cosine:.3f}")
    print(f"{'held-out generation':<34}{'cosine':>8}{'Frechet':>10}{'recall':>8}")
    rows = [("model, single sample", g["model"]["cosine_mean"], g.get("distribution")),
            ("model, mean of 4", g["mean_of_k"]["4"], None),
            ("model, point estimate", g["point_estimate"]["cosine_mean"], None),
            ("ridge regression (fitted)", g["baselines"]["ridge"]["cosine_mean"],
             g["baselines"]["ridge"].get("distribution")),
            ("per-position mean", g["baselines"]["per_position_mean"]["cosine_mean"], None),
            ("mean direction", g["baselines"]["mean_direction"]["cosine_mean"], None)]
    for name, cos, dist in rows:
        extra = f"{dist['frechet_distance']:>10.4f}{dist['recall']:>8.3f}" if dist else ""
        print(f"{name:<34}{cos:>8.4f}{extra}")
    print(f"dispersion ratio {g['dispersion_ratio']:.3f}")
    print(format_results(res))
    (root / "quality.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
