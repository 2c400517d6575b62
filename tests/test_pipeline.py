"""The Python API (`Denoiser`): bad input is refused with what was expected, and sampling stays inside
the noise levels the model was trained on."""

import math

import pytest
import torch

from blip3o_denoise import sphere as S
from blip3o_denoise.model import ModelConfig, UniversalDiT
from blip3o_denoise.pipeline import Denoiser
from blip3o_denoise.sampling import generate, integrate, model_velocity_fn, point_estimate

D_IN, D_COND, N = 8, 12, 16


def denoiser(min_level=0.0, max_level=1.0, ptype="velocity", cond_dropout=0.0):
    torch.manual_seed(0)
    m = UniversalDiT(ModelConfig(input_dim=D_IN, cond_dim=D_COND, hidden_size=32, depth=1, num_heads=4,
                                 num_kv_heads=2, cond_dropout=cond_dropout))
    with torch.no_grad():
        for p in m.parameters():  # the zero-initialised output layer would make every velocity 0
            p.add_(torch.randn_like(p) * 0.05)
    cfg = {"flow": {"prediction_type": ptype, "min_noise_level": min_level, "max_noise_level": max_level},
           "train": {"num_inference_steps": 4, "solver": "euler"},
           "data": {"tokens": N, "target_dim": D_IN, "cond_dim": D_COND}}
    return Denoiser(m, cfg)


def cond(b=2, n=N, d=D_COND):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(1))


def noisy(b=2, n=N, d=D_IN):
    return S.normalize(torch.randn(b, n, d, generator=torch.Generator().manual_seed(2)))


def with_value(x, value):
    x = x.clone()
    x[0, 3, 1] = value
    return x


BAD_CONDITIONS = [
    (with_value(cond(), float("nan")), "finite"),
    (with_value(cond(), float("inf")), "finite"),
    (cond()[0], "3-D tensor"),
    (cond(b=0), "non-empty"),
    (cond(n=0), "non-empty"),
    (cond(d=D_COND + 1), f"width {D_COND}"),
    (cond(n=9), f"{N} tokens"),
    (cond().int(), "floating-point"),
    (cond().numpy(), "torch.Tensor"),
]


@pytest.mark.parametrize("bad,expected", BAD_CONDITIONS)
def test_bad_condition_is_refused_with_what_was_expected(bad, expected):
    den = denoiser()
    for call in (lambda: den.generate(bad, num_steps=2), lambda: den.denoise(noisy(), bad, 0.5, num_steps=2),
                 lambda: den.point_estimate(noisy(), bad, 0.5)):
        with pytest.raises(ValueError, match="condition: expected .*" + expected):
            call()


BAD_NOISY = [
    (with_value(noisy(), float("nan")), "finite"),
    (with_value(noisy(), -float("inf")), "finite"),
    (noisy()[0], "3-D tensor"),
    (noisy(b=0), "non-empty"),
    (noisy(d=D_IN + 2), f"width {D_IN}"),
    (noisy(n=25), f"{N} tokens"),
    (noisy(b=3), "batch size 2"),
]


@pytest.mark.parametrize("bad,expected", BAD_NOISY)
def test_bad_noisy_input_is_refused_with_what_was_expected(bad, expected):
    den = denoiser()
    for call in (lambda: den.denoise(bad, cond(), 0.5, num_steps=2), lambda: den.point_estimate(bad, cond(), 0.5)):
        with pytest.raises(ValueError, match="noisy: expected .*" + expected):
            call()


