import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import readme_command
from blip3o_denoise.cli import build_parser, main, train_config_from_args
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.pipeline import Denoiser
from blip3o_denoise.train import TrainConfig, build, checkpoint_dirs, lr_lambda, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    make_synthetic(d, SyntheticSpec(num_samples=60, eva_dim=32, clip_dim=16, tokens=17, num_shards=2))
    return d


def tiny(data, out, **kw):
    base = dict(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", batch_size=8,
                max_steps=6, warmup_steps=2, eval_every_n_steps=0, save_every_n_steps=0, num_inference_steps=4,
                holdout_fraction=0.2, eval_samples=8, progress=False, log_every_n_steps=1)
    base.update(kw)
    return TrainConfig(**base)


SEED_FLAGS = {
    "--task_mode": ("eva_denoising", "task_mode"),
    "--chunked_embeddings_dir": ("/x", "chunked_embeddings_dir"),
    "--output_dir": ("/y", "output_dir"),
    "--model_size": ("small", "model_size"),
    "--training_mode": ("cls_patch", "training_mode"),
    "--batch_size": ("4", "batch_size"),
    "--num_epochs": ("3", "num_epochs"),
    "--learning_rate": ("0.0003", "learning_rate"),
    "--max_grad_norm": ("0.5", "max_grad_norm"),
    "--sphere_constraint_weight": ("0.2", "sphere_constraint_weight"),
    "--prediction_type": ("target", "prediction_type"),
    "--noise_schedule": ("cosine", "noise_schedule"),
    "--min_noise_level": ("0.2", "min_noise_level"),
    "--max_noise_level": ("0.8", "max_noise_level"),
    "--overfit_test_size": ("20", "overfit_test_size"),
    "--max_shards": ("1", "max_shards"),
    "--seed": ("7", "seed"),
    "--warmup_steps": ("5", "warmup_steps"),
    "--weight_decay": ("0.1", "weight_decay"),
    "--eval_every_n_steps": ("9", "eval_every_n_steps"),
    "--save_every_n_steps": ("11", "save_every_n_steps"),
    "--num_workers": ("2", "num_workers"),
    "--precision": ("bf16", "precision"),
    "--conditioning": ("both", "conditioning"),
    "--num_inference_steps": ("13", "num_inference_steps"),
}


def test_every_seed_flag_parses_to_its_option(tmp_path):
    argv = ["train"]
    for flag, (value, _) in SEED_FLAGS.items():
        argv += [flag, value]
    argv += ["--debug_mode", "--resume"]
    cfg = train_config_from_args(build_parser().parse_args(argv))
    default = TrainConfig()
    for flag, (value, name) in SEED_FLAGS.items():
        got = getattr(cfg, name)
        assert str(got) == value or got == type(got)(value), flag
        assert got != getattr(default, name), f"{flag} equals its default: the test would not see it"
    assert cfg.debug_mode and cfg.resume


def test_config_file_and_flag_override(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("batch_size: 5\nlearning_rate: 0.002\nmodel_size: tiny\n")
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(yml), "--batch_size", "7"]))
    assert (cfg.batch_size, cfg.learning_rate, cfg.model_size) == (7, 0.002, "tiny")
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"batch_sise": 3}))
    with pytest.raises(ValueError, match="batch_sise"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(js)]))


def test_bad_option_values_are_named():
    with pytest.raises(ValueError, match="--task_mode"):
        TrainConfig(task_mode="denoise")
    with pytest.raises(ValueError, match="min_noise_level"):
        TrainConfig(min_noise_level=0.9, max_noise_level=0.1)
    assert main(["train", "--chunked_embeddings_dir", "/nonexistent", "--model_size", "micro", "--no_progress"]) == 2


