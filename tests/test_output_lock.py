"""One writer per output directory: a command writing into a directory that a live process writes to is
refused at start, naming that process; the lock of a killed process is taken over."""

import json
import os
import signal
import subprocess
import sys

import pytest

from blip3o_denoise.cli import main
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.lock import LOCK_NAME

HOLD = ("import sys, time; from blip3o_denoise.lock import acquire; acquire(sys.argv[1], 'holder'); "
        "print('ok', flush=True); time.sleep(60)")


@pytest.fixture
def holder():
    """Start a process that locks a directory and sleeps; yields a function taking the directory."""
    procs = []

    def hold(d):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        procs.append(p)
        assert p.stdout.readline().strip() == "ok"
        return p

    yield hold
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def train_args(data, out):
    return ["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--model_size", "micro",
            "--batch_size", "8", "--max_steps", "1", "--warmup_steps", "1", "--eval_every_n_steps", "0",
            "--save_every_n_steps", "0", "--num_inference_steps", "2", "--holdout_fraction", "0.2",
            "--eval_samples", "4", "--no_progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock") / "d"
    make_synthetic(d, SyntheticSpec(num_samples=24, eva_dim=16, clip_dim=8, tokens=16))
    return d


def test_second_writer_is_refused_and_a_killed_ones_lock_is_taken_over(data, tmp_path, holder, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7}\n')  # the other run's log must stay as it is
    p = holder(out)
    assert main(train_args(data, out)) == 2
    err = capsys.readouterr().err
    assert f"{out}: in use by process {p.pid}" in err and "'holder'" in err and err.count("\n") == 1
    assert (out / "metrics.jsonl").read_text() == '{"step": 7}\n' and not (out / "final").exists()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == p.pid  # left behind by the killed process
    (out / "metrics.jsonl").unlink()
    assert main(train_args(data, out)) == 0
    assert f"taking over the stale lock of process {p.pid}" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").exists() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["convert", "make-synthetic", "convert-litdata", "extract"])
def test_other_writing_commands_are_refused_too(data, tmp_path, holder, capsys, command):
    dst = tmp_path / "dst"
    dst.mkdir()
    p = holder(dst)
    argv = {"convert": ["convert", str(data), str(dst), "--no_progress"],
            "convert-litdata": ["convert", str(data), str(dst), "--format", "litdata", "--no_progress"],
            "extract": ["extract", "--images", str(tmp_path), "--output", str(dst), "--target_model", "x",
                        "--condition_model", "y", "--no_progress"],
            "make-synthetic": ["make-synthetic", str(dst), "--num_samples", "4", "--eva_dim", "8", "--clip_dim", "8",
                               "--tokens", "4"]}[command]
    assert main(argv) == 2
    assert f"in use by process {p.pid}" in capsys.readouterr().err
    assert sorted(f.name for f in dst.iterdir()) == [LOCK_NAME]
