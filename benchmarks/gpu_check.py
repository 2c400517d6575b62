"""One-card check: bf16 training throughput and MFU, SDPA backend, generation latency, evaluation time.

    python benchmarks/gpu_check.py --output gpu_check.json                  # a GPU, at most about 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick --output q.json     # tiny shapes, seconds (the test)

Parts, in this order (each in its own try/except: a failure is recorded in the JSON and the rest runs):

- ``sdpa``: which scaled-dot-product-attention kernel the model's attention runs, read from the
  aten op names of one profiled forward+backward of the model under bf16 autocast, and which
  backends accept the model's q/k/v when forced one at a time with ``sdpa_kernel``.
- ``host``: the main process's host time per training step outside forward, backward and the
  optimizer (waiting for the batch, drawing randomness, issuing copies) at the ``base`` preset's
  shapes, batch 64 (also with --quick), against the step time a card needs at 40% MFU (``host_time.py``); noise drawn
  in the main process as before issue 21, and in the loader's workers as train.py does now.
- ``train``: the real training step (the path from noise drawn with per-sample seeds by the
  loader's collate, as train.py's workers do: drawn ahead, outside the timed step, and timed alone
  as ``sample_path_s``), forward under bf16 autocast, ``flow_loss``, backward, fused AdamW step) per preset, eager and
  compiled, at ``clip_denoising`` shapes (N = 256, CLIP 1024 <- EVA 4096): median step time over
  timed steps after warm-up, samples/s, tokens/s, peak memory, FLOPs per step (FlopCounterMode
  over one eager step), achieved TFLOP/s = FLOPs / median step time, and MFU = achieved / the
  card's bf16 dense peak (a table by device name; unknown cards: MFU null, the peak marked
  unknown). On a GPU the batch is chosen from the memory one probe step takes (about 45% of the
  card, a power of two, at most 256).
- ``profile``: when the first preset's MFU is under the 40% target (or cannot be judged), a short
  torch.profiler summary of where its step time goes (top kernels and CPU ops).
- ``generation``: 50-step generation latency per sample, bf16 autocast and fp32, batch 1 and a
  larger batch.
- ``evaluate``: ``blip3o_denoise.evaluate.evaluate`` at its default settings (EvalConfig()) on 96
  random held-out samples, with the baselines fitted as the CLI fits them; generation from pure
  noise included (trained noise range 0.1-1.0). The weights are random: only the time means
  anything.

A global time guard (``--time_budget``, default 270 s) skips parts that would not fit, stops
timed loops early, and a watchdog writes what was measured and exits at the budget + 25 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from speed import peak_memory_gib, sync  # noqa: E402

MFU_TARGET = 0.40
HARD_LIMIT_GRACE_S = 25.0

# bf16 dense tensor-core peak in TFLOP/s (without sparsity), from the vendors' datasheets; approximate.
# Checked in order: every substring of an entry must appear in the lower-cased device name.
PEAK_BF16_DENSE_TFLOPS = (
    (("h100", "pcie"), 756.0),
    (("h100",), 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (("h200",), 989.0),
    (("a100",), 312.0),
    (("l40s",), 362.0),
    (("rtx 4090",), 165.0),
)

# aten op name of each SDPA implementation -> the name we report
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "aten::_scaled_dot_product_efficient_attention": "memory_efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "memory_efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}

FULL = dict(tokens=256, input_dim=1024, cond_dim=4096, warmup=3, repeats=10, gen_batch=32, eval_samples=96,
            baseline_samples=256)
# --quick: tiny widths through the presets' overrides, so the whole script runs in seconds on a CPU
QUICK = dict(tokens=16, input_dim=32, cond_dim=64, warmup=1, repeats=3, gen_batch=4, eval_samples=16,
             baseline_samples=32)
QUICK_OVERRIDES = {"base": dict(hidden_size=64, depth=2, num_heads=4, num_kv_heads=2),
                   "large": dict(hidden_size=96, depth=3, num_heads=4, num_kv_heads=2)}

# rough seconds a part needs on a GPU: the guard skips a part when less than this is left
NEED_S = {"sdpa": 10, "host": 30, "train_eager": 25, "train_compile": 100, "generation": 15, "evaluate": 45}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a card from its name, or None when the card is not in the table."""
    name = device_name.lower()
    if "nvl" in name:  # NVL parts run other clocks and power than the SXM numbers below
        return None
    for parts, peak in PEAK_BF16_DENSE_TFLOPS:
        if all(p in name for p in parts):
            return peak
    return None


