"""The command line on converted (LitData) datasets, local and in a real S3 API (moto's server on
127.0.0.1): `convert --format litdata`, then `evaluate`, `generate` and `sweep` reading the copy;
the same samples and numbers wherever the data is stored; clear errors for bad input."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import litdata  # noqa: F401 - not skipped: CI installs it (.ci/run), a missing engine is a failure

from conftest import moto_s3_server
from blip3o_denoise.cli import main
from blip3o_denoise.data.engine_format import read_manifest
from blip3o_denoise.data.dataset import Embeddings, split_indices
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

HOLD = "0.2"  # more held-out samples than the default 0.05 gives on 40 samples
CREDS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Seed shards: 40 samples in 2 shards, N = 4 (2x2), CLIP 8 <- EVA 16."""
    d = tmp_path_factory.mktemp("seed")
    make_synthetic(d, SyntheticSpec(num_samples=40, eva_dim=16, clip_dim=8, tokens=4, num_shards=2))
    return d


@pytest.fixture(scope="module")
def ckpt(src, tmp_path_factory):
    """A tiny run trained on the LOCAL seed shards (up to pure noise, so evaluate scores generation)."""
    from blip3o_denoise.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(task_mode="clip_denoising", chunked_embeddings_dir=str(src), output_dir=str(out),
                      model_size="micro", batch_size=8, max_steps=4, max_noise_level=1.0, num_inference_steps=2,
                      holdout_fraction=float(HOLD), eval_samples=4, progress=False, skip_value_check=True))
    return out


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with a bucket; credentials in the environment for the module."""
    import boto3

    with moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in CREDS.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bucket")
        yield endpoint


def _convert(src, dst, *flags):
    return main(["convert", str(src), str(dst), "--format", "litdata", "--holdout_fraction", HOLD,
                 "--chunk_samples", "4", "--no_progress", *flags])


@pytest.fixture(scope="module")
def local_copy(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "ds"
    assert _convert(src, dst) == 0
    return str(dst)


@pytest.fixture(scope="module")
def s3_copy(src, s3):
    url = "s3://bucket/data/ds"
    assert _convert(src, url, "--endpoint_url", s3) == 0
    return url


def _no_timings(x):
    """A results dict without its wall-clock fields, the data location and where the picture went (the rest,
    the picture's index of keys included, must be equal)."""
    if isinstance(x, dict):
        return {k: _no_timings(v) for k, v in x.items()
                if "seconds" not in k and k not in ("data", "checkpoint", "png", "share_of_evaluation_time")}
    if isinstance(x, list):
        return [_no_timings(v) for v in x]
    return x


def test_convert_litdata_to_a_directory_and_to_s3(src, local_copy, s3_copy, s3, capsys):
    import boto3

    local = read_manifest(local_copy)
    remote = read_manifest(s3_copy, {"endpoint_url": s3})
    assert local == remote  # the same dataset wherever it is written
    keys = Embeddings(src).keys
    _, held = split_indices(keys, float(HOLD))
    assert (local["dtype"], local["chunk_samples"], local["holdout_fraction"]) == ("bfloat16", 4, 0.2)
    assert (local["tokens"], local["clip_dim"], local["eva_dim"], local["keys"]) == (4, 8, 16, keys)
    assert sorted(local["parts"]["eval"]["indices"]) == held and 0 < len(held) < 40
    names = {o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="bucket")["Contents"]}
    assert {"data/ds/blip3o_stream.json", "data/ds/train/index.json", "data/ds/eval/index.json"} <= names
    assert sum(n.startswith("data/ds/train/chunk-") for n in names) == -(-(40 - len(held)) // 4)
    # the summary line, like the store's
    dst = src.parent / "summary"
    assert _convert(src, dst, "--dtype", "float32") == 0
    out = capsys.readouterr().out
    assert f"{dst}: 40 samples in LitData chunks of 4 (train/ {40 - len(held)}, eval/ {len(held)} held out" in out
    assert "float32, N=4, clip 8, eva 16" in out


def test_convert_refuses_flags_of_the_other_format(src, tmp_path, capsys):
    cases = [
        (["--format", "litdata", "--chunk", "8"], "--chunk: only for convert --format store"),
        (["--chunk_samples", "4", "--holdout_fraction", "0.1"],
         "--holdout_fraction and --chunk_samples: only for convert --format litdata (this is --format store)"),
        (["--endpoint_url", "http://127.0.0.1:1"], "--endpoint_url: only for convert --format litdata"),
    ]
    for flags, msg in cases:
        assert main(["convert", str(src), str(tmp_path / "x"), "--no_progress", *flags]) == 2
        assert msg in capsys.readouterr().err
    assert main(["convert", str(src), "s3://bucket/store", "--no_progress"]) == 2
    assert "s3://bucket/store: the store is written to a local directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _evaluate(ckpt, data, out, *flags):
    argv = ["evaluate", "--checkpoint", str(ckpt), "--chunked_embeddings_dir", data, "--output", str(out),
            "--split", "heldout", "--noise_levels", "0.5", "--sample_counts", "1,2", "--no_distribution",
            "--no_progress", *flags]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_evaluate_from_s3_equals_the_local_copy(ckpt, src, local_copy, s3_copy, s3, tmp_path):
    a = _evaluate(ckpt, local_copy, tmp_path / "local.json")
    b = _evaluate(ckpt, s3_copy, tmp_path / "s3.json", "--cache_dir", str(tmp_path / "cache"), "--max_cache_size",
                  "1GB", "--endpoint_url", s3)
    _, held = split_indices(Embeddings(src).keys, float(HOLD))
    assert a["num_images"] == b["num_images"] == len(held)
    assert a["held_out"] is b["held_out"] is True  # checked against the run's (local) training split
    assert b["data"] == {"directory": s3_copy, "split": "heldout"}
    assert _no_timings(a) == _no_timings(b)  # the same samples, the same seed: the same numbers
    assert a["generation"]["model"] and a["denoising"]
    assert list((tmp_path / "cache").rglob("eval-random/index.json"))  # the engine's files went to the given cache


def test_generate_from_s3_writes_the_same_samples(ckpt, src, local_copy, s3_copy, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # the endpoint from the environment this time
    monkeypatch.setenv("BLIP3O_CACHE_DIR", str(tmp_path / "default_cache"))  # --cache_dir's default
    got = {}
    for name, data in (("local", local_copy), ("s3", s3_copy), ("seed", str(src))):
        out = tmp_path / f"{name}.safetensors"
        assert main(["generate", "--checkpoint", str(ckpt), "--chunked_embeddings_dir", data, "--output", str(out),
                     "--split", "heldout", "--batch_size", "3"]) == 0
        with safe_open(str(out), "pt") as f:
            got[name] = (json.loads(f.metadata()["keys"]), f.get_tensor("embeddings"))
    keys = Embeddings(src).keys
    held = [keys[i] for i in split_indices(keys, float(HOLD))[1]]
    assert got["s3"][0] == got["local"][0] == got["seed"][0] == held  # held out wherever it is stored
    assert torch.equal(got["s3"][1], got["local"][1]) and got["s3"][1].shape == (len(held), 4, 8)
    assert list((tmp_path / "default_cache").rglob("eval-random/index.json"))


def test_sweep_from_s3(ckpt, s3_copy, local_copy, s3, tmp_path):
    """The sweep of the S3 copy equals the sweep of the same dataset in a local directory, number for number."""
    common = ["sweep", "--checkpoint", str(ckpt), "--steps", "1,2", "--k", "2", "--num_samples", "4"]
    out = tmp_path / "sweep.json"
    assert main([*common, "--chunked_embeddings_dir", s3_copy, "--output", str(out), "--cache_dir", str(tmp_path / "c"),
                 "--endpoint_url", s3]) == 0
    assert main([*common, "--chunked_embeddings_dir", local_copy, "--output", str(tmp_path / "local.json")]) == 0
    remote, local = (json.loads(p.read_text()) for p in (out, tmp_path / "local.json"))
    assert [r["steps"] for r in remote["rows"]] == [1, 2] and remote["held_out"] is True
    assert _no_timings(remote) == _no_timings(local)


def test_bad_remote_inputs_name_the_url(ckpt, src, s3_copy, s3, tmp_path, capsys):
    def run(*argv):
        t = time.monotonic()
        rc = main(list(argv))
        err = capsys.readouterr().err
        assert time.monotonic() - t < 30 and rc == 2 and err.startswith("error: "), (rc, err)
        return err

    base = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "o.json"), "--cache_dir", str(tmp_path / "c")]
    err = run("evaluate", *base, "--chunked_embeddings_dir", "s3://bucket/missing", "--endpoint_url", s3)
    assert "s3://bucket/missing: no blip3o_stream.json: not a converted dataset" in err
    err = run("generate", *base, "--chunked_embeddings_dir", "s3://nobucket/ds", "--endpoint_url", s3)
    assert "s3://nobucket/ds: cannot read blip3o_stream.json: bucket does not exist" in err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    err = run("evaluate", *base, "--chunked_embeddings_dir", s3_copy, "--endpoint_url", dead)
    assert f"{s3_copy}: cannot read blip3o_stream.json: endpoint unreachable" in err
    err = run("convert", str(src), "s3://bucket/new", "--format", "litdata", "--endpoint_url", dead, "--no_progress")
    assert "s3://bucket/new: cannot read blip3o_stream.json: endpoint unreachable" in err
    # another dataset's widths: refused before any sample is scored, naming the URL
    other = tmp_path / "other"
    make_synthetic(other, SyntheticSpec(num_samples=12, eva_dim=16, clip_dim=6, tokens=4))
    assert _convert(other, "s3://bucket/other", "--endpoint_url", s3) == 0
    err = run("evaluate", *base, "--chunked_embeddings_dir", "s3://bucket/other", "--endpoint_url", s3)
    assert "s3://bucket/other: data has target width 6" in err and "the model was trained on 8" in err


def test_inspect_describes_a_converted_dataset(local_copy, capsys):
    assert main(["inspect", local_copy, "--check_values", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    m = read_manifest(local_copy)
    chunks = len(list(Path(local_copy).glob("*/chunk-*.bin")))
    assert (report["format"], report["samples"], report["shards"]) == ("litdata", 40, chunks) and chunks >= 10
    assert report["parts"]["eval"]["samples"] == m["parts"]["eval"]["samples"] > 0
    assert not report["problems"] and not report["failed_shards"]
    assert "no shards" not in report["text"] and f"{chunks} chunks of up to 4 samples" in report["text"]
