"""Flow maps on the sphere (flowmap.py, the jump solver, the step-size input, training wiring)."""

from contextlib import nullcontext

import pytest
import torch

from blip3o_denoise import sphere as S
from blip3o_denoise.config import TrainConfig
from blip3o_denoise.flow import FlowConfig, PathSample, flow_loss
from blip3o_denoise.flowmap import (
    consistency_target, draw_consistency, dyadic_steps, jump, sampler_states, teacher_target,
)
from blip3o_denoise.model import UniversalDiT, config_from_preset
from blip3o_denoise.sampling import integrate, model_calls
from blip3o_denoise.train import Teacher, flow_map_targets

AXIS = S.normalize(torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64))
OMEGA = 2.0  # radians per unit time


def rotate(x, angle):
    """Rodrigues: rotate ``x [..., 3]`` about AXIS by ``angle [...]``."""
    a = AXIS.expand_as(x)
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    return x * c + torch.cross(a, x, dim=-1) * s + a * (a * x).sum(-1, keepdim=True) * (1 - c)


def exact_rotation_map(x, t, d):
    """The exact flow map of dx/dt = OMEGA * AXIS x x as a jump direction: exp_x(d w) = R(OMEGA d) x.
    Its orbits are circles of latitude, not great circles, so w depends on d (curvature)."""
    db = d[:, None, None]
    return S.log_map(x, rotate(x, OMEGA * db.squeeze(-1))) / db


def rotation_velocity(x, t, d=None):
    return OMEGA * torch.cross(AXIS.expand_as(x), x, dim=-1)


def points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return S.normalize(torch.randn(n, 1, 3, generator=g, dtype=torch.float64))


def test_an_exact_flow_map_has_zero_self_consistency_loss():
    x = points()
    t = torch.full((64,), 0.2, dtype=torch.float64)
    for two_d in (0.5, 0.125):
        d2 = torch.full((64,), two_d, dtype=torch.float64)
        w_star = consistency_target(exact_rotation_map, x, t, d2, min_step=1 / 128)
        assert float((w_star - exact_rotation_map(x, t, d2)).norm(dim=-1).max()) < 1e-9
        # the velocity read as a jump (the same w for every d) is not a flow map: its loss is not zero
        naive = consistency_target(rotation_velocity, x, t, d2, min_step=1 / 128)
        assert float((naive - rotation_velocity(x, t)).norm(dim=-1).mean()) > 1e-3 * two_d
    assert abs(float((w_star * x).sum(-1).abs().max())) < 1e-9  # a tangent vector at x_t


def test_the_jump_solver_is_exact_for_an_exact_flow_map_in_one_call():
    x0 = points(seed=1)
    calls = []

    def field(x, t, d=None):
        calls.append(d)
        return exact_rotation_map(x, t, d)

    end = integrate(field, x0, 0.0, 1, "jump")
    assert len(calls) == 1 and model_calls("jump", 1) == 1
    assert torch.allclose(end, rotate(x0, torch.full(x0.shape[:-1], OMEGA, dtype=torch.float64)), atol=1e-9)
    euler = integrate(rotation_velocity, x0, 0.0, 1, "euler")  # one Euler step leaves the circle
    assert float((euler - end).norm(dim=-1).mean()) > 0.1


def test_dyadic_steps_and_consistency_draws():
    assert dyadic_steps(1 / 8) == [1.0, 0.5, 0.25, 0.125]
    seeds = list(range(4000))
    two_d, t = draw_consistency(seeds, 0.25, 1 / 8)
    chosen = two_d > 0
    assert abs(float(chosen.float().mean()) - 0.25) < 0.03
    assert bool(torch.isnan(t[~chosen]).all()) and not bool(torch.isnan(t[chosen]).any())
    assert bool((t[chosen] + two_d[chosen] <= 1 + 1e-6).all())  # every jump ends by t = 1
    assert torch.equal(torch.remainder(t[chosen] / two_d[chosen], 1.0), torch.zeros(int(chosen.sum())))  # its grid
    assert set(two_d[chosen].tolist()) == set(dyadic_steps(1 / 8))  # every jump is trained, 1 included
    assert bool(((two_d == 1.0) & (t == 0.0)).any()) and bool(((two_d == 0.5) & (t == 0.5)).any())
    # a sample's draw depends on its seed only, not on the batch it is in
    part = draw_consistency(seeds[1000:1100], 0.25, 1 / 8)
    assert torch.equal(part[0], two_d[1000:1100])
    # a noise range that starts above t = 0 (max noise level 0.6): grid starts from t >= 0.4 only
    two_d, t = draw_consistency(seeds, 0.25, 1 / 8, t_lo=0.4)
    assert bool((t[two_d > 0] >= 0.4 - 1e-6).all()) and 1.0 not in set(two_d.tolist())


