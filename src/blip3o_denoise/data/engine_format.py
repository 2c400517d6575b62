"""The converted (LitData) format: its layout, our manifest and the checks made before reading it.

Layout under the destination (a local directory or an ``s3://`` prefix)::

    train/index.json, train/chunk-0-*.bin     samples whose key is not held out
    eval/index.json,  eval/chunk-0-*.bin      held-out samples (key_fraction(key) < holdout_fraction)
    blip3o_stream.json                        our manifest, written last (its presence = complete)

The held-out split is decided when converting, by exactly the local path's rule
(:func:`~blip3o_denoise.data.dataset.split_indices`), because the engine shuffles and partitions
a whole dataset: filtering held-out samples while streaming would give ranks unequal counts. A run
whose ``holdout_fraction`` differs from the converted one is refused.

Each item holds the key, the ORIGINAL global sample index, the raw tokens (no normalisation; bf16
stored as its int16 bit pattern, which LitData cannot serialise directly) and a CRC32 of the
token bytes, checked on read by :class:`Decode`. Writing is ``engine_convert.py``; reading is
``engine_dataset.py`` (the engine), ``streaming.py`` (training) and ``random_access.py`` (evaluation).
"""

from __future__ import annotations

import json
import math
import zlib

import torch

from .objectstore import RemoteDataError, Sink, read_object

MANIFEST = "blip3o_stream.json"
FORMAT = "blip3o-denoise-litdata"
VERSION = 1
PARTS = ("train", "eval")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORED_AS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}  # LitData lacks bf16
INDEX = "index.json"


def crc(*tensors: torch.Tensor) -> int:
    c = 0
    for t in tensors:
        c = zlib.crc32(t.contiguous().view(torch.uint8).numpy(), c)
    return c


def has_cls_token(n: int) -> bool:
    """A token count that is not a square grid carries a CLS token in front of its patches."""
    return math.isqrt(n) ** 2 != n


