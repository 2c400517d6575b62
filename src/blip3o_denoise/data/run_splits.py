"""The data of a trained run, wherever it is stored: its evaluation split, its training split (for fitting
baselines) and an opener for the data of its earlier phases. Everything is opened through
:func:`~blip3o_denoise.data.open.open_dataset`; the split is the key-hash rule of ``dataset.py`` everywhere."""

from __future__ import annotations

from pathlib import Path

from ..phases import min_holdout_fraction
from .dataset import PairDataset, split_indices
from .objectstore import RemoteDataError, is_remote
from .open import open_dataset


def load_eval_split(run_config: dict, directory: str, split: str, holdout_fraction: float | None,
                    max_samples: int, cache_dir: str = "", max_cache_size: str = "50GB",
                    endpoint_url: str = "") -> PairDataset:
    """The samples of ``directory`` a trained run is evaluated on: its held-out split (``split="heldout"``,
    by default the smallest holdout fraction any phase of the run trained with) or all of them; checked
    against the widths the run trained on.

    ``directory`` is seed shards, a store, or a converted dataset, local or ``s3://`` (read through
    :func:`~blip3o_denoise.data.open.open_dataset`, chunks cached in ``cache_dir``). The held-out
    split is the same key-hash rule everywhere: a sample is held out or not wherever it is stored."""
    emb = open_dataset(directory, None, cache_dir=cache_dir, max_cache_size=max_cache_size,
                       endpoint_url=endpoint_url)
    tr = run_config["train"]
    if split == "all":
        idx = list(range(len(emb)))
    else:
        frac = min_holdout_fraction(run_config) if holdout_fraction is None else holdout_fraction
        _, idx = split_indices(emb.keys, frac)
    if max_samples:
        idx = idx[:max_samples]
    if not idx:
        raise ValueError(f"{directory}: no samples in the '{split}' split")
    ds = PairDataset(emb, idx, tr["task_mode"], tr["training_mode"])
    data = run_config["data"]
    trained = (data["target_dim"], data["cond_dim"], data["tokens"], data.get("cond_tokens", data["tokens"]))
    if (ds.target_dim, ds.cond_dim, ds.tokens, ds.cond_tokens) != trained:
        raise ValueError(
            f"{directory}: data has target width {ds.target_dim}, condition width {ds.cond_dim}, {ds.tokens} target "
            f"and {ds.cond_tokens} condition tokens; the model was trained on {trained[0]}, {trained[1]}, "
            f"{trained[2]} and {trained[3]}"
        )
    return ds


def training_split(cfg: dict, train_dir: str, cache_dir: str = "", max_cache_size: str = "50GB",
                   endpoint_url: str = "") -> PairDataset | None:
    """The training split of a run (for fitting baselines), or None when its data is not here.

    ``train_dir`` (default: the run's ``chunked_embeddings_dir``) may be a converted dataset, local
    or ``s3://``. A run whose recorded data is remote and cannot be read from here gives None with
    a note naming the URL and why; a ``train_dir`` given explicitly must be readable. The run's own
    data is read through the run's ``endpoint_url`` unless one is given."""
    tdir = train_dir or cfg["train"]["chunked_embeddings_dir"]
    if not tdir or not (is_remote(tdir) or Path(tdir).is_dir()):
        return None
    if not train_dir:
        endpoint_url = endpoint_url or cfg["train"].get("endpoint_url") or ""
    try:
        temb = open_dataset(tdir, cfg["train"].get("max_shards") or None, cache_dir=cache_dir,
                            max_cache_size=max_cache_size, endpoint_url=endpoint_url)
    except RemoteDataError as e:
        if train_dir:
            raise
        print(f"note: the run's training data cannot be read from here ({' '.join(str(e).split())})")
        return None
    tr_idx, _ = split_indices(temb.keys, cfg["train"]["holdout_fraction"])
    return PairDataset(temb, tr_idx, cfg["train"]["task_mode"], cfg["train"]["training_mode"])


def phase_opener(run_config: dict, train_dir: str = "", **remote):
    """``open_dir`` for :func:`earlier_trained_keys`: the run's data directory read from ``train_dir`` when
    given; None for data that cannot be read here."""
    def open_dir(path: str, max_shards: int | None):
        if train_dir and path == run_config["train"]["chunked_embeddings_dir"]:
            path = train_dir
        try:
            return open_dataset(path, max_shards, cache_dir=remote.get("cache_dir", ""),
                                max_cache_size=remote.get("max_cache_size", "50GB"),
                                endpoint_url=remote.get("endpoint_url", ""))
        except (OSError, ValueError):  # a RemoteDataError is a ValueError
            return None

    return open_dir
