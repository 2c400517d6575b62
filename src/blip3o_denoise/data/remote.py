"""Datasets in object storage, through LitData (``litdata``, extra ``remote``).

This module owns the remote path and nothing else: converting a local dataset (seed shards or our
store, read through :class:`~blip3o_denoise.data.dataset.Embeddings`) into LitData's chunked
format, locally or straight to ``s3://bucket/prefix``; reading it back for training (a shuffled,
resumable, rank-partitioned stream of the same dicts as :class:`PairDataset`) and for evaluation
(random access with the ``Embeddings`` interface); and turning the engine's failures into errors
that name the URL and the object.

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
token bytes, checked on read. Within each part samples are written in an order given by a hash of
their key, so a chunk holds an unstructured mix of the source; the engine then shuffles the chunk
order per epoch and the samples inside each chunk, which for small chunks (``chunk_samples``,
default 16, about 42 MB at BLIP3-o widths in bf16) is close to a global shuffle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from ..sphere import normalize
from .dataset import TASK_MODES, Embeddings, select_tokens, split_indices
from .safe_pickle import ShardFormatError

MANIFEST = "blip3o_stream.json"
FORMAT = "blip3o-denoise-litdata"
VERSION = 1
PARTS = ("train", "eval")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORED_AS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}  # LitData lacks bf16
_INDEX = "index.json"


class RemoteDataError(ShardFormatError):
    """A remote (or LitData-format) dataset cannot be used; the message names the URL and object."""


# ----------------------------------------------------------------------------------------------
# locations: s3://bucket/prefix or a local directory


def is_remote(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def _client_options(storage_options: dict | None) -> dict:
    """boto3 client options with fail-fast retries (LitData's own default is 1000 adaptive attempts,
    which turns an unreachable endpoint into a hang)."""
    import botocore.config

    opts = dict(storage_options or {})
    opts.setdefault("config", botocore.config.Config(connect_timeout=5, read_timeout=60,
                                                     retries={"max_attempts": 3, "mode": "standard"}))
    return opts


def _s3(storage_options: dict | None):
    import boto3

    # a session of its own: boto3's shared default session would keep the credentials it first saw
    return boto3.session.Session().client("s3", **_client_options(storage_options))


def _explain(e: Exception, url: str, obj: str) -> RemoteDataError:
    import botocore.exceptions as bx

    if isinstance(e, bx.NoCredentialsError):
        why = ("no credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
               "aws_access_key_id / aws_secret_access_key in the storage options")
    elif isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        why = f"endpoint unreachable ({e}); check endpoint_url / AWS_ENDPOINT_URL and the network"
    elif isinstance(e, bx.ClientError):
        code = e.response.get("Error", {}).get("Code", "?")
        if code in ("404", "NoSuchKey", "NotFound"):
            why = "object does not exist"
        elif code == "NoSuchBucket":
            why = "bucket does not exist"
        elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            why = f"access denied ({code}): check the credentials"
        else:
            why = f"S3 error {code}: {e}"
    else:
        why = f"{type(e).__name__}: {e}"
    return RemoteDataError(f"{url}: cannot read {obj}: {why}")


def _read_object(url: str, name: str, storage_options: dict | None) -> bytes:
    """The bytes of ``url/name`` (S3 or local); a RemoteDataError naming both if it cannot be read."""
    if not is_remote(url):
        p = Path(url) / name
        try:
            return p.read_bytes()
        except OSError as e:
            raise RemoteDataError(f"{url}: cannot read {name}: {e.strerror or e}") from e
    import botocore.exceptions as bx

    bucket, prefix = _split_s3(url)
    key = "/".join(x for x in (prefix, name) if x)
    try:
        return _s3(storage_options).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise _explain(e, url, name) from e


class _Sink:
    """Where a conversion writes: a local directory, or an S3 prefix (files are staged locally one
    chunk at a time, uploaded, then deleted)."""

    def __init__(self, dst: str, storage_options: dict | None):
        self.dst, self.remote = str(dst), is_remote(dst)
        if self.remote:
            self.bucket, self.prefix = _split_s3(self.dst)
            self.client = _s3(storage_options)

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (Path(self.dst) / name).exists()
        import botocore.exceptions as bx

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _explain(e, self.dst, name) from e
        except bx.BotoCoreError as e:
            raise _explain(e, self.dst, name) from e

    def _key(self, name: str) -> str:
        return "/".join(x for x in (self.prefix, name) if x)

    def put_file(self, local: str, name: str, remove: bool = True) -> None:
        if not self.remote:
            return  # written in place
        import botocore.exceptions as bx

        try:
            self.client.upload_file(local, self.bucket, self._key(name))
        except (bx.BotoCoreError, bx.ClientError, OSError) as e:
            raise _explain(e, self.dst, name) from e
        if remove:
            os.remove(local)

    def put_json(self, obj: dict, name: str) -> None:
        raw = json.dumps(obj).encode()
        if self.remote:
            import botocore.exceptions as bx

            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=raw)
            except (bx.BotoCoreError, bx.ClientError) as e:
                raise _explain(e, self.dst, name) from e
        else:
            p = Path(self.dst) / name
            tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
            tmp.write_bytes(raw)
            os.replace(tmp, p)


# ----------------------------------------------------------------------------------------------
# writing


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
    return out.view(_STORED_AS[dtype]) if dtype == "bfloat16" else out


def _crc(*tensors: torch.Tensor) -> int:
    c = 0
    for t in tensors:
        c = zlib.crc32(t.contiguous().view(torch.uint8).numpy(), c)
    return c


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
    sink = _Sink(dst, storage_options)
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
                    done = w.add_item(row, {"key": emb.keys[i], "index": int(i), "crc": _crc(clip, eva),
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
                sink.put_file(str(local / _INDEX), f"{part}/{_INDEX}")
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


# ----------------------------------------------------------------------------------------------
# reading: manifest and checks


def read_manifest(url: str, storage_options: dict | None = None) -> dict:
    """Our manifest of a converted dataset; RemoteDataError (naming the URL) if absent or malformed."""
    url = str(url).rstrip("/")
    try:
        raw = _read_object(url, MANIFEST, storage_options)
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
        chunks = [c["filename"] for c in json.loads(_read_object(url, f"{part}/{_INDEX}", storage_options))["chunks"]]
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteDataError(f"{url}: {part}/{_INDEX} is not a LitData index ({e})") from e
    sink = _Sink(url, storage_options)
    missing = [c for c in chunks if not sink.exists(f"{part}/{c}")]
    if missing:
        raise RemoteDataError(f"{url}: {part}/{missing[0]} is missing ({len(missing)} of the {len(chunks)} chunks "
                              f"that {part}/{_INDEX} lists): deleted, or an incomplete copy; convert again")


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
    has_cls = math.isqrt(manifest["tokens"]) ** 2 != manifest["tokens"]
    eva_has_cls = math.isqrt(manifest["eva_tokens"]) ** 2 != manifest["eva_tokens"]
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


# ----------------------------------------------------------------------------------------------
# reading: the engine


def _cache_path(cache_dir: str, url: str, part: str) -> str:
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()[:16], part)


def _engine_input(url: str, part: str, cache_dir: str | None, reader: str = "stream"):
    from litdata.streaming.resolver import Dir

    if is_remote(url):
        if not cache_dir:
            raise ValueError(f"{url}: a remote dataset needs a local cache directory (cache_dir)")
        path = _cache_path(cache_dir, url, part if reader == "stream" else f"{part}-{reader}")
        os.makedirs(path, exist_ok=True)
        return Dir(path=path, url=_join(url, part))
    return str(Path(url, part).resolve())


def _decoder(manifest: dict):
    m = manifest
    return _Decode(m["dtype"], m["tokens"], m["eva_tokens"], m["clip_dim"], m["eva_dim"])


class _Decode:
    """An engine item -> (index, key, clip, eva) in the stored dtype, checked against the manifest."""

    def __init__(self, dtype: str, tokens: int, eva_tokens: int, clip_dim: int, eva_dim: int):
        self.dtype, self.shapes = dtype, {"clip": (tokens, clip_dim), "eva": (eva_tokens, eva_dim)}

    def __call__(self, item: dict, where: str) -> tuple[int, str, torch.Tensor, torch.Tensor]:
        if not isinstance(item, dict) or not {"key", "index", "crc", "clip", "eva"} <= set(item):
            raise RemoteDataError(f"{where}: item is not a blip3o-denoise sample (fields {sorted(item)[:8]!r:.80})")
        out = []
        for f in ("clip", "eva"):
            t = item[f]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != self.shapes[f] or t.dtype != _STORED_AS[self.dtype]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise RemoteDataError(f"{where}: field '{f}' has shape {shape}, the manifest says {self.shapes[f]} "
                                      f"of {self.dtype} (corrupt chunk or another dataset)")
            out.append(t)
        if _crc(*out) != item["crc"]:
            raise RemoteDataError(f"{where}: sample {item['index']} (key {item['key']!r}): CRC32 mismatch "
                                  "(corrupt chunk)")
        if self.dtype == "bfloat16":
            out = [t.view(torch.bfloat16) for t in out]
        return int(item["index"]), str(item["key"]), out[0], out[1]


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
except ImportError:  # pragma: no cover - reported by _engine_class
    _StreamingDataset = object


def _engine_class():
    if _StreamingDataset is object:
        raise ImportError("remote datasets need LitData: pip install 'blip3o-denoise[remote]'")
    return _Stream


class _Stream(_StreamingDataset):
    """LitData's StreamingDataset whose items are decoded, verified and turned into our dicts."""

    def __init__(self, url: str, part: str, manifest: dict, make_item, **kw):
        self._url, self._part, self._decode, self._make_item = url, part, _decoder(manifest), make_item
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
        where = f"{_join(self._url, self._part)}: {obj}"
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
                raise _explain(cause, _join(self._url, self._part), where.split(": ", 1)[1]) from e
            raise RemoteDataError(f"{where}: cannot read ({type(e).__name__}: {e})") from e
        try:
            return self._make_item(*self._decode(item, where))
        except RemoteDataError:
            if chunk is not None:
                _drop_cached_chunk(self, chunk)
            raise


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


