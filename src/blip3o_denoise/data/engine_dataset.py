"""The streaming engine (LitData, extra ``remote``) under both readers: its ``StreamingDataset`` with every
item decoded and verified (:class:`EngineDataset`), where its chunks are cached, and its failures turned into
errors naming the URL and the chunk (a bad chunk is dropped from the cache so a later run fetches it again).
A second engine would sit beside this file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .engine_format import decoder
from .objectstore import RemoteDataError, explain, is_remote, join_url


def cache_path(cache_dir: str, url: str, part: str) -> str:
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()[:16], part)


def engine_input(url: str, part: str, cache_dir: str | None, reader: str = "stream"):
    from litdata.streaming.resolver import Dir

    if is_remote(url):
        if not cache_dir:
            raise ValueError(f"{url}: a remote dataset needs a local cache directory (cache_dir)")
        path = cache_path(cache_dir, url, part if reader == "stream" else f"{part}-{reader}")
        os.makedirs(path, exist_ok=True)
        return Dir(path=path, url=join_url(url, part))
    return str(Path(url, part).resolve())


def _chunk_name(ds, chunk_index) -> str:
    try:
        return f"chunk {ds.cache._reader.config._chunks[int(chunk_index)]['filename']}"
    except Exception:  # noqa: BLE001 - only used to word an error
        return f"chunk #{chunk_index}"


def _drop_cached_chunk(ds, chunk_index) -> None:
    """Remove a bad chunk from the local cache, so a later run downloads it again."""
    try:
        cache_dir = ds.input_dir.path
        name = ds.cache._reader.config._chunks[int(chunk_index)]["filename"]
        if cache_dir and ds.input_dir.url:  # only a cache copy, never the source itself
            p = os.path.join(cache_dir, name)
            if os.path.exists(p):
                os.remove(p)
    except Exception:  # noqa: BLE001
        pass


try:  # the engine is an optional dependency (extra "remote"); writing and reading need it
    from litdata import StreamingDataset as _StreamingDataset
except ImportError:  # pragma: no cover - reported by engine_class
    _StreamingDataset = object


def engine_class():
    if _StreamingDataset is object:
        raise ImportError("remote datasets need LitData: pip install 'blip3o-denoise[remote]'")
    return EngineDataset


class EngineDataset(_StreamingDataset):
    """LitData's StreamingDataset whose items are decoded, verified and turned into our dicts."""

    def __init__(self, url: str, part: str, manifest: dict, make_item, **kw):
        self._url, self._part, self._decode, self._make_item = url, part, decoder(manifest), make_item
        endpoint = str((kw.get("storage_options") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL", ""))
        # LitData 0.2.76 fetches chunks with obstore, which refuses plain-http endpoints (a local
        # MinIO / moto server): "BadScheme". boto3 serves those; set in every worker process.
        self._no_obstore = endpoint.startswith("http://")
        super().__init__(**kw)

    def __getitem__(self, index):
        if self._no_obstore:
            import litdata.streaming.downloader as dl

            dl._OBSTORE_AVAILABLE = False
        chunk = getattr(index, "chunk_index", None)
        obj = _chunk_name(self, chunk) if chunk is not None else f"row {index}"
        where = f"{join_url(self._url, self._part)}: {obj}"
        try:
            item = super().__getitem__(index)
        except RemoteDataError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine's errors name neither URL nor object
            if chunk is not None:
                _drop_cached_chunk(self, chunk)
            import botocore.exceptions as bx

            cause = e
            while cause is not None and not isinstance(cause, (bx.BotoCoreError, bx.ClientError)):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise explain(cause, join_url(self._url, self._part), where.split(": ", 1)[1]) from e
            raise RemoteDataError(f"{where}: cannot read ({type(e).__name__}: {e})") from e
        try:
            return self._make_item(*self._decode(item, where))
        except RemoteDataError:
            if chunk is not None:
                _drop_cached_chunk(self, chunk)
            raise
