"""The train / held-out split and the baselines fitted on it: nothing held out is ever read for fitting."""

import random

import pytest
import torch

from blip3o_denoise import sphere as S
from blip3o_denoise.data.dataset import Embeddings, PairDataset, split_indices
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.evaluate import fit_baselines
from blip3o_denoise.train import TrainConfig, build


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    make_synthetic(d, SyntheticSpec(num_samples=60, eva_dim=32, clip_dim=16, tokens=16, num_shards=2))
    return d


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.9])
def test_split_indices_partition_the_keys_by_key_not_order(fraction):
    keys = [f"img-{i:06d}" for i in range(3000)]
    train, held = split_indices(keys, fraction)
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(len(keys)))
    assert abs(len(held) / len(keys) - fraction) < 0.03
    held_keys = {keys[i] for i in held}
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    _, held2 = split_indices(shuffled, fraction)
    assert {shuffled[i] for i in held2} == held_keys  # the order (shards read) does not move a key
    _, held3 = split_indices(keys[:1000], fraction)  # fewer shards: held-out keys stay held out
    assert {keys[i] for i in held3} == held_keys & set(keys[:1000])


@pytest.mark.parametrize("max_samples", [512, 10])
def test_fit_baselines_reads_only_training_samples(data, max_samples):
    emb = Embeddings(data)
    train_idx, held_idx = split_indices(emb.keys, 0.3)
    assert held_idx and train_idx
    reads = []
    real_read = emb.read
    emb.read = lambda i, field: reads.append(i) or real_read(i, field)
    ds = PairDataset(emb, train_idx, "clip_denoising")
    b = fit_baselines(ds, max_samples=max_samples, ridge=True, chunk=4)
    read = set(reads)
    assert read and read <= set(train_idx) and not read & set(held_idx)
    # the ridge's validation part is among those reads: fitted + validation samples are all read once each
    assert b.ridge is not None and b.info["val_samples"] >= 1
    assert b.info["train_samples"] + b.info["val_samples"] == len(read)
    # the mean direction is the training targets' (of the fitted part), recomputed here
    fitted = sorted(read)[b.info["val_samples"]:]
    targets = torch.stack([S.normalize(real_read(i, "clip").float()) for i in fitted])
    assert torch.allclose(b.mean_direction, S.normalize(S.normalize(targets.sum(0)).mean(0)), atol=1e-5)


def test_eval_dir_with_training_keys_is_refused(data, tmp_path):
    cfg = dict(chunked_embeddings_dir=str(data), output_dir=str(tmp_path / "o"), model_size="micro",
               holdout_fraction=0.2, progress=False)
    with pytest.raises(ValueError, match="also appear in the training split"):
        build(TrainConfig(eval_dir=str(data), **cfg))
    other = tmp_path / "other"  # another seed: other keys, the same widths
    make_synthetic(other, SyntheticSpec(num_samples=12, eva_dim=32, clip_dim=16, tokens=16, seed=1))
    run = build(TrainConfig(eval_dir=str(other), **cfg))
    assert len(run.eval_set) == 12 and run.eval_set.emb.keys[0].startswith("synthetic-1-")
