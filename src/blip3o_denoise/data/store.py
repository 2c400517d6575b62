"""The converted store: one safetensors file per shard, streamed in and read by positioned reads.

Layout of a store directory::

    store_manifest.json          widths, N, dtype, per-shard counts, byte sizes and sha256
    shard_00000.safetensors      tensors "clip" [n, N, Dc] and "eva" [n, N, De]
    shard_00000.json             {"keys": [...], "captions": [...]}

Files are standard safetensors (any safetensors reader, or a memory map, opens them). We write
them ourselves, streaming a chunk of samples at a time, because ``safetensors.torch.save_file``
needs whole tensors in memory (14 GB for one real shard); and we read rows with positioned reads
so that a training process's resident memory does not grow with the bytes it has touched.

Every file goes through a temporary name and a rename, and a shard enters the manifest only
once both of its files are complete: an interrupted conversion leaves no shard that looks done,
and rerunning it skips the finished shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

from .safe_pickle import FileTensor, ShardFormatError
from .seed_format import (
    CLIP_KEY, EVA_KEY, Shard, atomic_write_bytes, atomic_write_json, list_seed_shards, open_seed_shard,
)

STORE_MANIFEST = "store_manifest.json"
STORE_FORMAT = "blip3o-denoise-store"
STORE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_ST_DTYPES = {v: k for k, v in _ST_NAMES.items()}


def _safetensors_header(tensors: dict[str, tuple[torch.dtype, tuple]], metadata: dict) -> bytes:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
    return struct.pack("<Q", len(raw)) + raw


def read_safetensors_layout(path: str) -> tuple[dict[str, FileTensor], dict]:
    """Parse a safetensors header; return a :class:`FileTensor` per tensor and the metadata."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ShardFormatError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ShardFormatError(f"{path}: safetensors header length {n} is invalid (truncated file?)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ShardFormatError(f"{path}: safetensors header is not valid JSON ({e})") from e
    meta = header.pop("__metadata__", {}) or {}
    out, end = {}, 0
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ShardFormatError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')!r}")
        b, e = info["data_offsets"]
        out[name] = FileTensor(path, 8 + n + b, dtype, tuple(info["shape"]))
        end = max(end, e)
    if 8 + n + end > size:
        raise ShardFormatError(f"{path}: file is truncated ({size} bytes, header promises {8 + n + end})")
    return out, meta


def _write_shard(src: Shard, dst: Path, dtype: torch.dtype, chunk: int, on_rows=None) -> tuple[int, str]:
    """Stream ``src`` into a safetensors file at ``dst``; return (bytes, sha256)."""
    n = src.num_samples
    tensors = {"clip": (dtype, (n,) + src.clip.shape[1:]), "eva": (dtype, (n,) + src.eva.shape[1:])}
    header = _safetensors_header(tensors, {"format": STORE_FORMAT, "source": Path(src.path).name})
    digest, total = hashlib.sha256(), 0

    def write(f):
        nonlocal total
        for part in (header,):
            f.write(part)
            digest.update(part)
            total += len(part)
        for field, t in ((CLIP_KEY, src.clip), (EVA_KEY, src.eva)):
            for i in range(0, n, chunk):
                rows = t.rows(i, min(i + chunk, n))
                finite = torch.isfinite(rows.float()).flatten(1).all(dim=1)
                if not bool(finite.all()):
                    j = i + int((~finite).nonzero()[0])
                    raise ShardFormatError(f"{src.path}: field '{field}' has non-finite values in sample {j}")
                out = rows.to(dtype)
                if not bool(torch.isfinite(out).all()):
                    raise ShardFormatError(f"{src.path}: field '{field}' overflows {dtype} in samples {i}..; use --dtype bfloat16 or float32")
                data = out.contiguous().view(torch.uint8).numpy().tobytes()
                f.write(data)
                digest.update(data)
                total += len(data)
                if on_rows is not None and field == EVA_KEY:  # count each sample once
                    on_rows(len(rows))

    atomic_write_bytes(dst, write)
    return total, digest.hexdigest()


