"""Evaluation time for held-out samples at the tiny preset: the earlier way against `evaluate` today.

Earlier: the K samples of a condition generated one pass after another, in fp32 (what the
evaluation did before batching). Today: `evaluate()` with the K samples of a condition in one
batched call, under bf16 autocast. Equal settings: the same samples, K, steps, noise levels,
widths and model (random weights: only the time means anything). One configuration per fresh
process, one warm-up call, median of --repeats.

    python benchmarks/eval_speed.py                   # 96 samples, N = 256, 256 <- 1280 (the dev benchmark)
    python benchmarks/eval_speed.py --steps 25 --k 8  # the issue's setting (slow on a CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def build(args):
    import torch

    from blip3o_denoise.model import UniversalDiT, config_from_preset

    torch.manual_seed(0)
    model = UniversalDiT(config_from_preset("tiny", args.target_dim, args.cond_dim)).eval()
    g = torch.Generator().manual_seed(1)
    from blip3o_denoise import sphere

    batch = {"target": sphere.normalize(torch.randn(args.samples, args.tokens, args.target_dim, generator=g)),
             "condition": torch.randn(args.samples, args.tokens, args.cond_dim, generator=g)}
    return model, batch


def earlier(model, batch, args):
    """The evaluation loop as it was: K sequential passes, fp32, 64 rows per call."""
    import torch

    from blip3o_denoise import sphere
    from blip3o_denoise.sampling import generate, noise_to_level, point_estimate

    target, cond = batch["target"], batch["condition"]
    gen = torch.Generator().manual_seed(0)

    def chunked(fn, *ts):
        return torch.cat([fn(*(t[i:i + 64] for t in ts)) for i in range(0, ts[0].shape[0], 64)])

    with torch.no_grad():
        for _ in range(args.k):
            chunked(lambda c: generate(model, c, "velocity", args.steps, generator=gen), cond)
        noise = sphere.normalize(torch.randn(target.shape, generator=gen))
        chunked(lambda x, c: point_estimate(model, x, c, 1.0, "velocity"), noise, cond)
        for s in args.levels:
            noisy = noise_to_level(target, s, gen)
            chunked(lambda x, c: generate(model, c, "velocity", args.steps, noise_level=s, x_start=x), noisy, cond)
            chunked(lambda x, c: point_estimate(model, x, c, s, "velocity"), noisy, cond)


def today(model, batch, args):
    from blip3o_denoise.evaluate import EvalConfig, evaluate

    ks = tuple(k for k in (1, 2, 4, 8) if k <= args.k)
    cfg = EvalConfig(num_steps=args.steps, noise_levels=tuple(args.levels), sample_counts=ks, distribution=False,
                     precision=args.precision)
    evaluate(model, batch, "velocity", "clip_denoising", 0.0, 1.0, cfg)


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, batch = build(args)
    fn = earlier if args.mode == "earlier" else today
    small = {k: v[:4] for k, v in batch.items()}
    fn(model, small, args)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn(model, batch, args)
        times.append(time.perf_counter() - t0)
    return {"mode": args.mode, "precision": args.precision if args.mode == "today" else "fp32",
            "seconds": statistics.median(times), "runs": times}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--target_dim", type=int, default=256)
    ap.add_argument("--cond_dim", type=int, default=1280)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args)))
        return
    results = []
    for mode in ("earlier", "today"):
        cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    a, b = results
    print(f"evaluate {args.samples} samples, tiny preset, N = {args.tokens}, {args.target_dim} <- {args.cond_dim}, "
          f"{args.steps} steps, K up to {args.k}, levels {args.levels}, {args.threads} threads")
    print(f"  earlier (K sequential passes, fp32): {a['seconds']:.1f} s")
    print(f"  today (K batched, {b['precision']}):            {b['seconds']:.1f} s   "
          f"speed-up {a['seconds'] / b['seconds']:.2f}x")


if __name__ == "__main__":
    main()
