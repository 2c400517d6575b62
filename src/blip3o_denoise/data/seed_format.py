"""The seed's shard format: ``embeddings_shard_{idx:05d}_{patch_only|cls_patch}.pkl`` + manifest.

Each shard is a dict with ``clip_blip3o_embeddings [n, N, Dc]``, ``eva_blip3o_embeddings
[n, N, De]`` (float tensors), ``captions`` and ``keys`` (lists of str), plus ``total_samples``,
``shard_idx``, ``source_tar`` and ``config``. ``embeddings_manifest.json`` sits beside them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .safe_pickle import FileTensor, MemoryTensor, ShardFormatError, load_shard_file

CLIP_KEY = "clip_blip3o_embeddings"
EVA_KEY = "eva_blip3o_embeddings"
SEED_MANIFEST = "embeddings_manifest.json"
SHARD_PATTERN = re.compile(r"^embeddings_shard_(\d{5,})_(patch_only|cls_patch)\.pkl$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Shard:
    """One shard of paired embeddings, with tensors read on demand (any on-disk format)."""

    path: str
    clip: FileTensor | MemoryTensor
    eva: FileTensor | MemoryTensor
    keys: list
    captions: list
    extra: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.clip.shape[0]

    @property
    def tokens(self) -> int:
        return self.clip.shape[1]

    @property
    def eva_tokens(self) -> int:
        return self.eva.shape[1]


def list_seed_shards(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: embeddings directory does not exist")
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := SHARD_PATTERN.match(p.name)))
    return [p for _, p in found]


def read_seed_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / SEED_MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ShardFormatError(f"{path}: expected a JSON object")
    for key, kind in (("total_shards", int), ("total_samples", int), ("tokens_per_sample", int)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise ShardFormatError(f"{path}: field '{key}' should be {kind.__name__}, got {manifest[key]!r}")
    return manifest


def validate_shard_dict(obj, path: str) -> Shard:
    """Check the fields, shapes, dtypes and counts of a loaded shard dict; return a :class:`Shard`."""
    if not isinstance(obj, dict):
        raise ShardFormatError(f"{path}: expected a dict at the top level, got {type(obj).__name__}")
    for key in (CLIP_KEY, EVA_KEY):
        if key not in obj:
            raise ShardFormatError(f"{path}: missing field '{key}' (found {sorted(map(str, obj))})")
        t = obj[key]
        if not isinstance(t, (FileTensor, MemoryTensor)):
            raise ShardFormatError(f"{path}: field '{key}' should be a tensor, got {type(t).__name__}")
        if len(t.shape) != 3:
            raise ShardFormatError(f"{path}: field '{key}' should have shape [n, N, D], got {list(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ShardFormatError(f"{path}: field '{key}' should be a float tensor, got {t.dtype}")
    clip, eva = obj[CLIP_KEY], obj[EVA_KEY]
    if clip.shape[0] != eva.shape[0]:
        raise ShardFormatError(
            f"{path}: '{CLIP_KEY}' has {clip.shape[0]} samples but '{EVA_KEY}' has {eva.shape[0]}"
        )
    # CLIP and EVA may have different token counts (other encoder pairs): --conditioning cross_attention
    # trains on such pairs, and training refuses the token-wise (aligned) modes for them
    n = clip.shape[0]
    keys = obj.get("keys")
    if keys is None:
        keys = [f"{Path(path).stem}:{i}" for i in range(n)]
    captions = obj.get("captions") or [""] * n
    for name, lst in (("keys", keys), ("captions", captions)):
        if not isinstance(lst, list) or len(lst) != n:
            raise ShardFormatError(f"{path}: field '{name}' should be a list of {n} strings, "
                                   f"got {len(lst) if isinstance(lst, list) else type(lst).__name__}")
    if "total_samples" in obj and obj["total_samples"] != n:
        raise ShardFormatError(f"{path}: field 'total_samples' says {obj['total_samples']} but tensors hold {n}")
    extra = {k: v for k, v in obj.items() if k not in (CLIP_KEY, EVA_KEY, "keys", "captions")}
    return Shard(path, clip, eva, [str(k) for k in keys], [str(c) for c in captions], extra)


def open_seed_shard(path: str | os.PathLike) -> Shard:
    path = str(path)
    return validate_shard_dict(load_shard_file(path), path)


def consistency_problems(shards: list[Shard]) -> list[str]:
    """Shards whose N or widths differ from the first one's, and sample keys held twice (within a
    shard or across shards: the held-out split is by key, so a duplicate could sit on both sides)."""
    if not shards:
        return []
    first, problems = shards[0], []
    for s in shards[1:]:
        if s.clip.shape[1:] != first.clip.shape[1:] or s.eva.shape[1:] != first.eva.shape[1:]:
            problems.append(
                f"{s.path}: token shapes clip {list(s.clip.shape[1:])}, eva {list(s.eva.shape[1:])} differ "
                f"from {first.path}: clip {list(first.clip.shape[1:])}, eva {list(first.eva.shape[1:])}"
            )
    where: dict[str, str] = {}
    dups = []
    for s in shards:
        for k in s.keys:
            if k in where:
                dups.append((k, where[k], s.path))
            else:
                where[k] = s.path
    if dups:
        k, a, b = dups[0]
        problems.append(f"sample keys are not unique across shards: {len(dups)} duplicate(s), e.g. {k!r} in {a} "
                        f"and in {b} (the held-out split is by key)")
    return problems


def _listed_name(entry) -> str | None:
    """The shard file name a seed manifest entry refers to, if it names one of our shard files."""
    if isinstance(entry, dict):
        names = ("path", "file", "shard_file", "filename")
        entry = next((entry[k] for k in names if isinstance(entry.get(k), str)), None)
    if not isinstance(entry, str):
        return None
    name = Path(entry).name
    return name if SHARD_PATTERN.match(name) else None


def seed_manifest_problems(directory: str | os.PathLike, paths: list[Path], shards: list[Shard],
                           manifest: dict | None) -> list[str]:
    """How a seed manifest disagrees with the shard files present (``paths``, all of them) and with the
    ``shards`` opened from them (counts are compared for those; the total only when all are open)."""
    if manifest is None:
        return []
    mpath, problems = Path(directory) / SEED_MANIFEST, []
    present = {p.name for p in paths}
    if "total_shards" in manifest and manifest["total_shards"] != len(paths):
        problems.append(
            f"{mpath}: 'total_shards' is {manifest['total_shards']} but {len(paths)} shard files are present"
        )
    opened = {Path(s.path).name: s for s in shards}
    listed = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    for entry in listed:
        name = _listed_name(entry)
        if name is None:
            continue
        if name not in present:
            problems.append(f"{mpath}: lists shard {name}, which is missing from {directory}")
        elif name in opened and isinstance(entry, dict) and isinstance(entry.get("num_samples"), int) \
                and entry["num_samples"] != opened[name].num_samples:
            problems.append(f"{mpath}: says {name} holds {entry['num_samples']} samples, the file holds "
                            f"{opened[name].num_samples}")
    if "total_samples" in manifest and len(shards) == len(paths):
        total = sum(s.num_samples for s in shards)
        if manifest["total_samples"] != total:
            problems.append(f"{mpath}: 'total_samples' is {manifest['total_samples']} but the shards hold {total}")
    if "tokens_per_sample" in manifest and shards and manifest["tokens_per_sample"] != shards[0].tokens:
        problems.append(f"{mpath}: 'tokens_per_sample' is {manifest['tokens_per_sample']} but the shards have "
                        f"{shards[0].tokens} tokens")
    return problems


def check_finite(shard: Shard, chunk_bytes: int = 1 << 25) -> None:
    """Raise naming the file, field, sample index and key if any value is NaN or infinite, or a token cannot
    be put on the unit sphere: its float32 norm overflows (finite values near 1e19 and above) or is zero.
    Such a token would normalise to zero and train silently on nothing.

    One pass over the shard in reads of about ``chunk_bytes``; the offending sample is looked
    for only in a chunk that holds one.
    """
    names = ("clip", "eva") if shard.path.endswith(".safetensors") else (CLIP_KEY, EVA_KEY)
    for name, t in zip(names, (shard.clip, shard.eva)):
        n = t.shape[0]
        row_bytes = max(1, math.prod(t.shape[1:]) * torch.empty((), dtype=t.dtype).element_size())
        step = max(1, chunk_bytes // row_bytes)
        for i in range(0, n, step):
            rows = t.rows(i, min(i + step, n)).float()
            # NaN and inf values give non-finite norms too: one reduction checks all three faults
            norms = torch.linalg.vector_norm(rows, dim=-1)
            ok = (torch.isfinite(norms) & (norms > 0)).flatten(1).all(dim=1)
            if bool(ok.all()):
                continue
            j = int((~ok).nonzero()[0])
            row, key = rows[j], (shard.keys[i + j] if i + j < len(shard.keys) else None)
            where = f"{shard.path}: field '{name}' has"
            if not bool(torch.isfinite(row).all()):
                what = "non-finite values (NaN or inf)"
            elif not bool(torch.isfinite(norms[j]).all()):
                what = (f"tokens whose norm overflows float32 (values up to {float(row.abs().max()):.3g}; rescale "
                        "the data)")
            else:
                tok = int((norms[j] == 0).nonzero()[0])
                what = f"an all-zero token (token {tok}), which has no direction on the sphere"
            raise ShardFormatError(f"{where} {what} in sample {i + j} (key {key!r})")


def atomic_write_bytes(path: Path, write_fn) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(json.dumps(obj, indent=2).encode()))


def write_seed_shard(
    directory: str | os.PathLike, shard_idx: int, clip: torch.Tensor, eva: torch.Tensor, keys: list,
    captions: list, include_cls: bool, source_tar: str = "", config: dict | None = None,
) -> Path:
    """Write one shard exactly as the seed's extractor does (``pickle.dump``, highest protocol)."""
    mode = "cls_patch" if include_cls else "patch_only"
    path = Path(directory) / f"embeddings_shard_{shard_idx:05d}_{mode}.pkl"
    obj = {
        CLIP_KEY: clip.float().contiguous(),
        EVA_KEY: eva.float().contiguous(),
        "captions": list(captions),
        "keys": list(keys),
        "total_samples": int(clip.shape[0]),
        "shard_idx": int(shard_idx),
        "source_tar": source_tar,
        "config": dict(config or {}),
    }
    atomic_write_bytes(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def write_seed_manifest(directory: str | os.PathLike, shards: list[dict], tokens: int, include_cls: bool,
                        extra: dict | None = None) -> Path:
    manifest = {
        "total_shards": len(shards),
        "total_samples": sum(s["num_samples"] for s in shards),
        "tokens_per_sample": tokens,
        "include_cls": include_cls,
        "shards": shards,
    }
    manifest.update(extra or {})
    path = Path(directory) / SEED_MANIFEST
    atomic_write_json(path, manifest)
    return path
