"""Which conditioning learns fastest? Held-out cosine against training time for each mode.

Runs each mode in a fresh process (one thread, same data, same seed) for a fixed time budget on
synthetic data and prints generation and denoising (s = 0.5) cosine at a few points in time.

    python benchmarks/conditioning.py --seconds 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def run_one(mode: str, data: str, seconds: float, checkpoints: list[float], hidden: int) -> list[dict]:
    import torch

    from blip3o_denoise.data.dataset import Embeddings, PairDataset, split_indices
    from blip3o_denoise.evaluate import evaluate
    from blip3o_denoise.flow import FlowConfig, flow_loss, sample_path
    from blip3o_denoise.model import ModelConfig, UniversalDiT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    emb = Embeddings(data)
    tr, ho = split_indices(emb.keys, 0.1)
    train = PairDataset(emb, tr, "clip_denoising").stack()
    held = PairDataset(emb, ho[:32], "clip_denoising").stack()
    model = UniversalDiT(ModelConfig(input_dim=emb.clip_dim, cond_dim=emb.eva_dim, hidden_size=hidden, depth=2,
                                     num_heads=4, num_kv_heads=2, conditioning=mode))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    flow = FlowConfig(min_noise_level=0.0, max_noise_level=1.0)
    gen = torch.Generator().manual_seed(0)
    out, train_time, step = [], 0.0, 0
    pending = list(checkpoints)
    while pending:
        t0 = time.time()
        idx = torch.randint(0, train["target"].shape[0], (16,), generator=gen)
        path = sample_path(train["target"][idx], flow, gen)
        loss, _ = flow_loss(model(path.x_t, path.t, train["condition"][idx]), path, flow)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.train()
        step += 1
        train_time += time.time() - t0
        if train_time >= pending[0]:
            pending.pop(0)
            r = evaluate(model, held, "velocity", "clip_denoising", 0.0, 1.0, num_steps=10, noise_levels=(0.5,))
            model.train()
            out.append({"mode": mode, "train_seconds": round(train_time, 1), "steps": step,
                        "generation": round(r["generation"]["model"]["cosine_mean"], 4),
                        "denoise_0.5_point": round(r["denoising"]["0.5"]["point_estimate"]["cosine_mean"], 4)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--one", default="")
    ap.add_argument("--data", default="")
    args = ap.parse_args()
    cps = [args.seconds / 4, args.seconds / 2, args.seconds]
    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.seconds, cps, args.hidden)))
        return
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

    with tempfile.TemporaryDirectory() as d:
        make_synthetic(d, SyntheticSpec(num_samples=400, eva_dim=256, clip_dim=128, tokens=64))
        rows = []
        for mode in ("aligned", "cross_attention", "both"):
            r = subprocess.run([sys.executable, __file__, "--one", mode, "--data", d, "--seconds", str(args.seconds),
                                "--hidden", str(args.hidden)], capture_output=True, text=True, check=True)
            rows += json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{'mode':<16}{'train s':>8}{'steps':>7}{'generation':>12}{'denoise s=0.5 (point)':>24}")
    for r in rows:
        print(f"{r['mode']:<16}{r['train_seconds']:>8}{r['steps']:>7}{r['generation']:>12}{r['denoise_0.5_point']:>24}")


if __name__ == "__main__":
    main()