class Guard:
    """The global time budget: parts ask before starting; timed loops stop once it is spent."""

    def __init__(self, budget_s: float):
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0


class Check:
    """Shared state of one run: arguments, shapes, the report being written, the guard."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.shapes = dict(QUICK if args.quick else FULL)
        self.guard = Guard(args.time_budget)
        self.batches: dict[str, tuple[int, dict]] = {}
        self.lock = threading.Lock()
        self.report: dict = {"schema": "gpu_check/1", "command": " ".join(sys.argv), "quick": args.quick,
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "time_budget_s": args.time_budget,
                             "skipped": [], "errors": []}

    def save(self):
        with self.lock:
            self.report["total_seconds"] = round(self.guard.elapsed(), 2)
            text = json.dumps(self.report, indent=2, default=str)
        Path(self.args.output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(self.args.output) + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.args.output)

    def part(self, name: str, need_s: float, fn, *fn_args) -> dict:
        """Run ``fn``, or record why not; an exception is recorded, never raised."""
        left = self.guard.left()
        if left < need_s:
            why = f"time guard: {max(left, 0):.0f} s of the {self.args.time_budget:.0f} s budget left"
            self.report["skipped"].append({"part": name, "reason": why})
            return {"skipped": why}
        t0 = time.perf_counter()
        try:
            out = fn(*fn_args)
        except Exception as e:  # one failing part (e.g. compile) must not stop the others
            msg = f"{type(e).__name__}: {e}".strip()[:2000]
            self.report["errors"].append({"part": name, "error": msg})
            out = {"error": msg, "traceback": traceback.format_exc()[-3000:]}
        out["part_seconds"] = round(time.perf_counter() - t0, 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    def model_config(self, preset: str):
        from blip3o_denoise.model import config_from_preset

        over = QUICK_OVERRIDES.get(preset, QUICK_OVERRIDES["base"]) if self.args.quick else {}
        return config_from_preset(preset, self.shapes["input_dim"], self.shapes["cond_dim"], **over)

    def build(self, preset: str):
        from blip3o_denoise.model import UniversalDiT

        torch.manual_seed(0)
        return UniversalDiT(self.model_config(preset)).to(self.device)

    def data(self, batch: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        s = self.shapes
        target = torch.randn(batch, s["tokens"], s["input_dim"], generator=g).to(self.device)
        cond = torch.randn(batch, s["tokens"], s["cond_dim"], generator=g).to(self.device)
        return target, cond

    def reset_memory(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    env = {"device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), memory_gib=round(props.total_memory / 2**30, 2),
                   compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        env["device_name"] = name
    return env


def peak_info(device: torch.device, device_name: str, override: float | None) -> dict:
    if override:
        return {"bf16_dense_tflops": override, "source": "--peak_tflops"}
    if device.type != "cuda":
        return {"bf16_dense_tflops": None, "source": None,
                "note": "peak unknown (a CPU): achieved TFLOP/s is reported, MFU is not"}
    peak = peak_bf16_tflops(device_name)
    if peak is None:
        return {"bf16_dense_tflops": None, "source": None,
                "note": f"peak unknown for {device_name!r}: achieved TFLOP/s is reported, MFU is not "
                        "(pass --peak_tflops to compute it)"}
    return {"bf16_dense_tflops": peak, "source": "table",
            "note": "vendor datasheet value for bf16 dense (without sparsity); approximate"}


# ----------------------------------------------------------------------------- SDPA backend


def sdpa_part(ck: Check) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from blip3o_denoise.model import _SDPA_HAS_GQA

    preset = ck.args.presets[0]
    model = ck.build(preset)
    target, cond = ck.data(2)
    t = torch.rand(2, device=ck.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast(ck.device.type, dtype=torch.bfloat16):
            out = model(target, t, cond)
        out.float().square().mean().backward()
        sync(ck.device)
    names = {e.name for e in prof.events()}
    used = sorted({label for op, label in SDPA_OPS.items() if op in names})
    seen = sorted(n for n in names if "scaled_dot_product" in n or "attention" in n.lower())

    cfg = model.cfg
    hd = cfg.hidden_size // cfg.num_heads
    n = ck.shapes["tokens"]
    q = torch.randn(2, cfg.num_heads, n, hd, device=ck.device, dtype=torch.bfloat16)
    kv = torch.randn(2, cfg.num_kv_heads, n, hd, device=ck.device, dtype=torch.bfloat16)
    available = {}
    for label, member in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(getattr(SDPBackend, member)):
                torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=_SDPA_HAS_GQA)
            available[label] = True
        except Exception as e:
            available[label] = f"no: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
    return {
        "backend": " + ".join(used) if used else "unknown (no known SDPA op seen)",
        "method": f"aten op names in torch.profiler over one forward+backward of the {preset} model "
                  f"(bf16 autocast, batch 2, N = {n})",
        "ops_seen": seen,
        "available": available,
        "available_method": "F.scaled_dot_product_attention on the model's q/k/v shapes (bf16, "
                            "enable_gqa) under sdpa_kernel(<one backend>): True when it ran",
    }


# ----------------------------------------------------------------------------- host time per step


def host_part(ck: Check) -> dict:
    from host_time import host_time

    peak = ck.report["peak"]
    name = ck.report["environment"]["device_name"] if peak["source"] == "table" else peak["source"]
    # the base preset's real shapes even with --quick (fewer steps): the host's work grows with them
    return host_time(ck.device, ck.args.quick, peak["bf16_dense_tflops"], name)


# ----------------------------------------------------------------------------- training


def make_step(model, fwd, opt, target, cond, device):
    """The training step of train.py: the path from the noise its loader's workers drew (per-sample seeds;
    drawn once here, ``path`` times one batch's draws), bf16 forward, loss, backward, AdamW."""
    from blip3o_denoise.data.noise import NoiseCollate
    from blip3o_denoise.flow import FlowConfig, flow_loss, path_from

    flow = FlowConfig()
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    collate = NoiseCollate(flow, 0)
    items = [{"target": target[i].cpu(), "condition": torch.zeros(1), "index": i} for i in range(target.shape[0])]

    def path():  # what a loader worker does for a batch (collate and draws), outside the step
        return collate(items)

    drawn = path()
    noise, level = drawn["noise"].to(device), drawn["noise_level"].to(device)

    def step(forward=None):
        p = path_from(target, noise, level, flow)
        with amp:
            pred = (forward or fwd)(p.x_t, p.t, cond)
        loss, _ = flow_loss(pred, p, flow)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, path


