"""``blip3o-denoise sweep``: cosine against the number of sampling steps and the guidance scale.

For each (steps, guidance): the single-sample cosine, the cosine of the normalised mean of K
samples, the point estimate (which does not depend on the number of steps), and forward /
backward retrieval top-1 of single samples among the swept targets. Writes JSON and a PNG plot
beside it.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import sphere
from .checks import write_atomically
from .distribution import distribution_metrics
from .evaluate import fit_baselines, mean_of_k_cosine
from .retrieval import evaluate_retrieval
from .sampling import generate, model_calls, point_estimate


def sweep(model, batch: dict, prediction_type: str, steps_list, guidance_list, k: int = 4, solvers=("euler",),
          seed: int = 0, pca=None, precision: str = "fp32", batch_size: int = 64, path: str = "sphere",
          min_noise_level: float = 0.0) -> dict:
    """For each (solver, guidance, steps): single-sample and mean-of-K cosine, and, with a PCA basis,
    the distribution of single samples against the targets (Frechet distance, k-NN precision and
    recall). Every setting starts from the same noise; the K samples of a condition run in one call."""
    target, cond = batch["target"], batch["condition"]
    autocast = torch.autocast(cond.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    gen = torch.Generator().manual_seed(seed)
    noise = sphere.normalize(torch.randn(target.shape, generator=gen)).to(cond.device)
    with autocast:
        point = point_estimate(model, noise, cond, 1.0, prediction_type, path=path).float()
    point_cos = float((point * target).sum(-1).mean())
    point_top1 = evaluate_retrieval({"p": point}, target, seed=seed)["predictors"]["p"]["forward"]["top1"]["mean"]
    rows_per_call = max(1, batch_size // k)
    rows = []
    for solver in solvers:
        for g in guidance_list:
            for n in steps_list:
                gen = torch.Generator().manual_seed(seed)  # same starting noise for every setting
                t0 = time.time()
                parts = []
                for i in range(0, cond.shape[0], rows_per_call):
                    c = cond[i:i + rows_per_call]
                    with autocast:
                        x = generate(model, c.repeat(k, 1, 1), prediction_type, n, solver, guidance=g, generator=gen,
                                     min_noise_level=min_noise_level, path=path)
                    parts.append(x.float().reshape(k, c.shape[0], *x.shape[1:]))
                samples = torch.cat(parts, 1)
                doubled = g != 1.0 and not getattr(model.cfg, "guidance_input", False)  # else g is an input
                row = {"steps": n, "calls": model_calls(solver, n) * (2 if doubled else 1), "solver": solver,
                       "guidance": g, "single": mean_of_k_cosine(samples, target, 1),
                       f"mean_of_{k}": mean_of_k_cosine(samples, target, k), "point_estimate": point_cos,
                       "seconds": round(time.time() - t0, 3)}
                r = evaluate_retrieval({"single": samples[0]}, target, seed=seed)["predictors"]["single"]
                row.update(top1_forward=r["forward"]["top1"]["mean"], top1_backward=r["backward"]["top1"]["mean"],
                           point_top1_forward=point_top1)
                if pca is not None:
                    d = distribution_metrics(samples[0], target, pca, seed=seed)
                    row.update(frechet_distance=d["frechet_distance"], precision=d["precision"], recall=d["recall"])
                rows.append(row)
    return {"k": k, "solvers": list(solvers), "rows": rows}


def steps_to_match(rows: list[dict], tolerance: float = 0.1) -> dict:
    """Per (solver, guidance): the fewest steps whose Frechet distance is within ``tolerance`` (relative)
    of the one at the most steps."""
    out = {}
    for key in sorted({(r["solver"], r["guidance"]) for r in rows}):
        rs = sorted((r for r in rows if (r["solver"], r["guidance"]) == key and "frechet_distance" in r),
                    key=lambda r: r["steps"])
        if not rs:
            continue
        ref = rs[-1]["frechet_distance"]
        out[f"{key[0]}, w={key[1]:g}"] = next(r["steps"] for r in rs if r["frechet_distance"] <= ref * (1 + tolerance))
    return out


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for solver, g in sorted({(r["solver"], r["guidance"]) for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["guidance"] == g and r["solver"] == solver]
        steps = [r["calls"] for r in rows]
        ax.plot(steps, [r["single"] for r in rows], "o-", label=f"single sample, {solver}, w={g:g}")
        ax.plot(steps, [r[f"mean_of_{k}"] for r in rows], "s--", label=f"mean of {k}, {solver}, w={g:g}")
    ax.axhline(result["rows"][0]["point_estimate"], color="gray", ls=":", label="point estimate")
    ax.set_xscale("log")
    ax.set_xlabel("model calls per sample (steps x calls per step)")
    ax.set_ylabel("held-out cosine")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(ns) -> dict:
    from .data.run_splits import load_eval_split, phase_opener, training_split
    from .phases import keys_trained_by_run
    from .pipeline import Denoiser

    started = time.time()
    try:  # know before the long computation whether a plot can be drawn
        import matplotlib  # noqa: F401
        can_plot = True
    except ImportError:
        can_plot = False
        print("note: matplotlib is not installed (pip install blip3o-denoise[plot]): the table and JSON only")
    den = Denoiser.from_pretrained(ns.checkpoint, device=ns.device)
    if den.max_noise_level < 1.0 - 1e-6:
        raise ValueError(f"{ns.checkpoint}: trained up to noise level {den.max_noise_level}; "
                         "a generation sweep needs --max_noise_level 1.0")
    guidance = [float(g) for g in ns.guidance_scales.split(",")]
    if any(g != 1.0 for g in guidance) and den.model.cfg.cond_dropout == 0 and not den.model.cfg.guidance_input:
        raise ValueError("guidance scales other than 1 need a model trained with --cond_dropout > 0")
    solvers = (ns.solver or den.solver).split(",")
    remote = {"cache_dir": ns.cache_dir, "max_cache_size": ns.max_cache_size, "endpoint_url": ns.endpoint_url}
    ds = load_eval_split(den.config, ns.chunked_embeddings_dir, ns.split, None, ns.num_samples, **remote)
    batch = ds.stack()
    train_set = training_split(den.config, "", **remote)
    in_training = keys_trained_by_run(ds, den.config, train_set, phase_opener(den.config, "", **remote))
    if in_training and not ns.allow_train_samples:
        raise ValueError(
            f"{ns.chunked_embeddings_dir}: {len(in_training)} of the {len(ds)} sweep samples were in the run's "
            f"training split (e.g. key {in_training[0]!r}; split '{ns.split}'): a sweep on them measures "
            "memorisation. Sweep the held-out split (--split heldout) or another directory, or pass "
            "--allow_train_samples, labelled as not held out"
        )
    if train_set is not None:
        pca = fit_baselines(train_set, ridge=False).pca
    else:
        print("note: the run's training data is not here: the distribution metrics use a PCA basis of the targets")
        from .distribution import PCABasis

        pca = PCABasis.fit(batch["target"].reshape(-1, batch["target"].shape[-1]), 64)
    precision = ns.precision or den.config["train"].get("precision", "fp32")
    with torch.inference_mode():
        result = sweep(den.model, {k: v.to(den.device) for k, v in batch.items() if k != "index"}, den.prediction_type,
                       [int(s) for s in ns.steps.split(",")], guidance, ns.k, solvers, ns.seed, pca, precision,
                       path=den.path, min_noise_level=den.min_noise_level)
    result["precision"] = precision
    # True: no sample is in the run's training split; None: the training data is not here to check
    result["held_out"] = None if in_training is None else not in_training
    result["steps_within_10pct_of_best_fd"] = steps_to_match(result["rows"])
    result["seconds"] = round(time.time() - started, 2)
    out = Path(ns.output)
    write_atomically(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    key = f"mean_of_{result['k']}"
    print(f"{'solver':<9}{'steps':>6}{'calls':>6}{'w':>5}{'single':>9}{'mean of ' + str(result['k']):>11}{'point':>8}"
          f"{'FD':>8}{'prec.':>7}{'recall':>7}{'top-1':>7}{'s':>7}")
    for r in result["rows"]:
        print(f"{r['solver']:<9}{r['steps']:>6}{r['calls']:>6}{r['guidance']:>5g}{r['single']:>9.4f}{r[key]:>11.4f}"
              f"{r['point_estimate']:>8.4f}{r['frechet_distance']:>8.4f}{r['precision']:>7.3f}{r['recall']:>7.3f}"
              f"{r['top1_forward']:>7.3f}{r['seconds']:>7.1f}")
    print(f"top-1: forward retrieval of single samples among {len(batch['target'])} held-out targets "
          f"(chance {1 / min(len(batch['target']), 300):.3f}; the point estimate: "
          f"{result['rows'][0]['point_top1_forward']:.3f})")
    for k, v in result["steps_within_10pct_of_best_fd"].items():
        print(f"{k}: {v} steps reach the Frechet distance of {max(int(s) for s in ns.steps.split(','))} steps "
              "within 10%")
    wrote = [str(out)]
    if can_plot:
        png = out.with_suffix(".png")
        plot_sweep(result, png)
        wrote.append(str(png))
    print(f"wrote {' and '.join(wrote)} in {result['seconds']:.1f} s")
    return result