def test_flags_change_what_is_built(data, tmp_path):
    base = build(tiny(data, tmp_path))
    assert base.train_set.target_dim == 16 and base.train_set.tokens == 16
    assert build(tiny(data, tmp_path, task_mode="eva_denoising")).train_set.target_dim == 32
    assert build(tiny(data, tmp_path, training_mode="cls_patch")).train_set.tokens == 17
    assert len(build(tiny(data, tmp_path, overfit_test_size=5)).train_set) == 5
    assert len(build(tiny(data, tmp_path, max_shards=1)).train_set) < len(base.train_set)
    n_micro = sum(p.numel() for p in base.model.parameters())
    assert sum(p.numel() for p in build(tiny(data, tmp_path, model_size="tiny")).model.parameters()) > 10 * n_micro
    cross = build(tiny(data, tmp_path, conditioning="cross_attention"))
    assert hasattr(cross.model.blocks[0], "cross_attn") and not hasattr(base.model.blocks[0], "cross_attn")
    r = build(tiny(data, tmp_path, max_steps=0, num_epochs=3, batch_size=4))
    assert r.total_steps == 3 * r.steps_per_epoch and r.steps_per_epoch == -(-len(r.train_set) // 4)
    g = base.optimizer.param_groups
    assert (g[0]["weight_decay"] == 0.01
            and build(tiny(data, tmp_path, weight_decay=0.3)).optimizer.param_groups[0]["weight_decay"] == 0.3)
    assert build(tiny(data, tmp_path, learning_rate=0.5)).optimizer.param_groups[0]["initial_lr"] == 0.5
    # the default (0) is resolved from the width, and the run records the number it used
    run = build(tiny(data, tmp_path))
    assert run.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 256 / 64)
    assert run.run_config["train"]["learning_rate"] == pytest.approx(1e-3 * 256 / 64)


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def read_metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_checkpoints_and_debug(data, tmp_path):
    out = tmp_path / "run"
    train(tiny(data, out, debug_mode=True, max_grad_norm=1e-4, save_every_n_steps=3))
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all("debug" in r and "grad_norm_by_module" in r["debug"] for r in recs)
    # the logged grad norm is the real, unclipped one (much larger than the clip threshold)
    assert all(r["grad_norm"] > 1e-3 for r in recs)
    assert recs[1]["lr"] > recs[0]["lr"]  # warmup
    ck = checkpoint_dirs(out)
    assert [c.name for c in ck] == ["step_00000003", "step_00000006"]
    for name in ("model.safetensors", "ema.safetensors", "training_state.pt", "config.json"):
        assert (ck[-1] / name).exists()
    state = torch.load(ck[-1] / "training_state.pt", weights_only=True)  # no arbitrary unpickling
    assert state["step"] == 6
    assert (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "results.json").read_text())["step"] == 6
    # an existing run is not silently overwritten
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(data, out))


def test_clipping_changes_the_update(data, tmp_path):
    train(tiny(data, tmp_path / "a", max_steps=2))
    train(tiny(data, tmp_path / "b", max_steps=2, max_grad_norm=1e-6))
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


class Crash(Exception):
    pass


def test_resume_is_exact(data, tmp_path, monkeypatch):
    import blip3o_denoise.train as T

    full = tmp_path / "full"
    train(tiny(data, full, max_steps=8, save_every_n_steps=4, cond_dropout=0.3, gradient_accumulation_steps=2))
    part = tmp_path / "part"
    real_save = T.save_checkpoint

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        raise Crash(path)

    monkeypatch.setattr(T, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(tiny(data, part, max_steps=8, save_every_n_steps=4, cond_dropout=0.3, gradient_accumulation_steps=2))
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    train(tiny(data, part, max_steps=8, save_every_n_steps=4, cond_dropout=0.3, gradient_accumulation_steps=2,
               resume=True))
    steps = [r["step"] for r in read_metrics(part) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    for name in ("model.safetensors", "ema.safetensors"):
        fa = load_file(str(checkpoint_dirs(full)[-1] / name))
        fb = load_file(str(checkpoint_dirs(part)[-1] / name))
        for k in fa:
            assert torch.equal(fa[k], fb[k]), (name, k)
    la = [r["loss"] for r in read_metrics(full) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(part) if "loss" in r]
    assert la == lb


def test_overfit_test_reports_pass_or_fail(data, tmp_path, capsys):
    """A run that cannot pass (3 steps from a random start) fails the overfit test, prints FAILED and exits 3;
    the passing side is the seed's overfit command (test_seed_readme_commands_run_verbatim)."""
    out = tmp_path / "o"
    rc = main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--model_size", "micro",
               "--batch_size", "8", "--max_steps", "3", "--overfit_test_size", "4", "--num_inference_steps", "2",
               "--eval_samples", "4", "--holdout_fraction", "0.2", "--eval_every_n_steps", "0", "--no_progress"])
    o = json.loads((out / "results.json").read_text())["overfit_test"]
    assert rc == 3 and o["samples"] == 4 and o["threshold"] == 0.8 and o["passed"] is False and o["cosine"] < 0.8
    assert "-> FAILED (threshold 0.8)" in capsys.readouterr().out


