"""Object storage: ``s3://bucket/prefix`` URLs, the boto3 client (fail-fast retries, its own session),
reading one object, a conversion's destination (:class:`Sink`: a local directory or an S3 prefix), the
remote cache directory, and :class:`RemoteDataError`, which turns the store's failures into one line naming
the URL and the object. Nothing here knows the data format; a second object store goes here."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .safe_pickle import ShardFormatError


class RemoteDataError(ShardFormatError):
    """A remote (or LitData-format) dataset cannot be used; the message names the URL and object."""


def is_remote(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def join_url(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def client_options(storage_options: dict | None) -> dict:
    """boto3 client options with fail-fast retries (LitData's own default is 1000 adaptive attempts,
    which turns an unreachable endpoint into a hang)."""
    import botocore.config

    opts = dict(storage_options or {})
    opts.setdefault("config", botocore.config.Config(connect_timeout=5, read_timeout=60,
                                                     retries={"max_attempts": 3, "mode": "standard"}))
    return opts


def s3_client(storage_options: dict | None):
    import boto3

    # a session of its own: boto3's shared default session would keep the credentials it first saw
    return boto3.session.Session().client("s3", **client_options(storage_options))


def explain(e: Exception, url: str, obj: str) -> RemoteDataError:
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


def read_object(url: str, name: str, storage_options: dict | None) -> bytes:
    """The bytes of ``url/name`` (S3 or local); a RemoteDataError naming both if it cannot be read."""
    if not is_remote(url):
        p = Path(url) / name
        try:
            return p.read_bytes()
        except OSError as e:
            raise RemoteDataError(f"{url}: cannot read {name}: {e.strerror or e}") from e
    import botocore.exceptions as bx

    bucket, prefix = split_s3(url)
    key = "/".join(x for x in (prefix, name) if x)
    try:
        return s3_client(storage_options).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise explain(e, url, name) from e


class Sink:
    """Where a conversion writes: a local directory, or an S3 prefix (files are staged locally one
    chunk at a time, uploaded, then deleted)."""

    def __init__(self, dst: str, storage_options: dict | None):
        self.dst, self.remote = str(dst), is_remote(dst)
        if self.remote:
            self.bucket, self.prefix = split_s3(self.dst)
            self.client = s3_client(storage_options)

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
            raise explain(e, self.dst, name) from e
        except bx.BotoCoreError as e:
            raise explain(e, self.dst, name) from e

    def _key(self, name: str) -> str:
        return "/".join(x for x in (self.prefix, name) if x)

    def put_file(self, local: str, name: str, remove: bool = True) -> None:
        if not self.remote:
            return  # written in place
        import botocore.exceptions as bx

        try:
            self.client.upload_file(local, self.bucket, self._key(name))
        except (bx.BotoCoreError, bx.ClientError, OSError) as e:
            raise explain(e, self.dst, name) from e
        if remove:
            os.remove(local)

    def put_json(self, obj: dict, name: str) -> None:
        raw = json.dumps(obj).encode()
        if self.remote:
            import botocore.exceptions as bx

            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=raw)
            except (bx.BotoCoreError, bx.ClientError) as e:
                raise explain(e, self.dst, name) from e
        else:
            p = Path(self.dst) / name
            tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
            tmp.write_bytes(raw)
            os.replace(tmp, p)


def default_cache_dir() -> str:
    """Where remote chunks are cached when no cache directory is given: ``$BLIP3O_CACHE_DIR`` or
    ``~/.cache/blip3o-denoise/remote``."""
    return os.environ.get("BLIP3O_CACHE_DIR") or str(Path.home() / ".cache" / "blip3o-denoise" / "remote")


def storage_options(endpoint_url: str = "") -> dict | None:
    """boto3 client options for an S3-compatible endpoint (MinIO, a test server); None: AWS, or the
    ``AWS_ENDPOINT_URL`` environment variable. Credentials always come from the usual AWS variables."""
    return {"endpoint_url": endpoint_url} if endpoint_url else None
