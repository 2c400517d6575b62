"""A training process killed with SIGKILL (also in the middle of a checkpoint write) resumes from
the last complete checkpoint and ends bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.train import checkpoint_dirs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    make_synthetic(d, SyntheticSpec(num_samples=44, eva_dim=32, clip_dim=16, tokens=16))
    return d


def args(data, out, steps):
    return ["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--model_size", "micro",
            "--batch_size", "4", "--max_steps", str(steps), "--save_every_n_steps", "5", "--holdout_fraction", "0.1",
            "--eval_samples", "2", "--num_inference_steps", "2", "--no_progress", "--cond_dropout", "0.1",
            "--gradient_accumulation_steps", "2", "--keep_checkpoints", "100"]


def final_weights(out):
    return (load_file(str(checkpoint_dirs(out)[-1] / "model.safetensors")),
            load_file(str(checkpoint_dirs(out)[-1] / "ema.safetensors")))


def assert_same(a, b):
    for wa, wb in zip(a, b):
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


def cli(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "blip3o_denoise.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = cli(args(data, out, 60))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return final_weights(out)


def test_sigkill_during_checkpoint_write(data, tmp_path, reference):
    out = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "import blip3o_denoise.checkpoint as T\n"
        "real = T.save_file\n"
        "calls = []\n"
        "def dying(*a, **k):\n"
        "    real(*a, **k)\n"
        "    calls.append(1)\n"
        "    if len(calls) == 5:  # third checkpoint (step 15): model written, EMA not yet\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "T.save_file = dying\n"
        "from blip3o_denoise.cli import main\n"
        f"sys.exit(main({args(data, out, 60)!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == -signal.SIGKILL
    assert [c.name for c in checkpoint_dirs(out)] == ["step_00000005", "step_00000010"]
    assert list((out / "checkpoints").glob(".tmp_step_*"))  # the half-written one, never renamed in
    p = cli(args(data, out, 60) + ["--resume"])
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resumed from" in stdout and "step_00000010" in stdout
    assert not list((out / "checkpoints").glob(".tmp_step_*"))
    assert_same(final_weights(out), reference)


def test_sigkill_at_an_arbitrary_moment(data, tmp_path, reference):
    out = tmp_path / "run"
    p = cli(args(data, out, 60))
    deadline = time.time() + 120
    while not checkpoint_dirs(out) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = checkpoint_dirs(out)
    assert done and done[-1].name != "step_00000060"
    p = cli(args(data, out, 60) + ["--resume"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert_same(final_weights(out), reference)
