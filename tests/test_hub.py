"""Models on the Hugging Face Hub's terms: ``save_pretrained`` writes config.json + model.safetensors + a model
card and loads back bit for bit; a repo id resolves from the local Hub cache with networking off; a repo that
is nowhere is a clear error naming it; ``push_to_hub`` uploads exactly that layout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip3o_denoise.pipeline import Denoiser

huggingface_hub = pytest.importorskip("huggingface_hub")

OLD_RUN = Path(__file__).parent / "fixtures" / "run_before_flow_maps"
ROOT = Path(__file__).resolve().parents[1]


def samples(den: Denoiser) -> dict:
    cond = torch.randn(2, den.tokens, den.model.cfg.cond_dim, generator=torch.Generator().manual_seed(3))
    noisy = torch.nn.functional.normalize(torch.randn(2, den.tokens, den.model.cfg.input_dim,
                                                      generator=torch.Generator().manual_seed(4)), dim=-1)
    return {"generated": den.generate(cond, num_steps=3, seed=1),
            "denoised": den.denoise(noisy, cond, 0.5, num_steps=2)}


def assert_same_samples(a: Denoiser, b: Denoiser):
    sa, sb = samples(a), samples(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def flow_map_run(tmp_path_factory):
    """A micro flow-map run (a few steps) with its results.json."""
    from blip3o_denoise.cli import main
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

    tmp = tmp_path_factory.mktemp("hub")
    make_synthetic(tmp / "d", SyntheticSpec(num_samples=24, eva_dim=16, clip_dim=8, tokens=16))
    out = tmp / "run"
    assert main(["train", "--chunked_embeddings_dir", str(tmp / "d"), "--output_dir", str(out), "--model_size",
                 "micro", "--max_steps", "2", "--batch_size", "8", "--warmup_steps", "1", "--min_noise_level", "0.0",
                 "--max_noise_level", "1.0", "--flow_map_share", "0.25", "--eval_every_n_steps", "0",
                 "--save_every_n_steps", "0", "--num_inference_steps", "2", "--holdout_fraction", "0.2",
                 "--eval_samples", "4", "--no_progress"]) == 0
    return out


def test_an_old_run_round_trips_through_the_hub_layout_bit_for_bit(tmp_path):
    den = Denoiser.from_pretrained(OLD_RUN)
    saved = den.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert {p.stat().st_mode for p in saved.iterdir()} == {
        (saved / "model.safetensors").stat().st_mode}  # readable by whoever may read the weights
    assert json.loads((saved / "config.json").read_text()) == json.loads((OLD_RUN / "final" / "config.json")
                                                                          .read_text())
    back = Denoiser.from_pretrained(saved)
    want = load_file(str(OLD_RUN / "expected.safetensors"))  # what the run sampled when it was written
    assert torch.equal(back.generate(want["condition"], num_steps=3, seed=1), want["generated"])
    assert torch.equal(back.denoise(want["noisy"], want["condition"], 0.5, num_steps=3), want["denoised"])
    card = (saved / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: blip3o-denoise") and "no evaluation" in card


def test_a_flow_map_run_round_trips_with_its_evaluation_in_the_card(flow_map_run, tmp_path):
    den = Denoiser.from_pretrained(flow_map_run)
    assert den.model.cfg.flow_map and den.solver == "jump"
    saved = den.save_pretrained(tmp_path / "model")
    back = Denoiser.from_pretrained(saved)
    assert back.model.cfg.flow_map and back.solver == den.solver and back.num_steps == den.num_steps
    assert any("step" in name for name in back.model.state_dict())  # the step embedding came along
    assert_same_samples(den, back)
    card = (saved / "README.md").read_text()
    result = json.loads((flow_map_run / "results.json").read_text())
    single = result["generation"]["model"]["cosine_mean"]
    assert f"{single:.4f}" in card and "single sample" in card  # the run's evaluation table
    assert str(flow_map_run.parent / "d") in card and f"training samples: {den.config['data']['num_train']}" in card
    # saved again from the saved copy, the card keeps its table (results.json travels with the model)
    again = back.save_pretrained(tmp_path / "again")
    assert (again / "README.md").read_text() == card


def _put_in_hub_cache(cache: Path, repo_id: str, model_dir: Path, revision: str = "a" * 40) -> None:
    """Lay ``model_dir`` out as huggingface_hub's cache does: blobs, a snapshot of links to them, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    for i, f in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / revision), repo / "snapshots" / revision / f.name)
    (repo / "refs" / "main").write_text(revision)


def _offline_env(hf_home: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
            "PYTHONPATH": str(ROOT / "src")}


def test_a_repo_id_loads_from_the_local_hub_cache_with_networking_off(tmp_path):
    den = Denoiser.from_pretrained(OLD_RUN)
    den.save_pretrained(tmp_path / "model")
    hf_home = tmp_path / "hf"
    _put_in_hub_cache(hf_home / "hub", "someone/clip-denoiser", tmp_path / "model")
    # the layout is the one huggingface_hub itself reads
    repos = huggingface_hub.scan_cache_dir(hf_home / "hub").repos
    assert [(r.repo_id, r.repo_type) for r in repos] == [("someone/clip-denoiser", "model")]
    code = ("import sys, torch; from safetensors.torch import save_file; from blip3o_denoise import Denoiser; "
            "d = Denoiser.from_pretrained('someone/clip-denoiser'); print(d.source); "
            "c = torch.randn(2, d.tokens, d.model.cfg.cond_dim, generator=torch.Generator().manual_seed(3)); "
            "save_file({'g': d.generate(c, num_steps=3, seed=1)}, sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.safetensors")], env=_offline_env(hf_home),
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert str(hf_home / "hub" / "models--someone--clip-denoiser" / "snapshots") in r.stdout
    cond = torch.randn(2, den.tokens, den.model.cfg.cond_dim, generator=torch.Generator().manual_seed(3))
    assert torch.equal(load_file(str(tmp_path / "g.safetensors"))["g"], den.generate(cond, num_steps=3, seed=1))


def test_a_repo_that_is_nowhere_is_a_clear_error_naming_it(tmp_path):
    hf_home = tmp_path / "hf"
    (hf_home / "hub").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "blip3o_denoise.cli", "generate", "--checkpoint", "someone/missing",
                        "--chunked_embeddings_dir", str(tmp_path), "--output", str(tmp_path / "g.safetensors")],
                       env=_offline_env(hf_home), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: someone/missing: no such directory"), r.stderr
    assert "HF_HUB_OFFLINE" in err[0] and str(hf_home / "hub") in err[0]
    assert not (tmp_path / "g.safetensors").exists()


def test_push_to_hub_uploads_the_saved_layout(monkeypatch):
    den = Denoiser.from_pretrained(OLD_RUN)
    calls = []

    class FakeApi:  # the Hub's side: what arrives must load back as the same model
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls.append(("create", repo_id, repo_type, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, repo_type, commit_message):
            folder = Path(folder_path)
            assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
            assert 'from_pretrained("me/denoiser")' in (folder / "README.md").read_text()
            assert_same_samples(den, Denoiser.from_pretrained(folder))
            calls.append(("upload", repo_id, repo_type))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = den.push_to_hub("me/denoiser", private=True, token="t")
    assert url == "https://huggingface.co/me/denoiser/commit/1"
    assert calls == [("token", "t"), ("create", "me/denoiser", "model", True, True),
                     ("upload", "me/denoiser", "model")]
