"""A condition with another token count than the target (N_c = 16 condition tokens, N = 64 target
tokens): read, trained with --conditioning cross_attention, evaluated and generated from; the
token-wise conditioning modes are refused at start."""

import json

import pytest
import torch
from safetensors import safe_open

from blip3o_denoise.cli import main
from blip3o_denoise.data.dataset import Embeddings, PairDataset
from blip3o_denoise.data.seed_format import open_seed_shard, write_seed_shard
from blip3o_denoise.data.store import convert
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.pipeline import Denoiser


def pool_condition(d):
    """Rewrite each seed shard of ``d`` (pickle.dump, the seed's layout) with its 8x8 EVA grid averaged to 4x4."""
    for i, path in enumerate(sorted(d.glob("embeddings_shard_*.pkl"))):
        s = open_seed_shard(path)
        eva = s.eva.read_all()
        n, _, w = eva.shape
        pooled = eva.reshape(n, 4, 2, 4, 2, w).mean(dim=(2, 4)).reshape(n, 16, w)
        write_seed_shard(d, i, s.clip.read_all(), pooled, s.keys, s.captions, include_cls=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("unequal") / "d"
    make_synthetic(d, SyntheticSpec(num_samples=40, eva_dim=16, clip_dim=8, tokens=64, num_shards=2))
    pool_condition(d)
    return d


TRAIN = ["--task_mode", "clip_denoising", "--model_size", "micro", "--batch_size", "8", "--max_steps", "2",
         "--warmup_steps", "1", "--max_noise_level", "1.0", "--holdout_fraction", "0.2", "--eval_samples", "4",
         "--num_inference_steps", "2", "--no_progress"]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("unequal_run") / "run"
    assert main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out),
                 "--conditioning", "cross_attention", *TRAIN]) == 0
    return out


def test_readers_accept_unequal_token_counts(data, tmp_path, capsys):
    assert main(["inspect", str(data)]) == 0
    assert "N = 64 (eva 16: --conditioning cross_attention)" in capsys.readouterr().out
    emb = Embeddings(data)
    assert (emb.tokens, emb.eva_tokens) == (64, 16)
    ds = PairDataset(emb, [0, 1], "clip_denoising")
    assert (ds.tokens, ds.cond_tokens) == (64, 16)
    item = ds[0]
    assert item["target"].shape == (64, 8) and item["condition"].shape == (16, 16)
    store = tmp_path / "store"
    convert(data, store, dtype="float32", progress=False)
    st = Embeddings(store)
    assert (st.tokens, st.eva_tokens) == (64, 16)
    assert torch.equal(PairDataset(st, [0], "clip_denoising")[0]["condition"], item["condition"])


def test_train_records_both_token_counts_and_evaluates(run):
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["data"]["tokens"] == 64 and cfg["data"]["cond_tokens"] == 16
    res = json.loads((run / "results.json").read_text())
    # generation from pure noise is scored with the target's 64 tokens; ridge (token to token) is left out
    g = res["generation"]
    assert g["model"]["num_images"] == res["num_images"] > 0 and "ridge" not in g["baselines"]
    assert set(res["denoising"]) == {"0.3", "0.5", "0.7", "0.9"}


def test_evaluate_and_generate(run, data, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run), "--chunked_embeddings_dir", str(data), "--output", str(out),
                 "--num_inference_steps", "2", "--noise_levels", "0.5", "--no_progress"]) == 0
    res = json.loads(out.read_text())
    assert res["denoising"]["0.5"]["model"]["num_images"] == res["num_images"] > 0 and res["held_out"] is True
    # that the scores mean something is test_cross_attention_learns_from_the_condition's job
    assert set(res["generation"]["mean_of_k"]) == {"1", "2", "4", "8"} and res["generation"]["model"]["num_images"] > 0
    gen = tmp_path / "gen.safetensors"
    assert main(["generate", "--checkpoint", str(run), "--chunked_embeddings_dir", str(data), "--output", str(gen),
                 "--max_samples", "3", "--num_steps", "2"]) == 0
    with safe_open(str(gen), "pt") as f:
        emb = f.get_tensor("embeddings")
    assert emb.shape == (3, 64, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(3, 64), atol=1e-4)
    den = Denoiser.from_pretrained(run)
    cond = torch.randn(2, 16, 16)
    assert den.generate(cond, num_steps=2, seed=0).shape == (2, 64, 8)
    assert den.denoise(torch.randn(2, 64, 8), cond, noise_level=0.5, num_steps=2).shape == (2, 64, 8)
    with pytest.raises(ValueError, match="expected 16 tokens"):
        den.generate(torch.randn(2, 64, 16), num_steps=2)


@pytest.mark.parametrize("mode", ["aligned", "both"])
def test_token_wise_conditioning_is_refused_at_start(data, tmp_path, capsys, mode):
    out = tmp_path / "run"
    assert main(["train", "--chunked_embeddings_dir", str(data), "--output_dir", str(out), "--conditioning", mode,
                 *TRAIN]) == 2
    err = capsys.readouterr().err
    assert f"--conditioning {mode}" in err and "16 condition tokens with 64 target tokens" in err
    assert "use --conditioning cross_attention" in err and not out.exists()


def test_cross_attention_learns_from_the_condition(tmp_path):
    """Trained long enough to learn (150 steps, a world of 8 latent factors as in the demo's quick mode), the
    cross-attention model beats the mean-direction baseline on held-out samples, and the score comes from the
    condition: the same noise with the conditions shuffled between samples scores far lower."""
    from blip3o_denoise import sphere
    from blip3o_denoise.data.run_splits import load_eval_split
    from blip3o_denoise.sampling import point_estimate
    from blip3o_denoise.train import TrainConfig, train

    d = tmp_path / "d"
    make_synthetic(d, SyntheticSpec(num_samples=160, eva_dim=32, clip_dim=16, tokens=64, num_shards=2, latent_dim=8))
    pool_condition(d)
    res = train(TrainConfig(chunked_embeddings_dir=str(d), output_dir=str(tmp_path / "run"), model_size="micro",
                            task_mode="clip_denoising", conditioning="cross_attention", hidden_size=64, depth=2,
                            batch_size=32, max_steps=150, warmup_steps=20, learning_rate=2e-3, ema_decay=0.995,
                            max_noise_level=1.0, holdout_fraction=0.2, eval_samples=16, num_inference_steps=2,
                            eval_every_n_steps=0, save_every_n_steps=0, progress=False))["generation"]
    point, mean_dir = res["point_estimate"]["cosine_mean"], res["baselines"]["mean_direction"]["cosine_mean"]
    assert point > mean_dir + 0.1, (point, mean_dir)
    den = Denoiser.from_pretrained(tmp_path / "run")
    batch = load_eval_split(den.config, str(d), "heldout", None, 0).stack()
    noise = sphere.normalize(torch.randn(batch["target"].shape, generator=torch.Generator().manual_seed(0)))

    def cosine(cond):
        x = point_estimate(den.model, noise, cond, 1.0, den.prediction_type)
        return float((x * batch["target"]).sum(-1).mean())

    assert cosine(batch["condition"]) > cosine(batch["condition"].roll(1, dims=0)) + 0.1
