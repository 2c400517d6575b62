"""The remote data path (data/objectstore.py, engine_*.py, streaming.py, random_access.py; LitData): conversion,
split, ranks, resume, a real S3 API (moto's server on 127.0.0.1), and the errors of bad input."""

import os
import socket
import time

import pytest
import torch

import litdata  # noqa: F401 - not skipped: CI installs it (.ci/run), a missing engine is a failure

from conftest import moto_s3_server
from blip3o_denoise.data.engine_convert import write_engine_dataset
from blip3o_denoise.data.engine_format import check_widths, read_manifest
from blip3o_denoise.data.objectstore import RemoteDataError
from blip3o_denoise.data.random_access import RemoteEmbeddings
from blip3o_denoise.data.streaming import streaming_loader, streaming_train_set
from blip3o_denoise.data.dataset import Embeddings, PairDataset, split_indices
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

HOLD = 0.2


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A small seed dataset with a CLS token (N = 1 + 2*2), 2 shards."""
    d = tmp_path_factory.mktemp("seed")
    make_synthetic(d, SyntheticSpec(num_samples=48, eva_dim=16, clip_dim=8, tokens=5, num_shards=2))
    return d


@pytest.fixture(scope="module")
def conv(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "ds"
    write_engine_dataset(src, str(dst), holdout_fraction=HOLD, chunk_samples=4)
    return str(dst)


def _epoch(loader):
    return [i for b in loader for i in b["index"].tolist()]


def test_round_trip_and_split(src, conv):
    emb, rem = Embeddings(src), RemoteEmbeddings(conv)
    m = rem.manifest
    assert (m["tokens"], m["eva_tokens"], m["clip_dim"], m["eva_dim"], m["dtype"]) == (5, 5, 8, 16, "bfloat16")
    assert m["holdout_fraction"] == HOLD and rem.keys == emb.keys and len(rem) == len(emb)
    train, held = split_indices(emb.keys, HOLD)
    assert sorted(m["parts"]["train"]["indices"]) == train and sorted(m["parts"]["eval"]["indices"]) == held
    assert 0 < len(held) < len(train)
    for i in range(len(emb)):
        for f in ("clip", "eva"):
            got, want = rem.read(i, f), emb.read(i, f)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
            assert torch.equal(got, want.to(torch.bfloat16))  # raw tokens, only rounded to bf16
    # the evaluation code's path: PairDataset over RemoteEmbeddings = PairDataset over the local data
    for task, mode in (("clip_denoising", "patch_only"), ("eva_denoising", "cls_patch")):
        a = PairDataset(emb, held, task, mode).stack()
        b = PairDataset(rem, held, task, mode).stack()
        assert torch.equal(a["index"], b["index"])
        torch.testing.assert_close(a["target"], b["target"], rtol=0, atol=1e-2)
        torch.testing.assert_close(a["condition"], b["condition"], rtol=0, atol=1e-2)


@pytest.mark.parametrize("task,mode", [("clip_denoising", "patch_only"), ("eva_denoising", "cls_patch")])
def test_stream_items_are_pair_dataset_items(src, conv, task, mode):
    emb = Embeddings(src)
    ds = streaming_train_set(conv, task, mode, holdout_fraction=HOLD, seed=0)
    local = PairDataset(emb, range(len(emb)), task, mode)
    widths = ("target_dim", "cond_dim", "tokens", "cond_tokens")
    assert [getattr(ds, w) for w in widths] == [getattr(local, w) for w in widths]
    n = 0
    for item in ds:
        want = local[item["index"]]
        assert set(item) == {"target", "condition", "index"} and item["target"].dtype == torch.float32
        assert item["target"].shape == want["target"].shape and item["condition"].shape == want["condition"].shape
        torch.testing.assert_close(item["target"], want["target"], rtol=0, atol=1e-2)
        torch.testing.assert_close(item["condition"], want["condition"], rtol=0, atol=1e-2)
        torch.testing.assert_close(item["target"].norm(dim=-1), torch.ones(want["target"].shape[0]))
        n += 1
    assert n == len(read_manifest(conv)["parts"]["train"]["indices"])


def test_seeded_shuffle_epochs_and_two_ranks(conv):
    from litdata.utilities.env import _DistributedEnv

    train = set(read_manifest(conv)["parts"]["train"]["indices"])
    bs = 3

    def rank_epochs(rank, world, seed=0):
        ds = streaming_train_set(conv, "clip_denoising", holdout_fraction=HOLD, seed=seed)
        ds.distributed_env = _DistributedEnv(world, rank, 1)  # the engine's own rank mechanism
        loader = streaming_loader(ds, batch_size=bs)
        return [_epoch(loader) for _ in range(2)]

    one = rank_epochs(0, 1)
    assert one == rank_epochs(0, 1)  # the same seed gives the same order
    assert one[0] != one[1] and sorted(one[0]) != one[0]  # reshuffled per epoch, and shuffled
    assert rank_epochs(0, 1, seed=1)[0] != one[0]
    r0, r1 = rank_epochs(0, 2), rank_epochs(1, 2)
    for epoch in range(2):
        a, b = r0[epoch], r1[epoch]
        assert len(a) == len(b) > 0 and len(a) % bs == 0  # equal per-rank counts, whole batches
        assert not set(a) & set(b) and len(set(a)) == len(a)  # disjoint, no repeats
        assert set(a) | set(b) <= train
        assert len(train) - len(set(a) | set(b)) < 2 * bs  # drop_last drops less than one global batch


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_mid_epoch_resume(conv, workers):
    def make():
        ds = streaming_train_set(conv, "eva_denoising", holdout_fraction=HOLD, seed=3)
        return streaming_loader(ds, batch_size=2, num_workers=workers)

    ref = make()
    full = [_epoch(ref), _epoch(ref)]
    for epoch, k in ((0, 3), (1, 5)):
        loader = make()
        for _ in range(epoch):
            _epoch(loader)
        it, seen = iter(loader), []
        for _ in range(k):
            seen += next(it)["index"].tolist()
        state = loader.state_dict()
        del it
        resumed = make()
        resumed.load_state_dict(state)
        rest = _epoch(resumed)
        assert seen + rest == full[epoch], (epoch, k)
        if epoch == 0:
            assert _epoch(resumed) == full[1]  # and the next epoch is the uninterrupted one


def test_refusals(src, conv, tmp_path):
    with pytest.raises(ValueError, match=r"holdout_fraction 0.2, the run asks for 0.05"):
        streaming_train_set(conv, "clip_denoising", holdout_fraction=0.05)
    m = read_manifest(conv)
    check_widths(m, conv, {"target_dim": 8, "cond_dim": 16, "tokens": 4, "cond_tokens": 4}, "clip_denoising")
    with pytest.raises(RemoteDataError, match=r"ds: blip3o_stream.json: the data has target_dim 8 \(expected 1024\)"):
        check_widths(m, conv, {"target_dim": 1024, "cond_dim": 16, "tokens": 4}, "clip_denoising")
    with pytest.raises(ValueError, match="already holds a converted dataset"):
        write_engine_dataset(src, conv, holdout_fraction=HOLD)
    with pytest.raises(RemoteDataError, match=r"no blip3o_stream.json: .*did not finish"):
        RemoteEmbeddings(str(tmp_path))


def test_missing_and_corrupt_chunk(src, tmp_path):
    dst = tmp_path / "ds"
    write_engine_dataset(src, str(dst), holdout_fraction=HOLD, chunk_samples=4)
    chunk = dst / "train" / "chunk-0-1.bin"
    good = chunk.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0xFF  # a flipped byte inside the last sample's tokens
    chunk.write_bytes(bytes(data))
    ds = streaming_train_set(str(dst), "clip_denoising", holdout_fraction=HOLD)
    with pytest.raises(RemoteDataError, match=r"ds/train: chunk chunk-0-1.bin: sample \d+ \(key .*CRC32 mismatch"):
        list(ds)
    assert chunk.read_bytes() == bytes(data)  # a local dataset is the source, never deleted
    chunk.write_bytes(good)
    os.remove(dst / "train" / "chunk-0-2.bin")
    ds = streaming_train_set(str(dst), "clip_denoising", holdout_fraction=HOLD, shuffle=False)
    with pytest.raises(RemoteDataError, match=r"ds/train: chunk chunk-0-2.bin: cannot read"):
        list(ds)


# ---------------------------------------------------------------------------- a real S3 API (moto)


@pytest.fixture(scope="module")
def s3(src):
    import boto3

    with moto_s3_server() as endpoint:
        creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
        opts = {"endpoint_url": endpoint, **creds}
        boto3.client("s3", **opts).create_bucket(Bucket="bucket")
        url = "s3://bucket/data/ds"
        write_engine_dataset(src, url, holdout_fraction=HOLD, chunk_samples=4, storage_options=opts)
        yield url, opts


def test_s3_write_and_stream_equals_local(s3, conv, src, tmp_path):
    import boto3

    url, opts = s3
    names = {o["Key"] for o in boto3.client("s3", **opts).list_objects_v2(Bucket="bucket")["Contents"]}
    assert "data/ds/blip3o_stream.json" in names and "data/ds/train/index.json" in names
    cache = tmp_path / "cache"
    ds = streaming_train_set(url, "clip_denoising", holdout_fraction=HOLD, seed=5, cache_dir=str(cache),
                               max_cache_size="1GB", storage_options=opts)
    local = streaming_train_set(conv, "clip_denoising", holdout_fraction=HOLD, seed=5)
    a, b = _epoch(streaming_loader(ds, batch_size=2)), _epoch(streaming_loader(local, batch_size=2))
    assert a == b and len(a) > 0  # the same order from S3 as from the local copy
    assert list(cache.rglob("chunk-*.bin"))  # chunks went through the local cache
    rem, emb = RemoteEmbeddings(url, cache_dir=str(cache), storage_options=opts), Embeddings(src)
    _, held = split_indices(rem.keys, HOLD)
    for i in held[:4]:
        assert torch.equal(rem.read(i, "eva"), emb.read(i, "eva").to(torch.bfloat16))


def test_s3_corrupt_object_not_kept_in_cache(s3, src, tmp_path):
    import boto3

    _, opts = s3
    url = "s3://bucket/data/corrupt"
    write_engine_dataset(src, url, holdout_fraction=HOLD, chunk_samples=4, storage_options=opts)
    client = boto3.client("s3", **opts)
    key = "data/corrupt/train/chunk-0-0.bin"
    good = client.get_object(Bucket="bucket", Key=key)["Body"].read()
    data = bytearray(good)
    data[-3] ^= 0x55
    client.put_object(Bucket="bucket", Key=key, Body=bytes(data))
    cache = tmp_path / "cache"
    ds = streaming_train_set(url, "clip_denoising", holdout_fraction=HOLD, cache_dir=str(cache), shuffle=False,
                               storage_options=opts)
    with pytest.raises(RemoteDataError, match=r"s3://bucket/data/corrupt/train: chunk chunk-0-0.bin: .*CRC32"):
        list(ds)
    assert not list(cache.rglob("chunk-0-0.bin"))  # the bad copy is not left for a later run
    client.put_object(Bucket="bucket", Key=key, Body=good)  # repaired at the source: the next run downloads it
    again = streaming_train_set(url, "clip_denoising", holdout_fraction=HOLD, cache_dir=str(cache), shuffle=False,
                                  storage_options=opts)
    assert len(list(again)) == len(again) > 0


def test_s3_missing_object_and_credentials(s3, monkeypatch, tmp_path):
    url, opts = s3
    with pytest.raises(RemoteDataError, match=r"s3://bucket/nothing: no blip3o_stream.json"):
        RemoteEmbeddings("s3://bucket/nothing", cache_dir=str(tmp_path), storage_options=opts)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    no_creds = {"endpoint_url": opts["endpoint_url"], "region_name": "us-east-1"}
    with pytest.raises(RemoteDataError, match=r"s3://bucket/data/ds: cannot read blip3o_stream.json: no credentials"):
        streaming_train_set(url, "clip_denoising", holdout_fraction=HOLD, cache_dir=str(tmp_path),
                              storage_options=no_creds)


def test_unreachable_endpoint_fails_fast(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "aws_access_key_id": "x", "aws_secret_access_key": "x",
            "region_name": "us-east-1"}
    t = time.monotonic()
    with pytest.raises(RemoteDataError, match=r"s3://bucket/ds: cannot read blip3o_stream.json: endpoint unreach"):
        streaming_train_set("s3://bucket/ds", "clip_denoising", cache_dir=str(tmp_path), storage_options=opts)
    assert time.monotonic() - t < 15
