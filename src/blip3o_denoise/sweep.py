"""``blip3o-denoise sweep``: cosine against the number of sampling steps and the guidance scale.

For each (steps, guidance): the single-sample cosine, the cosine of the normalised mean of K
samples, and the point estimate (which does not depend on the number of steps). Writes JSON and
a PNG plot beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import sphere
from .evaluate import mean_of_k_cosine
from .sampling import generate, point_estimate


def sweep(model, batch: dict, prediction_type: str, steps_list, guidance_list, k: int = 4, solver: str = "euler",
          seed: int = 0) -> dict:
    target, cond = batch["target"], batch["condition"]
    gen = torch.Generator().manual_seed(seed)
    noise = sphere.normalize(torch.randn(target.shape, generator=gen))
    point = point_estimate(model, noise, cond, 1.0, prediction_type)
    point_cos = float((point * target).sum(-1).mean())
    rows = []
    for g in guidance_list:
        for n in steps_list:
            gen = torch.Generator().manual_seed(seed)  # same starting noise for every setting
            t0 = time.time()
            samples = torch.stack([generate(model, cond, prediction_type, n, solver, guidance=g, generator=gen) for _ in range(k)])
            rows.append({"steps": n, "guidance": g, "single": mean_of_k_cosine(samples, target, 1),
                         f"mean_of_{k}": mean_of_k_cosine(samples, target, k), "point_estimate": point_cos,
                         "seconds": round(time.time() - t0, 3)})
    return {"k": k, "solver": solver, "rows": rows}


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g in sorted({r["guidance"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["guidance"] == g]
        steps = [r["steps"] for r in rows]
        ax.plot(steps, [r["single"] for r in rows], "o-", label=f"single sample, w={g:g}")
        ax.plot(steps, [r[f"mean_of_{k}"] for r in rows], "s--", label=f"mean of {k}, w={g:g}")
    ax.axhline(result["rows"][0]["point_estimate"], color="gray", ls=":", label="point estimate")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("held-out cosine")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(ns) -> dict:
    from .cli import _load_eval_set
    from .pipeline import Denoiser

    started = time.time()
    den = Denoiser.from_pretrained(ns.checkpoint, device=ns.device)
    if den.max_noise_level < 1.0 - 1e-6:
        raise ValueError(f"{ns.checkpoint}: trained up to noise level {den.max_noise_level}; a generation sweep needs --max_noise_level 1.0")
    guidance = [float(g) for g in ns.guidance_scales.split(",")]
    if any(g != 1.0 for g in guidance) and den.model.cfg.cond_dropout == 0:
        raise ValueError("guidance scales other than 1 need a model trained with --cond_dropout > 0")
    ds = _load_eval_set(den.config, ns.chunked_embeddings_dir, ns.split, None, ns.num_samples)
    batch = ds.stack()
    with torch.inference_mode():
        result = sweep(den.model, {k: v.to(den.device) for k, v in batch.items() if k != "index"}, den.prediction_type,
                       [int(s) for s in ns.steps.split(",")], guidance, ns.k, ns.solver or den.solver, ns.seed)
    result["seconds"] = round(time.time() - started, 2)
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    png = out.with_suffix(".png")
    plot_sweep(result, png)
    key = f"mean_of_{result['k']}"
    for r in result["rows"]:
        print(f"steps {r['steps']:>3}  guidance {r['guidance']:<4g} single {r['single']:.4f}  mean of {result['k']} "
              f"{r[key]:.4f}  point {r['point_estimate']:.4f}")
    print(f"wrote {out} and {png} in {result['seconds']:.1f} s")
    return result
