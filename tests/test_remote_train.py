"""Training from a converted (LitData) dataset: from a local directory in one process, and from a real
S3 API (moto's server on 127.0.0.1) with two gloo ranks, killed with SIGKILL after a checkpoint and
resumed bit-identically."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import blip3o_denoise.train as T
from conftest import moto_s3_server
from blip3o_denoise.checkpoint import checkpoint_dirs
from blip3o_denoise.data.dataset import Embeddings, split_indices
from blip3o_denoise.data.engine_convert import write_engine_dataset
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
HOLD = 0.1


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_synthetic(d, SyntheticSpec(num_samples=44, eva_dim=32, clip_dim=16, tokens=16))
    return d


@pytest.fixture(scope="module")
def conv(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("conv") / "ds"
    write_engine_dataset(src, str(d), holdout_fraction=HOLD, chunk_samples=4)
    return d


def cfg(data, out, **kw):
    base = dict(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", batch_size=4,
                max_steps=10, save_every_n_steps=3, holdout_fraction=HOLD, eval_samples=2, num_inference_steps=2,
                progress=False, gradient_accumulation_steps=2, cond_dropout=0.1, keep_checkpoints=100)
    return TrainConfig(**{**base, **kw})


def weights(out):
    ck = checkpoint_dirs(out)[-1]
    return load_file(str(ck / "model.safetensors")), load_file(str(ck / "ema.safetensors"))


def assert_same(a, b):
    for wa, wb in zip(a, b):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


def test_each_epoch_streams_the_training_split(src, conv, tmp_path, monkeypatch):
    seen, real = [], T.forward_backward

    def record(run, model, batches, epoch, autocast):
        seen.append((epoch, [int(i) for b in batches for i in b["index"]]))
        return real(run, model, batches, epoch, autocast)

    monkeypatch.setattr(T, "forward_backward", record)
    res = train(cfg(conv, tmp_path / "o", max_steps=20, gradient_accumulation_steps=1))
    train_idx, held_idx = split_indices(Embeddings(src).keys, HOLD)
    # 37 training samples in whole batches of 4: 9 steps per epoch, one sample left out (drop_last)
    assert len(train_idx) == 37
    epochs = {}
    for epoch, idx in seen:
        epochs.setdefault(epoch, []).extend(idx)
    assert sorted(epochs) == [0, 1, 2] and len(epochs[2]) == 8
    for e in (0, 1):
        assert len(set(epochs[e])) == len(epochs[e]) == 36  # each sample at most once per epoch
        assert set(epochs[e]) <= set(train_idx)  # nothing held out
    assert epochs[0] != epochs[1]  # reshuffled
    assert res["num_images"] == 2 and held_idx  # the final evaluation ran on the held-out part
    recs = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 10, 20]
    assert json.loads((tmp_path / "o" / "final" / "config.json").read_text())["data"]["format"] == "litdata"


def crash_after(monkeypatch, name):
    real_save = T.save_checkpoint

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if path.name == name:
            raise Crash(path)
        return path

    monkeypatch.setattr(T, "save_checkpoint", save_then_crash)
    return real_save


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_converted_dataset_is_exact(conv, tmp_path, monkeypatch, workers):
    """Crash after the step-6 checkpoint (mid-epoch 1; the run crosses into epoch 2 after it), resume: the
    same weights as an uninterrupted run, with the loader in-process or in 2 worker processes."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(conv, full, max_steps=10, num_workers=workers))
    real_save = crash_after(monkeypatch, "step_00000006")
    with pytest.raises(Crash):
        train(cfg(conv, part, max_steps=10, num_workers=workers))
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    state = torch.load(checkpoint_dirs(part)[-1] / "training_state.pt", weights_only=True)
    # 9 whole batches per epoch, 4 steps of 2: step 6 is 4 batches (16 samples) into epoch 1
    assert (state["epoch"], state["batch_in_epoch"], state["stream"]["num_samples_yielded"]) == (1, 4, 16)
    train(cfg(conv, part, max_steps=10, resume=True, num_workers=workers))
    assert_same(weights(part), weights(full))


def test_resume_at_the_end_of_an_epoch_reads_only_the_next_one(conv, tmp_path, monkeypatch):
    """Saved after the last step of epoch 0: the resumed run streams epoch 1 only (not epoch 0 again)."""
    from blip3o_denoise.data import engine_dataset, streaming

    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(conv, full, max_steps=18, gradient_accumulation_steps=1, save_every_n_steps=9))
    real_save = crash_after(monkeypatch, "step_00000009")
    with pytest.raises(Crash):
        train(cfg(conv, part, max_steps=18, gradient_accumulation_steps=1, save_every_n_steps=9))
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    streamed, real_get = [], engine_dataset.EngineDataset.__getitem__

    def counting(self, index):
        item = real_get(self, index)
        if isinstance(self._make_item, streaming._PairItem):  # the training stream, not evaluation reads
            streamed.append(item["index"])
        return item

    monkeypatch.setattr(engine_dataset.EngineDataset, "__getitem__", counting)
    train(cfg(conv, part, max_steps=18, gradient_accumulation_steps=1, save_every_n_steps=9, resume=True))
    assert len(streamed) == 36  # the 9 batches of epoch 1
    assert_same(weights(part), weights(full))