def test_the_loader_trains_jumps_from_their_grid():
    from blip3o_denoise.data.noise import NoiseCollate

    items = [{"target": torch.randn(4, 8), "condition": torch.randn(4, 12), "index": torch.tensor(i)}
             for i in range(64)]
    batch = NoiseCollate(FlowConfig(min_noise_level=0.0, max_noise_level=1.0, time_shift=3.0), seed=3,
                         flow_map_share=0.5, flow_map_min_step=1 / 4)(items)
    jump = batch["step"] > 0
    t = 1 - batch["noise_level"]
    assert 10 < int(jump.sum()) < 54
    assert torch.allclose(torch.remainder(t[jump] / batch["step"][jump] + 1e-6, 1.0), torch.zeros(int(jump.sum())),
                          atol=1e-4)


def _dit(flow_map: bool, seed=0):
    torch.manual_seed(seed)
    m = UniversalDiT(config_from_preset("micro", 8, 12, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1,
                                        flow_map=flow_map))
    for p in m.parameters():  # give every zero-initialised layer weights, the step embedding's included
        if float(p.detach().abs().max()) == 0.0:
            torch.nn.init.normal_(p, std=0.1)
    return m.eval()


def test_step_size_zero_is_the_ordinary_velocity_model():
    fm = _dit(True)
    plain = UniversalDiT(config_from_preset("micro", 8, 12, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1))
    plain.load_state_dict({k: v for k, v in fm.state_dict().items() if not k.startswith("step_embed.")})
    x, c = S.normalize(torch.randn(3, 4, 8)), torch.randn(3, 4, 12)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        base = plain(x, t, c)
        assert torch.equal(fm(x, t, c, step_size=torch.zeros(3)), base)
        assert torch.equal(fm(x, t, c), base)
        assert not torch.allclose(fm(x, t, c, step_size=torch.full((3,), 0.5)), base, atol=1e-4)
    with pytest.raises(ValueError, match="without flow maps"):
        plain(x, t, c, step_size=torch.full((3,), 0.5))


def test_fine_tuning_starts_the_flow_map_as_the_velocity_model(tmp_path):
    from safetensors.torch import save_file

    from blip3o_denoise.checkpoint import load_initial_weights

    plain = _dit(False, seed=3)
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file(plain.state_dict(), str(ck / "model.safetensors"))
    (ck / "config.json").write_text(__import__("json").dumps({"model": plain.cfg.to_dict()}))
    fm = UniversalDiT(config_from_preset("micro", 8, 12, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1,
                                         flow_map=True))
    load_initial_weights(fm, ck)
    x, c, t = S.normalize(torch.randn(2, 4, 8)), torch.randn(2, 4, 12), torch.tensor([0.3, 0.6])
    with torch.no_grad():  # a fresh step embedding is zero: every step size reads as the old velocity
        assert torch.equal(fm(x, t, c, step_size=torch.tensor([0.25, 1.0])), plain(x, t, c))
    wider = UniversalDiT(config_from_preset("micro", 8, 12, hidden_size=64, depth=1, num_heads=2, num_kv_heads=1,
                                            flow_map=True))
    with pytest.raises(ValueError, match="hidden_size"):
        load_initial_weights(wider, ck)


