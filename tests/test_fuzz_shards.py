"""Byte-flip fuzzing of shard files: every single-byte mutation of a small seed shard (.pkl) and of a
store shard (.safetensors + its keys .json) either loads cleanly or raises one of our errors naming
the file, never another exception type, never a hang, never an allocation of a size read from the damaged bytes."""

import os
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from blip3o_denoise.data.safe_pickle import ShardFormatError, UnsafePickleError
from blip3o_denoise.data.seed_format import check_finite, open_seed_shard, write_seed_shard
from blip3o_denoise.data.store import STORE_MANIFEST, convert, open_store_shard, read_store_manifest

OURS = (ShardFormatError, UnsafePickleError)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmSize")


@contextmanager
def address_space_headroom(extra: int):
    """Cap this process's address space at its current size + ``extra``: an allocation of a size
    read from a damaged header then fails as a MemoryError, which the test sees (Linux only)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _vm_bytes() + extra
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    except (ImportError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def fuzz(path: Path, positions, load, budget_s: float = 20.0) -> dict:
    """Mutate one byte of ``path`` at each position (three ways), ``load`` it, restore the byte."""
    original = path.read_bytes()
    rng = random.Random(0)
    outcomes, bad = {"ok": 0, "named": 0}, []
    old = signal.signal(signal.SIGALRM, _alarm)
    started = time.time()
    fd = os.open(path, os.O_WRONLY)
    try:
        with address_space_headroom(256 << 20):
            for pos in positions:
                for new in sorted({original[pos] ^ 0xFF, original[pos] ^ 0x01, rng.randrange(256)} - {original[pos]}):
                    os.pwrite(fd, bytes([new]), pos)
                    signal.setitimer(signal.ITIMER_REAL, 5.0)
                    try:
                        load(path)
                        outcomes["ok"] += 1
                    except OURS as e:
                        if path.name not in str(e) or "MemoryError" in str(e):
                            bad.append((pos, new, f"{type(e).__name__}: {e}"))
                        outcomes["named"] += 1
                    except Hang:
                        bad.append((pos, new, "took more than 5 s"))
                    except Exception as e:  # noqa: BLE001 - the point of the test
                        bad.append((pos, new, f"{type(e).__name__}: {e}"))
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                os.pwrite(fd, original[pos:pos + 1], pos)
    finally:
        os.close(fd)
        signal.signal(signal.SIGALRM, old)
        path.write_bytes(original)
    assert not bad, f"{len(bad)} mutations of {path.name} escaped as other errors, e.g. {bad[:5]}"
    assert time.time() - started < budget_s
    outcomes["total"] = outcomes["ok"] + outcomes["named"]
    return outcomes


def load_seed(path):
    s = open_seed_shard(path)
    if s.num_samples:
        s.clip.rows(0, 1)
        s.eva.rows(s.num_samples - 1, s.num_samples)
    check_finite(s)


def data_span(raw: bytes, t: torch.Tensor) -> range:
    at = raw.find(t.numpy().tobytes())
    assert at >= 0
    return range(at, at + t.numel() * t.element_size())


def structural_positions(path, tensors, extra_random=200):
    """Every byte outside the tensors' raw data, plus a sample of data bytes."""
    raw = path.read_bytes()
    spans = [data_span(raw, t) for t in tensors]
    inside = set().union(*map(set, spans))
    pos = [i for i in range(len(raw)) if i not in inside]
    return pos + random.Random(1).sample(sorted(inside), min(extra_random, len(inside)))


def test_fuzz_small_seed_shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    clip, eva = torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, 8, generator=g)
    path = write_seed_shard(tmp_path, 0, clip, eva, ["k0", "k1"], ["a cat", "a dog"], include_cls=False,
                            source_tar="x.tar", config={"model": "m"})
    out = fuzz(path, range(path.stat().st_size), load_seed)
    assert out["total"] > 2500 and out["named"] > 1000 and out["ok"] > 50


def test_fuzz_seed_shard_with_on_disk_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    clip, eva = torch.randn(2, 16, 512, generator=g), torch.randn(2, 16, 1024, generator=g)
    path = write_seed_shard(tmp_path, 0, clip, eva, ["k0", "k1"], ["a", "b"], include_cls=False)
    assert path.stat().st_size > 1 << 16  # large enough that the tensors are read lazily from the file
    out = fuzz(path, structural_positions(path, [clip, eva]), load_seed)
    assert out["total"] > 1000 and out["named"] > 500


@pytest.fixture
def store(tmp_path):
    (tmp_path / "seed").mkdir()
    g = torch.Generator().manual_seed(0)
    write_seed_shard(tmp_path / "seed", 0, torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 8, generator=g),
                     ["k0", "k1", "k2"], ["a", "b", "c"], include_cls=False)
    dst = tmp_path / "store"
    convert(tmp_path / "seed", dst, dtype="float32", progress=False)
    return dst, read_store_manifest(dst)


def load_store(dst, manifest):
    def load(_path):
        s = open_store_shard(dst, manifest["shards"][0], dst / STORE_MANIFEST, manifest)
        s.clip.rows(0, 1)
        s.eva.rows(2, 3)
        check_finite(s)
    return load


def test_fuzz_store_shard(store):
    dst, manifest = store
    st = dst / manifest["shards"][0]["file"]
    header_end = 8 + int.from_bytes(st.read_bytes()[:8], "little")
    positions = list(range(header_end)) + random.Random(2).sample(range(header_end, st.stat().st_size), 200)
    out = fuzz(st, positions, load_store(dst, manifest))
    assert out["total"] > 1000 and out["named"] > 500
    meta = dst / manifest["shards"][0]["meta"]
    out = fuzz(meta, range(meta.stat().st_size), load_store(dst, manifest))
    assert out["named"] > 50