def test_resume_refuses_another_kind_of_dataset(src, conv, tmp_path):
    out = tmp_path / "o"
    train(cfg(src, out, max_steps=3, holdout_fraction=HOLD))
    with pytest.raises(ValueError, match="written while training from a shard directory or store.*converted"):
        train(cfg(conv, out, max_steps=6, resume=True))


def test_converted_dataset_refusals(conv, tmp_path):
    with pytest.raises(ValueError, match=r"holdout_fraction"):
        train(cfg(conv, tmp_path / "a", holdout_fraction=0.2))
    with pytest.raises(ValueError, match="overfit_test_size.*converted"):
        train(cfg(conv, tmp_path / "b", overfit_test_size=4))
    with pytest.raises(ValueError, match="max_shards"):
        train(cfg(conv, tmp_path / "c", max_shards=1))


# ---------------------------------------------------------------------------- two ranks from S3


@pytest.fixture(scope="module")
def s3(src):
    import boto3

    with moto_s3_server() as endpoint:
        creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        opts = {"endpoint_url": endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
                "region_name": "us-east-1"}
        boto3.client("s3", **opts).create_bucket(Bucket="bucket")
        url = "s3://bucket/runs/ds"
        write_engine_dataset(src, url, holdout_fraction=HOLD, chunk_samples=4, storage_options=opts)
        yield url, endpoint, creds


def torchrun(url, endpoint, creds, out, cache, log: Path, resume=False):
    """Start 2 gloo ranks training from ``url``; output goes to ``log`` (a pipe nobody reads could fill up)."""
    args = ["--chunked_embeddings_dir", url, "--endpoint_url", endpoint, "--cache_dir", str(cache),
            "--output_dir", str(out), "--model_size", "micro", "--batch_size", "2", "--max_steps", "120",
            "--save_every_n_steps", "4", "--holdout_fraction", str(HOLD), "--eval_samples", "2",
            "--num_inference_steps", "2", "--no_progress", "--keep_checkpoints", "100", "--num_workers", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_universal_denoising.py"), *args, *(["--resume"] if resume else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", **creds)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_all(p) -> None:
    """SIGKILL torchrun and every rank at once."""
    for pid in [p.pid, *descendants(p.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait()


def finish(p, log: Path) -> str:
    try:
        p.wait(timeout=400)
    finally:
        if p.poll() is None:
            kill_all(p)
    text = log.read_text()
    assert p.returncode == 0, text[-4000:]
    return text


def test_two_ranks_from_s3_killed_and_resumed_match_an_uninterrupted_run(s3, tmp_path):
    url, endpoint, creds = s3
    ref, log = tmp_path / "ref", tmp_path / "ref.log"
    finish(torchrun(url, endpoint, creds, ref, tmp_path / "cache_ref", log), log)
    assert [c.name for c in checkpoint_dirs(ref)][-1] == "step_00000120"
    assert list((tmp_path / "cache_ref").rglob("chunk-*.bin"))  # the chunks came through the local cache
    # 37 training samples, whole global batches of 2 x 2: 9 steps per epoch on each rank
    assert [r["epoch"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())
            if r.get("step") == 120 and "loss" in r] == [13]

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    p = torchrun(url, endpoint, creds, out, tmp_path / "cache", log)
    try:
        deadline = time.time() + 300
        while not checkpoint_dirs(out) and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
    finally:
        kill_all(p)
    done = checkpoint_dirs(out)
    assert done and done[-1].name != "step_00000120", (f"not killed mid-run (exit {p.returncode}): "
                                                       + log.read_text()[-3000:])
    state = torch.load(done[-1] / "training_state.pt", weights_only=True)
    stream = state["stream"]
    assert stream["dataset"]["world_size"] == 2 and 0 < state["batch_in_epoch"] <= 9
    assert stream["num_samples_yielded"] == 2 * state["batch_in_epoch"]  # this rank's samples in the epoch
    # resumed on "another node": a different cache directory, the same data
    log = tmp_path / "resumed.log"
    text = finish(torchrun(url, endpoint, creds, out, tmp_path / "cache_elsewhere", log, resume=True), log)
    assert "resumed from" in text and "warning: the streamed epoch resumes with other" not in text
    assert_same(weights(out), weights(ref))


def test_a_deleted_evaluation_chunk_is_named_before_training(src, tmp_path):
    """The evaluation chunks are read only when training ends: one deleted is refused at start, by name, with
    nothing trained or written."""
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(conv_dir(src, tmp_path), d)
    victim = sorted((d / "eval").glob("chunk-*.bin"))[-1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"eval/{victim.name} is missing"):
        train(cfg(d, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def conv_dir(src, tmp_path):
    d = tmp_path / "fresh"
    write_engine_dataset(src, str(d), holdout_fraction=HOLD, chunk_samples=1)
    return d
