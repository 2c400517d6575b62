"""Training and generation speed: our model against the original design, and per preset.

Every configuration runs in a fresh process (one config per process, warm-up, median of timed
repeats). Suites:

- ``compare``: at equal width, depth and heads, a training step (path sampling, forward, loss,
  backward, fused AdamW) and a 50-step generation, for our model (aligned and cross-attention
  conditioning) and the reference re-implementation of the original design
  (``benchmarks/reference_model.py``); prints the ratios.
- ``presets``: training throughput (samples/s, tokens/s), achieved GFLOP/s (torch's
  FlopCounterMode over one forward+backward) and peak memory per preset and batch size.
- ``steps``: generation latency per sample against the number of sampling steps.

    python benchmarks/speed.py --suite compare --precision bf16
    python benchmarks/speed.py --suite presets --presets tiny,small --batch_sizes 2,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def build(cfg: dict, device):

    from blip3o_denoise.model import UniversalDiT, config_from_preset
    from reference_model import ReferenceDiT

    mcfg = config_from_preset(cfg["preset"], cfg["input_dim"], cfg["cond_dim"],
                              conditioning=cfg.get("conditioning", "aligned"))
    if cfg["model"] == "reference":
        model = ReferenceDiT(cfg["input_dim"], cfg["cond_dim"], mcfg.hidden_size, mcfg.depth, mcfg.num_heads)
    else:
        model = UniversalDiT(mcfg)
    return model.to(device), mcfg


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from blip3o_denoise.flow import FlowConfig, flow_loss, sample_path
    from blip3o_denoise.sampling import generate
    from reference_model import reference_generate

    device = torch.device(cfg.get("device", "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(cfg.get("threads", 2))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model, mcfg = build(cfg, device)
    b, n = cfg["batch"], cfg["tokens"]
    target = torch.randn(b, n, cfg["input_dim"], device=device)
    cond = torch.randn(b, n, cfg["cond_dim"], device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    out = {**cfg, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}

    if cfg["what"] == "train":
        flow = FlowConfig()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        gen = torch.Generator().manual_seed(0)

        def step():
            path = sample_path(target, flow, gen)
            with amp:
                pred = model(path.x_t, path.t, cond)
            loss, _ = flow_loss(pred, path, flow)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(cfg.get("warmup", 3)):
            step()
        times = []
        for _ in range(cfg.get("repeats", 8)):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        path = sample_path(target, flow, gen)
        with FlopCounterMode(display=False) as fc:
            with amp:
                pred = model(path.x_t, path.t, cond)
            flow_loss(pred, path, flow)[0].backward()
        opt.zero_grad(set_to_none=True)
        out.update(step_s=med, samples_per_s=b / med, tokens_per_s=b * n / med,
                   gflop_per_step=fc.get_total_flops() / 1e9, gflop_per_s=fc.get_total_flops() / 1e9 / med)
    else:
        model.eval()
        steps = cfg["steps"]

        def run():
            with amp:
                if cfg["model"] == "reference":
                    reference_generate(model, cond, steps, cfg["input_dim"])
                else:
                    generate(model, cond, "velocity", num_steps=steps)

        run()
        times = []
        for _ in range(cfg.get("repeats", 3)):
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out.update(generate_s=med, per_sample_s=med / b)
    out["peak_memory_gib"] = peak_memory_gib(device)
    return out


def spawn(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True)
    if r.returncode != 0:
        return {**cfg, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=("compare", "presets", "steps"), default="compare")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny", help="size of the compare and steps suites")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batch_sizes", default="2,4")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--input_dim", type=int, default=1024)
    ap.add_argument("--cond_dim", type=int, default=4096)
    ap.add_argument("--gen_steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default="")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    base = dict(precision=args.precision, device=args.device, tokens=args.tokens, input_dim=args.input_dim,
                cond_dim=args.cond_dim, threads=args.threads)
    print(f"# device {args.device}, precision {args.precision}, N={args.tokens}, D_in={args.input_dim}, "
          f"D_cond={args.cond_dim}")
    if args.suite == "compare":
        # Rounds interleave the models, so a slow spell of this shared machine hits all of them;
        # each number is the median over rounds of a per-process median.
        models = (("ours (aligned)", "ours", "aligned"), ("ours (cross_attention)", "ours", "cross_attention"),
                  ("reference (original design)", "reference", "cross_attention"))
        runs = {label: ([], []) for label, _, _ in models}
        for _ in range(args.rounds):
            for label, model, cond in models:
                common = dict(base, preset=args.preset, model=model, conditioning=cond)
                runs[label][0].append(spawn(dict(common, what="train", batch=args.batch)))
                runs[label][1].append(spawn(dict(common, what="generate", batch=1, steps=args.gen_steps)))

        def med(rs, key):
            ok = [r for r in rs if "error" not in r]
            if not ok:
                return {"error": rs[0]["error"]}
            out = dict(ok[0])
            out[key] = statistics.median(r[key] for r in ok)
            if key == "step_s":
                out["gflop_per_s"] = out["gflop_per_step"] / out[key]
            return out

        rows = {label: (med(t, "step_s"), med(g, "generate_s")) for label, (t, g) in runs.items()}
        ref_t, ref_g = rows["reference (original design)"]
        print(f"\n{args.preset} preset, train batch {args.batch}, generation batch 1 x {args.gen_steps} steps, "
              f"{args.threads} threads, median of {args.rounds} interleaved rounds")
        print(f"{'model':<30}{'params':>8}{'train step s':>14}{'x ref':>7}{'GFLOP/s':>9}{'generate s':>12}{'x ref':>7}")
        for label, (t, g) in rows.items():
            if "error" in t or "error" in g:
                print(f"{label:<30} failed: {t.get('error') or g.get('error')}")
                continue
            print(f"{label:<30}{t['params_m']:>7.1f}M{t['step_s']:>14.3f}{ref_t['step_s'] / t['step_s']:>7.2f}"
                  f"{t['gflop_per_s']:>9.1f}{g['generate_s']:>12.3f}{ref_g['generate_s'] / g['generate_s']:>7.2f}")
    elif args.suite == "presets":
        print(f"\n{'preset':<8}{'batch':>6}{'params':>9}{'step s':>9}{'samples/s':>11}{'tokens/s':>10}"
              f"{'GFLOP/s':>9}{'peak GiB':>10}")
        for preset in args.presets.split(","):
            for bs in (int(x) for x in args.batch_sizes.split(",")):
                r = spawn(dict(base, preset=preset, model="ours", what="train", batch=bs, repeats=5))
                if "error" in r:
                    print(f"{preset:<8}{bs:>6}  failed: {r['error']}")
                    continue
                print(f"{preset:<8}{bs:>6}{r['params_m']:>8.1f}M{r['step_s']:>9.3f}{r['samples_per_s']:>11.1f}"
                      f"{r['tokens_per_s']:>10.0f}{r['gflop_per_s']:>9.1f}{r['peak_memory_gib']:>10.2f}")
    else:
        print(f"\n{'steps':>6}{'seconds per sample':>20}")
        for steps in (1, 2, 4, 10, 25, 50):
            r = spawn(dict(base, preset=args.preset, model="ours", what="generate", batch=args.batch, steps=steps))
            print(f"{steps:>6}{r.get('per_sample_s', float('nan')):>20.4f}")


if __name__ == "__main__":
    main()