def append_store_shard(dst: str | os.PathLike, index: int, shard: Shard, dtype: str, source: str, chunk: int = 16,
                       extra: dict | None = None, on_rows=None) -> dict:
    """Write ``shard`` as store shard ``index`` (files first, atomically) and then record it in the
    manifest, creating the manifest if needed. Returns the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = read_store_manifest(dst) or {
        "format": STORE_FORMAT, "version": STORE_VERSION, "dtype": dtype, "tokens": shard.tokens,
        "clip_dim": shard.clip.shape[2], "eva_dim": shard.eva.shape[2], "include_cls": _has_cls(shard.tokens), "shards": [],
    }
    if manifest["dtype"] != dtype:
        raise ValueError(f"{dst / STORE_MANIFEST}: store has dtype {manifest['dtype']}, asked for {dtype}; use a new directory")
    if (manifest["tokens"], manifest["clip_dim"], manifest["eva_dim"]) != (shard.tokens, shard.clip.shape[2], shard.eva.shape[2]):
        raise ShardFormatError(
            f"{shard.path}: N={shard.tokens}, widths {shard.clip.shape[2]}/{shard.eva.shape[2]} differ from the store's "
            f"N={manifest['tokens']}, {manifest['clip_dim']}/{manifest['eva_dim']}"
        )
    name = f"shard_{index:05d}"
    st_path, meta_path = dst / f"{name}.safetensors", dst / f"{name}.json"
    atomic_write_json(meta_path, {"keys": shard.keys, "captions": shard.captions})
    nbytes, sha = _write_shard(shard, st_path, DTYPES[dtype], chunk, on_rows)
    entry = {"file": st_path.name, "meta": meta_path.name, "source": source, "num_samples": shard.num_samples,
             "bytes": nbytes, "sha256": sha}
    manifest["shards"] = sorted([e for e in manifest["shards"] if e["file"] != entry["file"]] + [entry], key=lambda e: e["file"])
    manifest["total_samples"] = sum(e["num_samples"] for e in manifest["shards"])
    manifest.update(extra or {})
    atomic_write_json(dst / STORE_MANIFEST, manifest)
    return manifest


def read_store_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / STORE_MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from e
    if m.get("format") != STORE_FORMAT:
        raise ShardFormatError(f"{path}: field 'format' should be {STORE_FORMAT!r}, got {m.get('format')!r}")
    for key in ("shards", "tokens", "clip_dim", "eva_dim", "dtype"):
        if key not in m:
            raise ShardFormatError(f"{path}: missing field '{key}'")
    return m


def convert(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, dtype: str = "bfloat16", chunk: int = 16,
    progress: bool = True, max_shards: int | None = None,
) -> dict:
    """Convert a seed directory into a store, shard by shard; finished shards are skipped on rerun.

    Memory is bounded by ``chunk`` samples (a few MB each at 256 x 4096), not by shard size.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    sources = list_seed_shards(src_dir)
    if not sources:
        raise FileNotFoundError(f"{src_dir}: no seed shards found (expected embeddings_shard_XXXXX_patch_only.pkl files)")
    if max_shards is not None:
        sources = sources[:max_shards]
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = read_store_manifest(dst)
    if manifest is not None and manifest["dtype"] != dtype:
        raise ValueError(f"{dst / STORE_MANIFEST}: store has dtype {manifest['dtype']}, asked for {dtype}; use a new directory")
    done = {s["source"]: s for s in (manifest or {}).get("shards", [])}
    for stale in dst.glob(".shard_*.tmp-*"):  # left by an interrupted run
        stale.unlink()

    opened = [open_seed_shard(p) for p in sources]  # opening reads headers only
    first = opened[0]
    for s in opened[1:]:
        if s.clip.shape[1:] != first.clip.shape[1:] or s.eva.shape[1:] != first.eva.shape[1:]:
            raise ShardFormatError(
                f"{s.path}: shapes {list(s.clip.shape[1:])} / {list(s.eva.shape[1:])} differ from "
                f"{first.path}: {list(first.clip.shape[1:])} / {list(first.eva.shape[1:])}"
            )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.num_samples for s in opened), desc="convert", unit="sample")
    for i, (path, shard) in enumerate(zip(sources, opened)):
        prev = done.get(path.name)
        st_path, meta_path = dst / f"shard_{i:05d}.safetensors", dst / f"shard_{i:05d}.json"
        if prev and st_path.exists() and meta_path.exists() and st_path.stat().st_size == prev["bytes"]:
            if bar:
                bar.update(shard.num_samples)
            continue
        manifest = append_store_shard(dst, i, shard, dtype, path.name, chunk, on_rows=bar.update if bar else None)
    if bar:
        bar.close()
    return read_store_manifest(dst)


def _has_cls(tokens: int) -> bool:
    return math.isqrt(tokens) ** 2 != tokens


def open_store_shard(directory: Path, entry: dict, manifest_path: Path) -> Shard:
    st_path = Path(directory) / entry["file"]
    if not st_path.exists():
        raise ShardFormatError(f"{manifest_path}: lists {entry['file']} but the file is missing")
    if st_path.stat().st_size != entry["bytes"]:
        raise ShardFormatError(f"{st_path}: size {st_path.stat().st_size} differs from the manifest's {entry['bytes']} (truncated?)")
    tensors, _ = read_safetensors_layout(str(st_path))
    meta = json.loads((Path(directory) / entry["meta"]).read_text())
    for key in ("clip", "eva"):
        if key not in tensors:
            raise ShardFormatError(f"{st_path}: missing tensor '{key}'")
    return Shard(str(st_path), tensors["clip"], tensors["eva"], meta["keys"], meta["captions"])


def verify_store(directory: str | os.PathLike) -> list[str]:
    """Recompute every shard's sha256; return a list of problems (empty when all is well)."""
    d = Path(directory)
    manifest = read_store_manifest(d)
    if manifest is None:
        return [f"{d}: no {STORE_MANIFEST}"]
    problems = []
    for e in manifest["shards"]:
        p = d / e["file"]
        if not p.exists():
            problems.append(f"{p}: missing")
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != e["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest (corrupt or modified)")
    return problems
