"""The wide head (blocks at a width >= the token width after the body) and ``--time_shift auto``."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip3o_denoise.checkpoint import resume_conflicts
from blip3o_denoise.cli import build_parser, train_config_from_args
from blip3o_denoise.config import AUTO, TrainConfig, auto_time_shift
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.model import ModelConfig, UniversalDiT
from blip3o_denoise.pipeline import Denoiser
from blip3o_denoise.sphere import normalize
from blip3o_denoise.train import build, train

OLD = Path(__file__).parent / "fixtures" / "old_checkpoint"
D, H = 64, 16  # tokens four times wider than the model


def model(head: bool, **kw) -> UniversalDiT:
    torch.manual_seed(0)
    extra = dict(head_width=64, head_depth=1) if head else {}
    return UniversalDiT(ModelConfig(input_dim=D, cond_dim=24, hidden_size=H, depth=1, num_heads=2, num_kv_heads=1,
                                    **extra, **kw))


def randomise_zero_layers(m: UniversalDiT) -> None:
    """Zero-initialised layers (gates, AdaLN, output) made random, as they are after training."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def output_rank(m: UniversalDiT) -> int:
    g = torch.Generator().manual_seed(2)
    x = normalize(torch.randn(8, 16, D, generator=g))
    cond = torch.randn(8, 16, 24, generator=g)
    with torch.no_grad():
        out = m(x, torch.full((8,), 0.3), cond).reshape(-1, D).double()
    s = torch.linalg.svdvals(out)
    return int((s > 1e-4 * s[0]).sum())


def test_plain_output_lies_in_a_hidden_width_subspace_and_the_head_lifts_it():
    plain, wide = model(False), model(True)
    randomise_zero_layers(plain)
    randomise_zero_layers(wide)
    # plain: out(features) with features of width H, plus the bias: at most H + 1 directions
    assert output_rank(plain) <= H + 1
    assert output_rank(wide) == D


def fit_linear_map(m: UniversalDiT, a: torch.Tensor, steps: int = 300) -> float:
    """Mean squared error left after fitting ``y = x a^T`` (token-wise) with ``m``'s raw output."""
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = normalize(torch.randn(16, 4, D, generator=g))
        loss = ((m(x, torch.rand(16, generator=g), torch.randn(16, 4, 24, generator=g)) - x @ a.T) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = normalize(torch.randn(64, 4, D, generator=g))
    with torch.no_grad():
        return float(((m(x, torch.rand(64, generator=g), torch.randn(64, 4, 24, generator=g)) - x @ a.T) ** 2)
                     .sum(-1).mean())


def test_wide_head_fits_a_full_rank_linear_map_the_plain_model_cannot():
    a = torch.randn(D, D, generator=torch.Generator().manual_seed(4))
    # Unit x spread evenly: E|a x|^2 = |a|_F^2 / D. An affine map through H dims keeps at most the top
    # H + 1 squared singular values of a: the rest is the plain model's floor.
    s2 = torch.linalg.svdvals(a) ** 2
    floor = float(s2[H + 1:].sum() / D)
    plain_err, wide_err = fit_linear_map(model(False), a), fit_linear_map(model(True), a)
    assert plain_err > 0.9 * floor
    assert wide_err < 0.3 * floor, (wide_err, plain_err, floor)


def test_old_checkpoint_loads_and_samples_bit_identically():
    den = Denoiser.from_pretrained(OLD)
    assert den.model.head is None
    exp = load_file(str(OLD / "expected.safetensors"))
    assert torch.equal(den.generate(exp["condition"], seed=3), exp["generated"])
    assert torch.equal(den.denoise(exp["noisy"], exp["condition"], 0.5), exp["denoised"])


def test_old_checkpoint_resumes_without_conflicts_and_refuses_a_head():
    saved = json.loads((OLD / "config.json").read_text())
    assert "head_width" not in saved["model"]
    current = {**saved, "model": {**saved["model"], "head_width": 0, "head_depth": 0}}
    assert resume_conflicts(saved, current) == []
    widened = {**saved, "model": {**saved["model"], "head_width": 64, "head_depth": 1}}
    assert resume_conflicts(saved, widened) == ["model head_depth 0 -> 1", "model head_width 0 -> 64"]


@pytest.mark.parametrize("conditioning,prediction", [("aligned", "velocity"), ("cross_attention", "target"),
                                                     ("both", "noise")])
def test_head_trains_in_every_conditioning_mode_and_prediction_type(conditioning, prediction):
    m = model(True, conditioning=conditioning, zero_init_output=prediction == "velocity", grad_checkpointing=True)
    randomise_zero_layers(m)
    m.train()
    out = m(normalize(torch.randn(2, 16, D)), torch.rand(2), torch.randn(2, 16, 24))
    out.square().sum().backward()
    assert out.shape == (2, 16, D)
    for name, p in m.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    make_synthetic(d, SyntheticSpec(num_samples=24, eva_dim=32, clip_dim=16, tokens=16))
    return d


def test_time_shift_auto_is_sqrt_of_tokens_times_width_over_4096(data, tmp_path):
    assert auto_time_shift(256, 1024) == 8.0 and auto_time_shift(256, 4096) == 16.0
    ns = build_parser().parse_args(["train", "--chunked_embeddings_dir", str(data), "--time_shift", "auto",
                                    "--output_dir", str(tmp_path / "run"), "--device", "cpu"])
    cfg = train_config_from_args(ns)
    assert cfg.time_shift == AUTO
    run = build(cfg)
    # clip_denoising: N = 16 target tokens of width 16
    assert run.run_config["flow"]["time_shift"] == pytest.approx(math.sqrt(16 * 16 / 4096)) == 0.25
    assert TrainConfig.from_dict({"time_shift": "auto"}).time_shift == AUTO
    with pytest.raises(ValueError, match="time_shift"):
        TrainConfig.from_dict({"time_shift": "fast"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--time_shift", "fast"])


def test_head_flags_must_come_together_and_fit_the_attention_heads():
    for bad in (dict(head_width=64), dict(head_depth=1), dict(head_width=100, head_depth=1)):
        with pytest.raises(ValueError, match="--head_width"):
            TrainConfig(**bad)


def test_head_run_trains_saves_and_resumes(data, tmp_path):
    common = dict(chunked_embeddings_dir=str(data), model_size="micro", head_width=64, head_depth=1,
                  batch_size=4, warmup_steps=0, min_lr_ratio=1.0, eval_every_n_steps=0, eval_samples=2,
                  num_inference_steps=2, progress=False, save_every_n_steps=2, device="cpu", max_noise_level=1.0)
    full, part = tmp_path / "full", tmp_path / "part"
    train(TrainConfig(output_dir=str(full), max_steps=4, **common))
    train(TrainConfig(output_dir=str(part), max_steps=2, **common))
    shutil.rmtree(part / "final")
    train(TrainConfig(output_dir=str(part), max_steps=4, resume=True, **common))
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert any(k.startswith("head.blocks.0.") for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    den = Denoiser.from_pretrained(full)
    assert den.model.head is not None
    out = den.generate(torch.randn(1, 16, 32), seed=0)
    assert out.shape == (1, 16, 16) and torch.allclose(out.norm(dim=-1), torch.ones(1, 16), atol=1e-5)