@pytest.mark.parametrize("level", [0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_noise_level_outside_zero_one_is_refused(level):
    den = denoiser()
    with pytest.raises(ValueError, match=r"noise_level: expected a number in \(0, 1\]"):
        den.denoise(noisy(), cond(), level, num_steps=2)
    with pytest.raises(ValueError, match=r"noise_level: expected a number in \(0, 1\]"):
        den.point_estimate(noisy(), cond(), level)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_num_steps_must_be_a_positive_integer(steps):
    den = denoiser()
    with pytest.raises(ValueError, match="num_steps: expected a positive integer"):
        den.generate(cond(), num_steps=steps)
    with pytest.raises(ValueError, match="num_steps: expected a positive integer"):
        den.denoise(noisy(), cond(), 0.5, num_steps=steps)


def test_guidance_must_be_finite():
    den = denoiser(cond_dropout=0.1)
    with pytest.raises(ValueError, match="guidance: expected a finite number"):
        den.generate(cond(), num_steps=2, guidance=float("nan"))


def test_good_input_still_works():
    den = denoiser()
    out = den.denoise(noisy(), cond(), 0.5, num_steps=2)
    assert out.shape == (2, N, D_IN) and torch.allclose(out.norm(dim=-1), torch.ones(2, N), atol=1e-5)
    assert den.generate(cond(), num_steps=2).shape == (2, N, D_IN)


# ----------------------------------------------------------------------------- min_noise_level


def test_integrate_stops_at_t_end():
    """The rotation field of test_sampling: stopping at t_end = 0.5 lands on the exact solution at 0.5."""
    g = torch.Generator().manual_seed(0)
    a = S.normalize(torch.randn(3, 4, 32, generator=g, dtype=torch.float64))
    b = S.normalize(S.project_tangent(a, torch.randn(3, 4, 32, generator=g, dtype=torch.float64)))
    phi = lambda t: 2.0 * (math.exp(2 * t) - 1) / (math.exp(2) - 1)

    def v(x, t):
        rx = (x * a).sum(-1, keepdim=True) * b - (x * b).sum(-1, keepdim=True) * a
        return (2 * 2.0 * torch.exp(2 * t) / (math.exp(2) - 1)).view(-1, 1, 1) * rx

    for solver in ("euler", "heun", "midpoint"):
        x = integrate(v, a, 0.0, 64, solver, t_end=0.5)
        assert (x - (math.cos(phi(0.5)) * a + math.sin(phi(0.5)) * b)).norm(dim=-1).max() < 2e-2, solver
    assert torch.equal(integrate(v, a, 0.3, 4, t_end=0.3), a)
    with pytest.raises(ValueError, match="end time"):
        integrate(v, a, 0.5, 4, t_end=0.4)


def queried_times(den):
    ts = []
    den.model.register_forward_pre_hook(lambda mod, args: ts.append(args[1].detach().clone()))
    return ts


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_sampler_never_queries_below_the_trained_min_noise_level(solver):
    den = denoiser(min_level=0.3)
    ts = queried_times(den)
    den.generate(cond(), num_steps=5, seed=0, solver=solver)
    den.denoise(noisy(), cond(), 0.8, num_steps=5, solver=solver)
    t = torch.cat(ts)
    assert float(t.max()) == pytest.approx(0.7, abs=1e-6)  # noise level 0.3: the point estimate's call
    # the same model told it was trained down to 0 integrates to t = 1 - 1/steps
    den0 = denoiser(min_level=0.0)
    ts0 = queried_times(den0)
    den0.generate(cond(), num_steps=5, seed=0, solver=solver)
    assert float(torch.cat(ts0).max()) > 0.79


@pytest.mark.parametrize("ptype", ["velocity", "target"])
def test_min_noise_level_integrates_to_it_then_jumps_with_the_point_estimate(ptype):
    den = denoiser(min_level=0.3, ptype=ptype)
    out = den.denoise(noisy(), cond(), 0.8, num_steps=5)
    with torch.inference_mode():
        fn = model_velocity_fn(den.model, cond(), ptype, num_tokens=N)
        x = integrate(fn, noisy(), 0.2, 5, t_end=0.7)
    expected = point_estimate(den.model, x, cond(), 0.3, ptype)  # prediction_to_target, default rule
    assert torch.allclose(out, expected, atol=1e-5)
    # starting at the trained minimum: the point estimate there, no integration
    at_min = den.denoise(noisy(), cond(), 0.3, num_steps=5)
    assert torch.allclose(at_min, point_estimate(den.model, noisy(), cond(), 0.3, ptype), atol=1e-5)


def test_start_below_the_trained_min_noise_level_is_refused():
    den = denoiser(min_level=0.3, max_level=0.9)
    with pytest.raises(ValueError, match=r"below the lowest level seen in training \(0.3\)"):
        den.denoise(noisy(), cond(), 0.2, num_steps=2)
    with pytest.raises(ValueError, match=r"below the lowest level seen in training \(0.3\)"):
        den.point_estimate(noisy(), cond(), 0.1)
    with pytest.raises(ValueError, match="below min_noise_level"):
        generate(den.model, cond(), "velocity", 2, noise_level=0.2, x_start=noisy(), min_noise_level=0.3)


def test_from_pretrained_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    """A run without final/ whose newest checkpoint was cut short: the previous one is loaded, and said."""
    import shutil

    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.checkpoint import resolve_checkpoint
    from blip3o_denoise.train import TrainConfig, checkpoint_dirs, train

    data = tmp_path / "d"
    make_synthetic(data, SyntheticSpec(num_samples=24, eva_dim=16, clip_dim=8, tokens=16))
    out = tmp_path / "run"
    train(TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", batch_size=4,
                      max_steps=4, save_every_n_steps=2, holdout_fraction=0.2, eval_samples=2, num_inference_steps=2,
                      progress=False))
    shutil.rmtree(out / "final")
    older, newest = checkpoint_dirs(out)
    ema = newest / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])
    assert resolve_checkpoint(out) == older
    assert "unreadable weights" in capsys.readouterr().out
    Denoiser.from_pretrained(out)  # loads the older one
    (older / "model.safetensors").write_bytes(b"\x00")
    (older / "ema.safetensors").unlink()
    with pytest.raises(ValueError, match="every checkpoint is damaged"):
        resolve_checkpoint(out)
