"""Bad input data is named before it costs anything: non-finite values, stores that disagree with
their manifest, manifests that disagree with the shards, stale conversions, duplicated keys."""

import json
import os

import pytest
import torch

from blip3o_denoise.cli import main
from blip3o_denoise.data.dataset import Embeddings
from blip3o_denoise.data.inspect import inspect_dataset
from blip3o_denoise.data.safe_pickle import ShardFormatError
from blip3o_denoise.data.seed_format import open_seed_shard, write_seed_shard
from blip3o_denoise.data.store import STORE_MANIFEST, convert
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


@pytest.mark.parametrize("value,field", [(float("nan"), "eva_blip3o_embeddings"),
                                         (float("inf"), "clip_blip3o_embeddings")])
def test_nonfinite_training_data_is_named_before_training(tmp_path, value, field):
    d = make_data(tmp_path / "d")
    path, key = poison(d, 1, 5, field, value)
    with pytest.raises(ShardFormatError) as e:
        build(tiny(d, tmp_path / "out"))
    msg = str(e.value)
    assert str(path) in msg and f"'{field}'" in msg and "sample 5" in msg and repr(key) in msg
    # the check is the one refusing
    assert build(tiny(d, tmp_path / "out", skip_value_check=True)).train_set is not None


def test_value_check_finds_nan_anywhere_and_passes_large_finite_values(tmp_path):
    from blip3o_denoise.data.seed_format import check_finite

    big = torch.full((3, 4, 8), 1e18)  # large, and the token norms still fit in float32
    check_finite(open_seed_shard(write_seed_shard(tmp_path, 0, big, big, ["a", "b", "c"], ["", "", ""], False)))
    for i, field in ((0, "clip"), (2, "eva")):
        x = torch.randn(3, 4, 8)
        x[i, 3, 7] = float("-inf") if field == "clip" else float("nan")
        clip, eva = (x, torch.randn(3, 4, 8)) if field == "clip" else (torch.randn(3, 4, 8), x)
        path = write_seed_shard(tmp_path, 0, clip, eva, ["a", "b", "c"], ["", "", ""], False)
        with pytest.raises(ShardFormatError, match=f"{field}_blip3o_embeddings.*sample {i} .key '{'abc'[i]}'"):
            check_finite(open_seed_shard(path))


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


def scale_sample(d, shard_idx: int, sample: int, field: str, factor: float):
    """Rewrite one seed shard of ``d`` with one sample's tokens of ``field`` multiplied by ``factor``."""
    path = sorted(d.glob("embeddings_shard_*.pkl"))[shard_idx]
    s = open_seed_shard(path)
    clip, eva = s.clip.read_all().clone(), s.eva.read_all().clone()
    (eva if field.startswith("eva") else clip)[sample] *= factor
    write_seed_shard(d, shard_idx, clip, eva, s.keys, s.captions, include_cls=False)
    return path, s.keys[sample]


@pytest.mark.parametrize("factor,field,named", [(1e37, "clip_blip3o_embeddings", "norm overflows float32"),
                                                (0.0, "clip_blip3o_embeddings", "all-zero token"),
                                                (1e36, "eva_blip3o_embeddings", "norm overflows float32")])