class ToyField(torch.nn.Module):
    """A small MLP with the model's call signature, on one token of S^2 (fast enough for a test)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                     torch.nn.SiLU(), torch.nn.Linear(hidden, 3))

    def forward(self, x, t, cond=None, drop_mask=None, step_size=None):
        d = torch.zeros_like(t) if step_size is None else step_size
        return self.f(torch.cat([x[:, 0], t[:, None], d[:, None]], -1))[:, None]


class RotationTeacher(torch.nn.Module):
    """A 'trained model' whose velocity is the rotation field exactly (the teacher of distillation tests)."""

    def prepare_condition(self, cond, batch_size=None, num_tokens=None, drop_mask=None):
        return None

    def forward(self, x, t, cond=None, drop_mask=None, cache=None):
        return rotation_velocity(x.double(), t).to(x.dtype)


def train_toy(share, steps=800, seed=0, teacher=None):
    """Flow matching on the rotation field (u_t given exactly), plus self-consistency (or, with ``teacher``,
    distillation) on ``share`` of each batch, through the training loop's own flow_map_targets and flow_loss."""
    torch.manual_seed(seed)
    net = ToyField()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    cfg = TrainConfig(chunked_embeddings_dir="x", flow_map_share=share or 0.0, flow_map_min_step=1 / 8,
                      min_noise_level=0.0, max_noise_level=1.0)
    fcfg = FlowConfig(min_noise_level=0.0, max_noise_level=1.0, sphere_constraint_weight=0.0)
    for step in range(steps):
        x = points(128, seed=10 + step).float()
        t = torch.rand(128, generator=torch.Generator().manual_seed(step))
        path = PathSample(x, x, x, t, rotation_velocity(x.double(), t).float())
        two_d = None
        if share:
            jumps, t_jump = draw_consistency(list(range(step * 128, step * 128 + 128)), cfg.flow_map_share, 1 / 8)
            t = torch.where(jumps > 0, t_jump, t)
            path = PathSample(x, x, x, t, rotation_velocity(x.double(), t).float())
            path, two_d = flow_map_targets(net, path, None, None, jumps, cfg, nullcontext(), teacher)
        loss, _ = flow_loss(net(path.x_t, path.t, step_size=two_d), path, fcfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def jump_error(net, x0, calls):
    """Mean angle (rad) between ``calls`` jumps of ``net`` from ``x0`` over [0, 1] and the exact rotation."""
    exact = rotate(x0.double(), torch.full(x0.shape[:-1], OMEGA, dtype=torch.float64)).float()
    with torch.no_grad():
        fn = lambda x, t, d=None: S.project_tangent(x, net(x, t, step_size=d))  # noqa: E731
        return float(torch.arccos((integrate(fn, x0, 0.0, calls, "jump") * exact).sum(-1).clamp(-1, 1)).mean())


def test_training_on_a_toy_makes_one_jump_land_where_the_flow_goes():
    x0 = points(256, seed=99).float()
    err = lambda net, calls: jump_error(net, x0, calls)  # noqa: E731

    fm, plain = train_toy(0.5), train_toy(0.0, steps=400)
    # one and two jumps of the flow map against the velocity model's output read as jumps (measured: 1000
    # steps give 0.24 vs 0.57 rad at one call, 0.06 vs 0.31 at two)
    assert err(fm, 1) < 0.6 * err(plain, 1) and err(fm, 2) < 0.5 * err(plain, 2)

    def mismatch(net):  # angle between two chained jumps of 1/2 and one jump of 1
        with torch.no_grad():
            x, t = x0, torch.zeros(256)
            half, whole = torch.full((256,), 0.5), torch.ones(256)
            mid = jump(x, S.project_tangent(x, net(x, t, step_size=half)), half)
            two = jump(mid, S.project_tangent(mid, net(mid, t + 0.5, step_size=half)), half)
            once = jump(x, S.project_tangent(x, net(x, t, step_size=whole)), whole)
        return float(torch.arccos((two * once).sum(-1).clamp(-1, 1)).mean())

    assert mismatch(fm) < 0.7 * mismatch(plain)  # measured: 0.18 vs 0.30 rad after 800 steps


def test_teacher_targets_follow_the_teachers_ode():
    """The distillation target is where the sampler's own midpoint solver lands over the same interval, per
    sample (each with its own start time and jump), and converges to the exact rotation at order 2."""
    x = points(64, seed=3)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75] * 16, dtype=torch.float64)
    two_d = torch.tensor([1.0, 0.5, 0.25, 0.25] * 16, dtype=torch.float64)

    def speeding_up(x, t, d=None):  # the rotation at angular speed OMEGA (1 + t): the time must be right
        assert float(t.max()) < 1.0  # never asked at the end of an interval that reaches t = 1
        return (1 + t)[:, None, None] * rotation_velocity(x, t)

    errors = {}
    for steps in (1, 4, 16):
        w = teacher_target(speeding_up, x, t, two_d, steps)
        assert float((w * x).sum(-1).abs().max()) < 1e-9  # tangent at x_t
        end = jump(x, w, two_d)
        for k in range(4):  # the sampler, one start time and interval at a time
            i = slice(k, None, 4)
            ref = integrate(speeding_up, x[i], float(t[k]), steps, "midpoint", t_end=float(t[k] + two_d[k]))
            assert torch.allclose(end[i], ref, atol=1e-9)
        angle = OMEGA * (two_d + ((t + two_d) ** 2 - t ** 2) / 2)  # the integral of the speed over the interval
        exact = rotate(x, angle[:, None])
        errors[steps] = float(torch.arccos((end * exact).sum(-1).clamp(-1, 1)).max())
    # measured: 1.24 rad at 1 step, 0.126 at 4, 0.0080 at 16 (the longest jump turns by 3 rad); order 2: the
    # error falls about 16x for 4x smaller steps once the steps are small (15.8x from 4 to 16 steps)
    assert errors[16] < 0.01 and errors[4] > 12 * errors[16] and errors[1] > 8 * errors[4]
    with pytest.raises(ValueError, match="steps"):
        teacher_target(rotation_velocity, x, t, two_d, 0)


