"""The training set of a converted dataset, local or ``s3://``: a shuffled, resumable, rank-partitioned
stream of the same dicts as :class:`~blip3o_denoise.data.dataset.PairDataset`, and the loader whose
``state_dict()`` resumes it mid-epoch."""

from __future__ import annotations

import torch

from ..sphere import normalize
from .dataset import TASK_MODES, select_tokens
from .engine_dataset import engine_class, engine_input
from .engine_format import INDEX, PARTS, check_holdout, data_widths, has_cls_token, read_manifest
from .objectstore import client_options, is_remote, join_url, read_object


class _PairItem:
    """(index, key, clip, eva) -> PairDataset's dict (unit-norm float32 tokens, original index)."""

    def __init__(self, task_mode: str, training_mode: str, has_cls: bool, eva_has_cls: bool):
        self.task_mode, self.training_mode = task_mode, training_mode
        self.has_cls, self.eva_has_cls = has_cls, eva_has_cls

    def __call__(self, index: int, key: str, clip: torch.Tensor, eva: torch.Tensor) -> dict:
        e = normalize(select_tokens(eva.float(), self.eva_has_cls, self.training_mode))
        if self.task_mode == "eva_denoising":
            return {"target": e, "condition": e, "index": index}
        t = normalize(select_tokens(clip.float(), self.has_cls, self.training_mode))
        return {"target": t, "condition": e, "index": index}


def streaming_train_set(
    url: str, task_mode: str, training_mode: str = "patch_only", holdout_fraction: float = 0.05, seed: int = 0,
    cache_dir: str | None = None, max_cache_size: int | str = "50GB", storage_options: dict | None = None,
    shuffle: bool = True, part: str = "train", max_pre_download: int = 2,
):
    """The training part of a converted dataset as a LitData ``StreamingDataset`` yielding
    ``{"target", "condition", "index"}`` exactly like ``PairDataset`` (``index``: the original global
    sample index). Shuffled per epoch from ``seed``; under torch.distributed every rank gets a
    disjoint, equal-size part (drop_last). Iterate it with :func:`streaming_loader`, whose
    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch exactly.
    """
    if task_mode not in TASK_MODES:
        raise ValueError(f"task_mode: expected one of {TASK_MODES}, got {task_mode!r}")
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    url = str(url).rstrip("/")
    m = read_manifest(url, storage_options)
    check_holdout(m, url, holdout_fraction)
    if m["parts"][part]["samples"] == 0:
        raise ValueError(f"{url}: the '{part}' part holds no samples")
    has_cls, eva_has_cls = has_cls_token(m["tokens"]), has_cls_token(m["eva_tokens"])
    select_tokens(torch.zeros(m["eva_tokens"], 1), eva_has_cls, training_mode, f"{url}: ")
    if task_mode == "clip_denoising":
        select_tokens(torch.zeros(m["tokens"], 1), has_cls, training_mode, f"{url}: ")
    opts = client_options(storage_options) if is_remote(url) else None
    read_object(join_url(url, part), INDEX, storage_options)  # fail fast, naming the object
    ds = engine_class()(
        url, part, m, _PairItem(task_mode, training_mode, has_cls, eva_has_cls),
        input_dir=engine_input(url, part, cache_dir), shuffle=shuffle, seed=seed, drop_last=True,
        max_cache_size=max_cache_size, storage_options=opts, max_pre_download=max_pre_download,
    )
    ds.manifest, ds.url = m, url
    ds.target_dim = m["eva_dim"] if task_mode == "eva_denoising" else m["clip_dim"]
    ds.cond_dim = m["eva_dim"]
    w = data_widths(m, task_mode, training_mode)
    ds.tokens, ds.cond_tokens = w["tokens"], w["cond_tokens"]
    return ds


def streaming_loader(dataset, batch_size: int, num_workers: int = 0, **kw):
    """LitData's ``StreamingDataLoader`` over :func:`streaming_train_set` (``state_dict()`` for resume)."""
    from litdata import StreamingDataLoader

    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kw)
