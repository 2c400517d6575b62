import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from blip3o_denoise.data.dataset import Embeddings, PairDataset, key_fraction, select_tokens, split_indices
from blip3o_denoise.data.safe_pickle import ShardFormatError, UnsafePickleError, load_shard_file
from blip3o_denoise.data.seed_format import check_finite, open_seed_shard, write_seed_shard
from blip3o_denoise.data.store import STORE_MANIFEST, convert, read_safetensors_layout, verify_store
from blip3o_denoise.data.synthetic import SyntheticSpec, SyntheticWorld, make_synthetic


@pytest.fixture
def seed_dir(tmp_path):
    d = tmp_path / "seed"
    make_synthetic(d, SyntheticSpec(num_samples=30, eva_dim=48, clip_dim=24, tokens=17, num_shards=3))
    return d


def write_shard(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def good_dict(n=4, big=False):
    d = 4096 if big else 8
    return {
        "clip_blip3o_embeddings": torch.randn(n, 16, d),
        "eva_blip3o_embeddings": torch.randn(n, 16, 2 * d),
        "captions": [f"c{i}" for i in range(n)],
        "keys": [f"k{i}" for i in range(n)],
        "total_samples": n,
    }


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    obj = good_dict()
    obj["captions"] = RunsCommand(marker)
    path = tmp_path / "embeddings_shard_00000_patch_only.pkl"
    write_shard(path, obj)
    with pytest.raises(UnsafePickleError, match="refused to load global"):
        open_seed_shard(path)
    assert not marker.exists()
    # the same payload in a torch.save archive is refused by torch's weights-only loader
    torch.save({"x": RunsCommand(marker)}, tmp_path / "ts.pkl")
    with pytest.raises(UnsafePickleError):
        load_shard_file(str(tmp_path / "ts.pkl"))
    assert not marker.exists()


def test_reads_pickle_dump_and_torch_save_exactly(tmp_path):
    obj = good_dict(n=3, big=True)
    write_shard(tmp_path / "a.pkl", obj)
    torch.save(obj, tmp_path / "b.pkl")
    for name in ("a.pkl", "b.pkl"):
        s = open_seed_shard(tmp_path / name)
        assert torch.equal(s.clip.read_all(), obj["clip_blip3o_embeddings"])
        assert torch.equal(s.eva.rows(1, 3), obj["eva_blip3o_embeddings"][1:3])
        assert s.keys == obj["keys"] and s.captions == obj["captions"]


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "embeddings_shard_00000_patch_only.pkl"
    write_shard(path, good_dict(big=True))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFormatError, match="truncated") as e:
        open_seed_shard(path)
    assert str(path) in str(e.value)
    path.write_bytes(data[:100])
    with pytest.raises(ShardFormatError, match=str(path.name)):
        open_seed_shard(path)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(clip_blip3o_embeddings=torch.randn(4, 16)), "clip_blip3o_embeddings.*shape"),
        (lambda d: d.update(eva_blip3o_embeddings=torch.randn(5, 16, 16)),
         "has 4 samples but 'eva_blip3o_embeddings' has 5"),
        (lambda d: d.pop("eva_blip3o_embeddings"), "missing field 'eva_blip3o_embeddings'"),
        (lambda d: d.update(keys=["a"]), "field 'keys'"),
        (lambda d: d.update(clip_blip3o_embeddings=torch.zeros(4, 16, 8, dtype=torch.int32)), "float tensor"),
        (lambda d: d.update(total_samples=7), "total_samples"),
    ],
)
def test_wrong_fields_are_named(tmp_path, mutate, match):
    obj = good_dict()
    mutate(obj)
    path = tmp_path / "embeddings_shard_00000_patch_only.pkl"
    write_shard(path, obj)
    with pytest.raises(ShardFormatError, match=match):
        open_seed_shard(path)


def test_nan_values_are_found_with_sample_and_field(tmp_path):
    obj = good_dict()
    obj["eva_blip3o_embeddings"][2, 3, 1] = float("nan")
    path = write_seed_shard(tmp_path, 0, obj["clip_blip3o_embeddings"], obj["eva_blip3o_embeddings"], obj["keys"],
                            obj["captions"], False)
    with pytest.raises(ShardFormatError, match="eva_blip3o_embeddings.*sample 2"):
        check_finite(open_seed_shard(path))
    with pytest.raises(ShardFormatError, match="non-finite"):
        convert(tmp_path, tmp_path / "store", progress=False)