def test_eval_json_schema_and_noise_range(data, tmp_path):
    res = train(tiny(data, tmp_path / "r", min_noise_level=0.2, max_noise_level=0.6))
    assert "generation_skipped" in res and "generation" not in res
    assert set(res["denoising"]) == {"0.3", "0.5"} and res["denoising_skipped_levels"] == [0.7, 0.9]
    d = res["denoising"]["0.5"]
    for part in (d["model"], d["point_estimate"], d["baselines"]["identity"]):
        for k in ("cosine_mean", "cosine_std", "pooled_cosine_mean", "angular_distance_mean",
                  "sphere_violation_mean", "quality_ratio_0.6", "quality_ratio_0.7", "quality_ratio_0.8", "num_images"):
            assert k in part
    res = train(tiny(data, tmp_path / "g", task_mode="eva_denoising", max_noise_level=1.0))
    assert "quality_ratio_0.9" in res["generation"]["model"]
    assert "mean_direction" in res["generation"]["baselines"]


def test_cli_end_to_end_train_evaluate_generate(data, tmp_path):
    out = tmp_path / "cli"
    rc = subprocess.run(
        [sys.executable, str(ROOT / "train_universal_denoising.py"), "--task_mode", "clip_denoising",
         "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--model_size", "micro",
         "--batch_size", "8", "--num_epochs", "1", "--max_noise_level", "1.0", "--num_inference_steps", "3",
         "--holdout_fraction", "0.2", "--no_progress"], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert "generation from pure noise" in rc.stdout and "dispersion ratio" in rc.stdout
    res_path = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out), "--chunked_embeddings_dir", str(data), "--output", str(res_path),
                 "--num_inference_steps", "3", "--noise_levels", "0.5", "--precision", "bf16", "--no_progress"]) == 0
    res = json.loads(res_path.read_text())
    assert res["precision"] == "bf16"  # the run trained in fp32: the flag, not the run's default, decided
    assert set(res["denoising"]) == {"0.5"} and "generation" in res and res["seconds"] >= 0
    g = res["generation"]
    assert set(g["mean_of_k"]) == {"1", "2", "4", "8"} and "dispersion_ratio" in g and "diversity" in g
    assert {"mean_direction", "per_position_mean", "ridge"} <= set(g["baselines"])
    assert ({"frechet_distance", "precision", "recall"} <= set(g["distribution"])
            and "distribution" in g["baselines"]["ridge"])
    sweep_path = tmp_path / "sweep.json"
    assert main(["sweep", "--checkpoint", str(out), "--chunked_embeddings_dir", str(data), "--output", str(sweep_path),
                 "--steps", "1,3", "--k", "2", "--num_samples", "4", "--precision", "bf16"]) == 0
    sw = json.loads(sweep_path.read_text())
    assert sw["solvers"] == ["euler"] and "frechet_distance" in sw["rows"][0] and sw["precision"] == "bf16"
    assert [r["steps"] for r in sw["rows"]] == [1, 3] and "mean_of_2" in sw["rows"][0]
    assert sweep_path.with_suffix(".png").stat().st_size > 5000
    assert main(["sweep", "--checkpoint", str(out), "--chunked_embeddings_dir", str(data), "--output", str(sweep_path),
                 "--guidance_scales", "1,2"]) == 2  # no condition dropout in training: refused
    gen_path = tmp_path / "gen.safetensors"
    assert main(["generate", "--checkpoint", str(out), "--chunked_embeddings_dir", str(data), "--output", str(gen_path),
                 "--max_samples", "5", "--num_steps", "3"]) == 0
    with safe_open(str(gen_path), "pt") as f:
        emb = f.get_tensor("embeddings")
        keys = json.loads(f.metadata()["keys"])
    assert emb.shape == (5, 16, 16) and len(keys) == 5
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5, 16), atol=1e-4)


