"""The main process's host time per training step outside forward, backward and the optimizer.

No GPU is needed: the device's share of a step is stood in for by a sleep of the step time a card
would need at 40% MFU (from the FLOPs of one training step counted on the meta device), and the
main process is timed around it, as train.py feeds it: waiting for the next batch from the loader
(collating happens there when there are no workers), drawing randomness, issuing the copies to the
device. The path arithmetic (slerp) and everything after it is the device's work and not counted.

Two loaders are timed on the same in-memory samples:

- ``main_process_noise``: the code before issue 21: batches from the DataLoader as train.py built
  it, then each sample's noise and noise level drawn in the main process from its own generator
  (``flow.sample_path`` with ``sample_seeds``), plus the condition-dropout draws.
- ``loader_noise``: train.py's loader (``train.make_loader``), whose workers draw the noise.

Used by ``gpu_check.py`` (part ``host``); alone: ``python benchmarks/host_time.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch.utils.data import Dataset

BASE = dict(tokens=256, input_dim=1024, cond_dim=4096, batch=64, steps=12, warmup=3)
QUICK = dict(BASE, steps=4, warmup=1)  # the same shapes (the measurement is about them), fewer steps
REFERENCE_PEAK = ("NVIDIA H100 SXM (bf16 dense, datasheet)", 989.0)
TARGET_SHARE = 0.05
POOL = 8  # distinct sample tensors, reused: the measurement is about the step, not about reading files


class Samples(Dataset):
    """``PairDataset``'s items (unit-norm float32 target and condition, a global index) from memory."""

    def __init__(self, n: int, tokens: int, target_dim: int, cond_dim: int):
        from blip3o_denoise.sphere import normalize

        g = torch.Generator().manual_seed(0)
        self.n = n
        self.target = [normalize(torch.randn(tokens, target_dim, generator=g)) for _ in range(POOL)]
        self.cond = [normalize(torch.randn(tokens, cond_dim, generator=g)) for _ in range(POOL)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"target": self.target[i % POOL], "condition": self.cond[i % POOL], "index": i}