def test_sampler_states_are_where_the_jump_sampler_stands():
    """With an exact flow map, k jumps of 2d from the noise stand at the exact flow at t = k 2d; each sample is
    moved with its own rows (here each has its own rotation speed) and only as many times as its k."""
    x0 = points(8, seed=5)
    t = torch.tensor([0.0, 0.5, 0.75, 0.875, 0.25, 0.5, 0.0, 0.125], dtype=torch.float64)
    two_d = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.25, 0.25, 0.5, 0.125], dtype=torch.float64)
    speed = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    calls = []

    def field(x, tt, d, rows):
        assert torch.allclose(tt, len(calls) * d)  # the i-th jump of every sample starts at i 2d
        calls.append(len(rows))
        db = d[:, None, None]
        return S.log_map(x, rotate(x, speed[rows, None] * db.squeeze(-1))) / db

    states = sampler_states(field, x0, t, two_d)
    assert torch.allclose(states, rotate(x0, (speed * t)[:, None]), atol=1e-9)
    assert sum(calls) == int(torch.round(t / two_d).sum()) == 15 and max(calls) == 6  # no call for k = 0


def test_distilling_an_exact_teacher_beats_self_consistency_on_a_toy():
    """Same toy, same budget: jump targets from the teacher's ODE (here the exact field) against two chained
    jumps of the model itself. Distillation must beat the velocity read as jumps, and self-consistency at 2 and
    4 calls (every jump size is tied to the flow, so the error of small jumps is not passed up)."""
    x0 = points(256, seed=99).float()
    err = lambda net, calls: jump_error(net, x0, calls)  # noqa: E731

    teacher = Teacher(RotationTeacher(), "velocity", 1e-2)
    distilled, shortcut = train_toy(0.5, steps=400, teacher=teacher), train_toy(0.5, steps=400)
    plain = train_toy(0.0, steps=400)
    assert err(distilled, 1) < 0.6 * err(plain, 1) and err(distilled, 2) < 0.5 * err(plain, 2)
    # measured (400 steps, seeds 0 and 1): 2 calls 0.067 / 0.069 rad vs 0.090 / 0.088; 4 calls 0.031 / 0.030
    # vs 0.063 / 0.057; at one call both are near 0.24 (the toy's field is easy to bootstrap)
    assert err(distilled, 2) < 0.9 * err(shortcut, 2) and err(distilled, 4) < 0.7 * err(shortcut, 4)
    # and in absolute terms, against the exact end point (the field turns points by 2 rad): one jump within
    # 0.3 rad (measured 0.23-0.24), two within 0.1 (0.067-0.069), four within 0.05 (0.030-0.031)
    assert err(distilled, 1) < 0.3 and err(distilled, 2) < 0.1 and err(distilled, 4) < 0.05