def test_denoiser_api(data, tmp_path):
    out = tmp_path / "d"
    train(tiny(data, out, max_noise_level=1.0))
    den = Denoiser.from_pretrained(out)
    cond = torch.randn(2, 16, 32)
    a = den.generate(cond, num_steps=3, seed=1)
    assert a.shape == (2, 16, 16) and torch.allclose(a.norm(dim=-1), torch.ones(2, 16), atol=1e-4)
    assert torch.equal(a, den.generate(cond, num_steps=3, seed=1))
    assert not torch.equal(a, den.generate(cond, num_steps=3, seed=2))
    d = den.denoise(torch.randn(2, 16, 16), cond, noise_level=0.5, num_steps=3)
    assert d.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="cond_dropout"):
        den.generate(cond, guidance=2.0)
    out2 = tmp_path / "d2"
    train(tiny(data, out2, max_noise_level=0.7))
    with pytest.raises(ValueError, match="max_noise_level 1.0"):
        Denoiser.from_pretrained(out2).generate(cond)


def first_losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.mark.parametrize("flag", [
    {"prediction_type": "target"}, {"prediction_type": "noise"}, {"noise_schedule": "cosine"},
    {"noise_schedule": "logit_normal"}, {"min_noise_level": 0.5, "max_noise_level": 0.6},
    {"sphere_constraint_weight": 5.0, "prediction_type": "target"}, {"precision": "bf16"},
    {"learning_rate": 1e-2}, {"seed": 3}, {"batch_size": 4}, {"conditioning": "both"},
    {"time_shift": 1.0}, {"path": "euclidean"},
])
def test_each_training_flag_changes_the_run(data, tmp_path, flag):
    base = tmp_path / "base"
    train(tiny(data, base, max_steps=3, **({"sphere_constraint_weight": 0.0, "prediction_type": "target"}
                                           if "sphere_constraint_weight" in flag else {})))
    changed = tmp_path / "changed"
    train(tiny(data, changed, max_steps=3, **flag))
    assert first_losses(base) != first_losses(changed)


def test_num_workers_give_the_same_run(data, tmp_path):
    train(tiny(data, tmp_path / "w0", max_steps=3))
    train(tiny(data, tmp_path / "w2", max_steps=3, num_workers=2))
    assert first_losses(tmp_path / "w0") == first_losses(tmp_path / "w2")


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path):
    from blip3o_denoise.data.seed_format import write_seed_shard

    d = tmp_path / "nan"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    clip, eva = torch.randn(40, 16, 16, generator=g), torch.randn(40, 16, 32, generator=g)
    clip[::2] = float("nan")  # half the samples poison every batch they are in
    write_seed_shard(d, 0, clip, eva, [f"k{i}" for i in range(40)], [""] * 40, False)
    with pytest.raises(RuntimeError, match="non-finite steps in a row"):
        train(tiny(d, tmp_path / "o", max_steps=6, max_bad_steps=3, holdout_fraction=0.1, skip_value_check=True,
                   save_every_n_steps=1))
    # no non-finite step counted as a step: a counted one would have been saved (--save_every_n_steps 1) and logged
    assert checkpoint_dirs(tmp_path / "o") == []
    log = tmp_path / "o" / "metrics.jsonl"
    assert not log.exists() or "\"loss\"" not in log.read_text()


def test_seed_readme_commands_run_verbatim(tmp_path, monkeypatch):
    """The seed README's Quick Start and overfit commands, flags unchanged (tiny data keeps them fast)."""
    d = tmp_path / "embeddings"
    make_synthetic(d, SyntheticSpec(num_samples=32, eva_dim=16, clip_dim=8, tokens=16))
    small = tmp_path / "small"  # the Quick Start trains the base preset: 10 epochs of one step each here
    make_synthetic(small, SyntheticSpec(num_samples=9, eva_dim=16, clip_dim=8, tokens=16))
    quick = ["--task_mode", "clip_denoising", "--chunked_embeddings_dir", str(small),
             "--output_dir", str(tmp_path / "checkpoints_clip"),
             "--model_size", "base", "--batch_size", "8", "--num_epochs", "10", "--learning_rate", "1e-4"]
    # the seed's commands plus only what keeps CI fast here: fewer sampling steps, no progress bar
    fast = ["--num_inference_steps", "2", "--eval_samples", "2", "--holdout_fraction", "0.1", "--no_progress"]
    assert main(["train", *quick, *fast]) == 0
    assert (tmp_path / "checkpoints_clip" / "final" / "model.safetensors").exists()
    # the README's overfit command, through the seed's script; declared changes: the data and output paths,
    # --model_size micro (the default base preset takes minutes here) and the fast flags above
    script, *overfit = readme_command(
        "python train_universal_denoising.py --task_mode clip_denoising --chunked_embeddings_dir /data/embeddings",
        {"--chunked_embeddings_dir": d, "--output_dir": tmp_path / "test_overfit"})
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *overfit, *fast, "--model_size", "micro"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    rc = exit_.value.code
    o = json.loads((tmp_path / "test_overfit" / "results.json").read_text())["overfit_test"]
    assert o["samples"] == 20 and o["passed"] is True and rc == 0 and o["cosine"] > 0.8