def test_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards found"):
        Embeddings(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Embeddings(tmp_path / "nope")


def test_mismatched_shapes_across_shards(tmp_path):
    a, b = good_dict(), good_dict()
    b["clip_blip3o_embeddings"] = torch.randn(4, 16, 12)
    write_seed_shard(tmp_path, 0, a["clip_blip3o_embeddings"], a["eva_blip3o_embeddings"], a["keys"], a["captions"],
                     False)
    write_seed_shard(tmp_path, 1, b["clip_blip3o_embeddings"], b["eva_blip3o_embeddings"], ["x" + k for k in b["keys"]],
                     b["captions"], False)
    with pytest.raises(ShardFormatError, match="differ"):
        Embeddings(tmp_path)


def test_store_roundtrip_matches_seed_and_safetensors_library(seed_dir, tmp_path):
    from safetensors.torch import load_file

    for dtype, tol in (("float32", 0.0), ("float16", 1e-2), ("bfloat16", 3e-2)):
        dst = tmp_path / dtype
        m = convert(seed_dir, dst, dtype=dtype, progress=False)
        assert m["total_samples"] == 30 and m["tokens"] == 17 and m["clip_dim"] == 24 and m["eva_dim"] == 48
        a, b = Embeddings(seed_dir), Embeddings(dst)
        assert a.keys == b.keys and b.format == "store"
        for i in (0, 13, 29):
            assert (a.read(i, "eva") - b.read(i, "eva").float()).abs().max() <= tol * a.read(i, "eva").abs().max()
        lib = load_file(str(dst / "shard_00001.safetensors"))
        assert torch.equal(lib["clip"][2], b.shards[1].clip.rows(2, 3)[0])
        assert verify_store(dst) == []


def test_interrupted_conversion_leaves_no_complete_looking_shard_and_resumes(seed_dir, tmp_path):
    dst = tmp_path / "store"
    code = (
        "import sys\n"
        "import blip3o_denoise.data.store as st\n"
        "orig = st._write_shard\n"
        "calls = []\n"
        "def dying(src, dst, dtype, chunk, on_rows=None):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        def boom(n):\n"
        "            import os; os._exit(9)\n"
        "        return orig(src, dst, dtype, 1, boom)\n"
        "    return orig(src, dst, dtype, chunk, on_rows)\n"
        "st._write_shard = dying\n"
        f"st.convert({str(seed_dir)!r}, {str(dst)!r}, progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9
    manifest = json.loads((dst / STORE_MANIFEST).read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard_00000.safetensors"]
    assert not (dst / "shard_00001.safetensors").exists()  # only a hidden temporary, if anything
    first_mtime = (dst / "shard_00000.safetensors").stat().st_mtime_ns
    m = convert(seed_dir, dst, progress=False)
    assert not list(dst.glob(".*tmp*"))
    assert len(m["shards"]) == 3 and m["total_samples"] == 30
    assert (dst / "shard_00000.safetensors").stat().st_mtime_ns == first_mtime  # skipped, not redone
    assert verify_store(dst) == []
    assert len(Embeddings(dst)) == 30
    # a truncated store shard is caught on open
    p = dst / "shard_00002.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ShardFormatError, match="shard_00002"):
        Embeddings(dst)


def test_split_is_deterministic_disjoint_and_independent_of_shards(seed_dir):
    e = Embeddings(seed_dir)
    tr, ho = split_indices(e.keys, 0.3)
    assert set(tr).isdisjoint(ho) and len(tr) + len(ho) == 30 and 0 < len(ho) < 30
    tr2, ho2 = split_indices(e.keys, 0.3)
    assert (tr, ho) == (tr2, ho2)
    sub = Embeddings(seed_dir, max_shards=1)
    _, ho_sub = split_indices(sub.keys, 0.3)
    assert {sub.keys[i] for i in ho_sub} == {e.keys[i] for i in ho if e.keys[i] in set(sub.keys)}
    assert 0 <= key_fraction("abc") < 1


def test_max_shards_and_pair_dataset_modes(seed_dir):
    e = Embeddings(seed_dir, max_shards=2)
    assert len(e) == 20
    ds = PairDataset(e, list(range(20)), "clip_denoising", "patch_only")
    item = ds[3]
    assert item["target"].shape == (16, 24) and item["condition"].shape == (16, 48)
    assert torch.allclose(item["target"].norm(dim=-1), torch.ones(16), atol=1e-5)
    cls = PairDataset(e, list(range(20)), "eva_denoising", "cls_patch")[3]
    assert cls["target"].shape == (17, 48) and torch.equal(cls["target"], cls["condition"])
    # patch_only drops exactly the CLS token
    assert torch.allclose(cls["condition"][1:], item["condition"])


def test_cls_patch_on_patch_only_data_is_a_clear_error(tmp_path):
    make_synthetic(tmp_path, SyntheticSpec(num_samples=4, eva_dim=8, clip_dim=8, tokens=16))
    with pytest.raises(ValueError, match="cls_patch.*CLS"):
        PairDataset(Embeddings(tmp_path), [0], "clip_denoising", "cls_patch")
    with pytest.raises(ValueError, match="training_mode"):
        select_tokens(torch.zeros(16, 2), False, "all")


def test_synthetic_structure_and_noise_floor():
    spec = SyntheticSpec(num_samples=16, eva_dim=256, clip_dim=512, tokens=64)
    clip, eva, m = SyntheticWorld(spec).sample(16, torch.Generator().manual_seed(0))
    x1 = torch.nn.functional.normalize(clip, dim=-1)
    # the documented noise floor holds
    assert abs(float((x1 * m).sum(-1).mean()) - spec.best_point_cosine) < 0.01
    # neighbouring tokens are correlated, far ones much less
    g = 8
    grid = x1.view(16, g, g, -1)
    near = (grid[:, :, :-1] * grid[:, :, 1:]).sum(-1).mean()
    far = (grid[:, :, :2] * grid[:, :, -2:]).sum(-1).mean()
    assert near > far + 0.2
    # a few large channels in the condition
    top = eva.abs().mean((0, 1)).topk(spec.outlier_channels).values
    assert top.min() > 4 * eva.abs().mean()
    # same world, different seeds: different samples, same relation
    a = SyntheticWorld(spec).sample(2, torch.Generator().manual_seed(1))[0]
    b = SyntheticWorld(spec).sample(2, torch.Generator().manual_seed(2))[0]
    assert not torch.allclose(a, b)


def test_seed_manifest_is_written(seed_dir):
    m = json.loads((seed_dir / "embeddings_manifest.json").read_text())
    assert m["total_shards"] == 3 and m["total_samples"] == 30 and m["tokens_per_sample"] == 17
    assert m["include_cls"] is True and len(m["shards"]) == 3


def test_safetensors_header_errors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x00" * 4)
    with pytest.raises(ShardFormatError, match="too short"):
        read_safetensors_layout(str(p))