def test_finite_but_absurd_tokens_are_named_everywhere(tmp_path, capsys, factor, field, named):
    """Finite values whose token norms overflow, or all-zero tokens, would normalise to zero and train silently:
    training and inspect --check_values name them."""
    d = make_data(tmp_path / "d")
    path, key = scale_sample(d, 1, 5, field, factor)
    with pytest.raises(ShardFormatError) as e:
        build(tiny(d, tmp_path / "out"))
    assert str(path) in str(e.value) and f"'{field}'" in str(e.value) and named in str(e.value)
    assert repr(key) in str(e.value)
    assert main(["inspect", str(d), "--check_values"]) == 1
    assert named in capsys.readouterr().out
    # a converted (streamed) dataset is not value-checked when training: converting refuses the sample
    assert main(["convert", str(d), str(tmp_path / "lit"), "--format", "litdata", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert repr(key) in err and "no direction on the sphere" in err


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
    for factor in (1e37, 0.0):  # tokens that normalise to zero
        huge = make_data(tmp_path / f"huge{factor:g}", seed=3, num_shards=1)
        _, key = scale_sample(huge, 0, 2, "eva_blip3o_embeddings", factor)
        assert main(["generate", "--checkpoint", str(run), "--chunked_embeddings_dir", str(huge), "--output", str(gen),
                     "--num_steps", "2"]) == 2
        err = capsys.readouterr().err
        assert repr(key) in err and "norm overflows" in err and not gen.exists()


# ----------------------------------------------------------------------------- 2. store header vs manifest


def seed_and_store(tmp_path, **kw):
    d = make_data(tmp_path / "seed", num_shards=3, **kw)
    dst = tmp_path / "store"
    convert(d, dst, dtype="float32", progress=False)
    return d, dst


def edit_json(path, fn):
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("edit,named", [
    (lambda m: m["shards"][1].update(num_samples=m["shards"][1]["num_samples"] + 1), "num_samples"),
    (lambda m: m.update(dtype="float16"), "dtype"),
    (lambda m: m.update(clip_dim=99), "clip_dim"),
    (lambda m: m.update(tokens=9), "tokens"),
])
def test_store_shard_disagreeing_with_the_manifest_is_refused(tmp_path, capsys, edit, named):
    _, dst = seed_and_store(tmp_path)
    edit_json(dst / STORE_MANIFEST, edit)
    with pytest.raises(ShardFormatError, match=f"shard_0000[01].safetensors.*{named}"):
        Embeddings(dst)
    with pytest.raises(ValueError, match=f"shard_0000[01].safetensors.*{named}"):
        build(tiny(dst, tmp_path / "out"))
    assert main(["inspect", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "FAILED shard_0000" in out and named in out


def test_store_shard_with_unequal_condition_and_target_counts(tmp_path, capsys):
    from safetensors.torch import save_file

    _, dst = seed_and_store(tmp_path)
    st = dst / "shard_00002.safetensors"
    save_file({"clip": torch.randn(8, 16, 8), "eva": torch.randn(7, 16, 16)}, str(st))
    edit_json(dst / STORE_MANIFEST, lambda m: m["shards"][2].update(num_samples=8, bytes=st.stat().st_size))
    with pytest.raises(ShardFormatError, match="shard_00002.safetensors: tensor 'eva' holds 7 samples"):
        Embeddings(dst)
    assert main(["inspect", str(dst)]) == 1
    assert "FAILED shard_00002.safetensors" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 3. inspect never crashes


def test_inspect_reports_empty_and_broken_datasets(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    assert "no shards found" in capsys.readouterr().out
    zero = tmp_path / "zero"
    zero.mkdir()
    write_seed_shard(zero, 0, torch.zeros(0, 16, 8), torch.zeros(0, 16, 16), [], [], include_cls=False)
    assert main(["inspect", str(zero), "--check_values"]) == 0
    assert "samples 0" in capsys.readouterr().out
    _, dst = seed_and_store(tmp_path)
    edit_json(dst / STORE_MANIFEST, lambda m: m["shards"].append("shard_00009.safetensors"))
    assert main(["inspect", str(dst)]) == 1
    assert "entry 3 of 'shards'" in capsys.readouterr().out


def test_inspect_never_crashes_on_damaged_shards(tmp_path):
    d = make_data(tmp_path / "d", num_samples=4, num_shards=1)
    victim = next(d.glob("*.pkl"))
    original = victim.read_bytes()
    failed = 0
    for pos in range(0, min(len(original), 1500), 3):
        data = bytearray(original)
        data[pos] ^= 0xFF
        victim.write_bytes(bytes(data))
        report = inspect_dataset(str(d), check_values=True)  # must not raise
        failed += bool(report["failed_shards"])
        for f in report["failed_shards"]:
            assert f["shard"] == victim.name and victim.name in f["error"]
    # 114 of these 500 flips break the pickle's structure or a value (measured); the others hit bytes that
    # decode to other finite values or captions: a check that swallowed its errors would report none
    assert failed >= 100


# ----------------------------------------------------------------------------- 4. seed manifest vs shards


@pytest.mark.parametrize("damage,named", [
    (lambda d: sorted(d.glob("*.pkl"))[1].unlink(), "embeddings_shard_00001_patch_only.pkl, which is missing"),
    (lambda d: edit_json(d / "embeddings_manifest.json", lambda m: m.update(total_samples=31)),
     "'total_samples' is 31"),
])
def test_seed_manifest_disagreeing_with_shards(tmp_path, capsys, damage, named):
    d = make_data(tmp_path / "seed", num_samples=30, num_shards=3)
    damage(d)
    assert main(["inspect", str(d)]) == 1
    assert named in capsys.readouterr().out
    with pytest.raises(ShardFormatError, match=named):
        convert(d, tmp_path / "store", progress=False)
    assert main(["convert", str(d), str(tmp_path / "store"), "--no_progress"]) == 2
    assert "--ignore_manifest" in capsys.readouterr().err
    with pytest.raises(ShardFormatError, match=named):
        build(tiny(d, tmp_path / "out"))
    assert main(["convert", str(d), str(tmp_path / "store"), "--no_progress", "--ignore_manifest"]) == 0
    assert len(build(tiny(d, tmp_path / "out", ignore_manifest=True)).train_set) > 0
    argv = ["train", "--chunked_embeddings_dir", str(d), "--output_dir", str(tmp_path / "o"), "--model_size", "micro",
            "--max_steps", "1", "--no_progress"]
    assert main(argv) == 2 and named in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. stale conversions


def test_convert_reconverts_a_changed_source(tmp_path, capsys):
    d, dst = seed_and_store(tmp_path)
    path = sorted(d.glob("*.pkl"))[1]
    s = open_seed_shard(path)
    new_eva = s.eva.read_all() * -1.0  # same size, same keys, other values
    write_seed_shard(d, 1, s.clip.read_all(), new_eva, s.keys, s.captions, include_cls=False)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    before = (dst / "shard_00000.safetensors").stat().st_mtime_ns
    m = convert(d, dst, dtype="float32", progress=False)
    assert "changed since it was converted" in capsys.readouterr().err
    assert torch.equal(Embeddings(dst).shards[1].eva.read_all(), new_eva)
    assert (dst / "shard_00000.safetensors").stat().st_mtime_ns == before  # unchanged sources are not redone
    assert m["shards"][1]["source_mtime_ns"] == path.stat().st_mtime_ns


def test_convert_refuses_a_store_of_other_sources(tmp_path, capsys):
    d, dst = seed_and_store(tmp_path)
    sorted(d.glob("*.pkl"))[0].unlink()  # every later shard now sits at another position
    with pytest.raises(ValueError, match="shard_00000.safetensors was converted from.*new directory"):
        convert(d, dst, dtype="float32", progress=False, ignore_manifest=True)
    assert main(["convert", str(d), str(dst), "--dtype", "float32", "--no_progress", "--ignore_manifest"]) == 2
    assert "convert into a new directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. keys and shapes across shards


def test_duplicate_keys_across_shards_are_errors_everywhere(tmp_path, capsys):
    d = make_data(tmp_path / "seed", num_shards=2)
    a, b = [open_seed_shard(p) for p in sorted(d.glob("*.pkl"))]
    keys = list(b.keys)
    keys[3] = a.keys[0]
    write_seed_shard(d, 1, b.clip.read_all(), b.eva.read_all(), keys, b.captions, include_cls=False)
    assert main(["inspect", str(d)]) == 1
    assert f"not unique across shards: 1 duplicate(s), e.g. {a.keys[0]!r}" in capsys.readouterr().out
    with pytest.raises(ShardFormatError, match="not unique"):
        convert(d, tmp_path / "store", progress=False)
    with pytest.raises(ShardFormatError, match="not unique"):
        build(tiny(d, tmp_path / "out"))


@pytest.mark.parametrize("shape", [(12, 16, 9), (12, 9, 16)])
def test_shards_of_different_widths_or_tokens_are_errors(tmp_path, capsys, shape):
    d = make_data(tmp_path / "seed", num_shards=2)
    b = open_seed_shard(sorted(d.glob("*.pkl"))[1])
    write_seed_shard(d, 1, torch.randn(shape[0], shape[1], 8), torch.randn(*shape), b.keys, b.captions,
                     include_cls=False)
    assert main(["inspect", str(d)]) == 1
    assert "differ from" in capsys.readouterr().out
    with pytest.raises(ShardFormatError, match="differ from"):
        convert(d, tmp_path / "store", progress=False)


def test_no_output_over_or_into_other_data(tmp_path, capsys):
    """make-synthetic refuses a non-empty directory; convert refuses its source and a directory of seed shards
    as its destination."""
    from blip3o_denoise.cli import main

    src = tmp_path / "src"
    make_data(src)
    before = sorted(p.name for p in src.iterdir())
    assert main(["make-synthetic", str(src), "--num_samples", "4", "--eva_dim", "8", "--clip_dim", "8",
                 "--tokens", "4"]) == 2
    assert f"out {src}: not empty" in capsys.readouterr().err
    for dst in (src, src / ".." / "src"):
        for fmt in ("store", "litdata"):
            assert main(["convert", str(src), str(dst), "--format", fmt, "--no_progress"]) == 2
            assert f"dst {dst}: is the source directory" in capsys.readouterr().err
    other = tmp_path / "other"
    make_data(other)
    assert main(["convert", str(src), str(other), "--no_progress"]) == 2
    assert "holds seed-format .pkl shards" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


def test_inspect_verify_counts_each_shard_once(tmp_path, capsys):
    """A 2-shard store with one shard modified after conversion: 2 shards, 1 failed (it opened, then failed
    its checksum: counted once)."""
    src, store = make_data(tmp_path / "src"), tmp_path / "store"
    convert(src, store, progress=False)
    victim = sorted(store.glob("*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01  # a value, not the header: the shard still opens
    victim.write_bytes(bytes(data))
    assert main(["inspect", str(store), "--verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 2 and [f["shard"] for f in report["failed_shards"]] == [victim.name]
    assert report["text"].startswith(f"{store}: store format, 2 shards")
