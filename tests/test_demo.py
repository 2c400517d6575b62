import json

from blip3o_denoise.cli import main


def test_demo_quick_mode_runs_end_to_end_and_reports(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--output_dir", str(out), "--quick"])
    res = json.loads((out / "demo_result.json").read_text())
    assert rc == (0 if res["beats_baselines"] else 4)
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "run" / "final" / "model.safetensors").exists()
    # even the short run must beat returning the noisy input at high noise
    d = res["denoising"]["0.9"]
    assert d["model"]["cosine_mean"] > d["baselines"]["identity"]["cosine_mean"] + 0.2
    assert res["generation"]["model"]["cosine_mean"] > res["generation"]["baselines"]["mean_direction"]["cosine_mean"]
    assert set(res["checks"]) and all(isinstance(v, bool) for v in res["checks"].values())
