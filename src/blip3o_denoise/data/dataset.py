"""The local sources: a directory of seed pickles or a store behind one sample index (:class:`Embeddings`), the
key-hash held-out split, token selection and the training dataset (:class:`PairDataset`). It imports no other
source; ``open.py`` is where a command opens any dataset, ``run_splits.py`` a trained run's splits."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..sphere import normalize
from .safe_pickle import ShardFormatError
from .seed_format import (
    Shard, check_finite, consistency_problems, list_seed_shards, open_seed_shard, read_seed_manifest,
    seed_manifest_problems,
)
from .store import STORE_MANIFEST, open_store_shard, read_store_manifest

TASK_MODES = ("eva_denoising", "clip_denoising")
TRAINING_MODES = ("patch_only", "cls_patch")


class Embeddings:
    """All shards of one directory behind one sample index ``0 .. len - 1``.

    Opening reads headers only; ``read(i)`` reads one sample's tokens from disk.
    """

    def __init__(self, directory: str | os.PathLike, max_shards: int | None = None, check_manifest: bool = False):
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: embeddings directory does not exist")
        self.directory = d
        store = read_store_manifest(d)
        if store is not None:
            self.format = "store"
            entries = store["shards"][:max_shards] if max_shards else store["shards"]
            self.shards = [open_store_shard(d, e, d / STORE_MANIFEST, store) for e in entries]
            self.manifest = store
        else:
            paths = list_seed_shards(d)
            if not paths:
                raise FileNotFoundError(
                    f"{d}: no shards found: expected embeddings_shard_XXXXX_{{patch_only,cls_patch}}.pkl files "
                    f"or a {STORE_MANIFEST} (from `blip3o-denoise convert`)"
                )
            self.format = "seed"
            self.manifest = read_seed_manifest(d)
            self.shards = [open_seed_shard(p) for p in (paths[:max_shards] if max_shards else paths)]
            problems = seed_manifest_problems(d, paths, self.shards, self.manifest) if check_manifest else []
            if problems:
                raise ShardFormatError("; ".join(problems) + " (an incomplete copy? --ignore_manifest reads the "
                                       "shards that are present)")
        if not self.shards:
            raise FileNotFoundError(f"{d}: the dataset holds no shards")
        problems = consistency_problems(self.shards)
        if problems:
            raise ShardFormatError("; ".join(problems))
        first = self.shards[0]
        self.tokens, self.clip_dim, self.eva_dim = first.tokens, first.clip.shape[2], first.eva.shape[2]
        self.eva_tokens = first.eva_tokens  # may differ from the CLIP token count (cross-attention conditioning)
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s.num_samples)
        self.keys = [k for s in self.shards for k in s.keys]

    def __len__(self) -> int:
        return self._starts[-1]

    def check_finite(self) -> None:
        """Read every value once; a ShardFormatError names the file, field, sample and key of the
        first NaN or inf (so a bad sample is found before training, not as a NaN loss later)."""
        for s in self.shards:
            check_finite(s)

    @property
    def has_cls(self) -> bool:
        """Whether the CLIP tokens start with a CLS token."""
        return math.isqrt(self.tokens) ** 2 != self.tokens

    @property
    def eva_has_cls(self) -> bool:
        return math.isqrt(self.eva_tokens) ** 2 != self.eva_tokens

    def locate(self, i: int) -> tuple[Shard, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        lo, hi = 0, len(self.shards) - 1
        while lo < hi:  # the last shard whose start is <= i
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= i:
                lo = mid
            else:
                hi = mid - 1
        return self.shards[lo], i - self._starts[lo]

    def read(self, i: int, field: str) -> torch.Tensor:
        """Raw tokens ``[N, D]`` of sample ``i``; ``field`` is ``clip`` or ``eva``."""
        shard, row = self.locate(i)
        return getattr(shard, field).rows(row, row + 1)[0]


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) from a sample key (sha1), the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64


def split_indices(keys: list[str], holdout_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out split by key hash: a key is held out iff its hash < fraction.

    The split does not depend on shard order or on how many shards are read, so adding data never
    moves a held-out sample into training.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: expected a value in [0, 1), got {holdout_fraction}")
    train, held = [], []
    for i, k in enumerate(keys):
        (held if key_fraction(k) < holdout_fraction else train).append(i)
    return train, held


def select_tokens(x: torch.Tensor, has_cls: bool, training_mode: str, where: str = "") -> torch.Tensor:
    """Adapt ``[..., N, D]`` data tokens to ``training_mode``.

    patch_only on CLS data drops the CLS token. cls_patch needs data that has one: we do not
    invent a pseudo-CLS (the original prepended the mean patch, which makes the model learn a
    token that is only an average of the others).
    """
    if training_mode not in TRAINING_MODES:
        raise ValueError(f"training_mode: expected one of {TRAINING_MODES}, got {training_mode!r}")
    if training_mode == "patch_only":
        return x[..., 1:, :] if has_cls else x
    if not has_cls:
        raise ValueError(
            f"{where}training_mode='cls_patch' needs data with a CLS token (N = 1 + g*g, e.g. 257), but the "
            f"data has {x.shape[-2]} patch tokens: use --training_mode patch_only or extract with CLS"
        )
    return x


class PairDataset(Dataset):
    """Unit-norm ``(target [N, Dt], condition [N_c, De])`` pairs for a task, read on demand.

    eva_denoising: target and condition are both the EVA tokens; clip_denoising: the target is the
    CLIP tokens, conditioned on EVA (``N_c`` may differ from ``N``: other encoder pairs).
    """

    def __init__(self, emb: Embeddings, indices: list[int], task_mode: str, training_mode: str = "patch_only"):
        if task_mode not in TASK_MODES:
            raise ValueError(f"task_mode: expected one of {TASK_MODES}, got {task_mode!r}")
        self.emb, self.indices = emb, list(indices)
        self.task_mode, self.training_mode = task_mode, training_mode
        select_tokens(torch.zeros(emb.eva_tokens, 1), emb.eva_has_cls, training_mode, f"{emb.directory}: ")
        if task_mode == "clip_denoising":
            select_tokens(torch.zeros(emb.tokens, 1), emb.has_cls, training_mode, f"{emb.directory}: ")

    @property
    def target_dim(self) -> int:
        return self.emb.eva_dim if self.task_mode == "eva_denoising" else self.emb.clip_dim

    @property
    def cond_dim(self) -> int:
        return self.emb.eva_dim

    @property
    def tokens(self) -> int:
        """N, the target's token count."""
        if self.task_mode == "eva_denoising":
            return self.cond_tokens
        return self.emb.tokens - (1 if self.emb.has_cls and self.training_mode == "patch_only" else 0)

    @property
    def cond_tokens(self) -> int:
        """N_c, the condition's token count."""
        return self.emb.eva_tokens - (1 if self.emb.eva_has_cls and self.training_mode == "patch_only" else 0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        eva = normalize(select_tokens(self.emb.read(i, "eva").float(), self.emb.eva_has_cls, self.training_mode))
        if self.task_mode == "eva_denoising":
            target = eva
        else:
            target = normalize(select_tokens(self.emb.read(i, "clip").float(), self.emb.has_cls, self.training_mode))
        return {"target": target, "condition": eva, "index": i}

    def stack(self, positions: list[int] | None = None) -> dict:
        """Read several samples at once (evaluation): tensors ``[B, N, D]``."""
        items = [self[j] for j in (positions if positions is not None else range(len(self)))]
        return {
            "target": torch.stack([it["target"] for it in items]),
            "condition": torch.stack([it["condition"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
        }


# ----------------------------------------------------------------------------- a trained run's data


def refuse_nonfinite(batch: dict, ds, names: tuple[str, ...]) -> None:
    """A ValueError naming the key of the first sample whose ``names`` tensors hold NaN or inf, or a token that
    normalised to zero (an all-zero token, or one whose norm overflows float32)."""
    for name in names:
        x = batch[name]
        bad = ~(torch.isfinite(x).flatten(1).all(dim=1) & (x.norm(dim=-1) > 0.5).flatten(1).all(dim=1))
        if bool(bad.any()):
            i = int(batch["index"][int(bad.nonzero()[0])])
            shard, row = ds.emb.locate(i)
            raise ValueError(
                f"{shard.path}: sample {row} (key {ds.emb.keys[i]!r}) has non-finite values (NaN or inf), an all-zero "
                f"token or a token whose norm overflows float32 in its {name}; `blip3o-denoise inspect "
                "--check_values` lists such shards"
            )
