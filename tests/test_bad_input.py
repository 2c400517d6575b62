"""Bad input data is named before it costs anything: non-finite values, stores that disagree with
their manifest, manifests that disagree with the shards, stale conversions, duplicated keys."""

import json

import pytest
import torch

from blip3o_denoise.cli import main
from blip3o_denoise.data.safe_pickle import ShardFormatError
from blip3o_denoise.data.seed_format import open_seed_shard, write_seed_shard
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.train import TrainConfig, build, train


def tiny(data, out, **kw):
    base = dict(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", batch_size=8,
                max_steps=1, warmup_steps=1, eval_every_n_steps=0, save_every_n_steps=0, num_inference_steps=2,
                holdout_fraction=0.2, eval_samples=4, progress=False, log_every_n_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def make_data(d, **kw):
    spec = dict(num_samples=24, eva_dim=16, clip_dim=8, tokens=16, num_shards=2)
    spec.update(kw)
    make_synthetic(d, SyntheticSpec(**spec))
    return d


def poison(d, shard_idx: int, sample: int, field: str = "eva_blip3o_embeddings", value=float("nan")):
    """Rewrite one seed shard of ``d`` with ``value`` in one sample (its keys and manifest unchanged)."""
    path = sorted(d.glob("embeddings_shard_*.pkl"))[shard_idx]
    s = open_seed_shard(path)
    clip, eva = s.clip.read_all().clone(), s.eva.read_all().clone()
    (eva if field.startswith("eva") else clip)[sample, 3, 1] = value
    write_seed_shard(d, shard_idx, clip, eva, s.keys, s.captions, include_cls=False)
    return path, s.keys[sample]


# ----------------------------------------------------------------------------- 1. non-finite values


@pytest.mark.parametrize("value,field", [(float("nan"), "eva_blip3o_embeddings"), (float("inf"), "clip_blip3o_embeddings")])
def test_nonfinite_training_data_is_named_before_training(tmp_path, value, field):
    d = make_data(tmp_path / "d")
    path, key = poison(d, 1, 5, field, value)
    with pytest.raises(ShardFormatError) as e:
        build(tiny(d, tmp_path / "out"))
    msg = str(e.value)
    assert str(path) in msg and f"'{field}'" in msg and "sample 5" in msg and repr(key) in msg
    assert build(tiny(d, tmp_path / "out", skip_value_check=True)).train_set is not None  # the check is the one refusing


def test_nonfinite_eval_dir_is_named_and_flag_parses(tmp_path, capsys):
    d = make_data(tmp_path / "d", seed=0)
    ev = make_data(tmp_path / "ev", seed=9, num_shards=1)
    path, _ = poison(ev, 0, 2)
    with pytest.raises(ShardFormatError, match="sample 2"):
        build(tiny(d, tmp_path / "out", eval_dir=str(ev)))
    argv = ["train", "--chunked_embeddings_dir", str(d), "--eval_dir", str(ev), "--output_dir", str(tmp_path / "o"),
            "--model_size", "micro", "--max_steps", "1", "--no_progress"]
    assert main(argv) == 2
    assert str(path) in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    d = make_data(root / "d")
    train(tiny(d, root / "run", max_noise_level=1.0))
    return d, root / "run"


def test_evaluate_and_generate_refuse_nonfinite_conditions(trained, tmp_path, capsys):
    _, run = trained
    bad = make_data(tmp_path / "bad", seed=3, num_shards=1)
    path, key = poison(bad, 0, 4)
    res = tmp_path / "res.json"
    assert main(["evaluate", "--checkpoint", str(run), "--chunked_embeddings_dir", str(bad), "--split", "all",
                 "--output", str(res), "--num_inference_steps", "2", "--noise_levels", "0.5", "--no_ridge",
                 "--no_distribution", "--sample_counts", "1", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert repr(key) in err and "non-finite" in err and not res.exists()
    gen = tmp_path / "gen.safetensors"
    assert main(["generate", "--checkpoint", str(run), "--chunked_embeddings_dir", str(bad), "--output", str(gen),
                 "--num_steps", "2"]) == 2
    err = capsys.readouterr().err
    assert repr(key) in err and str(path) in err and not gen.exists()