def test_distill_from_a_trained_run(tmp_path, capsys):
    """--distill_from end to end: the teacher is the run's EMA model, its ODE gives exactly the jump samples'
    targets (the rest keep flow matching), and a teacher that does not fit the data is refused at start."""
    import json

    from blip3o_denoise.cli import main
    from blip3o_denoise.data.noise import NoiseCollate
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.flow import path_from, prediction_to_velocity
    from blip3o_denoise.pipeline import Denoiser
    from blip3o_denoise.train import build

    data, other = tmp_path / "d", tmp_path / "wide"
    make_synthetic(data, SyntheticSpec(num_samples=30, eva_dim=16, clip_dim=8, tokens=16))
    make_synthetic(other, SyntheticSpec(num_samples=30, eva_dim=16, clip_dim=12, tokens=16))
    small = ["--model_size", "micro", "--batch_size", "8", "--max_steps", "2", "--warmup_steps", "1",
             "--eval_every_n_steps", "0", "--save_every_n_steps", "0", "--eval_samples", "4",
             "--min_noise_level", "0.0", "--max_noise_level", "1.0", "--holdout_fraction", "0.2", "--no_progress"]
    plain, fast, misfit = tmp_path / "plain", tmp_path / "fast", tmp_path / "misfit"
    assert main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(plain), *small]) == 0
    assert main(["train", "--chunked_embeddings_dir", str(other), "--output_dir", str(misfit), *small]) == 0
    distill = ["--chunked_embeddings_dir", str(data), "--flow_map_share", "0.5", "--distill_steps", "2", *small]
    assert main(["train", "--output_dir", str(fast), "--init_from", str(plain), "--distill_from", str(plain),
                 *distill]) == 0
    saved = json.loads((fast / "final" / "config.json").read_text())
    assert saved["train"]["distill_from"] == str(plain) and saved["model"]["flow_map"]

    cfg = TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(tmp_path / "x"), model_size="micro",
                      min_noise_level=0.0, max_noise_level=1.0, flow_map_share=0.5, distill_steps=2,
                      distill_from=str(plain), holdout_fraction=0.2, batch_size=8)
    run = build(cfg)
    collate = NoiseCollate(cfg.flow_config(), cfg.seed, flow_map_share=0.5, flow_map_min_step=cfg.flow_map_min_step)
    batch = collate([run.train_set[i] for i in range(8)])
    jumps = batch["step"] > 0
    assert 0 < int(jumps.sum()) < 8
    path = path_from(batch["target"], batch["noise"], batch["noise_level"], cfg.flow_config())
    new, _ = flow_map_targets(run.model, path, batch["condition"], None, batch["step"], cfg, nullcontext(), run.teacher)
    teacher, cond = Denoiser.from_pretrained(plain).model, batch["condition"][jumps]
    with torch.no_grad():
        ref = teacher_target(lambda x, t: prediction_to_velocity(teacher(x, t, cond), x, t, "velocity"),
                             path.x_t[jumps], path.t[jumps], batch["step"][jumps], 2)
    assert torch.allclose(new.u_t[jumps], ref, atol=1e-5)
    assert torch.equal(new.u_t[~jumps], path.u_t[~jumps]) and torch.equal(new.x_t, path.x_t)

    # a sample whose condition is dropped gets the teacher's null-condition ODE
    drop = torch.zeros(8, dtype=torch.bool)
    drop[torch.nonzero(jumps).flatten()[0]] = True
    dropped, _ = flow_map_targets(run.model, path, batch["condition"], drop, batch["step"], cfg, nullcontext(),
                                  run.teacher)
    with torch.no_grad():
        ref_drop = teacher_target(
            lambda x, t: prediction_to_velocity(teacher(x, t, cond, drop_mask=drop[jumps]), x, t, "velocity"),
            path.x_t[jumps], path.t[jumps], batch["step"][jumps], 2)
    assert torch.allclose(dropped.u_t[jumps], ref_drop, atol=1e-5)
    assert not torch.allclose(ref_drop[0], ref[0], atol=1e-4) and torch.allclose(ref_drop[1:], ref[1:], atol=1e-5)

    # --flow_map_start jumps: the jump samples start where the model's own jumps from their noise stand
    cfg.flow_map_start = "jumps"
    new, _ = flow_map_targets(run.model, path, batch["condition"], None, batch["step"], cfg, nullcontext(), run.teacher)
    two_d = batch["step"][jumps]

    def own(x, t, d, rows):
        with torch.no_grad():
            return prediction_to_velocity(run.model(x, t, cond[rows], step_size=d), x, t, "velocity")

    start = sampler_states(own, path.x0[jumps], path.t[jumps], two_d)
    assert torch.allclose(new.x_t[jumps], start, atol=1e-5) and torch.equal(new.x_t[~jumps], path.x_t[~jumps])
    moved = path.t[jumps] > 0
    assert bool(moved.any()) and not torch.allclose(start[moved], path.x_t[jumps][moved], atol=1e-3)
    with torch.no_grad():
        ref = teacher_target(lambda x, t: prediction_to_velocity(teacher(x, t, cond), x, t, "velocity"),
                             start, path.t[jumps], two_d, 2)
    assert torch.allclose(new.u_t[jumps], ref, atol=1e-5)

    assert main(["train", "--output_dir", str(tmp_path / "bad"), "--distill_from", str(misfit), *distill]) == 2
    err = capsys.readouterr().err
    assert f"--distill_from {misfit}" in err and "target width 12 (this run's data: 8)" in err
    assert not (tmp_path / "bad" / "final").exists()
    narrow = tmp_path / "narrow"  # trained on the default noise range 0.1-0.9: its ODE is not defined on [0, 1]
    assert main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(narrow),
                 *[a for a in small if a not in ("--min_noise_level", "0.0", "--max_noise_level", "1.0")]]) == 0
    assert main(["train", "--output_dir", str(tmp_path / "bad"), "--distill_from", str(narrow), *distill]) == 2
    assert "noise levels 0.1-0.9" in capsys.readouterr().err
    assert main(["train", "--output_dir", str(tmp_path / "bad"), "--distill_from", str(tmp_path / "none"),
                 *distill]) == 2
    assert f"--distill_from {tmp_path / 'none'}" in capsys.readouterr().err


