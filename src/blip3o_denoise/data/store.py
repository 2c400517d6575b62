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
import re
import struct
import sys
from pathlib import Path

import torch

from .safe_pickle import FileTensor, ShardFormatError
from .seed_format import (
    CLIP_KEY, EVA_KEY, Shard, atomic_write_bytes, atomic_write_json, consistency_problems, list_seed_shards,
    open_seed_shard, read_seed_manifest, seed_manifest_problems,
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
    """Parse a safetensors header; return a :class:`FileTensor` per tensor and the metadata.

    Every field of the (untrusted) header is checked, so a damaged file is a ShardFormatError naming
    it and the field, and no size read from it can ask for more memory than the file holds.
    """
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
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ShardFormatError(f"{path}: safetensors header is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise ShardFormatError(f"{path}: safetensors header should be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{path}: safetensors field '__metadata__' should be an object")
    out, spans = {}, []
    for name, info in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(info, dict):
            raise ShardFormatError(f"{where} should be described by an object, got {type(info).__name__}")
        dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise ShardFormatError(f"{where} has unsupported dtype {info.get('dtype')!r:.40}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ShardFormatError(f"{where}: field 'shape' should be a list of sizes >= 0, got {shape!r:.80}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ShardFormatError(f"{where}: field 'data_offsets' should be [begin, end], got {offsets!r:.80}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise ShardFormatError(
                f"{where}: field 'data_offsets' spans {offsets[1] - offsets[0]} bytes, its shape {shape} and dtype "
                f"need {nbytes}"
            )
        if 8 + n + offsets[1] > size:
            raise ShardFormatError(
                f"{path}: file is truncated ({size} bytes, tensor '{name}' ends at {8 + n + offsets[1]})"
            )
        spans.append((offsets[0], offsets[1], name))
        out[name] = FileTensor(path, 8 + n + offsets[0], dtype, tuple(shape))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ShardFormatError(f"{path}: tensors '{a}' and '{b}' overlap (field 'data_offsets')")
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
                    raise ShardFormatError(f"{src.path}: field '{field}' overflows {dtype} in samples {i}..; "
                                           "use --dtype bfloat16 or float32")
                data = out.contiguous().view(torch.uint8).numpy().tobytes()
                f.write(data)
                digest.update(data)
                total += len(data)
                if on_rows is not None and field == EVA_KEY:  # count each sample once
                    on_rows(len(rows))

    atomic_write_bytes(dst, write)
    return total, digest.hexdigest()


def append_store_shard(dst: str | os.PathLike, index: int, shard: Shard, dtype: str, source: str, chunk: int = 16,
                       extra: dict | None = None, on_rows=None, source_stat: dict | None = None) -> dict:
    """Write ``shard`` as store shard ``index`` (files first, atomically) and then record it in the
    manifest, creating the manifest if needed (``source_stat`` goes into the shard's entry, to tell
    later whether its source changed). Returns the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = read_store_manifest(dst) or {
        "format": STORE_FORMAT, "version": STORE_VERSION, "dtype": dtype, "tokens": shard.tokens,
        "clip_dim": shard.clip.shape[2], "eva_dim": shard.eva.shape[2], "include_cls": _has_cls(shard.tokens),
        "shards": [],
        "eva_tokens": shard.eva_tokens,
    }
    if manifest["dtype"] != dtype:
        raise ValueError(f"{dst / STORE_MANIFEST}: store has dtype {manifest['dtype']}, asked for {dtype}; "
                         "use a new directory")
    have = (manifest["tokens"], manifest.get("eva_tokens", manifest["tokens"]),
            manifest["clip_dim"], manifest["eva_dim"])
    if have != (shard.tokens, shard.eva_tokens, shard.clip.shape[2], shard.eva.shape[2]):
        raise ShardFormatError(
            f"{shard.path}: N={shard.tokens} (eva {shard.eva_tokens}), "
            f"widths {shard.clip.shape[2]}/{shard.eva.shape[2]} "
            f"differ from the store's N={have[0]} (eva {have[1]}), {manifest['clip_dim']}/{manifest['eva_dim']}"
        )
    name = f"shard_{index:05d}"
    st_path, meta_path = dst / f"{name}.safetensors", dst / f"{name}.json"
    atomic_write_json(meta_path, {"keys": shard.keys, "captions": shard.captions})
    nbytes, sha = _write_shard(shard, st_path, DTYPES[dtype], chunk, on_rows)
    entry = {"file": st_path.name, "meta": meta_path.name, "source": source, "num_samples": shard.num_samples,
             "bytes": nbytes, "sha256": sha, **(source_stat or {})}
    manifest["shards"] = sorted([e for e in manifest["shards"] if e["file"] != entry["file"]] + [entry],
                                key=lambda e: e["file"])
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
    if not isinstance(m, dict):
        raise ShardFormatError(f"{path}: expected a JSON object, got {type(m).__name__}")
    if m.get("format") != STORE_FORMAT:
        raise ShardFormatError(f"{path}: field 'format' should be {STORE_FORMAT!r}, got {m.get('format')!r}")
    for key in ("shards", "tokens", "clip_dim", "eva_dim", "dtype"):
        if key not in m:
            raise ShardFormatError(f"{path}: missing field '{key}'")
    if m["dtype"] not in DTYPES:
        raise ShardFormatError(f"{path}: field 'dtype' should be one of {tuple(DTYPES)}, got {m['dtype']!r}")
    for key in ("tokens", "clip_dim", "eva_dim") + (("eva_tokens",) if "eva_tokens" in m else ()):
        if type(m[key]) is not int or m[key] < 1:
            raise ShardFormatError(f"{path}: field '{key}' should be a positive integer, got {m[key]!r}")
    if not isinstance(m["shards"], list):
        raise ShardFormatError(f"{path}: field 'shards' should be a list")
    for i, e in enumerate(m["shards"]):
        ok = isinstance(e, dict) and all(isinstance(e.get(k), str) and e[k] and Path(e[k]).name == e[k]
                                         for k in ("file", "meta"))
        ok = ok and all(type(e.get(k)) is int and e[k] >= 0 for k in ("num_samples", "bytes"))
        if not ok:
            raise ShardFormatError(f"{path}: entry {i} of 'shards' should have 'file' and 'meta' (file names in the "
                                   f"store) and 'num_samples', 'bytes' (integers), got {e!r:.200}")
    return m


def _source_stat(path: Path) -> dict:
    st = path.stat()
    return {"source_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def convert(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, dtype: str = "bfloat16", chunk: int = 16,
    progress: bool = True, max_shards: int | None = None, ignore_manifest: bool = False,
) -> dict:
    """Convert a seed directory into a store, shard by shard; finished shards are skipped on rerun.

    A store shard is reused only when its source file has the size and mtime recorded when it was
    converted; a changed source is converted again. Memory is bounded by ``chunk`` samples (a few MB
    each at 256 x 4096), not by shard size.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    all_sources = list_seed_shards(src_dir)
    if not all_sources:
        raise FileNotFoundError(f"{src_dir}: no seed shards found "
                                "(expected embeddings_shard_XXXXX_patch_only.pkl files)")
    sources = all_sources[:max_shards] if max_shards is not None else all_sources
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = read_store_manifest(dst)
    if manifest is not None and manifest["dtype"] != dtype:
        raise ValueError(f"{dst / STORE_MANIFEST}: store has dtype {manifest['dtype']}, asked for {dtype}; "
                         "use a new directory")
    names = [p.name for p in all_sources]
    for e in (manifest or {}).get("shards", []):
        m = re.fullmatch(r"shard_(\d+)\.safetensors", e["file"])
        i = int(m.group(1)) if m else -1
        if not 0 <= i < len(names) or e.get("source") != names[i]:
            now = names[i] if 0 <= i < len(names) else "no shard"
            raise ValueError(
                f"{dst / STORE_MANIFEST}: {e['file']} was converted from {e.get('source')!r}, but {src_dir} now has "
                f"{now} in its place: the store is of other data; convert into a new directory"
            )
    done = {s["source"]: s for s in (manifest or {}).get("shards", [])}
    for stale in dst.glob(".shard_*.tmp-*"):  # left by an interrupted run
        stale.unlink()

    stats = [_source_stat(p) for p in sources]  # before reading, so a later change is seen by the next run
    opened = [open_seed_shard(p) for p in sources]  # opening reads headers only
    problems = consistency_problems(opened)
    if problems:
        raise ShardFormatError("; ".join(problems))
    if not ignore_manifest:
        problems = seed_manifest_problems(src_dir, all_sources, opened, read_seed_manifest(src_dir))
        if problems:
            raise ShardFormatError("; ".join(problems) + " (an incomplete copy? --ignore_manifest converts the "
                                   "shards that are present)")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.num_samples for s in opened), desc="convert", unit="sample")
    for i, (path, shard, stat) in enumerate(zip(sources, opened, stats)):
        prev = done.get(path.name)
        st_path, meta_path = dst / f"shard_{i:05d}.safetensors", dst / f"shard_{i:05d}.json"
        if prev and st_path.exists() and meta_path.exists() and st_path.stat().st_size == prev["bytes"]:
            if all(prev.get(k) == v for k, v in stat.items()):
                if bar:
                    bar.update(shard.num_samples)
                continue
            why = ("changed since it was converted (size or mtime differ from the store's record)"
                   if "source_mtime_ns" in prev else "has no recorded size and mtime in the store (an older version)")
            print(f"{path}: {why}; converting it again", file=sys.stderr)
        manifest = append_store_shard(dst, i, shard, dtype, path.name, chunk, on_rows=bar.update if bar else None,
                                      source_stat=stat)
    if bar:
        bar.close()
    return read_store_manifest(dst)


def _has_cls(tokens: int) -> bool:
    return math.isqrt(tokens) ** 2 != tokens


def open_store_shard(directory: Path, entry: dict, manifest_path: Path, manifest: dict | None = None) -> Shard:
    """Open one store shard; its header must agree with its manifest entry (and with ``manifest``'s
    dtype, N and widths when given): a disagreement is a ShardFormatError naming the file and field."""
    st_path = Path(directory) / entry["file"]
    if not st_path.exists():
        raise ShardFormatError(f"{manifest_path}: lists {entry['file']} but the file is missing")
    if st_path.stat().st_size != entry["bytes"]:
        raise ShardFormatError(f"{st_path}: size {st_path.stat().st_size} differs from the manifest's "
                               f"{entry['bytes']} (truncated?)")
    tensors, _ = read_safetensors_layout(str(st_path))
    for key in ("clip", "eva"):
        if key not in tensors:
            raise ShardFormatError(f"{st_path}: missing tensor '{key}'")
    clip, eva = tensors["clip"], tensors["eva"]
    n = entry["num_samples"]
    for key, t in (("clip", clip), ("eva", eva)):
        if len(t.shape) != 3:
            raise ShardFormatError(f"{st_path}: tensor '{key}' should have shape [n, N, D], got {list(t.shape)}")
        if t.shape[0] != n:
            raise ShardFormatError(f"{st_path}: tensor '{key}' holds {t.shape[0]} samples, the manifest's "
                                   f"'num_samples' says {n}")
    if manifest is not None:
        # stores written before eva_tokens was recorded have equal token counts
        want = {"dtype": DTYPES.get(manifest["dtype"]), "tokens": manifest["tokens"],
                "eva_tokens": manifest.get("eva_tokens", manifest["tokens"]),
                "clip_dim": manifest["clip_dim"], "eva_dim": manifest["eva_dim"]}
        got = {"dtype": clip.dtype if clip.dtype == eva.dtype else f"{clip.dtype}/{eva.dtype}", "tokens": clip.shape[1],
               "eva_tokens": eva.shape[1], "clip_dim": clip.shape[2], "eva_dim": eva.shape[2]}
        for field in want:
            if got[field] != want[field]:
                shown = manifest.get(field, manifest["tokens"])
                raise ShardFormatError(f"{st_path}: header has {field} {got[field]}, {manifest_path} says {shown}")
    meta_path = Path(directory) / entry["meta"]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ShardFormatError(f"{meta_path}: cannot read the shard's keys ({type(e).__name__}: {e})") from e
    for field in ("keys", "captions"):
        value = meta.get(field) if isinstance(meta, dict) else None
        if not (isinstance(value, list) and len(value) == n):
            got = len(value) if isinstance(value, list) else type(value).__name__
            raise ShardFormatError(f"{meta_path}: field '{field}' should be a list of {n} strings, got {got}")
    return Shard(str(st_path), clip, eva, [str(k) for k in meta["keys"]], [str(c) for c in meta["captions"]])


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
