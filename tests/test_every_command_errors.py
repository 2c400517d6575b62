"""Every command, not only train: damaged models, devices this machine lacks, outputs that cannot be written,
a full disk and Ctrl-C end in one ``error:`` line (exit 2; 130 for Ctrl-C) that names the file or flag, and
leave no partial output."""

import errno
import json
import pathlib

import pytest
import torch

from blip3o_denoise.cli import main
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.pipeline import Denoiser
from blip3o_denoise.train import TrainConfig, train

CHEAP = ["--num_inference_steps", "2", "--noise_levels", "0.5", "--sample_counts", "2", "--no_ridge",
         "--no_distribution", "--no_progress"]


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def copy_run(run, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run[1] / "final", dst)
    return dst


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def command(name, ckpt, data, out):
    argv = [name, "--checkpoint", str(ckpt), "--chunked_embeddings_dir", str(data), "--output", str(out)]
    return argv + (CHEAP if name == "evaluate" else ["--steps", "1", "--k", "2"] if name == "sweep" else [])


@pytest.mark.parametrize("name", ["evaluate", "generate", "sweep"])
@pytest.mark.parametrize("damage", ["truncated_weights", "torn_config", "sizes_differ"])
def test_damaged_models_are_one_line_errors(run, tmp_path, capsys, name, damage):
    ck = copy_run(run, tmp_path)
    if damage == "truncated_weights":
        w = ck / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
        needle = f"{w}: unreadable weights"
    elif damage == "torn_config":
        c = ck / "config.json"
        c.write_text(c.read_text()[:50])
        needle = f"{c}: not a run config"
    else:
        c = ck / "config.json"
        cfg = json.loads(c.read_text())
        cfg["model"]["hidden_size"] *= 2
        c.write_text(json.dumps(cfg))
        needle = "the weights do not match"
    out = tmp_path / "o.out"
    assert main(command(name, ck, run[0], out)) == 2
    one_line_error(capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_devices_this_machine_lacks_are_named(run, tmp_path, capsys, device):
    if (device == "cuda" and torch.cuda.is_available()) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    for name in ("evaluate", "generate", "sweep"):
        assert main([*command(name, run[1], run[0], tmp_path / "o"), "--device", device]) == 2
        one_line_error(capsys, f"--device {device}:")
    with pytest.raises(ValueError, match=f"--device {device}:"):
        Denoiser.from_pretrained(run[1], device=device)


@pytest.mark.parametrize("name", ["evaluate", "generate", "sweep"])
def test_outputs_that_cannot_be_files_are_refused_before_the_work(run, tmp_path, capsys, name):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, needle in ((tmp_path / "adir", "is a directory"), (tmp_path / "afile" / "o", "is not a directory"),
                        (tmp_path / "loop" / "o", "is not a directory")):
        assert main(command(name, run[1], run[0], out)) == 2
        one_line_error(capsys, f"--output {out}: ", needle)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("argv", [["train", "--chunked_embeddings_dir", "DATA", "--output_dir", "OUT"],
                                  ["convert", "DATA", "OUT"], ["make-synthetic", "OUT"]])
def test_a_file_or_a_loop_where_a_directory_is_needed(run, tmp_path, capsys, argv):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, needle in ((tmp_path / "afile", "is a file"), (tmp_path / "loop", "symlink loop")):
        assert main([str(run[0]) if a == "DATA" else str(out) if a == "OUT" else a for a in argv]) == 2
        one_line_error(capsys, str(out), needle)


def test_a_full_disk_leaves_no_empty_results_file(run, tmp_path, capsys, monkeypatch):
    real = pathlib.Path.write_text

    def full_disk(self, *a, **kw):  # the file is created, then the disk is full
        if self.suffix == ".json" or ".json.tmp" in self.name:
            self.open("w").close()
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    out = tmp_path / "r.json"
    assert main(command("evaluate", run[1], run[0], out)) == 2
    one_line_error(capsys, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_train_dir_of_other_widths(run, tmp_path, capsys):
    other = tmp_path / "other"
    make_synthetic(other, SyntheticSpec(num_samples=8, eva_dim=24, clip_dim=8, tokens=16))
    assert main([*command("evaluate", run[1], run[0], tmp_path / "r.json"), "--train_dir", str(other)]) == 2
    one_line_error(capsys, f"--train_dir {other}:", "condition width 24")


def test_ctrl_c_in_training_says_how_to_resume(run, tmp_path, capsys, monkeypatch):
    import blip3o_denoise.train as tr

    calls = []
    real = tr.optimizer_step

    def interrupted(r):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(r)

    monkeypatch.setattr(tr, "optimizer_step", interrupted)
    out = tmp_path / "run"
    argv = ["train", "--chunked_embeddings_dir", str(run[0]), "--output_dir", str(out), "--model_size", "micro",
            "--batch_size", "8", "--max_steps", "5", "--save_every_n_steps", "2", "--eval_every_n_steps", "0",
            "--holdout_fraction", "0.3", "--no_progress"]
    assert main(argv) == 130
    one_line_error(capsys, "interrupted", "--resume")
    monkeypatch.setattr(tr, "optimizer_step", real)
    assert main([*argv, "--resume", "--num_inference_steps", "2", "--eval_samples", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("argv,named", [
    (["evaluate", "--checkpoint", "s3://bucket/run", "--chunked_embeddings_dir", "DATA"], "--checkpoint s3://bucket/run"),
    (["generate", "--checkpoint", "RUN", "--chunked_embeddings_dir", "DATA", "--output", "s3://bucket/g.safetensors"],
     "--output s3://bucket/g.safetensors"),
    (["sweep", "--checkpoint", "RUN", "--chunked_embeddings_dir", "DATA", "--output", "s3://b/s.json"],
     "--output s3://b/s.json"),
    (["train", "--chunked_embeddings_dir", "DATA", "--output_dir", "s3://bucket/run"], "--output_dir s3://bucket/run"),
    (["make-synthetic", "s3://bucket/syn"], "out s3://bucket/syn"),
    (["inspect", "s3://bucket/data"], "dir s3://bucket/data"),
])
def test_object_storage_urls_where_a_local_path_is_needed_are_named_as_given(run, tmp_path, capsys, monkeypatch,
                                                                            argv, named):
    monkeypatch.chdir(tmp_path)
    argv = [str(run[0]) if a == "DATA" else str(run[1]) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, f"error: {named}: a local")
    assert not (tmp_path / "s3:").exists()  # no local folder named after the URL


def test_written_weights_follow_the_umask(run, tmp_path):
    """safetensors writes 0600 whatever the umask: a run's weights and generated files must be readable by the
    group like every other output (umask 022 -> 0644, 027 -> 0640)."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        out = tmp_path / "g.safetensors"
        assert main(command("generate", run[1], run[0], out)) == 0
        train(TrainConfig(chunked_embeddings_dir=str(run[0]), output_dir=str(tmp_path / "r"), model_size="micro",
                          batch_size=8, max_steps=1, save_every_n_steps=1, holdout_fraction=0.3, eval_samples=2,
                          num_inference_steps=2, progress=False))
    finally:
        os.umask(old)
    files = [out, *(tmp_path / "r").glob("final/*"), *(tmp_path / "r").glob("checkpoints/*/*.safetensors")]
    assert len(files) == 5 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o640}