def test_report_to_tensorboard_writes_events_or_says_what_to_install(data, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install"):
            train(tiny(data, tmp_path / "tb", report_to="tensorboard"))
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(data, tmp_path / "tb", report_to="tensorboard", max_steps=3))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    scalars = events.Scalars("loss")
    assert [s.step for s in scalars] == [1, 2, 3] and len(losses) == 3
    assert all(abs(s.value - v) < 1e-6 * max(1.0, abs(v)) for s, v in zip(scalars, losses))


def test_inspect_cli(data, tmp_path, capsys):
    assert main(["inspect", str(data), "--check_values"]) == 0
    out = capsys.readouterr().out
    assert "seed format, 2 shards" in out and "N = 17" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in data.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    victim = sorted(bad.glob("*.pkl"))[1]
    victim.write_bytes(victim.read_bytes()[:200])
    assert main(["inspect", str(bad)]) == 1
    assert f"FAILED {victim.name}" in capsys.readouterr().out


def test_compile_trains_saves_and_resumes_like_eager(data, tmp_path, monkeypatch):
    """--compile with the real torch.compile (the aot_eager backend: no C++ compiler on CPU), stopped at a
    checkpoint and resumed under it: the same weights as an eager run (the saved names carry no compile prefix)."""
    import functools

    real = torch.compile
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(1) or functools.partial(
        real, backend="aot_eager")(m, **kw))
    kw = dict(hidden_size=32, depth=1, num_heads=2, num_kv_heads=1, save_every_n_steps=2)
    train(tiny(data, tmp_path / "c", max_steps=2, compile=True, **kw))
    train(tiny(data, tmp_path / "c", max_steps=4, compile=True, resume=True, **kw))
    assert len(calls) == 2
    monkeypatch.setattr(torch, "compile", real)
    train(tiny(data, tmp_path / "e", max_steps=4, **kw))
    wc = load_file(str(checkpoint_dirs(tmp_path / "c")[-1] / "model.safetensors"))
    we = load_file(str(checkpoint_dirs(tmp_path / "e")[-1] / "model.safetensors"))
    assert set(wc) == set(we) and all(torch.allclose(wc[k], we[k], atol=1e-5) for k in we)