def test_readme_fast_sampling_commands(tmp_path):
    """The README's fine-tune and 2-call evaluate commands, built from its text. Declared changes: the data,
    paths, micro preset, 2 steps; appended flags keep the run and its evaluation small."""
    import json

    from blip3o_denoise.cli import main
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.pipeline import Denoiser
    from conftest import readme_command

    data = tmp_path / "d"
    make_synthetic(data, SyntheticSpec(num_samples=30, eva_dim=16, clip_dim=8, tokens=16))
    small = ["--batch_size", "8", "--warmup_steps", "1", "--eval_every_n_steps", "0", "--save_every_n_steps", "0",
             "--holdout_fraction", "0.2", "--eval_samples", "4", "--no_progress"]
    plain, fast = tmp_path / "checkpoints_clip", tmp_path / "fast_clip"
    assert main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(plain), "--model_size", "micro",
                 "--max_steps", "2", "--min_noise_level", "0.0", "--max_noise_level", "1.0",
                 "--num_inference_steps", "2", *small]) == 0
    argv = readme_command("blip3o-denoise train --chunked_embeddings_dir /data/store --output_dir ./fast_clip",
                          {"/data/store": data, "./fast_clip": fast, "--model_size": "micro", "--max_steps": 2,
                           "./checkpoints_clip": plain})
    assert main([*argv, *small]) == 0
    den = Denoiser.from_pretrained(fast)
    assert den.model.cfg.flow_map and den.solver == "jump"
    assert json.loads((fast / "final" / "config.json").read_text())["train"]["distill_from"] == str(plain)
    assert den.num_steps == 2  # the command's --num_inference_steps: the saved model's default
    cond = torch.randn(2, 16, 16)
    one = den.generate(cond, num_steps=1, seed=0)
    assert one.shape == (2, 16, 8) and not torch.equal(one, den.generate(cond, num_steps=2, seed=0))
    with pytest.raises(ValueError, match="without flow maps"):
        Denoiser.from_pretrained(plain).generate(cond, num_steps=1, solver="jump")
    out = tmp_path / "fast.json"
    argv = readme_command("blip3o-denoise evaluate --checkpoint ./fast_clip",
                          {"./fast_clip": fast, "/data/store": data, "fast.json": out})
    assert main([*argv, "--noise_levels", "0.5", "--sample_counts", "2", "--no_distribution", "--no_progress"]) == 0
    res = json.loads(out.read_text())
    assert res["solver"] == "jump" and res["num_steps"] == 2
    sw = tmp_path / "s.json"
    assert main(["sweep", "--checkpoint", str(fast), "--chunked_embeddings_dir", str(data),
                 "--output", str(sw), "--steps", "1,2", "--solver", "jump,heun", "--k", "2"]) == 0
    rows = json.loads(sw.read_text())["rows"]
    assert [(r["solver"], r["steps"], r["calls"]) for r in rows] == [("jump", 1, 1), ("jump", 2, 2), ("heun", 1, 1),
                                                                    ("heun", 2, 3)]


