"""Every command in the ```bash blocks of README.md and docs/*.md runs here, or is listed with the reason it
cannot.

The pages are parsed when the tests run, so an edited or added command is tested (or fails
``test_every_readme_command_is_run_or_listed`` until it is handled). Commands run verbatim from the
repository root, except for:

- data directories (``/data/...``) -> small synthetic data made by ``blip3o-denoise make-synthetic``,
  and output paths (``--output_dir``, ``--output``, ``--cache_dir``, ``convert``'s destination,
  ``make-synthetic``'s folder) -> fresh temporary folders; ``--checkpoint`` -> one tiny (``micro``) run
  trained once for the module with the README's training flags (the README's own ``base`` run is trained here too, but
  evaluating it would take minutes);
- ``s3://bucket/...`` -> moto's S3 server, started on 127.0.0.1 for the module (credentials and
  ``AWS_ENDPOINT_URL`` in the commands' environment), holding a conversion of a 40-sample dataset
  at ``s3://bucket/blip3o``; a command naming it gets a micro run trained from it as
  ``--checkpoint``, and ``convert`` writes to a fresh prefix of that bucket;
- the numeric values of the flags in ``SHORTENED`` (the README's values take minutes here);
- ``blip3o-denoise`` runs as ``python -m blip3o_denoise.cli`` (what the console script calls).

``SKIPPED`` lists the commands that cannot run here, with why; ``COVERED_ELSEWHERE`` the ones too
slow for this file, with the test that runs them.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import moto_s3_server, readme_commands
from blip3o_denoise.cli import main
from blip3o_denoise.data.dataset import split_indices
from blip3o_denoise.data.engine_convert import write_engine_dataset
from blip3o_denoise.data.engine_format import read_manifest
from blip3o_denoise.data.open import open_dataset
from blip3o_denoise.data.store import convert

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# flag -> the value used instead of the README's (only numeric values are replaced)
SHORTENED = {"--num_epochs": "1", "--max_steps": "2", "--steps": "2", "--num_samples": "8"}

SKIPPED = {
    "pip install torch==2.13.0": "installs packages (network); the test environment is already installed",
    'pip install -e ".[plot]"': "installs packages (network)",
    'pip install -e ".[test]"': "installs packages (network)",
    'pip install -e ".[extract]"': "installs packages (network)",
    'pip install -e ".[remote]"': "installs packages (network)",
    "pip install --no-deps litdata==0.2.76": "installs packages (network); .ci/run installs LitData the same way",
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...":
        "placeholder credentials of the sbatch script; the s3:// commands here get the test server's in their "
        "environment",
    "python -m pytest tests -x -q": "the test suite itself, which this file is part of",
    "blip3o-denoise extract --images /data/images --output /data/store --target_model openai/clip-vit-large-patch14 "
    "--condition_model BAAI/EVA-CLIP-8B --trust_remote_code --batch_size 64 --num_workers 8 --precision fp16":
        "downloads two hub models (network, and an 8B model); tests/test_extract.py runs extract with local towers",
    "torchrun --standalone --nproc_per_node=8 train_universal_denoising.py --task_mode clip_denoising "
    "--chunked_embeddings_dir /data/store --output_dir ./run --model_size large --batch_size 32 --precision bf16 "
    "--max_noise_level 1.0 --fsdp --grad_checkpointing":
        "8 GPUs; tests/test_distributed.py::test_readme_torchrun_command_with_default_flags runs it with 2 CPU "
        "processes (DDP and --fsdp)",
    'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)': "SLURM (sbatch script)",
    "sh ../shared/realdata/make.sh /tmp/rd": "builds the real development benchmark from the workplace's shared "
                                             "folder (Debian downloads, minutes); never part of the repository",
    "srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$head:29500 "
    "--rdzv_id=$SLURM_JOB_ID train_universal_denoising.py --chunked_embeddings_dir /data/store --output_dir ./run "
    "--resume ...": "SLURM (sbatch script), 32 GPUs",
    "srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$head:29500 "
    "--rdzv_id=$SLURM_JOB_ID train_universal_denoising.py --task_mode clip_denoising --chunked_embeddings_dir "
    "s3://bucket/blip3o --cache_dir /local/nvme/blip3o-cache --max_cache_size 400GB --num_workers 4 --output_dir "
    "/shared/runs/blip3o --model_size large --batch_size 32 --precision bf16 --max_noise_level 1.0 --fsdp --resume":
        "SLURM (sbatch script), 32 GPUs; tests/test_remote_train.py trains 2 gloo ranks from an S3 server, killed "
        "and resumed, and the s3:// train command above runs here",
    "python benchmarks/gpu_check.py --output gpu_check.json":
        "needs a GPU; tests/test_gpu_check.py runs its CPU quick form",
}

COVERED_ELSEWHERE = {
    "blip3o-denoise train --chunked_embeddings_dir /data/store --output_dir ./fast_clip --model_size base "
    "--min_noise_level 0.0 --max_noise_level 1.0 --precision bf16 --init_from ./checkpoints_clip --distill_from "
    "./checkpoints_clip --flow_map_share 0.25 --distill_steps 2 --flow_map_start jumps --flow_map_min_step 0.25 "
    "--learning_rate 3e-4 --max_steps 2000 --num_inference_steps 2":
        "tests/test_flowmap.py::test_readme_fast_sampling_commands",  # needs a run of its own widths
    "blip3o-denoise evaluate --checkpoint ./fast_clip --chunked_embeddings_dir /data/store --num_inference_steps 2 "
    "--output fast.json": "tests/test_flowmap.py::test_readme_fast_sampling_commands",  # needs the flow map above
    "python benchmarks/flowmap_quality.py --eval_dir /tmp/rd/eval --train_dir /tmp/rd/train --ordinary runs/ordinary "
    "--flow_map runs/flowmap --flow_map runs/finetuned --step_time":
        "tests/test_flowmap.py::test_flowmap_benchmark_runs_as_documented",  # real data: an hour
    "python benchmarks/real_quality.py /tmp/rd --recipes default --steps 1000":
        "tests/test_real_quality_script.py::test_real_quality_script_prints_and_writes_a_row",  # real data: minutes
    "python benchmarks/real_quality.py /tmp/sw --recipes default,w1280_d1,mini_head1024 --budget_seconds 120":
        "tests/test_real_quality_script.py::test_real_quality_script_gives_each_recipe_the_steps_of_an_equal_budget",
    "python benchmarks/real_quality.py /tmp/rd/wide --recipes default,w1536_d1,mini_head1280,shift_auto "
    "--budget_seconds 150":
        "tests/test_real_quality_script.py::test_real_quality_script_gives_each_recipe_the_steps_of_an_equal_budget",
    "python benchmarks/real_quality.py /tmp/rd --recipes default,shift_auto,shift1 --steps 200 --warmup_steps 40":
        "tests/test_real_quality_script.py::test_real_quality_script_gives_each_recipe_the_steps_of_an_equal_budget",
    "blip3o-denoise demo": "tests/test_demo.py::test_demo_quick_mode_beats_every_baseline_it_prints",
    "python train_universal_denoising.py --task_mode clip_denoising --chunked_embeddings_dir /data/embeddings "
    "--output_dir ./test_overfit --overfit_test_size 20 --batch_size 4 --num_epochs 50 --max_shards 1":
        "tests/test_train.py::test_seed_readme_commands_run_verbatim",  # base preset: ~1 min even at 1 epoch
}

RUNNABLE = ("blip3o-denoise ", "python train_universal_denoising.py ", "torchrun ", "python benchmarks/")
OUTPUT_FLAGS = ("--output_dir", "--output", "--cache_dir")
S3_DATA = "s3://bucket/blip3o"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def to_run() -> list[str]:
    return [c for c in readme_commands() if c not in SKIPPED and c not in COVERED_ELSEWHERE]


def test_every_readme_command_is_run_or_listed():
    cmds = readme_commands()
    assert cmds, "no ```bash blocks found in README.md and docs/*.md"
    unhandled = [c for c in to_run() if not c.startswith(RUNNABLE)]
    assert not unhandled, (f"commands of README.md and docs/*.md not run by this file nor listed in "
                           f"SKIPPED/COVERED_ELSEWHERE: {unhandled}")
    stale = [c for c in (*SKIPPED, *COVERED_ELSEWHERE) if c not in cmds]
    assert not stale, f"listed commands no longer in README.md nor docs/*.md: {stale}"
    for cmd, test in COVERED_ELSEWHERE.items():
        path, name = test.split("::")
        text = (ROOT / path).read_text()
        assert f"def {name}(" in text, test
        # the covering test builds its command from the README's text (conftest.readme_command)
        body = text.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0]
        starts = re.findall(r'readme_command\(\s*"([^"]+)"', body)
        assert any(cmd.startswith(s) for s in starts), f"{test} does not build {cmd!r} with readme_command"



@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Small stand-ins for /data/...: seed shards, their store, a directory of other samples, and the
    shared tiny run that --checkpoint points at."""
    root = tmp_path_factory.mktemp("readme")
    emb, new, store = root / "embeddings", root / "new", root / "store"
    # 7 samples: 1 held out at the default --holdout_fraction 0.05, 6 training samples (one step of 8)
    spec = ["--eva_dim", "16", "--clip_dim", "8", "--tokens", "16"]
    assert main(["make-synthetic", str(emb), "--num_samples", "7", *spec]) == 0
    assert main(["make-synthetic", str(new), "--num_samples", "5", "--seed", "1", *spec]) == 0
    convert(emb, store, dtype="bfloat16", progress=False)
    write_engine_dataset(emb, str(root / "litdata"))
    from PIL import Image  # /data/images.json: a photo per sample key, as the development benchmark writes it

    (root / "images").mkdir()
    for i, key in enumerate(open_dataset(str(emb)).keys):
        Image.new("RGB", (8, 8), (30 * i % 256, 80, 120)).save(root / "images" / f"{i}.png")
    (root / "images.json").write_text(json.dumps({k: f"images/{i}.png"
                                                  for i, k in enumerate(open_dataset(str(emb)).keys)}))
    ckpt = root / "checkpoints_clip"
    # the README's training flags, with the micro preset and a few steps
    assert main(["train", "--task_mode", "clip_denoising", "--chunked_embeddings_dir", str(store), "--output_dir",
                 str(ckpt), "--model_size", "micro", "--batch_size", "8", "--max_steps", "3", "--learning_rate", "1e-4",
                 "--max_noise_level", "1.0", "--num_inference_steps", "4", "--no_progress"]) == 0
    return {"root": root, "data": {"/data/embeddings": emb, "/data/store": store, "/data/new": new,
                                    "/data/litdata": root / "litdata", "/data/images.json": root / "images.json"},
            "ckpt": ckpt}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with the README's s3://bucket/blip3o: 40 samples (the README's train command
    streams whole batches of 8 with 4 workers), and a micro run trained from it."""
    import boto3

    root = tmp_path_factory.mktemp("readme_s3")
    with moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "BLIP3O_CACHE_DIR": str(root / "cache")}
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="bucket")
        assert main(["make-synthetic", str(root / "src"), "--num_samples", "40", "--eva_dim", "16", "--clip_dim", "8",
                     "--tokens", "16", "--seed", "2"]) == 0
        write_engine_dataset(root / "src", S3_DATA)
        ckpt = root / "run"
        assert main(["train", "--task_mode", "clip_denoising", "--chunked_embeddings_dir", S3_DATA, "--output_dir",
                     str(ckpt), "--model_size", "micro", "--max_steps", "2", "--max_noise_level", "1.0",
                     "--num_inference_steps", "4", "--no_progress"]) == 0
        yield {"env": env, "ckpt": ckpt}


def substitute(cmd: str, ws: dict, out: Path, s3: dict | None = None) -> list[str]:
    """argv for ``cmd``: data paths, output paths, --checkpoint and the SHORTENED values replaced
    (``s3``: the S3 server's fixture, for a command that names s3://)."""
    tokens = shlex.split(cmd)
    prog = {"blip3o-denoise": [sys.executable, "-m", "blip3o_denoise.cli"], "python": [sys.executable],
            "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[tokens[0]]
    argv, positional = [], 0
    for i, tok in enumerate(tokens[1:], 1):
        prev = tokens[i - 1]
        if prev in OUTPUT_FLAGS or (tokens[:2] == ["blip3o-denoise", "convert"] and not tok.startswith("-")
                                    and positional == 2) or (
                tokens[:2] == ["blip3o-denoise", "make-synthetic"] and not tok.startswith("-") and positional == 1):
            tok = f"s3://bucket/{out.parent.name}/blip3o" if tok.startswith("s3://") else str(out / Path(tok).name)
        elif prev == "--checkpoint":
            tok = str(s3["ckpt"] if s3 else ws["ckpt"])
        elif prev in SHORTENED and re.fullmatch(r"[0-9.e+-]+", tok):
            tok = SHORTENED[prev]
        elif tok.startswith("/data/"):
            assert tok in ws["data"], f"{tok}: add a stand-in for it to the ws fixture"
            tok = str(ws["data"][tok])
        if not tok.startswith("-") and not prev.startswith("--"):
            positional += 1
        argv.append(tok)
    return prog + argv


def check_outcome(cmd: str, argv: list[str], r: subprocess.CompletedProcess, ws: dict) -> None:
    """What each kind of command must have produced."""
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    words = shlex.split(cmd)
    kind = "train" if words[:2] == ["python", "train_universal_denoising.py"] else words[1]
    arg = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    if kind == "inspect":
        assert "samples 7" in r.stdout and "FAILED" not in r.stdout
    elif kind == "convert":
        dst = argv[argv.index("convert") + 2]
        if arg.get("--format") == "litdata":
            m = read_manifest(dst)  # the endpoint: AWS_ENDPOINT_URL, set by the test
            assert (m["total_samples"], m["dtype"], m["chunk_samples"]) == (7, "bfloat16", 16)
            assert m["holdout_fraction"] == 0.05 and m["parts"]["eval"]["samples"] >= 1
        else:
            m = json.loads((Path(dst) / "store_manifest.json").read_text())
            assert (m["total_samples"], m["dtype"]) == (7, arg["--dtype"])
    elif kind == "train":
        out = Path(arg["--output_dir"])
        assert (out / "final" / "model.safetensors").exists()
        res = json.loads((out / "results.json").read_text())
        assert ("generation" in res) == (float(arg.get("--max_noise_level", 0.9)) >= 1.0)
        assert res["num_images"] >= 1 and res["denoising"]
    elif kind == "evaluate":
        res = json.loads(Path(arg["--output"]).read_text())
        assert res["held_out"] is True and "generation" in res and res["denoising"]
        assert "ridge" in res["generation"]["baselines"]
        assert res["generation"]["retrieval"]["pool_size"] == res["num_images"]
        if "--images_json" in arg:  # the picture, and the photos it names are the JSON's
            table = json.loads(Path(arg["--images_json"]).read_text())
            assert Path(res["figure"]["png"]).stat().st_size > 0
            for q in res["figure"]["queries"]:
                assert q["image"] == str(Path(arg["--images_json"]).parent / table[q["key"]])
    elif kind == "generate":
        with safe_open(arg["--output"], "pt") as f:
            emb, keys = f.get_tensor("embeddings"), json.loads(f.metadata()["keys"])
        want = open_dataset(arg["--chunked_embeddings_dir"]).keys
        if arg.get("--split") == "heldout":  # the run's holdout fraction, 0.05: the key-hash rule
            want = [want[i] for i in split_indices(want, 0.05)[1]]
        assert keys == want and emb.shape == (len(want), 16, 8)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(want), 16), atol=1e-3)


@pytest.mark.parametrize("cmd", to_run(), ids=lambda c: " ".join(c.split()[:2])[:40])
def test_readme_command_runs(cmd, ws, tmp_path, request):
    out = tmp_path / "out"
    out.mkdir()
    s3 = request.getfixturevalue("s3") if "s3://" in cmd else None
    argv = substitute(cmd, ws, out, s3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **(s3["env"] if s3 else {})}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if s3:
        with pytest.MonkeyPatch.context() as mp:  # check_outcome reads from the server too
            for k, v in s3["env"].items():
                mp.setenv(k, v)
            check_outcome(cmd, argv, r, ws)
    else:
        check_outcome(cmd, argv, r, ws)
