import json

from conftest import readme_command
from blip3o_denoise.cli import main


def test_demo_quick_mode_beats_every_baseline_it_prints(tmp_path):
    out = tmp_path / "demo"
    rc = main([*readme_command("blip3o-denoise demo"), "--output_dir", str(out), "--quick"])  # declared: quick
    res = json.loads((out / "demo_result.json").read_text())
    failed = [name for name, ok in res["checks"].items() if not ok]
    assert res["checks"] and not failed, failed
    assert res["beats_baselines"] is True and rc == 0
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "run" / "final" / "model.safetensors").exists()
    gen, base = res["generation"], res["generation"]["baselines"]
    # the printed checks, recomputed from the numbers (with a margin: not a coin flip)
    assert gen["model"]["cosine_mean"] > base["mean_direction"]["cosine_mean"] + 0.1
    assert gen["point_estimate"]["cosine_mean"] > base["ridge"]["cosine_mean"] + 0.02
    assert gen["distribution"]["frechet_distance"] < base["ridge"]["distribution"]["frechet_distance"]
    for level, d in res["denoising"].items():
        assert d["point_estimate"]["cosine_mean"] > d["baselines"]["identity"]["cosine_mean"], level
    # even the short run must beat returning the noisy input at high noise
    d = res["denoising"]["0.9"]
    assert d["model"]["cosine_mean"] > d["baselines"]["identity"]["cosine_mean"] + 0.2