def step_flops(preset: str, shapes: dict, overrides: dict | None = None) -> int:
    """FLOPs of one training step (forward, flow loss, backward) at ``shapes``, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from blip3o_denoise.flow import FlowConfig, PathSample, flow_loss
    from blip3o_denoise.model import UniversalDiT, config_from_preset

    cfg = config_from_preset(preset, shapes["input_dim"], shapes["cond_dim"], **(overrides or {}))
    b, n = shapes["batch"], shapes["tokens"]
    with torch.device("meta"):
        model = UniversalDiT(cfg)
        x = torch.empty(b, n, shapes["input_dim"])
        cond = torch.empty(b, n, shapes["cond_dim"])
        t = torch.empty(b)
        with FlopCounterMode(display=False) as fc:
            pred = model(x, t, cond)
            flow_loss(pred, PathSample(x, x, x, t, x), FlowConfig())[0].backward()
    return fc.get_total_flops()


def _legacy_draws(batch: dict, cond_dropout: float, seed: int = 0, epoch: int = 0):
    """What the main process drew per step before issue 21 (train.forward_backward + flow.sample_path)."""
    from blip3o_denoise.flow import FlowConfig, sample_noise, sample_noise_level, sample_seed

    cfg = FlowConfig()
    seeds = [sample_seed(seed, epoch, int(i)) for i in batch["index"]]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    level = torch.cat([sample_noise_level(1, cfg, g) for g in gens])
    noise = torch.stack([sample_noise(batch["target"].shape[1:], g) for g in gens])
    drop = [float(torch.rand(1, generator=torch.Generator().manual_seed(s ^ 0x5DEECE66D))) < cond_dropout
            for s in seeds]
    return noise, level, drop


def _legacy_copy(batch: dict, device: torch.device) -> dict:
    """The copies before issue 21: target and condition from the loader's pinned batch without blocking,
    the noise and levels drawn in the main process (pageable memory) with a blocking copy."""
    return {k: v.to(device, non_blocking=k in ("target", "condition")) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def measure(loader, steps: int, warmup: int, step_s: float, device: torch.device, legacy: bool,
            cond_dropout: float) -> dict:
    """Per-step medians in seconds of: waiting for the batch, drawing randomness, issuing the copies."""
    from blip3o_denoise.train import to_device

    rows = []
    it = iter(loader)
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        if legacy:
            noise, level, _ = _legacy_draws(batch, cond_dropout)
            batch = {**batch, "noise": noise, "noise_level": level}
        t2 = time.perf_counter()
        _legacy_copy(batch, device) if legacy else to_device(batch, device)
        t3 = time.perf_counter()
        time.sleep(step_s)  # the device computing forward, backward and the optimizer step
        if k >= warmup:
            rows.append((t1 - t0, t2 - t1, t3 - t2))
    wait, draw, copy = (statistics.median(r[i] for r in rows) for i in range(3))
    return {"wait_for_batch_s": wait, "draw_randomness_s": draw, "issue_copies_s": copy,
            "host_s": statistics.median(sum(r) for r in rows), "main_process_work_s": draw + copy}


def worker_batch_seconds(ds, batch: int, collate) -> float:
    """CPU seconds one worker spends to build one batch (read, collate, draw the noise), timed here."""
    times = []
    for k in range(3):
        t0 = time.perf_counter()
        collate([ds[k * batch + j] for j in range(batch)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_seconds(nbytes: int) -> float:
    """One thread copying ``nbytes`` between host buffers: what the loader's pin-memory thread does per batch
    on a GPU machine (beside the main thread; it keeps up while this stays under the step)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    with _one_thread():
        for _ in range(3):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def host_time(device: torch.device, quick: bool, peak_tflops: float | None, peak_name: str | None,
              workers: int | None = None, preset: str = "base", overrides: dict | None = None) -> dict:
    from torch.utils.data import DataLoader, default_collate

    from blip3o_denoise.data.noise import NoiseCollate
    from blip3o_denoise.flow import FlowConfig
    from blip3o_denoise.train import make_loader

    s = dict(QUICK if quick else BASE)
    flops = step_flops(preset, s, overrides)
    name, peak = (peak_name, peak_tflops) if peak_tflops else REFERENCE_PEAK
    step_s = flops / (0.40 * peak * 1e12)
    if workers is None:  # what training picks on this device, at least 2 so that the workers' side shows
        from blip3o_denoise.train import resolve_workers

        workers = max(2, resolve_workers(-1, device))
    ds = Samples(s["batch"] * (s["steps"] + s["warmup"] + 4), s["tokens"], s["input_dim"], s["cond_dim"])
    pin = device.type == "cuda"
    rows = {}
    old = DataLoader(ds, batch_size=s["batch"], num_workers=0, pin_memory=pin)
    rows["main_process_noise"] = {"workers": 0, **measure(old, s["steps"], s["warmup"], step_s, device, True, 0.1)}
    rows["main_process_noise"]["worker_batch_s"] = worker_batch_seconds(ds, s["batch"], default_collate)
    collate = NoiseCollate(FlowConfig(), 0, 0.1)
    new = make_loader(ds, s["batch"], None, workers, device, collate, 0)
    rows["loader_noise"] = {"workers": workers, **measure(new, s["steps"], s["warmup"], step_s, device, False, 0.1)}
    rows["loader_noise"]["worker_batch_s"] = worker_batch_seconds(ds, s["batch"], collate)
    for r in rows.values():
        r["share_of_step"] = r["host_s"] / step_s
        r["work_share_of_step"] = r["main_process_work_s"] / step_s
        r["workers_needed"] = math.ceil(r["worker_batch_s"] / step_s)
    bytes_per_step = s["batch"] * s["tokens"] * (2 * s["input_dim"] + s["cond_dim"]) * 4 + s["batch"] * 13
    return {
        "preset": preset, "shapes": s, "flops_per_step": flops, "peak_tflops": peak, "peak_of": name,
        "step_s_at_40pct_mfu": step_s, "target_share": TARGET_SHARE, "bytes_to_device_per_step": bytes_per_step,
        "cpu_cores": os.cpu_count(), "load_average": os.getloadavg()[0], "pinned_memory": pin, "rows": rows,
        "pin_copy_s_estimate": copy_seconds(bytes_per_step),
        "method": "main process timed around a sleep of the 40%-MFU step time standing in for the device; "
                  "medians over timed steps after warm-up; path arithmetic excluded (device work)",
    }


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def format_host(h: dict) -> list[str]:
    s = h["shapes"]
    lines = [f"host time per training step in the main process (outside forward/backward/optimizer), {h['preset']} "
             f"N = {s['tokens']}, {s['input_dim']} <- {s['cond_dim']}, batch {s['batch']}",
             f"device step at 40% MFU: {h['flops_per_step'] / 1e12:.3g} TFLOP / (0.4 x {h['peak_tflops']:g} TFLOP/s, "
             f"{h['peak_of']}) = {h['step_s_at_40pct_mfu'] * 1e3:.3g} ms; target: host <= "
             f"{h['target_share']:.0%} of it ({h['target_share'] * h['step_s_at_40pct_mfu'] * 1e3:.3g} ms)",
             f"{'noise drawn in':<20}{'workers':>8}{'wait ms':>9}{'draw ms':>9}{'copy ms':>9}{'host ms':>9}"
             f"{'share':>10}{'work share':>11}{'worker ms/batch':>16}{'workers needed':>15}"]
    for key, r in h["rows"].items():
        label = "main process (old)" if key == "main_process_noise" else "loader workers"
        ms = [r[k] * 1e3 for k in ("wait_for_batch_s", "draw_randomness_s", "issue_copies_s", "host_s")]
        worker = _ms(r["worker_batch_s"] * 1e3)
        lines.append(f"{label:<20}{r['workers']:>8}" + "".join(f"{_ms(x):>9}" for x in ms)
                     + f"{r['share_of_step']:>10.1%}{r['work_share_of_step']:>11.1%}{worker:>16}"
                     + f"{r['workers_needed']:>15}")
    lines.append(f"(share: host ms / device step; work share: draw + copy, without waiting; {h['cpu_cores']} CPU "
                 f"cores here, load average {h['load_average']:.1f}; {h['bytes_to_device_per_step'] / 2**20:.0f} MiB "
                 f"to the device per step; the pin-memory thread's copy of it: about "
                 f"{h['pin_copy_s_estimate'] * 1e3:.1f} ms, beside the main thread)")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--output", default="")
    args = ap.parse_args(argv)
    h = host_time(torch.device(args.device), args.quick, None, None, args.workers)
    print("\n".join(format_host(h)))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(h, f, indent=2)


if __name__ == "__main__":
    main()
