"""Converting a local dataset (seed shards or our store, read through
:class:`~blip3o_denoise.data.dataset.Embeddings`) into the converted (LitData) format of ``engine_format.py``,
locally or straight to ``s3://bucket/prefix``, with our manifest written last.

Within each part samples are written in an order given by a hash of their key, so a chunk holds an
unstructured mix of the source; the engine then shuffles the chunk order per epoch and the samples inside
each chunk, which for small chunks (``chunk_samples``, default 16, about 42 MB at BLIP3-o widths in bf16) is
close to a global shuffle."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .dataset import Embeddings, split_indices
from .engine_format import DTYPES, FORMAT, INDEX, MANIFEST, STORED_AS, VERSION, crc
from .objectstore import Sink
from .safe_pickle import ShardFormatError


def _order_key(key: str) -> bytes:
    # salted, so the write order is independent of the held-out hash (key_fraction)
    return hashlib.sha1(b"blip3o-stream-order:" + key.encode()).digest()


def _raw(t: torch.Tensor, dtype: str, where: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise ShardFormatError(f"{where} has non-finite values")
    out = t.to(DTYPES[dtype]).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise ShardFormatError(f"{where} overflows {dtype}; use bfloat16 or float32")
    norms = torch.linalg.vector_norm(out.float(), dim=-1)  # training reads this part without a value check
    if not bool((torch.isfinite(norms) & (norms > 0)).all()):
        raise ShardFormatError(f"{where} has an all-zero token or one whose float32 norm overflows: it has no "
                               "direction on the sphere")
    return out.view(STORED_AS[dtype]) if dtype == "bfloat16" else out


def write_engine_dataset(
    src_dir: str | os.PathLike, dst: str, holdout_fraction: float = 0.05, dtype: str = "bfloat16",
    chunk_samples: int = 16, storage_options: dict | None = None, max_shards: int | None = None,
    staging_dir: str | None = None, progress: bool = False,
) -> dict:
    """Convert a seed or store directory into LitData datasets ``dst/train`` and ``dst/eval``.

    Reads one sample at a time (memory: one chunk of ``chunk_samples``); ``dst`` is a local
    directory or ``s3://bucket/prefix`` (``storage_options``: boto3 client options such as
    ``endpoint_url``; chunks are staged in ``staging_dir`` or a temporary directory, one at a time).
    Our manifest is written last: an interrupted conversion leaves no dataset that reads as complete
    (rerun it into the same destination). Returns the manifest.
    """
    from litdata.streaming.writer import BinaryWriter

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples: expected >= 1, got {chunk_samples}")
    dst = str(dst).rstrip("/")
    emb = Embeddings(src_dir, max_shards)
    train_idx, held_idx = split_indices(emb.keys, holdout_fraction)
    sink = Sink(dst, storage_options)
    if sink.exists(MANIFEST):
        raise ValueError(f"{dst}: already holds a converted dataset ({MANIFEST}); convert into a new location")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(emb), desc="convert", unit="sample")
    parts = {}
    with tempfile.TemporaryDirectory(dir=staging_dir, prefix="blip3o-stream-") as tmp:
        for part, idx in (("train", train_idx), ("eval", held_idx)):
            order = sorted(idx, key=lambda i: _order_key(emb.keys[i]))
            local = Path(dst) / part if not sink.remote else Path(tmp) / part
            if local.exists():  # left by an interrupted conversion (no manifest yet)
                shutil.rmtree(local)
            local.mkdir(parents=True)
            if order:
                w = BinaryWriter(str(local), chunk_size=chunk_samples)
                for row, i in enumerate(order):
                    where = f"{emb.directory}: sample {i} (key {emb.keys[i]!r})"
                    clip = _raw(emb.read(i, "clip"), dtype, where + " clip")
                    eva = _raw(emb.read(i, "eva"), dtype, where + " eva")
                    done = w.add_item(row, {"key": emb.keys[i], "index": int(i), "crc": crc(clip, eva),
                                            "clip": clip, "eva": eva})
                    if done:
                        sink.put_file(done, f"{part}/{Path(done).name}")
                    if bar:
                        bar.update(1)
                for done in w.done():
                    sink.put_file(done, f"{part}/{Path(done).name}")
                w.merge(1)
                for leftover in local.glob("*.index.json"):  # the per-writer index, merged into index.json
                    leftover.unlink()
                sink.put_file(str(local / INDEX), f"{part}/{INDEX}")
            parts[part] = {"samples": len(order), "indices": [int(i) for i in order]}
    if bar:
        bar.close()
    manifest = {
        "format": FORMAT, "version": VERSION, "engine": "litdata", "dtype": dtype, "chunk_samples": chunk_samples,
        "tokens": emb.tokens, "eva_tokens": emb.eva_tokens, "clip_dim": emb.clip_dim, "eva_dim": emb.eva_dim,
        "include_cls": emb.has_cls, "holdout_fraction": holdout_fraction, "total_samples": len(emb),
        "source": str(Path(src_dir).resolve()), "source_format": emb.format, "keys": list(emb.keys), "parts": parts,
    }
    sink.put_json(manifest, MANIFEST)
    return manifest
