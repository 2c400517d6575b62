"""benchmarks/gpu_check.py runs on the CPU (--quick) and its numbers follow from what it measured."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip3o_denoise.flow import FlowConfig, flow_loss, sample_path
from blip3o_denoise.model import ModelConfig, UniversalDiT

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PEAK = 1000.0  # a made-up peak, so that MFU is computed on a CPU


def run_script(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--output", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    r = run_script(out, "--peak_tflops", str(PEAK), "--batch_size", "3")
    return json.loads(out.read_text()), r.stdout


@pytest.fixture(scope="module")
def gpu_check_module():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    return gpu_check


def measured(report):
    return [t for t in report["train"] if "step_s" in t]


def test_environment_and_sdpa_fields(quick):
    r, stdout = quick
    env = r["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert "cuda" in env and env["cuda"] == torch.version.cuda
    assert env["device_name"]
    assert r["quick"] is True and r["errors"] == [], r["errors"]
    sd = r["sdpa"]
    assert sd["backend"] in {"flash (CPU kernel)", "math"}, sd
    assert any("scaled_dot_product" in op for op in sd["ops_seen"])
    assert sd["available"]["math"] is True and "method" in sd and "available_method" in sd
    assert "QUICK RUN" in stdout and "MFU" in stdout and "SDPA backend" in stdout


def test_training_numbers_follow_from_flops_and_time(quick):
    r, _ = quick
    rows = measured(r)
    assert [(t["preset"], t["compile"]) for t in rows] == [("base", False), ("large", False)]
    assert all("compile not requested" in t["skipped"] for t in r["train"] if t["compile"])
    assert r["peak"] == {"bf16_dense_tflops": PEAK, "source": "--peak_tflops"}
    n = r["shapes"]["tokens"]
    for t in rows:
        assert t["batch"] == 3 and t["tokens_per_step"] == 3 * n
        assert len(t["step_times_s"]) == t["timed_steps"] >= 1
        assert t["step_s"] == pytest.approx(statistics.median(t["step_times_s"]), abs=2e-6)
        assert t["samples_per_s"] == pytest.approx(3 / t["step_s"], rel=1e-9)
        assert t["tokens_per_s"] == pytest.approx(3 * n / t["step_s"], rel=1e-9)
        assert t["flops_per_step"] > 0 and sum(t["flops_by_op"].values()) == t["flops_per_step"]
        achieved = t["flops_per_step"] / t["step_s"] / 1e12
        assert t["achieved_tflops"] == pytest.approx(achieved, rel=1e-9)
        assert t["mfu"] == pytest.approx(achieved / PEAK, rel=1e-9)
        assert 0 < t["sample_path_s"] and t["sample_path_share"] == pytest.approx(t["sample_path_s"] / t["step_s"])
        assert t["peak_memory_gib"] > 0
    assert rows[1]["flops_per_step"] > rows[0]["flops_per_step"]  # the large preset is larger
    assert r["target"]["met"] is None and "not measured" in r["target"]["verdict"]


def test_flop_count_matches_an_independent_count(quick):
    """The script's FLOPs per step equal FlopCounterMode over the same training step done here, and
    are about 3x the forward pass (backward = 2x forward, minus the input gradient of the first layer)."""
    r, _ = quick
    s = r["shapes"]
    for t in measured(r):
        torch.manual_seed(0)
        model = UniversalDiT(ModelConfig(**t["model"]))
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(t["params_m"], abs=1e-3)
        target = torch.randn(t["batch"], s["tokens"], s["input_dim"])
        cond = torch.randn(t["batch"], s["tokens"], s["cond_dim"])
        path = sample_path(target, FlowConfig(), torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as fwd:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = model(path.x_t, path.t, cond)
        with FlopCounterMode(display=False) as full:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = model(path.x_t, path.t, cond)
            flow_loss(pred, path, FlowConfig())[0].backward()
        assert t["flops_per_step"] == full.get_total_flops()
        assert 2.5 < t["flops_per_step"] / fwd.get_total_flops() <= 3.0


def test_profile_generation_and_evaluate(quick):
    r, _ = quick
    prof = r["profile"]["base eager"]
    assert "under the 40% target" in prof["why"]
    top = prof["cpu_ops"]["top"]
    assert top and all(0 < row["share"] <= 1 for row in top)
    assert sum(row["share"] for row in top) <= 1 + 1e-6
    assert sum(prof["cpu_ops"]["by_category"].values()) == pytest.approx(1.0, abs=1e-3)
    for preset in ("base", "large"):
        rows = r["generation"][preset]["rows"]
        expected = {("bf16", 1), ("bf16", 4), ("fp32", 1), ("fp32", 4)}
        assert {(row["precision"], row["batch"]) for row in rows} == expected
        for row in rows:
            assert row["steps"] == 50 and row["per_sample_s"] == pytest.approx(row["seconds"] / row["batch"])
    ev = r["evaluate"]
    assert ev["samples"] == 16 and ev["seconds"] >= ev["evaluate_reported_seconds"] - 0.01 > 0
    from blip3o_denoise.evaluate import EvalConfig

    assert ev["settings"]["num_steps"] == EvalConfig().num_steps  # evaluate() at its defaults
    assert ev["settings"]["sample_counts"] == list(EvalConfig().sample_counts)


def test_time_guard_skips_and_records(tmp_path):
    out = tmp_path / "guard.json"
    r = run_script(out, "--time_budget", "0", "--presets", "base")
    rep = json.loads(out.read_text())
    skipped = {s["part"] for s in rep["skipped"]}
    assert skipped == {"sdpa", "host", "train base eager", "generation base", "evaluate"}, skipped
    assert all("time guard" in s["reason"] for s in rep["skipped"])
    assert "skipped" in rep["sdpa"] and "skipped" in rep["evaluate"] and not measured(rep)
    assert "skipped train base eager: time guard" in r.stdout


def test_peak_table(gpu_check_module):
    peak = gpu_check_module.peak_bf16_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989
    assert peak("NVIDIA H100 PCIe") == 756
    assert peak("NVIDIA H200") == 989
    assert peak("NVIDIA A100-SXM4-80GB") == 312
    assert peak("NVIDIA L40S") == 362
    assert peak("NVIDIA GeForce RTX 4090") == 165
    assert peak("Tesla T4") is None and peak("NVIDIA H100 NVL") is None
    info = gpu_check_module.peak_info(torch.device("cuda"), "Tesla T4", None)
    assert info["bf16_dense_tflops"] is None and "unknown" in info["note"]


def test_host_time_per_step_beside_the_device_step(quick, gpu_check_module):
    """The host part, at the base preset's real shapes even in the quick run: the device step at 40% MFU
    follows from the counted FLOPs and the peak; with noise drawn in the loader's workers the main process
    draws nothing, and each share is host time over that step."""
    r, stdout = quick
    h = r["host"]
    s = h["shapes"]
    assert (s["tokens"], s["input_dim"], s["cond_dim"], s["batch"]) == (256, 1024, 4096, 64)
    assert h["peak_tflops"] == PEAK and h["preset"] == "base"
    assert h["step_s_at_40pct_mfu"] == pytest.approx(h["flops_per_step"] / (0.4 * PEAK * 1e12), rel=1e-12)
    assert 7e12 < h["flops_per_step"] < 1e13  # about 6 x 64 x 256 tokens x 86M parameters, plus attention
    old, new = h["rows"]["main_process_noise"], h["rows"]["loader_noise"]
    assert old["workers"] == 0 and new["workers"] >= 2
    assert old["draw_randomness_s"] > 0 and new["draw_randomness_s"] < old["draw_randomness_s"] / 100
    for row in (old, new):
        assert row["share_of_step"] == pytest.approx(row["host_s"] / h["step_s_at_40pct_mfu"])
        assert row["main_process_work_s"] == pytest.approx(row["draw_randomness_s"] + row["issue_copies_s"])
    assert h["bytes_to_device_per_step"] == 64 * 256 * (2 * 1024 + 4096) * 4 + 64 * 13
    assert "host time per training step in the main process" in stdout and "loader workers" in stdout


def test_flops_on_the_meta_device_match_a_cpu_count_plus_attention(gpu_check_module):
    """The host part counts FLOPs on the meta device (no memory, no time); on the CPU the same step counts
    the same matmuls, but not attention (the CPU's SDPA kernel is not in FlopCounterMode's registry)."""
    from host_time import step_flops

    from blip3o_denoise.model import config_from_preset

    shapes = dict(tokens=16, input_dim=32, cond_dim=64, batch=3)
    over = gpu_check_module.QUICK_OVERRIDES["base"]
    meta = step_flops("base", shapes, over)
    cfg = config_from_preset("base", 32, 64, **over)
    torch.manual_seed(0)
    model = UniversalDiT(cfg)
    x, cond = torch.randn(3, 16, 32), torch.randn(3, 16, 64)
    with FlopCounterMode(display=False) as fc:
        path = sample_path(x, FlowConfig(), torch.Generator().manual_seed(0))
        flow_loss(model(path.x_t, path.t, cond), path, FlowConfig())[0].backward()
    # attention: q k^T and p v, each 2 b h n^2 d FLOPs forward and twice that backward, in every block
    attention = 3 * 2 * (2 * 3 * 16 * 16 * cfg.hidden_size) * cfg.depth
    assert meta == fc.get_total_flops() + attention