def choose_batch(ck: Check, preset: str) -> tuple[int, dict]:
    """The batch for a preset: --batch_size, a fixed small one on CPU, or sized from a probe step on a GPU."""
    if ck.args.batch_size:
        return ck.args.batch_size, {"how": "--batch_size"}
    if ck.device.type != "cuda":
        b = 2 if ck.args.quick else 4
        return b, {"how": f"fixed on CPU ({b})"}
    probe, fraction, cap = 4, 0.45, 256
    model = ck.build(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    target, cond = ck.data(probe)
    step, _ = make_step(model, model, opt, target, cond, ck.device)
    step()  # creates the optimizer state
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    per_sample = (torch.cuda.max_memory_allocated() - static) / probe
    total = torch.cuda.get_device_properties(ck.device).total_memory
    fit = max(1, int((fraction * total - static) / per_sample))
    b = min(cap, 2 ** int(math.log2(fit)))
    del model, opt, target, cond, step
    torch.cuda.empty_cache()
    return b, {"how": f"largest power of two whose probed memory fits {fraction:.0%} of the card, at most {cap}",
               "probe_batch": probe, "static_gib": round(static / 2**30, 3),
               "per_sample_gib": round(per_sample / 2**30, 4), "fits": fit}


def train_part(ck: Check, preset: str, compiled: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    dev = ck.device
    if preset not in ck.batches:
        ck.batches[preset] = choose_batch(ck, preset)
    batch, batch_choice = ck.batches[preset]
    model = ck.build(preset)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compiled else model
    target, cond = ck.data(batch)
    step, path = make_step(model, fwd, opt, target, cond, dev)
    ck.reset_memory()

    sync(dev)
    t0 = time.perf_counter()
    step()  # with --compile: the compilation happens here
    sync(dev)
    first_step_s = time.perf_counter() - t0
    for _ in range(ck.shapes["warmup"] - 1):
        step()
    times = []
    for _ in range(ck.shapes["repeats"]):
        if ck.guard.spent() and times:
            break
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    path_times = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        path()
        sync(dev)
        path_times.append(time.perf_counter() - t0)
    peak_mem = peak_memory_gib(dev)

    # FLOPs: counted on the eager module (identical math); the optimizer step adds none
    with FlopCounterMode(display=False) as fc:
        step(forward=model)
    flops = fc.get_total_flops()
    by_op = {str(op): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()}

    peak = ck.report["peak"]["bf16_dense_tflops"]
    path_s = statistics.median(path_times)
    achieved = flops / step_s / 1e12
    n = ck.shapes["tokens"]
    out = {
        "preset": preset, "compile": compiled, "batch": batch, "batch_choice": batch_choice,
        "tokens_per_step": batch * n, "model": model.cfg.to_dict(),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "first_step_s": round(first_step_s, 4), "warmup_steps": ck.shapes["warmup"], "timed_steps": len(times),
        "timed_steps_requested": ck.shapes["repeats"], "step_times_s": [round(x, 6) for x in times],
        "step_s": step_s, "samples_per_s": batch / step_s, "tokens_per_s": batch * n / step_s,
        "flops_per_step": flops, "flops_by_op": by_op, "achieved_tflops": achieved,
        "flops_note": ("includes attention" if any("attention" in op for op in by_op) else
                       "attention FLOPs not counted: this device's SDPA kernel is not in FlopCounterMode's registry"),
        "mfu": achieved / peak if peak else None,
        # one batch's draws in a loader worker (not in the step): workers needed ~ this / step_s
        "sample_path_s": path_s, "sample_path_share": path_s / step_s,
        "peak_memory_gib": peak_mem,
        "memory_kind": ("torch.cuda.max_memory_allocated since the part began" if dev.type == "cuda"
                        else "process peak RSS (VmHWM), never reset: covers every earlier part too"),
    }
    if preset == ck.args.presets[0] and (out["mfu"] is None or out["mfu"] < MFU_TARGET):
        why = ("MFU cannot be judged (peak unknown)" if out["mfu"] is None
               else f"MFU {out['mfu']:.1%} under the {MFU_TARGET:.0%} target")
        key = f"{preset} {'compile' if compiled else 'eager'}"
        ck.report.setdefault("profile", {})[key] = ck.part(f"profile {key}", 0, profile_summary, ck, step, why)
    del fwd
    if compiled:
        torch._dynamo.reset()
    return out


def _category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "matmul", "cublas", "cutlass", "sm90_xmma", "addmm", "aten::mm", "aten::bmm")):
        return "matmul"
    if "adam" in n:
        return "optimizer"
    if any(k in n for k in ("randn", "normal", "bernoulli", "philox")):
        return "random numbers (noise)"
    if "triton" in n:
        return "compiled (triton) fused ops"
    if any(k in n for k in ("memcpy", "copy", "to_copy")):
        return "copies / transfers"
    return "elementwise, reductions, other"


