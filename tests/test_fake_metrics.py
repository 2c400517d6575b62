"""Settings that would fake a metric are refused, naming the flag; a model indistinguishable from the
identity is not rated as beating it."""

import pytest
import torch

from blip3o_denoise import sphere
from blip3o_denoise.cli import main
from blip3o_denoise.evaluate import EvalConfig, evaluate


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


EVAL = ["--num_inference_steps", "2", "--noise_levels", "0.5", "--sample_counts", "2", "--no_progress"]


@pytest.mark.parametrize("command,extra,flag", [
    ("evaluate", ["--pca_dim", "0"], "--pca_dim 0"),
    ("evaluate", ["--guidance", "2"], "--guidance 2"),
    ("evaluate", ["--num_samples", "-1"], "--num_samples -1"),
    ("evaluate", ["--sample_counts", "2,0"], "--sample_counts 2,0"),
    ("evaluate", ["--sample_counts", "-3"], "--sample_counts -3"),
    ("evaluate", ["--noise_levels", "0.5,1.5"], "--noise_levels 0.5,1.5"),
    ("evaluate", ["--noise_levels", "0"], "--noise_levels 0"),
    ("evaluate", ["--num_inference_steps", "0"], "--num_inference_steps 0"),
    ("evaluate", ["--guidance", "nan"], "--guidance nan"),
    ("generate", ["--max_samples", "-1"], "--max_samples -1"),
    ("generate", ["--num_steps", "0"], "--num_steps 0"),
    ("generate", ["--guidance", "3"], "--guidance 3"),
    ("generate", ["--batch_size", "0"], "--batch_size 0"),
    ("sweep", ["--k", "0"], "--k 0"),
    ("sweep", ["--steps", "0,2"], "--steps 0,2"),
    ("sweep", ["--num_samples", "-2"], "--num_samples -2"),
])
def test_settings_that_fake_metrics_are_refused(run, tmp_path, capsys, command, extra, flag):
    data, ckpt = run
    out = tmp_path / ("o.safetensors" if command == "generate" else "o.json")
    argv = [command, "--checkpoint", str(ckpt), "--chunked_embeddings_dir", str(data), "--output", str(out)]
    argv += (EVAL if command == "evaluate" else []) + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}:"), err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("argv,flag", [
    (["convert", "SRC", "DST", "--max_shards", "-1"], "--max_shards -1"),
    (["convert", "SRC", "DST", "--chunk", "0"], "--chunk 0"),
    (["convert", "SRC", "DST", "--format", "litdata", "--chunk_samples", "0"], "--chunk_samples 0"),
    (["make-synthetic", "DST", "--target_noise", "nan"], "--target_noise nan"),
    (["make-synthetic", "DST", "--target_noise", "-1"], "--target_noise -1"),
    (["make-synthetic", "DST", "--eva_dim", "0"], "--eva_dim 0"),
    (["make-synthetic", "DST", "--tokens", "0"], "--tokens 0"),
    (["extract", "--images", "SRC", "--output", "DST", "--target_model", "a", "--condition_model", "b",
      "--batch_size", "0"], "--batch_size 0"),
])
def test_data_commands_refuse_out_of_range_options(run, tmp_path, capsys, argv, flag):
    dst = tmp_path / "dst"
    argv = [str(run[0]) if a == "SRC" else str(dst) if a == "DST" else a for a in argv]
    assert main(argv) == 2
    assert f"error: {flag}:" in capsys.readouterr().err
    assert not dst.exists()


class NearIdentity(torch.nn.Module):
    """Predicts the clean target as the noisy input nudged a hair toward the condition (= the clean target in
    eva_denoising): better than the identity by far less than the noise of the estimate."""

    def __init__(self, nudge):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.nudge = nudge

    def prepare_condition(self, cond, batch_size=None, num_tokens=None):
        return cond

    def forward(self, x, t, cond=None, cache=None, drop_mask=None):
        return sphere.normalize(x + self.nudge * (cond if cond is not None else cache))


def test_a_model_indistinguishable_from_identity_does_not_beat_it():
    g = torch.Generator().manual_seed(1)  # not evaluate's seed, whose noise would equal the targets
    target = sphere.normalize(torch.randn(32, 16, 32, generator=g))
    batch = {"target": target, "condition": target}
    cfg = EvalConfig(num_steps=2, noise_levels=(0.3,), sample_counts=(1,), distribution=False)
    tiny = evaluate(NearIdentity(1e-5), batch, "target", "eva_denoising", 0.0, 0.5, cfg)["denoising"]["0.3"]
    assert 0 < tiny["point_estimate"]["cosine_mean"] - tiny["baselines"]["identity"]["cosine_mean"] < 1e-4
    assert tiny["beats_identity"] is False and tiny["rating"] == "not better than identity"
    assert tiny["identity_margin"]["required"] >= 0.005
    real = evaluate(NearIdentity(0.5), batch, "target", "eva_denoising", 0.0, 0.5, cfg)["denoising"]["0.3"]
    assert real["beats_identity"] is True and real["rating"] == "excellent"