def test_remaining_flags_have_their_effect(data, tmp_path):
    res = train(tiny(data, tmp_path / "a", max_steps=4, eval_every_n_steps=2, eval_samples=5,
                     solver="heun", ema_decay=0.05, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1))
    evals = [r for r in read_metrics(tmp_path / "a") if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]  # periodic at step 2, final at 4
    assert res["num_images"] == 5 and res["solver"] == "heun"
    cfg = json.loads((tmp_path / "a" / "final" / "config.json").read_text())["model"]
    assert (cfg["hidden_size"], cfg["depth"], cfg["num_heads"], cfg["num_kv_heads"]) == (32, 1, 2, 1)
    # the EMA decay changes the exported (EMA) weights, not the trained ones
    train(tiny(data, tmp_path / "b", max_steps=4, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1))
    ea = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    eb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    ma = load_file(str(checkpoint_dirs(tmp_path / "a")[-1] / "model.safetensors"))
    mb = load_file(str(checkpoint_dirs(tmp_path / "b")[-1] / "model.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert any(not torch.equal(ea[k], eb[k]) for k in ea)


def test_report_to_wandb_says_what_to_install(data, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="pip install"):
        train(tiny(data, tmp_path / "w", report_to="wandb"))


def test_resume_with_changed_options_warns(data, tmp_path, capsys):
    out = tmp_path / "r"
    train(tiny(data, out, max_steps=2, learning_rate=1e-4))
    capsys.readouterr()
    train(tiny(data, out, max_steps=3, resume=True, learning_rate=5e-4))
    text = capsys.readouterr().out
    assert "resumed from" in text and "learning_rate 0.0001 -> 0.0005" in text
    train(tiny(data, out, max_steps=4, resume=True, learning_rate=5e-4, eval_samples=4))
    assert "resumed from" in (text := capsys.readouterr().out) and "warning: resuming" not in text


def test_nonfinite_loss_in_any_micro_batch_skips_the_whole_step(data, tmp_path, monkeypatch):
    """With accumulation 2, a NaN loss in the first micro-batch (the second is finite) drops the step."""
    import blip3o_denoise.train as T

    runs, seen, real_build, real_loss = [], [], T.build, T.flow_loss

    def keep_build(cfg):
        runs.append(real_build(cfg))
        seen.append({k: v.clone() for k, v in runs[0].model.state_dict().items()})
        return runs[0]

    def loss_with_a_nan(pred, path, cfg):
        loss, parts = real_loss(pred, path, cfg)
        seen.append({k: v.clone() for k, v in runs[0].model.state_dict().items()})
        return (loss * float("nan"), parts) if len(seen) == 2 else (loss, parts)  # the first micro-batch

    monkeypatch.setattr(T, "build", keep_build)
    monkeypatch.setattr(T, "flow_loss", loss_with_a_nan)
    res = train(tiny(data, tmp_path / "o", max_steps=2, gradient_accumulation_steps=2, batch_size=4))
    # seen: [initial, micro 1 (NaN), micro 2, micro 3 (first of the next step), micro 4, micro 5, ...]
    for k in seen[0]:
        assert torch.equal(seen[0][k], seen[3][k]), k  # the skipped step changed no weight
    assert any(not torch.equal(seen[0][k], seen[5][k]) for k in seen[0])  # the next step did
    assert res["skipped_nonfinite"] == 1
    assert [(r["step"], r["skipped_nonfinite"])
            for r in read_metrics(tmp_path / "o") if "loss" in r] == [(1, 1), (2, 1)]
    assert not any(torch.isnan(v).any() for v in runs[0].model.state_dict().values())


def test_resume_applies_changed_optimizer_options(data, tmp_path, monkeypatch):
    """--resume with a new learning rate, warmup, decay floor and weight decay follows them from that step on."""
    import blip3o_denoise.train as T

    out = tmp_path / "r"
    train(tiny(data, out, max_steps=2, warmup_steps=2, learning_rate=1e-4))
    runs, real_build = [], T.build
    monkeypatch.setattr(T, "build", lambda cfg: runs.append(real_build(cfg)) or runs[-1])
    train(tiny(data, out, max_steps=5, resume=True, learning_rate=2e-3, warmup_steps=4, min_lr_ratio=0.5,
               weight_decay=0.3))
    logged = {r["step"]: r["lr"] for r in read_metrics(out) if "loss" in r}
    assert logged[1] == pytest.approx(1e-4 * lr_lambda(0, 2, 2, 0.1))
    for step in (3, 4, 5):  # the lr of step s is the schedule at s - 1 optimizer steps
        assert logged[step] == pytest.approx(2e-3 * lr_lambda(step - 1, 4, 5, 0.5)), step
    groups = runs[0].optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0] and groups[0]["initial_lr"] == 2e-3


def test_config_file_values_are_typed(tmp_path):
    yml = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 (no dot) as a string; it is a number here
    yml.write_text("learning_rate: 1e-4\nmin_lr_ratio: 5e-2\nbatch_size: 4.0\nwarmup_steps: '7'\nresume: true\n")
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(yml)]))
    assert ((cfg.learning_rate, cfg.min_lr_ratio, cfg.batch_size, cfg.warmup_steps, cfg.resume)
            == (1e-4, 0.05, 4, 7, True))
    assert type(cfg.learning_rate) is float and type(cfg.batch_size) is int and type(cfg.warmup_steps) is int


