"""Few-call sampling: a flow-map model at 1, 2, 4, 8 calls beside an ordinary model at 10 and 50 steps.

Both runs are trained beforehand with `blip3o-denoise train` (docs/real-data.md, "Fast sampling", shows the
commands); this script scores them on the same held-out samples, with the same seed and noise:

    python benchmarks/flowmap_quality.py --eval_dir /tmp/rd/eval --train_dir /tmp/rd/train \\
        --ordinary runs/ordinary --flow_map runs/flowmap [--flow_map runs/finetuned ...]

Per row: Frechet distance, k-NN precision and recall of single samples (in the PCA basis fitted on
the training split), forward retrieval top-1 of single samples among all evaluation samples, the
single-sample cosine, and the point estimate (one call at t = 0, the same for every row of a model).
Ridge's numbers are printed beside. --step_time adds the training cost: mean seconds per
optimizer step of each run's own settings (forward, flow-map targets, backward, AdamW), measured
here over 20 batches drawn as in training, and the expected model calls per sample and step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch


def score(den, batch, baselines, solver, steps, seed=0, batch_rows=32, guidance=1.0):
    from blip3o_denoise.distribution import distribution_metrics
    from blip3o_denoise.evaluate import mean_of_k_cosine
    from blip3o_denoise.retrieval import evaluate_retrieval
    from blip3o_denoise.sampling import generate

    target, cond = batch["target"], batch["condition"]
    gen = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if den.config["train"]["precision"] == "bf16" \
        else nullcontext()
    t0 = time.time()
    parts = []
    for i in range(0, len(cond), batch_rows):
        with autocast:
            parts.append(generate(den.model, cond[i:i + batch_rows], den.prediction_type, steps, solver,
                                  guidance=guidance, generator=gen, min_noise_level=den.min_noise_level,
                                  path=den.path).float())
    x = torch.cat(parts)
    seconds = time.time() - t0
    d = distribution_metrics(x, target, baselines.pca, seed=seed)
    r = evaluate_retrieval({"x": x}, target, seed=seed)["predictors"]["x"]
    return {"solver": solver, "steps": steps, "guidance": guidance, "fd": d["frechet_distance"],
            "precision": d["precision"],
            "recall": d["recall"], "top1": r["forward"]["top1"]["mean"], "top1_backward": r["backward"]["top1"]["mean"],
            "single": mean_of_k_cosine(x[None], target, 1), "seconds": round(seconds, 1)}


def point(den, batch, seed=0):
    from blip3o_denoise.retrieval import evaluate_retrieval
    from blip3o_denoise.sampling import point_estimate

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch["target"].shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=den.config["train"]["precision"] == "bf16"):
        p = torch.cat([point_estimate(den.model, noise[i:i + 32], batch["condition"][i:i + 32], 1.0,
                                      den.prediction_type, path=den.path).float() for i in range(0, len(noise), 32)])
    top1 = evaluate_retrieval({"p": p}, batch["target"])["predictors"]["p"]["forward"]["top1"]["mean"]
    return float((p * batch["target"]).sum(-1).mean()), top1


def step_time(run_dir, repeats=20):
    """Mean seconds per optimizer step with the run's own options, over ``repeats`` different batches drawn as the
    training loader draws them (after 3 warm-up steps): the share of jump samples varies from batch to batch as
    in training, so the mean is the cost of a training step. Also the expected model calls per sample and step."""
    from blip3o_denoise.data.noise import NoiseCollate
    from blip3o_denoise.flowmap import dyadic_steps
    from blip3o_denoise.train import TrainConfig, build, forward_backward, optimizer_step

    saved = json.loads(open(f"{run_dir}/final/config.json").read())["train"]
    import tempfile

    cfg = TrainConfig(**{**saved, "output_dir": tempfile.mkdtemp(prefix="flowmap_step_time_"), "init_from": "",
                         "progress": False})
    run = build(cfg)
    collate = NoiseCollate(cfg.flow_config(), cfg.seed, cfg.cond_dropout, flow_map_share=cfg.flow_map_share,
                           flow_map_min_step=cfg.flow_map_min_step,
                           guidance_scales=cfg.guidance_scales())  # as the training loader draws them
    n, b = len(run.train_set), cfg.batch_size
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    times = []
    for i in range(repeats + 3):
        batch = collate([run.train_set[(i * b + k) % n] for k in range(b)])
        t0 = time.perf_counter()
        forward_backward(run, run.model, [batch], i, autocast)
        optimizer_step(run)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    # a forward-backward per sample; per jump sample two no-grad calls (self-consistency) or the teacher's
    # 2 * --distill_steps (distillation), and with --flow_map_start jumps the k = t / 2d jumps that reach its
    # start time (k uniform on 0 .. 1/2d - 1, for each jump size)
    guided = cfg.distill_guidance != 1.0 or bool(cfg.distill_guidance_scales)  # the teacher's null-condition calls
    per_jump = 2 * cfg.distill_steps * (2 if guided else 1) if cfg.distill_from else 2
    if cfg.flow_map_share > 0 and cfg.flow_map_start == "jumps":
        sizes = dyadic_steps(cfg.flow_map_min_step)
        per_jump += sum((round(1 / s) - 1) / 2 for s in sizes) / len(sizes)
    return statistics.mean(times), 1 + cfg.flow_map_share * per_jump


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval_dir", required=True)
    ap.add_argument("--train_dir", required=True)
    ap.add_argument("--ordinary", required=True, help="a run trained without flow maps")
    ap.add_argument("--flow_map", action="append", default=[], help="a flow-map run (repeatable)")
    ap.add_argument("--calls", default="1,2,4,8")
    ap.add_argument("--ordinary_steps", default="10,50")
    ap.add_argument("--ordinary_guidance", default="1", help="guidance scales of the ordinary rows (e.g. 1,2; each "
                    "costs two calls per step; the ordinary run must be trained with --cond_dropout > 0)")
    ap.add_argument("--flow_map_guidance", default="1", help="guidance scales of the flow-map rows (a model "
                    "distilled with --distill_guidance_scales takes the scale as an input: one call per jump)")
    ap.add_argument("--num_samples", type=int, default=0, help="evaluation samples (0 = all)")
    ap.add_argument("--step_time", action="store_true")
    ap.add_argument("--output", default="")
    ns = ap.parse_args()
    torch.manual_seed(0)
    from blip3o_denoise.data.dataset import Embeddings, PairDataset
    from blip3o_denoise.evaluate import fit_baselines
    from blip3o_denoise.pipeline import Denoiser
    from blip3o_denoise.retrieval import evaluate_retrieval

    ev, tr = Embeddings(ns.eval_dir), Embeddings(ns.train_dir)
    n = len(ev) if ns.num_samples <= 0 else min(ns.num_samples, len(ev))
    batch = PairDataset(ev, list(range(n)), "clip_denoising", "patch_only").stack()
    baselines = fit_baselines(PairDataset(tr, list(range(len(tr))), "clip_denoising", "patch_only"))
    ridge = baselines.ridge.predict(batch["condition"])
    from blip3o_denoise.distribution import distribution_metrics

    rd = distribution_metrics(ridge, batch["target"], baselines.pca)
    rr = evaluate_retrieval({"r": ridge}, batch["target"])["predictors"]["r"]["forward"]["top1"]["mean"]
    rows = []
    scales = [float(g) for g in ns.ordinary_guidance.split(",")]
    runs = [(ns.ordinary, "euler", [(int(s), g) for g in scales for s in ns.ordinary_steps.split(",")])]
    fm_scales = [float(g) for g in ns.flow_map_guidance.split(",")]
    runs += [(r, "jump", [(int(c), g) for g in fm_scales for c in ns.calls.split(",")]) for r in ns.flow_map]
    for run, solver, counts in runs:
        den = Denoiser.from_pretrained(run)
        pe, pe_top1 = point(den, batch)
        cost = step_time(run) if ns.step_time else (None, None)
        for c, g in counts:
            row = {"run": run, **score(den, batch, baselines, solver, c, guidance=g), "point": pe,
                   "point_top1": pe_top1, "step_seconds": cost[0], "calls_per_train_step": cost[1]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{n} evaluation samples; ridge: FD {rd['frechet_distance']:.4f} precision {rd['precision']:.3f} "
          f"recall {rd['recall']:.3f} top-1 {rr:.3f} cosine "
          f"{float((ridge * batch['target']).sum(-1).mean()):.4f}")
    print(f"{'run':<28}{'solver':>7}{'steps':>6}{'guid.':>6}{'FD':>8}{'prec.':>7}{'recall':>7}{'top-1':>7}{'single':>8}"
          f"{'point':>8}{'step s':>8}")
    for r in rows:
        step = "" if r["step_seconds"] is None else f"{r['step_seconds']:.3f}"
        print(f"{r['run'][-28:]:<28}{r['solver']:>7}{r['steps']:>6}{r['guidance']:>6g}{r['fd']:>8.4f}{r['precision']:>7.3f}"
              f"{r['recall']:>7.3f}{r['top1']:>7.3f}{r['single']:>8.4f}{r['point']:>8.4f}{step:>8}")
    if ns.output:
        with open(ns.output, "w") as f:
            json.dump({"rows": rows, "ridge": {**rd, "top1": rr}, "num_samples": n}, f, indent=2)


if __name__ == "__main__":
    main()
