"""benchmarks/real_quality.py on a miniature stand-in of the real development benchmark (train/ and
eval/ directories of seed shards), so the script that produces the README's real-data table cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import readme_command
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def test_real_quality_script_prints_and_writes_a_row(tmp_path):
    data = tmp_path / "rd"
    make_synthetic(data / "train", SyntheticSpec(num_samples=24, eva_dim=16, clip_dim=8, tokens=16, seed=0))
    make_synthetic(data / "eval", SyntheticSpec(num_samples=6, eva_dim=16, clip_dim=8, tokens=16, seed=1))
    out = tmp_path / "rows.json"
    fast = ["--eval_steps", "2", "--sample_eval", "4", "--output", str(out), "--workdir", str(tmp_path / "work")]

    def bench(argv):
        proc = subprocess.run([sys.executable, *argv, *fast], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "BENCH_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # the README's command (the default recipe); only the data and its step count are swapped
    bench(readme_command("python benchmarks/real_quality.py /tmp/rd --recipes default --steps",
                         {"/tmp/rd": data, "--steps": "2"}))
    rows = json.loads(out.read_text())
    assert [r["recipe"] for r in rows] == ["default"] and -1 <= rows[0]["point"] <= 1
    proc = bench(["benchmarks/real_quality.py", str(data), "--recipes", "mini_shift3_target", "--steps", "2"])
    rows = json.loads(out.read_text())
    assert [r["recipe"] for r in rows] == ["mini_shift3_target"]
    for r in rows:
        assert r["eval_samples"] == 6 and r["sample_eval"] == 4
        for key in ("point", "point_exp_map", "ridge", "mean_of_4", "single"):
            assert -1.0 <= r[key] <= 1.0
        assert r["fd"] >= 0 and r["ridge_fd"] >= 0
    # target prediction has one reading only: both point columns agree
    assert abs(rows[0]["point"] - rows[0]["point_exp_map"]) < 1e-6
    assert "mini_shift3_target" in proc.stdout and "ridge" in proc.stdout


def test_real_quality_script_gives_each_recipe_the_steps_of_an_equal_budget(tmp_path):
    data = tmp_path / "rd"
    make_synthetic(data / "train", SyntheticSpec(num_samples=24, eva_dim=16, clip_dim=8, tokens=16, seed=0))
    make_synthetic(data / "eval", SyntheticSpec(num_samples=6, eva_dim=16, clip_dim=8, tokens=16, seed=1))
    script, env = str(ROOT / "benchmarks" / "real_quality.py"), {**os.environ, "BENCH_THREADS": "1"}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_quality import RECIPES

    # the README's wide-token commands: every recipe they name exists (their budgets are minutes of real data)
    for argv in (readme_command("python benchmarks/real_quality.py /tmp/sw"),
                 readme_command("python benchmarks/real_quality.py /tmp/rd/wide")):
        assert set(argv[argv.index("--recipes") + 1].split(",")) <= set(RECIPES), argv
    # and the noise-shift command runs, with its data and step counts swapped
    out3 = tmp_path / "shift.json"
    argv = readme_command("python benchmarks/real_quality.py /tmp/rd --recipes default,shift_auto",
                          {"/tmp/rd": data, "--steps": "2", "--warmup_steps": "1"})
    proc = subprocess.run([sys.executable, *argv, "--eval_steps", "2", "--sample_eval", "4", "--output", str(out3),
                           "--workdir", str(tmp_path / "s")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["recipe"] for r in json.loads(out3.read_text())] == ["default", "shift_auto", "shift1"]
    timed = subprocess.run([sys.executable, script, str(data), "--recipes", "default", "--time_only", "--workdir",
                            str(tmp_path / "t")], capture_output=True, text=True, env=env)
    assert timed.returncode == 0, timed.stderr[-3000:]
    line = [ln for ln in timed.stdout.splitlines() if ln.startswith("--step_seconds default=")]
    assert line and float(line[0].split("=")[1]) > 0
    out = tmp_path / "rows.json"
    # a recipe twice as costly per step gets half the steps; warmup is a fifth of the steps
    proc = subprocess.run([sys.executable, script, str(data), "--recipes", "default,shift_auto", "--budget_seconds",
                           "5", "--step_seconds", "default=0.25,shift_auto=0.5", "--eval_steps", "2",
                           "--sample_eval", "4", "--output", str(out), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["recipe"], r["steps"], r["warmup_steps"]) for r in rows] == [("default", 20, 4), ("shift_auto", 10, 2)]
    # --time_shift auto from 16 target tokens of width 8
    assert rows[0]["time_shift"] == 3.0 and abs(rows[1]["time_shift"] - (16 * 8 / 4096) ** 0.5) < 1e-9
