"""Checkpoints that a kill or a bad disk left damaged: resume from the newest intact one, leave no
half-deleted step_* behind, and keep metrics.jsonl free of replayed steps."""

import json

import pytest
import torch
from safetensors.torch import load_file

import blip3o_denoise.checkpoint as C
import blip3o_denoise.report as R
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.train import TrainConfig, checkpoint_dirs, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckdata")
    make_synthetic(d, SyntheticSpec(num_samples=40, eva_dim=32, clip_dim=16, tokens=16))
    return d


def tiny(data, out, **kw):
    base = dict(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", hidden_size=32, depth=1,
                batch_size=8, max_steps=6, warmup_steps=2, eval_every_n_steps=0, save_every_n_steps=2,
                num_inference_steps=2, holdout_fraction=0.2, eval_samples=4, progress=False, log_every_n_steps=1,
                keep_checkpoints=100)
    base.update(kw)
    return TrainConfig(**base)


def loss_steps(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if "loss" in r], recs


class Killed(Exception):
    pass


@pytest.mark.parametrize("name", ["model.safetensors", "training_state.pt", "ema.safetensors"])
def test_resume_skips_a_truncated_newest_checkpoint(data, tmp_path, capsys, name):
    out = tmp_path / "run"
    train(tiny(data, out))
    assert [c.name for c in checkpoint_dirs(out)][-2:] == ["step_00000004", "step_00000006"]
    bad = checkpoint_dirs(out)[-1] / name
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    train(tiny(data, out, max_steps=8, resume=True))
    said = capsys.readouterr().out
    assert str(bad) in said and "unreadable" in said  # the damaged file, by path
    assert "resumed from" in said and "step_00000004 at step 4" in said
    steps, _ = loss_steps(out)
    assert steps == list(range(1, 9))  # 5 and 6 replayed once, not twice
    # the resumed run rewrote step 6 whole
    load_file(str(checkpoint_dirs(out)[-2] / "model.safetensors"))
    assert torch.load(checkpoint_dirs(out)[-1] / "training_state.pt", weights_only=True)["step"] == 8


def test_resume_with_every_checkpoint_damaged_names_them(data, tmp_path):
    out = tmp_path / "run"
    train(tiny(data, out, max_steps=4))
    for c in checkpoint_dirs(out):
        (c / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="no intact checkpoint.*step_00000004.*step_00000002"):
        train(tiny(data, out, max_steps=4, resume=True))


def test_kill_during_rotation_leaves_no_half_deleted_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_rmtree = C.shutil.rmtree
    calls = []

    def killed_while_deleting(path, *a, **kw):
        if "step_" in str(path) and ".tmp_step_" not in str(path):
            calls.append(path)
            files = sorted(p for p in path.iterdir())
            for f in files[: len(files) - 1]:  # all but the last file gone, then the process dies
                f.unlink()
            raise Killed(path)
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(C.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(Killed):
        train(tiny(data, out, keep_checkpoints=1))
    monkeypatch.setattr(C.shutil, "rmtree", real_rmtree)
    assert calls  # the rotation after the second save was interrupted
    train(tiny(data, out, keep_checkpoints=1, resume=True))
    root = out / "checkpoints"
    leftovers = sorted(p.name for p in root.iterdir())
    assert leftovers == ["step_00000006"], leftovers
    assert all((root / "step_00000006" / f).exists() for f in C.CHECKPOINT_FILES)


def test_step_dirs_without_config_are_removed_at_the_next_save(data, tmp_path):
    out = tmp_path / "run"
    train(tiny(data, out, max_steps=2))
    root = out / "checkpoints"
    (root / "step_00000001").mkdir()  # emptied by an in-place delete that was killed
    (root / "step_00000003").mkdir()
    (root / "step_00000003" / "model.safetensors").write_bytes(b"x")
    train(tiny(data, out, max_steps=4, resume=True))
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]


def test_metrics_after_a_resume_have_each_step_once(data, tmp_path, monkeypatch):
    """Killed at step 5 (after the step-4 checkpoint) and mid-line: the resumed run replays 5 and 6."""
    out = tmp_path / "run"
    real_log = R.Reporter.log

    def log_then_die(self, record):
        real_log(self, record)
        if record.get("step") == 5 and "loss" in record:
            with open(self.path, "a") as f:
                f.write('{"step": 6, "lo')  # a record torn by the kill
            raise Killed()

    monkeypatch.setattr(R.Reporter, "log", log_then_die)
    with pytest.raises(Killed):
        train(tiny(data, out, max_steps=6, save_every_n_steps=4))
    monkeypatch.setattr(R.Reporter, "log", real_log)
    train(tiny(data, out, max_steps=6, save_every_n_steps=4, resume=True))
    steps, recs = loss_steps(out)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sum(1 for r in recs if r.get("final")) == 1
    # resuming a finished run redoes only its final evaluation, once
    train(tiny(data, out, max_steps=6, save_every_n_steps=4, resume=True))
    steps, recs = loss_steps(out)
    assert steps == [1, 2, 3, 4, 5, 6] and sum(1 for r in recs if r.get("final")) == 1
