"""Random access to a converted dataset, local or ``s3://``, by original sample index and with the
interface of :class:`~blip3o_denoise.data.dataset.Embeddings` (what evaluation and the other commands read)."""

from __future__ import annotations

import torch

from .engine_dataset import engine_class, engine_input
from .engine_format import INDEX, MANIFEST, PARTS, has_cls_token, read_manifest
from .objectstore import RemoteDataError, client_options, is_remote, join_url, read_object


class Location:
    """What ``Embeddings.locate`` returns the shard of: something with a ``path`` to name in errors."""

    def __init__(self, path: str):
        self.path = path


class _RawItem:
    def __call__(self, index, key, clip, eva):
        return index, key, clip, eva


class RemoteEmbeddings:
    """A converted dataset with ``Embeddings``' interface, by ORIGINAL global sample index:
    ``len``, ``keys``, ``tokens``, ``eva_tokens``, ``clip_dim``, ``eva_dim``, ``has_cls``,
    ``eva_has_cls``, ``read(i, field)``, ``locate(i)``, ``directory``, ``format``, ``manifest``.

    So ``PairDataset(RemoteEmbeddings(url, ...), split_indices(emb.keys, f)[1], ...)`` is the local
    path's held-out set, read from the ``eval`` part (random access: LitData fetches the needed
    byte range or chunk into ``cache_dir``)."""

    format = "litdata"

    def __init__(self, url: str, cache_dir: str | None = None, max_cache_size: int | str = "50GB",
                 storage_options: dict | None = None):
        self.url = self.directory = str(url).rstrip("/")
        self.manifest = m = read_manifest(self.url, storage_options)
        self.tokens, self.eva_tokens = m["tokens"], m["eva_tokens"]
        self.clip_dim, self.eva_dim = m["clip_dim"], m["eva_dim"]
        self.keys = [str(k) for k in m["keys"]]
        self._where = {}
        for part in PARTS:
            for row, i in enumerate(m["parts"][part]["indices"]):
                self._where[int(i)] = (part, row)
        self._args = (cache_dir, max_cache_size, storage_options)
        self._parts: dict = {}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_cls(self) -> bool:
        return has_cls_token(self.tokens)

    @property
    def eva_has_cls(self) -> bool:
        return has_cls_token(self.eva_tokens)

    def _part(self, part: str):
        if part not in self._parts:
            cache_dir, max_cache_size, storage_options = self._args
            read_object(join_url(self.url, part), INDEX, storage_options)
            self._parts[part] = engine_class()(
                # a cache folder apart from the training stream's: two readers never evict each other's chunks
                self.url, part, self.manifest, _RawItem(), input_dir=engine_input(self.url, part, cache_dir,
                                                                                   "random"),
                shuffle=False, max_cache_size=max_cache_size,
                storage_options=client_options(storage_options) if is_remote(self.url) else None,
            )
        return self._parts[part]

    def locate(self, i: int) -> tuple[Location, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        part, row = self._where[i]
        return Location(join_url(self.url, part)), row

    def read(self, i: int, field: str) -> torch.Tensor:
        """Raw tokens ``[N, D]`` of sample ``i`` (stored dtype); ``field`` is ``clip`` or ``eva``."""
        if field not in ("clip", "eva"):
            raise ValueError(f"field: expected 'clip' or 'eva', got {field!r}")
        loc, row = self.locate(i)
        index, _, clip, eva = self._part(loc.path.rsplit("/", 1)[1])[row]
        if index != i:
            raise RemoteDataError(f"{loc.path}: row {row} holds sample {index}, {MANIFEST} says {i} (mismatched files)")
        return clip if field == "clip" else eva

    def check_finite(self) -> None:
        for i in range(len(self)):
            for f in ("clip", "eva"):
                if not bool(torch.isfinite(self.read(i, f)).all()):
                    raise RemoteDataError(f"{self.locate(i)[0].path}: sample {i} (key {self.keys[i]!r}) has "
                                          f"non-finite {f}")
