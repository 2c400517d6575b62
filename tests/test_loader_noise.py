"""Each sample's noise is drawn in the loader's workers (issue 21): the main process draws none, runs are
bit-identical to the previous main-process draws, batches are pinned iff the device is CUDA, and a step
reads at most one value back from the device."""

import json
import os
from pathlib import Path

import pytest
import torch
from previous_step import previous_train_step
from safetensors.torch import load_file
from test_distributed import run as run_cli

import blip3o_denoise.train as T
from blip3o_denoise import sphere
from blip3o_denoise.data.noise import NoiseCollate
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.flow import FlowConfig, sample_path, sample_seed
from blip3o_denoise.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    make_synthetic(d, SyntheticSpec(num_samples=40, eva_dim=32, clip_dim=16, tokens=16, num_shards=2))
    return d


def tiny(data, out, **kw):
    base = dict(chunked_embeddings_dir=str(data), output_dir=str(out), model_size="micro", batch_size=4,
                gradient_accumulation_steps=2, max_steps=4, warmup_steps=1, eval_every_n_steps=0,
                save_every_n_steps=0, num_inference_steps=2, holdout_fraction=0.2, eval_samples=4, progress=False,
                log_every_n_steps=1, cond_dropout=0.3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def weights(out):
    w = load_file(str(Path(out) / "final" / "model.safetensors"))
    ck = sorted((Path(out) / "checkpoints").iterdir())[-1]
    return w, load_file(str(ck / "model.safetensors"))


def losses(out):
    return [json.loads(x)["loss"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def assert_identical(a, b):
    for wa, wb in zip(weights(a), weights(b)):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    assert losses(a) == losses(b)


def test_collate_draws_what_sample_path_drew_per_sample():
    cfg = FlowConfig(noise_schedule="logit_normal")
    items = [{"target": torch.randn(5, 8), "condition": torch.randn(5, 4), "index": i} for i in (7, 3, 11)]
    batch = NoiseCollate(cfg, seed=9, cond_dropout=0.5, epoch=2)(items)
    seeds = [sample_seed(9, 2, i) for i in (7, 3, 11)]
    ref = sample_path(batch["target"], cfg, sample_seeds=seeds)
    assert torch.equal(batch["noise"], ref.x0) and torch.equal(1.0 - batch["noise_level"], ref.t)
    assert batch["drop"].dtype == torch.bool and batch["drop"].shape == (3,)
    assert "drop" not in NoiseCollate(cfg, seed=9)(items)  # no dropout: no mask (the model's own path)


@pytest.mark.parametrize("workers", [0, 2])
def test_runs_are_bit_identical_to_main_process_draws(data, tmp_path, monkeypatch, workers):
    with monkeypatch.context() as m:
        m.setattr(T, "train_step", previous_train_step)
        train(tiny(data, tmp_path / "previous"))
    train(tiny(data, tmp_path / "now", num_workers=workers))
    assert_identical(tmp_path / "previous", tmp_path / "now")


def test_two_ranks_are_bit_identical_to_main_process_draws(data, tmp_path):
    common = ["--chunked_embeddings_dir", str(data), "--model_size", "micro", "--batch_size", "2",
              "--gradient_accumulation_steps", "2", "--max_steps", "3", "--warmup_steps", "1", "--holdout_fraction",
              "0.2", "--eval_samples", "4", "--num_inference_steps", "2", "--no_progress", "--log_every_n_steps", "1",
              "--cond_dropout", "0.3", "--device", "cpu", "--eval_every_n_steps", "0"]
    run_cli(common + ["--output_dir", str(tmp_path / "previous")], nproc=2,
            script=ROOT / "tests" / "previous_step.py")
    run_cli(common + ["--output_dir", str(tmp_path / "now"), "--num_workers", "2"], nproc=2)
    assert_identical(tmp_path / "previous", tmp_path / "now")


def count_main_process_draws(monkeypatch):
    """Calls of torch.randn / torch.rand in this process from the first batch of the loop to its end."""
    main, state = os.getpid(), {"on": False, "draws": 0}
    for name in ("randn", "rand"):
        real = getattr(torch, name)

        def counted(*a, _real=real, **kw):
            if state["on"] and os.getpid() == main:
                state["draws"] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(torch, name, counted)
    real_epoch, real_finish = T.epoch_steps, T.finish

    def epoch_steps(run, pos):
        state["on"] = True
        yield from real_epoch(run, pos)

    def finish(*a, **kw):
        state["on"] = False
        return real_finish(*a, **kw)

    monkeypatch.setattr(T, "epoch_steps", epoch_steps)
    monkeypatch.setattr(T, "finish", finish)
    return state


@pytest.mark.parametrize("workers", [0, 2])
def test_with_workers_the_main_process_draws_no_noise(data, tmp_path, monkeypatch, workers):
    state = count_main_process_draws(monkeypatch)
    train(tiny(data, tmp_path / "o", num_workers=workers))
    if workers:
        assert state["draws"] == 0
    else:  # the counter sees the draws when they happen here: a level, noise and dropout draw for each of
        assert state["draws"] == 3 * 31  # the 31 training samples (4 steps of 8 take the whole epoch)


def test_batches_are_pinned_iff_the_device_is_cuda(data, tmp_path):
    run = T.build(tiny(data, tmp_path / "o", num_workers=2))
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        loader = T.make_loader(run.train_set, 4, run.sampler, 2, device, run.noise, 0)
        assert loader.pin_memory is pinned and loader.collate_fn is run.noise and loader.num_workers == 2


def test_streamed_batches_are_pinned_iff_the_device_is_cuda(tmp_path):
    pytest.importorskip("litdata")
    from blip3o_denoise.data.engine_convert import write_engine_dataset
    from blip3o_denoise.data.streaming import streaming_train_set

    src, conv = tmp_path / "src", tmp_path / "conv"
    make_synthetic(src, SyntheticSpec(num_samples=12, eva_dim=16, clip_dim=8, tokens=4))
    write_engine_dataset(src, str(conv), holdout_fraction=0.2, chunk_samples=4)
    ds = streaming_train_set(str(conv), "clip_denoising", holdout_fraction=0.2, cache_dir=str(tmp_path / "c"))
    noise = NoiseCollate(FlowConfig(), 0)
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        loader = T.make_stream_loader(ds, 2, 1, device, noise)
        assert loader.pin_memory is pinned and loader.collate_fn.collate_fn is noise
    batch = next(iter(T.make_stream_loader(ds, 2, 0, torch.device("cpu"), noise)))
    assert batch["noise"].shape == batch["target"].shape and batch["noise_level"].shape == (2,)


def test_num_workers_auto(monkeypatch):
    assert T.resolve_workers(-1, torch.device("cpu")) == 0
    assert T.resolve_workers(3, torch.device("cuda")) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert T.resolve_workers(-1, torch.device("cuda")) == 3  # 32 cores / 8 processes, one left to the process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert T.resolve_workers(-1, torch.device("cuda")) == T.MAX_AUTO_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert T.resolve_workers(-1, torch.device("cuda")) == 1


def test_a_step_reads_one_value_from_the_device_and_logs_only_at_log_steps(data, tmp_path, monkeypatch):
    """Reading a float or bool tensor into Python waits for the device on a GPU; count such reads per
    step (integer tensors are host counters and sample indices here), with the sphere's code told that
    reads are not free, as on an accelerator."""
    monkeypatch.setattr(sphere, "host_reads_are_free", lambda x: False)
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            if self.is_floating_point() or self.dtype == torch.bool:
                reads["n"] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step, per_log = [], []
    real_step, real_log = T.train_step, T.TrainLog.step

    def train_step(*a, **kw):
        reads["n"] = 0
        out = real_step(*a, **kw)
        per_step.append(reads["n"])
        return out

    def log_step(self, step, *a, **kw):
        reads["n"] = 0
        real_log(self, step, *a, **kw)
        per_log.append((step, reads["n"]))

    monkeypatch.setattr(T, "train_step", train_step)
    monkeypatch.setattr(T.TrainLog, "step", log_step)
    train(tiny(data, tmp_path / "o", max_steps=5, log_every_n_steps=100))
    assert per_step == [1] * 5
    assert [s for s, n in per_log if n] == [1, 5]  # the first and the last step are logged


def test_device_side_antipodal_fallback_gives_the_same_numbers(monkeypatch):
    x0 = sphere.normalize(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)))
    x1 = sphere.normalize(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)))
    x1[1, 2] = -x0[1, 2]  # one antipodal pair
    t = torch.tensor([0.2, 0.5, 0.9])
    on_host = (sphere.slerp(x0, x1, t), sphere.slerp_velocity(x0, x1, t))
    monkeypatch.setattr(sphere, "host_reads_are_free", lambda x: False)
    on_device = (sphere.slerp(x0, x1, t), sphere.slerp_velocity(x0, x1, t))
    for a, b in zip(on_host, on_device):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    x1[1, 2] = x0[1, 2].roll(1)  # none antipodal: the selection changes nothing
    selected = sphere.slerp(x0, x1, t)
    monkeypatch.undo()
    assert torch.equal(selected, sphere.slerp(x0, x1, t))