@pytest.mark.parametrize("suffix,text,key", [
    (".json", '{"resume": "no"}', "resume"),
    (".yaml", "debug_mode: 'yes'\n", "debug_mode"),
    (".yaml", "progress: 1\n", "progress"),
    (".yaml", "batch_size: 2.5\n", "batch_size"),
    (".yaml", "num_epochs: ten\n", "num_epochs"),
    (".yaml", "learning_rate: fast\n", "learning_rate"),
    (".yaml", "learning_rate: true\n", "learning_rate"),
    (".yaml", "model_size: 3\n", "model_size"),
])
def test_config_file_type_errors_name_the_key_and_file(tmp_path, capsys, suffix, text, key):
    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError, match=key) as e:
        train_config_from_args(build_parser().parse_args(["train", "--config", str(f)]))
    assert str(f) in str(e.value)
    assert main(["train", "--config", str(f), "--chunked_embeddings_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert key in err and str(f) in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [
    ("--eval_samples", "0"), ("--eval_samples", "-3"), ("--max_steps", "-5"), ("--ema_decay", "1.0"),
    ("--ema_decay", "-0.1"), ("--max_grad_norm", "-1"), ("--warmup_steps", "-1"), ("--keep_checkpoints", "-1"),
    ("--holdout_fraction", "1.0"), ("--holdout_fraction", "-0.1"),
    ("--cond_dropout", "1.0"), ("--cond_dropout", "-0.5"),
    ("--num_workers", "-2"), ("--eval_every_n_steps", "-1"), ("--save_every_n_steps", "-1"),
    ("--log_every_n_steps", "-1"), ("--log_every_n_steps", "0"), ("--learning_rate", "nan"), ("--weight_decay", "-0.1"),
    ("--min_lr_ratio", "1.5"), ("--max_bad_steps", "0"),
])
def test_out_of_range_values_are_refused_at_start(tmp_path, capsys, flag, value):
    rc = main(["train", f"{flag}={value}", "--chunked_embeddings_dir", str(tmp_path),
               "--output_dir", str(tmp_path / "o"), "--model_size", "micro", "--no_progress"])
    out, err = capsys.readouterr()
    assert rc != 0 and flag in err and "Traceback" not in out + err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_user_errors_are_one_line_without_traceback(data, tmp_path, capsys):
    yml = tmp_path / "broken.yaml"
    yml.write_text("batch_size: 4\nlearning_rate: 1e-4: 2\n")
    assert main(["train", "--config", str(yml)]) == 2
    line = _one_error_line(capsys)
    assert str(yml) in line and "YAML" in line and "line 2" in line
    js = tmp_path / "broken.json"
    js.write_text('{"batch_size": 4,}')
    assert main(["train", "--config", str(js)]) == 2
    assert str(js) in _one_error_line(capsys)
    flags = ["--chunked_embeddings_dir", str(data), "--output_dir", str(tmp_path / "o"), "--model_size", "micro",
             "--no_progress"]
    assert main(["train", *flags, "--device", "gpu"]) == 2
    assert "--device gpu" in _one_error_line(capsys)
    # --debug_mode adds the traceback
    assert main(["train", "--config", str(yml), "--debug_mode"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_at_start(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--model_size", "micro",
                 "--device", "cuda", "--no_progress"]) == 2
    line = _one_error_line(capsys)
    assert "--device cuda" in line and "CUDA is not available" in line
    assert not out.exists()


def test_divergence_stop_is_an_error_line(tmp_path, capsys):
    from blip3o_denoise.data.seed_format import write_seed_shard

    d = tmp_path / "nan"
    d.mkdir()
    clip, eva = torch.full((20, 16, 16), float("nan")), torch.randn(20, 16, 32)
    write_seed_shard(d, 0, clip, eva, [f"k{i}" for i in range(20)], [""] * 20, False)
    assert main(["train", "--chunked_embeddings_dir", str(d), "--output_dir", str(tmp_path / "o"), "--model_size",
                 "micro", "--hidden_size", "32", "--depth", "1", "--batch_size", "4", "--max_bad_steps", "2",
                 "--holdout_fraction", "0.2", "--no_progress", "--skip_value_check"]) == 2
    assert "non-finite steps in a row" in _one_error_line(capsys)


@pytest.mark.parametrize("change,named", [
    ({"model_size": "tiny"}, ["--model_size 'micro' -> 'tiny'", "model hidden_size 64 -> 384", "model depth 2 -> 6"]),
    ({"conditioning": "both", "prediction_type": "target"},
     ["--conditioning 'aligned' -> 'both'", "--prediction_type 'velocity' -> 'target'"]),
    ({"hidden_size": 32, "depth": 1}, ["--hidden_size 0 -> 32", "--depth 0 -> 1", "model hidden_size 64 -> 32"]),
    ({"task_mode": "eva_denoising"}, ["--task_mode 'clip_denoising' -> 'eva_denoising'", "model input_dim 16 -> 32"]),
])
def test_resume_with_a_different_model_or_task_is_refused(data, tmp_path, capsys, change, named):
    out = tmp_path / "r"
    train(tiny(data, out, max_steps=1))
    before = [(c.name, (c / "model.safetensors").read_bytes()) for c in checkpoint_dirs(out)]
    capsys.readouterr()
    argv = ["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--model_size", "micro",
            "--batch_size", "8", "--max_steps", "2", "--holdout_fraction", "0.2", "--no_progress", "--resume"]
    for k, v in change.items():
        argv += [f"--{k}", str(v)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "cannot resume" in line and all(n in line for n in named), line
    assert "size mismatch" not in line
    assert [(c.name, (c / "model.safetensors").read_bytes()) for c in checkpoint_dirs(out)] == before


@pytest.mark.parametrize("ptype", ["target", "noise"])
def test_target_and_noise_prediction_get_gradients_from_the_first_step(data, tmp_path, ptype):
    """A zero output layer gives a zero predicted point, which has no direction and no gradient: such a
    run never moved (grad norm 0.0 at every step, loss flat). Target and noise models start from a random
    output layer, so they learn."""
    out = tmp_path / ptype
    train(tiny(data, out, prediction_type=ptype, max_steps=8, learning_rate=3e-3))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "grad_norm" in r]
    assert all(r["grad_norm"] > 1e-3 for r in steps)
    assert steps[-1]["mse"] < steps[0]["mse"]


def test_finite_divergence_is_reported_in_the_log_and_results(data, tmp_path, monkeypatch, capsys):
    from blip3o_denoise import train as train_mod

    calm = train(tiny(data, tmp_path / "calm", max_steps=12))
    assert calm["divergence"] == []
    real_loss, calls = train_mod.flow_loss, [0]

    def blowing_up(pred, path, cfg):  # finite, but 1e4 times larger from the 9th step on
        total, parts = real_loss(pred, path, cfg)
        calls[0] += 1
        return (total * 1e4 if calls[0] > 8 else total), parts

    monkeypatch.setattr(train_mod, "flow_loss", blowing_up)
    res = train(tiny(data, tmp_path / "wild", max_steps=12))
    assert [e["step"] for e in res["divergence"]] == [11]  # spikes at 9, 10, 11: three logs in a row
    assert res["divergence"][0]["loss"] > 100 * res["divergence"][0]["running_median"]
    assert "is diverging" in capsys.readouterr().out
    assert json.loads((tmp_path / "wild" / "results.json").read_text())["divergence"] == res["divergence"]


def test_resume_below_the_checkpoint_step_is_refused(data, tmp_path, capsys):
    """Resuming a run at step 4 with --max_steps 2 would train nothing and relabel the run's outputs: refused,
    and the checkpoint's config stays as it is."""
    out = tmp_path / "r"
    train(tiny(data, out, max_steps=4, save_every_n_steps=2))
    ck = checkpoint_dirs(out)[-1] / "config.json"
    before = ck.read_text()
    rc = main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--model_size", "micro",
               "--batch_size", "8", "--max_steps", "2", "--resume", "--no_progress"])
    assert rc == 2 and "--max_steps 2: the run is already at step 4" in _one_error_line(capsys)
    assert ck.read_text() == before and checkpoint_dirs(out)[-1].name == "step_00000004"


def test_a_split_without_training_samples_names_the_split(tmp_path, capsys):
    """Two samples, both held out at --holdout_fraction 0.999: the error names the split, not the batch size;
    the refused run leaves no output directory behind."""
    d = tmp_path / "d"
    make_synthetic(d, SyntheticSpec(num_samples=2, eva_dim=16, clip_dim=8, tokens=16))
    rc = main(["train", "--chunked_embeddings_dir", str(d), "--output_dir", str(tmp_path / "o"), "--model_size",
               "micro", "--holdout_fraction", "0.999", "--no_progress"])
    line = _one_error_line(capsys)
    assert rc == 2 and "no training samples: --holdout_fraction 0.999 holds out all 2 samples" in line
    assert "batch" not in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix,text", [(".json", '{"batch_size": 8, "batch_size": 4}'),
                                         (".yaml", "batch_size: 8\nlearning_rate: 0.001\nbatch_size: 4\n")])
def test_a_config_file_naming_an_option_twice_is_refused(tmp_path, capsys, suffix, text):
    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    assert main(["train", "--config", str(f), "--chunked_embeddings_dir", str(tmp_path)]) == 2
    assert f"--config {f}: option 'batch_size' is given twice" in _one_error_line(capsys)
