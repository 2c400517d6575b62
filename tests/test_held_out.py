"""`blip3o-denoise evaluate` scores held-out samples: samples of the run's training split are refused
unless --allow_train_samples, and then the results say they are not held out."""

import json

import pytest

from blip3o_denoise.cli import main
from blip3o_denoise.data.dataset import Embeddings, split_indices
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.train import TrainConfig, train

CHEAP = ["--num_inference_steps", "2", "--noise_levels", "0.5", "--sample_counts", "2", "--no_ridge",
         "--no_distribution", "--no_progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("held")
    data = root / "d"
    make_synthetic(data, SyntheticSpec(num_samples=30, eva_dim=16, clip_dim=8, tokens=16))
    train(TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(root / "run"), model_size="micro", batch_size=8,
                      max_steps=1, warmup_steps=1, eval_every_n_steps=0, save_every_n_steps=0,
                      num_inference_steps=2, holdout_fraction=0.2, eval_samples=4, max_noise_level=1.0,
                      progress=False))
    return data, root / "run"


def evaluate(run, out, *extra):
    data, ckpt = run
    return main(["evaluate", "--checkpoint", str(ckpt), "--chunked_embeddings_dir", str(data), "--output", str(out),
                 *CHEAP, *extra])


@pytest.mark.parametrize("extra", [["--split", "all"], ["--holdout_fraction", "0.6"]], ids=["split_all", "bigger"])
def test_training_samples_are_refused(run, tmp_path, capsys, extra):
    out = tmp_path / "r.json"
    assert evaluate(run, out, *extra) == 2
    err = capsys.readouterr().err
    assert "were in the run's training split" in err and "--allow_train_samples" in err
    assert not out.exists()


def test_allowed_training_samples_are_labelled_not_held_out(run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert evaluate(run, out, "--split", "all", "--allow_train_samples", "--num_samples", "0") == 0
    res = json.loads(out.read_text())
    keys = Embeddings(run[0]).keys
    n_train = len(split_indices(keys, 0.2)[0])
    assert res["held_out"] is False and res["train_samples_in_evaluation"] == n_train and res["num_images"] == 30
    assert f"NOT HELD OUT: {n_train} of 30 evaluation samples" in capsys.readouterr().out


def test_the_held_out_split_is_labelled_held_out(run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert evaluate(run, out) == 0
    res = json.loads(out.read_text())
    assert res["held_out"] is True and res["train_samples_in_evaluation"] == 0
    assert "NOT HELD OUT" not in capsys.readouterr().out


def test_sweep_refuses_training_samples_and_labels_what_it_measures(run, tmp_path, capsys):
    data, ckpt = run
    out = tmp_path / "s.json"
    base = ["sweep", "--checkpoint", str(ckpt), "--chunked_embeddings_dir", str(data), "--output", str(out),
            "--steps", "1", "--k", "2", "--num_samples", "30"]
    assert main([*base, "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert "sweep samples were in the run's training split" in err and not out.exists()
    assert main([*base, "--split", "all", "--allow_train_samples"]) == 0
    assert json.loads(out.read_text())["held_out"] is False
    assert main(base) == 0  # the held-out split
    assert json.loads(out.read_text())["held_out"] is True


def test_a_resume_with_a_larger_holdout_fraction_keeps_earlier_training_samples_out(tmp_path, capsys):
    """Phase 1 trains at holdout 0.2, the resume at 0.5: samples with a key hash in [0.2, 0.5) were trained on
    and are never scored as held out, neither by evaluate's default split nor when asked for 0.5."""
    data, out = tmp_path / "d", tmp_path / "run"
    make_synthetic(data, SyntheticSpec(num_samples=30, eva_dim=16, clip_dim=8, tokens=16))
    common = dict(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", batch_size=8,
                  warmup_steps=1, eval_every_n_steps=0, save_every_n_steps=1, num_inference_steps=2, eval_samples=30,
                  max_noise_level=1.0, progress=False)
    train(TrainConfig(max_steps=1, holdout_fraction=0.2, **common))
    res = train(TrainConfig(max_steps=2, holdout_fraction=0.5, resume=True, **common))
    keys = Embeddings(data).keys
    early = set(split_indices(keys, 0.2)[0]) & set(split_indices(keys, 0.5)[1])  # trained, then "held out"
    assert early, "the data must have samples between the two fractions"
    assert "were trained on before this resume changed the split" in capsys.readouterr().out
    assert res["num_images"] == len(split_indices(keys, 0.2)[1])  # the in-training evaluation skipped them
    phases = json.loads((out / "final" / "config.json").read_text())["train_phases"]
    assert [p["holdout_fraction"] for p in phases] == [0.2, 0.5] and phases[1]["from_step"] == 1
    rj = tmp_path / "r.json"
    assert evaluate((data, out), rj, "--num_samples", "0") == 0  # default: held out in every phase
    r = json.loads(rj.read_text())
    assert r["held_out"] is True and r["num_images"] == len(split_indices(keys, 0.2)[1])
    assert evaluate((data, out), rj, "--holdout_fraction", "0.5", "--num_samples", "0") == 2
    assert f"{len(early)} of the {len(split_indices(keys, 0.5)[1])} evaluation samples" in capsys.readouterr().err
    assert evaluate((data, out), rj, "--holdout_fraction", "0.5", "--num_samples", "0", "--allow_train_samples") == 0
    r = json.loads(rj.read_text())
    assert r["held_out"] is False and r["train_samples_in_evaluation"] == len(early)
    sweep = ["sweep", "--checkpoint", str(out), "--chunked_embeddings_dir", str(data), "--output",
             str(tmp_path / "s.json"), "--steps", "1", "--k", "2", "--num_samples", "30"]
    assert main(sweep) == 0 and json.loads((tmp_path / "s.json").read_text())["held_out"] is True