class _RawItem:
    def __call__(self, index, key, clip, eva):
        return index, key, clip, eva


def _has_cls(n: int) -> bool:
    return math.isqrt(n) ** 2 != n


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
    has_cls, eva_has_cls = _has_cls(m["tokens"]), _has_cls(m["eva_tokens"])
    select_tokens(torch.zeros(m["eva_tokens"], 1), eva_has_cls, training_mode, f"{url}: ")
    if task_mode == "clip_denoising":
        select_tokens(torch.zeros(m["tokens"], 1), has_cls, training_mode, f"{url}: ")
    opts = _client_options(storage_options) if is_remote(url) else None
    _read_object(_join(url, part), _INDEX, storage_options)  # fail fast, naming the object
    ds = _engine_class()(
        url, part, m, _PairItem(task_mode, training_mode, has_cls, eva_has_cls),
        input_dir=_engine_input(url, part, cache_dir), shuffle=shuffle, seed=seed, drop_last=True,
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


class Location:
    """What ``Embeddings.locate`` returns the shard of: something with a ``path`` to name in errors."""

    def __init__(self, path: str):
        self.path = path


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
        return _has_cls(self.tokens)

    @property
    def eva_has_cls(self) -> bool:
        return _has_cls(self.eva_tokens)

    def _part(self, part: str):
        if part not in self._parts:
            cache_dir, max_cache_size, storage_options = self._args
            _read_object(_join(self.url, part), _INDEX, storage_options)
            self._parts[part] = _engine_class()(
                # a cache folder apart from the training stream's: two readers never evict each other's chunks
                self.url, part, self.manifest, _RawItem(), input_dir=_engine_input(self.url, part, cache_dir,
                                                                                   "random"),
                shuffle=False, max_cache_size=max_cache_size,
                storage_options=_client_options(storage_options) if is_remote(self.url) else None,
            )
        return self._parts[part]

    def locate(self, i: int) -> tuple[Location, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        part, row = self._where[i]
        return Location(_join(self.url, part)), row

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


# ----------------------------------------------------------------------------------------------
# one entry point for every command: a shard directory, a store, or a converted (LitData) dataset


def is_engine_dataset(path: str | os.PathLike) -> bool:
    """An ``s3://`` URL or a local directory written by :func:`write_engine_dataset`."""
    return is_remote(path) or Path(path, MANIFEST).is_file()


def default_cache_dir() -> str:
    """Where remote chunks are cached when no cache directory is given: ``$BLIP3O_CACHE_DIR`` or
    ``~/.cache/blip3o-denoise/remote``."""
    return os.environ.get("BLIP3O_CACHE_DIR") or str(Path.home() / ".cache" / "blip3o-denoise" / "remote")


def storage_options(endpoint_url: str = "") -> dict | None:
    """boto3 client options for an S3-compatible endpoint (MinIO, a test server); None: AWS, or the
    ``AWS_ENDPOINT_URL`` environment variable. Credentials always come from the usual AWS variables."""
    return {"endpoint_url": endpoint_url} if endpoint_url else None


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