def read_manifest(url: str, storage_options: dict | None = None) -> dict:
    """Our manifest of a converted dataset; RemoteDataError (naming the URL) if absent or malformed."""
    url = str(url).rstrip("/")
    try:
        raw = read_object(url, MANIFEST, storage_options)
    except RemoteDataError as e:
        if "object does not exist" in str(e) or "No such file" in str(e):  # not a missing bucket
            raise RemoteDataError(f"{url}: no {MANIFEST}: not a converted dataset, or its conversion did not "
                                  "finish (convert again)") from e
        raise
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise RemoteDataError(f"{url}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise RemoteDataError(f"{url}: {MANIFEST}: field 'format' should be {FORMAT!r}")
    for k in ("tokens", "eva_tokens", "clip_dim", "eva_dim", "total_samples"):
        if type(m.get(k)) is not int or m[k] < 1:
            raise RemoteDataError(f"{url}: {MANIFEST}: field '{k}' should be a positive integer, got {m.get(k)!r}")
    if m.get("dtype") not in DTYPES:
        raise RemoteDataError(f"{url}: {MANIFEST}: field 'dtype' should be one of {tuple(DTYPES)}")
    keys, parts = m.get("keys"), m.get("parts")
    if not (isinstance(keys, list) and len(keys) == m["total_samples"]):
        raise RemoteDataError(f"{url}: {MANIFEST}: field 'keys' should list {m['total_samples']} keys")
    if not (isinstance(parts, dict) and set(parts) == set(PARTS)):
        raise RemoteDataError(f"{url}: {MANIFEST}: field 'parts' should have {PARTS}")
    seen = sorted(i for p in PARTS for i in parts[p].get("indices", []))
    if seen != list(range(m["total_samples"])):
        raise RemoteDataError(f"{url}: {MANIFEST}: the parts' indices should cover 0..{m['total_samples'] - 1} once")
    return m


def check_chunks_present(url: str, part: str, storage_options: dict | None = None) -> None:
    """Every chunk that ``part/index.json`` lists exists (one listing or HEAD each): a deleted chunk is
    named before training, not when the evaluation after training reads it."""
    url = str(url).rstrip("/")
    try:
        chunks = [c["filename"] for c in json.loads(read_object(url, f"{part}/{INDEX}", storage_options))["chunks"]]
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteDataError(f"{url}: {part}/{INDEX} is not a LitData index ({e})") from e
    sink = Sink(url, storage_options)
    missing = [c for c in chunks if not sink.exists(f"{part}/{c}")]
    if missing:
        raise RemoteDataError(f"{url}: {part}/{missing[0]} is missing ({len(missing)} of the {len(chunks)} chunks "
                              f"that {part}/{INDEX} lists): deleted, or an incomplete copy; convert again")


def check_holdout(manifest: dict, url: str, holdout_fraction: float) -> None:
    """Refuse a run whose held-out fraction differs from the one the dataset was split with."""
    if not math.isclose(float(holdout_fraction), float(manifest["holdout_fraction"]), rel_tol=0, abs_tol=1e-12):
        raise ValueError(
            f"{url}: converted with holdout_fraction {manifest['holdout_fraction']}, the run asks for "
            f"{holdout_fraction}: the held-out split is fixed at conversion (train/ and eval/); use "
            f"--holdout_fraction {manifest['holdout_fraction']} or convert again with {holdout_fraction}"
        )


def data_widths(manifest: dict, task_mode: str, training_mode: str = "patch_only") -> dict:
    """``target_dim, cond_dim, tokens, cond_tokens`` as a checkpoint's ``config['data']`` records them."""
    has_cls, eva_has_cls = has_cls_token(manifest["tokens"]), has_cls_token(manifest["eva_tokens"])
    cond_tokens = manifest["eva_tokens"] - (1 if eva_has_cls and training_mode == "patch_only" else 0)
    if task_mode == "eva_denoising":
        return {"target_dim": manifest["eva_dim"], "cond_dim": manifest["eva_dim"], "tokens": cond_tokens,
                "cond_tokens": cond_tokens}
    return {"target_dim": manifest["clip_dim"], "cond_dim": manifest["eva_dim"],
            "tokens": manifest["tokens"] - (1 if has_cls and training_mode == "patch_only" else 0),
            "cond_tokens": cond_tokens}


def check_widths(manifest: dict, url: str, expected: dict, task_mode: str, training_mode: str = "patch_only") -> None:
    """Refuse data whose widths / token counts differ from ``expected`` (a checkpoint's
    ``config['data']``: target_dim, cond_dim, tokens, optional cond_tokens)."""
    have = data_widths(manifest, task_mode, training_mode)
    want = {**expected, "cond_tokens": expected.get("cond_tokens", expected["tokens"])}
    bad = [f"{k} {have[k]} (expected {want[k]})" for k in have if k in want and have[k] != want[k]]
    if bad:
        raise RemoteDataError(f"{url}: {MANIFEST}: the data has " + ", ".join(bad) + " (another dataset or model?)")


def decoder(manifest: dict):
    m = manifest
    return Decode(m["dtype"], m["tokens"], m["eva_tokens"], m["clip_dim"], m["eva_dim"])


class Decode:
    """An engine item -> (index, key, clip, eva) in the stored dtype, checked against the manifest."""

    def __init__(self, dtype: str, tokens: int, eva_tokens: int, clip_dim: int, eva_dim: int):
        self.dtype, self.shapes = dtype, {"clip": (tokens, clip_dim), "eva": (eva_tokens, eva_dim)}

    def __call__(self, item: dict, where: str) -> tuple[int, str, torch.Tensor, torch.Tensor]:
        if not isinstance(item, dict) or not {"key", "index", "crc", "clip", "eva"} <= set(item):
            raise RemoteDataError(f"{where}: item is not a blip3o-denoise sample (fields {sorted(item)[:8]!r:.80})")
        out = []
        for f in ("clip", "eva"):
            t = item[f]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != self.shapes[f] or t.dtype != STORED_AS[self.dtype]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise RemoteDataError(f"{where}: field '{f}' has shape {shape}, the manifest says {self.shapes[f]} "
                                      f"of {self.dtype} (corrupt chunk or another dataset)")
            out.append(t)
        if crc(*out) != item["crc"]:
            raise RemoteDataError(f"{where}: sample {item['index']} (key {item['key']!r}): CRC32 mismatch "
                                  "(corrupt chunk)")
        if self.dtype == "bfloat16":
            out = [t.view(torch.bfloat16) for t in out]
        return int(item["index"]), str(item["key"]), out[0], out[1]
