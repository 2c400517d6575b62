"""The one entry point that opens any dataset: seed shards or a store (:class:`~.dataset.Embeddings`), or a
converted dataset, local or ``s3://`` (:class:`~.random_access.RemoteEmbeddings`). Every command opens its data
here; a new kind of source is one more branch in :func:`open_dataset`."""

from __future__ import annotations

import os
from pathlib import Path

from .dataset import Embeddings
from .engine_format import MANIFEST
from .objectstore import default_cache_dir, is_remote, storage_options
from .random_access import RemoteEmbeddings


def is_engine_dataset(path: str | os.PathLike) -> bool:
    """An ``s3://`` URL or a local directory written by :func:`write_engine_dataset`."""
    return is_remote(path) or Path(path, MANIFEST).is_file()


def open_dataset(path: str | os.PathLike, max_shards: int | None = None, check_manifest: bool = False,
                 cache_dir: str = "", max_cache_size: int | str = "50GB", endpoint_url: str = ""):
    """``Embeddings`` for seed shards or a store; :class:`RemoteEmbeddings` for a converted dataset,
    local or ``s3://`` (its chunks cached under ``cache_dir``, default :func:`default_cache_dir`)."""
    if not is_engine_dataset(path):
        return Embeddings(path, max_shards, check_manifest=check_manifest)
    if max_shards:
        raise ValueError(f"{path}: --max_shards reads the first shards of a shard directory; a converted "
                         "(LitData) dataset has no shards to choose from")
    return RemoteEmbeddings(str(path), cache_dir or default_cache_dir(), max_cache_size, storage_options(endpoint_url))