def _top(events, attr: str, steps: int, top: int) -> dict:
    rows = [(e.key, getattr(e, attr), e.count) for e in events if getattr(e, attr) > 0]
    total = sum(v for _, v, _ in rows)
    rows.sort(key=lambda r: -r[1])
    cats: dict[str, float] = {}
    for k, v, _ in rows:
        cats[_category(k)] = cats.get(_category(k), 0.0) + v / total
    return {
        "total_ms_per_step": total / 1e3 / steps,
        "by_category": {k: round(v, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": [{"name": k[:120], "ms_per_step": round(v / 1e3 / steps, 4), "share": round(v / total, 4),
                 "calls_per_step": c / steps} for k, v, c in rows[:top]],
    }


def profile_summary(ck: Check, step, why: str, steps: int = 3) -> dict:
    """Where a step's time goes: top kernels (GPU) and top CPU ops by self time over a few profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    dev = ck.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    wall = (time.perf_counter() - t0) / steps
    avgs = prof.key_averages()
    out = {"why": why, "profiled_steps": steps, "wall_s_per_step_under_profiler": wall}
    if dev.type == "cuda":
        kernels = [e for e in avgs if getattr(e, "device_type", None) == DeviceType.CUDA]
        k = _top(kernels, "self_device_time_total", steps, 12)
        out["gpu_kernels"] = k
        out["gpu_busy_share"] = k["total_ms_per_step"] / 1e3 / wall
        out["note"] = ("gpu_busy_share well under 1 means the GPU waits for the CPU (launches, the noise drawn "
                       "in the loop, transfers)")
    cpu = [e for e in avgs if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    out["cpu_ops"] = _top(cpu, "self_cpu_time_total", steps, 8 if dev.type == "cuda" else 12)
    return out


# ----------------------------------------------------------------------------- generation, evaluation


def generation_part(ck: Check, preset: str, steps: int = 50) -> dict:
    from contextlib import nullcontext

    from blip3o_denoise.sampling import generate

    model = ck.build(preset).eval()
    rows = []
    for precision in ("bf16", "fp32"):
        for batch in (1, ck.shapes["gen_batch"]):
            if ck.guard.spent():
                rows.append({"precision": precision, "batch": batch, "skipped": "time guard"})
                continue
            _, cond = ck.data(batch, seed=1)
            gen = torch.Generator().manual_seed(0)
            amp = (torch.autocast(ck.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())

            def run():
                with amp:
                    generate(model, cond, "velocity", num_steps=steps, generator=gen)

            run()
            times = []
            for _ in range(3):
                sync(ck.device)
                t0 = time.perf_counter()
                run()
                sync(ck.device)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append({"precision": precision, "batch": batch, "steps": steps, "seconds": med,
                         "per_sample_s": med / batch})
    return {"preset": preset, "solver": "euler", "rows": rows}


class _Samples:
    """The two calls fit_baselines makes on a dataset: len() and stack(positions)."""

    def __init__(self, target: torch.Tensor, cond: torch.Tensor):
        self.target, self.cond = target, cond

    def __len__(self) -> int:
        return self.target.shape[0]

    def stack(self, positions=None) -> dict:
        idx = list(positions) if positions is not None else list(range(len(self)))
        return {"target": self.target[idx], "condition": self.cond[idx]}


def evaluate_part(ck: Check, preset: str) -> dict:
    from blip3o_denoise.evaluate import EvalConfig, evaluate, fit_baselines

    s = ck.shapes
    g = torch.Generator().manual_seed(2)

    def randn(b, d):
        return torch.randn(b, s["tokens"], d, generator=g)

    train = _Samples(randn(s["baseline_samples"], s["input_dim"]), randn(s["baseline_samples"], s["cond_dim"]))
    held = {"target": randn(s["eval_samples"], s["input_dim"]), "condition": randn(s["eval_samples"], s["cond_dim"])}
    model = ck.build(preset).eval()
    t0 = time.perf_counter()
    baselines = fit_baselines(train)
    fit_s = time.perf_counter() - t0
    cfg = EvalConfig()
    sync(ck.device)
    t0 = time.perf_counter()
    res = evaluate(model, held, "velocity", "clip_denoising", 0.1, 1.0, cfg, baselines)
    sync(ck.device)
    return {
        "preset": preset, "samples": s["eval_samples"], "seconds": time.perf_counter() - t0,
        "evaluate_reported_seconds": res["seconds"], "baselines_fit_s": fit_s,
        "baselines_fit_samples": s["baseline_samples"], "precision": getattr(cfg, "precision", "fp32"),
        "settings": {"num_steps": cfg.num_steps, "solver": cfg.solver, "noise_levels": list(cfg.noise_levels),
                     "sample_counts": list(cfg.sample_counts), "distribution": cfg.distribution,
                     "trained_noise_range": [0.1, 1.0], "batch_size": cfg.batch_size},
    }


# ----------------------------------------------------------------------------- report


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(r: dict) -> str:
    env, peak = r["environment"], r["peak"]
    p = peak["bf16_dense_tflops"]
    lines = [f"gpu_check on {env['device_name']} ({env['device']}) | torch {env['torch']} | CUDA {env['cuda']} | "
             + (f"bf16 dense peak {p:g} TFLOP/s ({peak['source']})" if p else "bf16 peak unknown: MFU not computed")]
    if r.get("quick"):
        lines.append("QUICK RUN: tiny widths, not the real shapes (but the host time per step: real shapes)")
    sd = r.get("sdpa", {})
    if "backend" in sd:
        ok = ", ".join(k for k, v in sd["available"].items() if v is True)
        lines.append(f"SDPA backend: {sd['backend']} (profiler op names); backends that accept the shapes: {ok}")
    s = r["shapes"]
    if "rows" in r.get("host", {}):
        from host_time import format_host

        lines += [""] + format_host(r["host"])
    elif r.get("host"):
        lines.append(f"host time: {r['host'].get('skipped') or 'failed: ' + r['host'].get('error', '?')[:200]}")
    lines += ["", f"training step, bf16 autocast, clip_denoising N = {s['tokens']}, "
                  f"{s['input_dim']} <- {s['cond_dim']}; medians",
              f"{'preset':<7}{'compile':>8}{'batch':>6}{'params':>9}{'step ms':>10}{'samples/s':>11}{'tokens/s':>11}"
              f"{'GFLOP/step':>12}{'TFLOP/s':>9}{'MFU':>7}{'noise ms':>10}{'peak GiB':>10}"]
    for t in r.get("train", []):
        head = f"{t['preset']:<7}{'yes' if t['compile'] else 'no':>8}"
        if "step_s" not in t:
            lines.append(f"{head}  {'skipped: ' + t['skipped'] if 'skipped' in t else 'failed: ' + t['error'][:80]}")
            continue
        mfu = f"{t['mfu'] * 100:.3g}%" if t["mfu"] is not None else "-"
        lines.append(f"{head}{t['batch']:>6}{t['params_m']:>8.1f}M{t['step_s'] * 1e3:>10.1f}{t['samples_per_s']:>11.1f}"
                     f"{t['tokens_per_s']:>11.0f}{t['flops_per_step'] / 1e9:>12.3g}{t['achieved_tflops']:>9.3g}"
                     f"{mfu:>7}{t['sample_path_s'] * 1e3:>10.1f}{t['peak_memory_gib']:>10.2f}")
    if r.get("train"):
        lines.append("(noise ms: one batch's noise drawn with per-sample seeds, as a loader worker does)")
    tg = r.get("target", {})
    if tg:
        lines.append(f"target: MFU >= {tg['mfu']:.0%} at {tg['preset']} with compile: {tg['verdict']}")
    for key, prof in r.get("profile", {}).items():
        top = prof.get("gpu_kernels") or prof.get("cpu_ops")
        if top:
            cats = ", ".join(f"{k} {v:.0%}" for k, v in list(top["by_category"].items())[:4])
            busy = f"GPU busy {prof['gpu_busy_share']:.0%} of the step; " if "gpu_busy_share" in prof else ""
            lines.append(f"profile ({key}): {busy}{cats}")
    gen = r.get("generation", {})
    if gen:
        lines += ["", "50-step generation (Euler on the sphere), seconds per sample",
                  f"{'preset':<7}{'precision':>10}{'batch':>6}{'s/sample':>10}"]
        for preset, g in gen.items():
            for row in g.get("rows", []):
                val = _fmt(row.get("per_sample_s"), ".4f")
                lines.append(f"{preset:<7}{row['precision']:>10}{row['batch']:>6}{val:>10}")
            if "rows" not in g:
                lines.append(f"{preset:<7}  {g.get('skipped') or 'failed: ' + g.get('error', '?')[:80]}")
    ev = r.get("evaluate", {})
    if "seconds" in ev:
        lines.append(f"\nevaluate ({ev['preset']}, {ev['samples']} samples, EvalConfig() defaults, generation "
                     f"included): {ev['seconds']:.1f} s; baselines fit {ev['baselines_fit_s']:.1f} s")
    elif ev:
        lines.append(f"\nevaluate: {ev.get('skipped') or 'failed: ' + ev.get('error', '?')[:200]}")
    for s_ in r["skipped"]:
        lines.append(f"skipped {s_['part']}: {s_['reason']}")
    for e in r["errors"]:
        lines.append(f"error in {e['part']}: {e['error'][:200]}")
    lines.append(f"total {r.get('total_seconds', 0):.1f} s")
    return "\n".join(lines)


def target_verdict(r: dict, preset: str) -> dict:
    rows = [t for t in r["train"] if t["preset"] == preset and t["compile"] and "mfu" in t]
    out = {"mfu": MFU_TARGET, "preset": preset, "compile": True}
    if not rows:
        out.update(met=None, verdict="not measured (compiled run skipped or failed)")
    elif rows[0]["mfu"] is None:
        out.update(met=None, verdict=f"unknown (peak unknown; achieved {rows[0]['achieved_tflops']:.3g} TFLOP/s)")
    else:
        met = rows[0]["mfu"] >= MFU_TARGET
        out.update(met=met, verdict=f"{'met' if met else 'NOT met'} ({rows[0]['mfu']:.1%}; "
                                    f"{'see profile' if not met else 'no profile needed'})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny widths and few steps: seconds on a CPU")
    ap.add_argument("--output", default="gpu_check.json")
    ap.add_argument("--presets", default="base,large", help="comma-separated; the first is the MFU target's")
    ap.add_argument("--batch_size", type=int, default=0, help="training batch for every preset (0: choose)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure torch.compile (default: on for a GPU, off for a CPU)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="bf16 dense peak, for a card not in the table")
    ap.add_argument("--time_budget", type=float, default=270.0, help="seconds for all parts (a hard stop 25 s later)")
    args = ap.parse_args(argv)
    args.presets = [p for p in args.presets.split(",") if p]
    compile_on = args.compile if args.compile is not None else args.device.startswith("cuda")

    ck = Check(args)
    dev = ck.device
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py does on GPUs (fp32 parts: generation, evaluate)
        torch.backends.cudnn.allow_tf32 = True

    def hard_stop():
        ck.report["aborted"] = f"hard time limit: {args.time_budget + HARD_LIMIT_GRACE_S:.0f} s"
        for _ in range(3):  # the main thread may be changing the report while it is serialised
            try:
                ck.save()
                break
            except RuntimeError:
                time.sleep(0.5)
        print(f"gpu_check: stopped at the hard time limit; partial results in {args.output}", flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.time_budget + HARD_LIMIT_GRACE_S, hard_stop)
    watchdog.daemon = True
    watchdog.start()

    r = ck.report
    r["environment"] = environment(dev)
    r["peak"] = peak_info(dev, r["environment"]["device_name"], args.peak_tflops)
    r["shapes"] = {"task_mode": "clip_denoising", **{k: ck.shapes[k] for k in ("tokens", "input_dim", "cond_dim")}}
    r["compile_requested"] = compile_on
    r["mfu_formula"] = "flops_per_step / step_s / (bf16_dense_tflops * 1e12)"
    r["train_step"] = ("path from noise drawn ahead as train.py's loader workers do + forward under bf16 "
                       "autocast + flow_loss + backward + fused AdamW step; no grad clipping, EMA or data loading")
    r["sdpa"] = ck.part("sdpa", NEED_S["sdpa"], sdpa_part, ck)
    ck.save()
    r["host"] = ck.part("host", NEED_S["host"], host_part, ck)
    ck.save()
    r["train"], r["generation"] = [], {}
    for preset in args.presets:
        for compiled in (False, True):
            row = {"preset": preset, "compile": compiled}
            if compiled and not compile_on:
                row["skipped"] = "compile not requested (pass --compile)"
            else:
                need = NEED_S["train_compile" if compiled else "train_eager"]
                name = f"train {preset} {'compile' if compiled else 'eager'}"
                row.update(ck.part(name, need, train_part, ck, preset, compiled))
            r["train"].append(row)
            ck.save()
        first = preset == args.presets[0]
        if first:
            r["target"] = target_verdict(r, preset)
        r["generation"][preset] = ck.part(f"generation {preset}", NEED_S["generation"], generation_part, ck, preset)
        ck.save()
        if first:  # evaluation time is measured once, at the first preset
            r["evaluate"] = ck.part("evaluate", NEED_S["evaluate"], evaluate_part, ck, preset)
            ck.save()
    watchdog.cancel()
    ck.save()
    print(format_table(r))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