def test_flowmap_benchmark_runs_as_documented(tmp_path):
    """benchmarks/flowmap_quality.py as the README gives it (data and run paths declared), on tiny runs."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import readme_command

    from blip3o_denoise.cli import main
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

    data, plain, fast = tmp_path / "d", tmp_path / "checkpoints_clip", tmp_path / "fast_clip"
    make_synthetic(data, SyntheticSpec(num_samples=30, eva_dim=16, clip_dim=8, tokens=16))
    common = ["--chunked_embeddings_dir", str(data), "--model_size", "micro", "--batch_size", "8", "--max_steps", "2",
              "--warmup_steps", "1", "--eval_every_n_steps", "0", "--save_every_n_steps", "0", "--eval_samples", "4",
              "--min_noise_level", "0.0", "--max_noise_level", "1.0", "--no_progress"]
    assert main(["train", "--output_dir", str(plain), *common]) == 0
    assert main(["train", "--output_dir", str(fast), "--flow_map_share", "0.25", *common]) == 0
    argv = readme_command("python benchmarks/flowmap_quality.py",
                          {"/tmp/rd/eval": data, "/tmp/rd/train": data, "runs/ordinary": plain, "runs/flowmap": fast,
                           "runs/finetuned": fast})
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, *argv, "--calls", "1,2", "--ordinary_steps", "2", "--num_samples", "8",
                        "--output", str(out)], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(Path(x["run"]).name, x["solver"], x["steps"]) for x in rows] == [
        ("checkpoints_clip", "euler", 2), ("fast_clip", "jump", 1), ("fast_clip", "jump", 2),
        ("fast_clip", "jump", 1), ("fast_clip", "jump", 2)]
    assert rows[1]["calls_per_train_step"] == 1.5 and rows[0]["calls_per_train_step"] == 1.0
    assert all(x["step_seconds"] > 0 for x in rows)


def test_a_run_saved_before_flow_maps_starts_a_flow_map():
    """Its config lacks the options added since (flow_map, the head): they read as their defaults."""
    from pathlib import Path

    from blip3o_denoise.checkpoint import load_initial_weights
    from blip3o_denoise.pipeline import Denoiser

    run = Path(__file__).parent / "fixtures" / "run_before_flow_maps"
    fm = UniversalDiT(config_from_preset("micro", 8, 12, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1,
                                         flow_map=True))
    load_initial_weights(fm, run)
    old = Denoiser.from_pretrained(run).model
    x, c, t = S.normalize(torch.randn(2, 4, 8)), torch.randn(2, 4, 12), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.equal(fm(x, t, c, step_size=torch.tensor([0.5, 0.25])), old(x, t, c))


FULL = {"min_noise_level": 0.0, "max_noise_level": 1.0}  # the noise range a flow map needs


@pytest.mark.parametrize("opts, needle", [
    ({"flow_map_share": -0.1}, "--flow_map_share"), ({"flow_map_share": 1.0}, "--flow_map_share"),
    ({"flow_map_share": float("nan")}, "--flow_map_share"), ({"flow_map_min_step": 0.0}, "--flow_map_min_step"),
    ({"flow_map_min_step": 0.3}, "--flow_map_min_step"), ({"solver": "jump"}, "--solver jump"),
    ({"flow_map_share": 0.25, "path": "euclidean", **FULL}, "--path sphere"),
    ({"flow_map_share": 0.25}, "--min_noise_level 0.0 --max_noise_level 1.0"),
    ({"flow_map_share": 0.25, "min_noise_level": 0.0, "max_noise_level": 0.9}, "got 0.0 and 0.9"),
    ({"distill_from": "runs/plain"}, "--distill_from"),
    ({"flow_map_share": 0.25, "distill_steps": 0, **FULL}, "--distill_steps"),
    ({"flow_map_start": "data"}, "--flow_map_start"),
    ({"flow_map_share": 0.25, "fsdp": True, **FULL}, "--fsdp with --flow_map_share"),
    ({"distill_guidance": -1.0, "distill_from": "r", "flow_map_share": 0.25, **FULL}, "--distill_guidance"),
    ({"distill_guidance": float("nan"), "distill_from": "r", "flow_map_share": 0.25, **FULL}, "--distill_guidance"),
])
def test_flow_map_options_are_checked(opts, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(chunked_embeddings_dir="x", **opts)
    assert TrainConfig(chunked_embeddings_dir="x", flow_map_share=0.25, **FULL).solver == "jump"  # auto
    assert TrainConfig(chunked_embeddings_dir="x").solver == "euler"


def test_a_distilled_run_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """The teacher is rebuilt from the run's config on --resume; the jump draws, the start states (from the
    model's own jumps) and the teacher's targets then repeat exactly: the same final weights, bit for bit."""
    from safetensors.torch import load_file

    import blip3o_denoise.report as R
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.train import train

    data = tmp_path / "d"
    make_synthetic(data, SyntheticSpec(num_samples=40, eva_dim=16, clip_dim=8, tokens=16))

    def cfg(out, **kw):
        return TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", hidden_size=32,
                           depth=1, batch_size=8, max_steps=4, warmup_steps=1, eval_every_n_steps=0,
                           save_every_n_steps=2, num_inference_steps=2, holdout_fraction=0.2, eval_samples=4,
                           progress=False, log_every_n_steps=1, min_noise_level=0.0, max_noise_level=1.0, **kw)

    teacher = tmp_path / "teacher"
    train(cfg(teacher))
    distill = dict(flow_map_share=0.5, distill_from=str(teacher), init_from=str(teacher), distill_steps=1,
                   flow_map_start="jumps", flow_map_min_step=0.25)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(cfg(whole, **distill))
    real_log = R.Reporter.log

    class Killed(Exception):
        pass

    def log_then_die(self, record):
        real_log(self, record)
        if record.get("step") == 3 and "loss" in record:
            raise Killed()

    monkeypatch.setattr(R.Reporter, "log", log_then_die)
    with pytest.raises(Killed):
        train(cfg(cut, **distill))
    monkeypatch.setattr(R.Reporter, "log", real_log)
    train(cfg(cut, resume=True, **distill))
    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = load_file(str(teacher / "final" / "model.safetensors"))
    assert any(not torch.equal(a[k], t[k]) for k in t)  # and it did train away from the teacher
    own = tmp_path / "own"  # the same run with the model as its own teacher (self-consistency) ends elsewhere
    train(cfg(own, **{k: v for k, v in distill.items() if k != "distill_from"}))
    c = load_file(str(own / "final" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_distilled_guidance_bakes_the_teachers_guided_ode_into_the_jumps(tmp_path, capsys):
    """--distill_guidance g: the jump targets follow the teacher's guided velocity v_u + g (v_c - v_u) (what
    sampling with --guidance g integrates, at two calls per step), so the student samples it at one call per jump.
    A teacher trained without condition dropout has no v_u: refused at start, naming the flag."""
    from blip3o_denoise.cli import main
    from blip3o_denoise.data.noise import NoiseCollate
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.flow import path_from
    from blip3o_denoise.pipeline import Denoiser
    from blip3o_denoise.sampling import model_velocity_fn
    from blip3o_denoise.train import build

    data = tmp_path / "d"
    make_synthetic(data, SyntheticSpec(num_samples=30, eva_dim=16, clip_dim=8, tokens=16))
    small = ["--chunked_embeddings_dir", str(data), "--model_size", "micro", "--batch_size", "8", "--max_steps", "3",
             "--warmup_steps", "1", "--eval_every_n_steps", "0", "--save_every_n_steps", "0", "--eval_samples", "4",
             "--min_noise_level", "0.0", "--max_noise_level", "1.0", "--holdout_fraction", "0.2", "--no_progress"]
    guided, plain = tmp_path / "guided", tmp_path / "plain"
    assert main(["train", "--output_dir", str(guided), "--cond_dropout", "0.3", "--learning_rate", "0.01",
                 *small]) == 0
    assert main(["train", "--output_dir", str(plain), *small]) == 0

    cfg = TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(tmp_path / "x"), model_size="micro",
                      min_noise_level=0.0, max_noise_level=1.0, flow_map_share=0.5, distill_steps=1,
                      distill_from=str(guided), distill_guidance=2.0, holdout_fraction=0.2, batch_size=8)
    run = build(cfg)
    batch = NoiseCollate(cfg.flow_config(), cfg.seed, flow_map_share=0.5,
                         flow_map_min_step=cfg.flow_map_min_step)([run.train_set[i] for i in range(8)])
    jumps = batch["step"] > 0
    path = path_from(batch["target"], batch["noise"], batch["noise_level"], cfg.flow_config())
    new, _ = flow_map_targets(run.model, path, batch["condition"], None, batch["step"], cfg, nullcontext(), run.teacher)
    teacher = Denoiser.from_pretrained(guided).model
    targets = {}
    for g in (2.0, 1.0):
        fn = model_velocity_fn(teacher, batch["condition"][jumps], "velocity", guidance=g)
        with torch.no_grad():
            targets[g] = teacher_target(lambda x, t: fn(x, t), path.x_t[jumps], path.t[jumps], batch["step"][jumps], 1)
    assert torch.allclose(new.u_t[jumps], targets[2.0], atol=1e-5)
    assert not torch.allclose(targets[2.0], targets[1.0], atol=1e-3)  # guidance changes the targets

    with pytest.raises(ValueError, match="--distill_from"):
        TrainConfig(chunked_embeddings_dir="x", distill_guidance=2.0, flow_map_share=0.25, **FULL)
    assert main(["train", "--output_dir", str(tmp_path / "bad"), "--flow_map_share", "0.5", "--distill_from",
                 str(plain), "--distill_guidance", "2", *small]) == 2
    assert "--distill_guidance 2 needs a teacher trained with --cond_dropout > 0" in capsys.readouterr().err
