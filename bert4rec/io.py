"""URIs -> filesystems, and the few Parquet/JSON reads and writes the jobs need.

Every path in this project is a URI: a local path (``/data/x``, ``./x``, ``file:///x``) or
``s3://bucket/key``. S3 credentials come from the usual boto chain (environment, shared
config, instance profile); only the endpoint and region are configurable, so that an
S3-compatible server (MinIO, a test server on loopback) can be used.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bert4rec.config import StorageConfig


class InputError(ValueError):
    """Bad input from the user: reported as one line, without a traceback."""


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns ``(fs, path)`` for ``uri``; ``path`` is what ``fs`` methods take."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        return _s3(storage.model_dump_json()), uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))


@functools.lru_cache(maxsize=8)
def _s3(storage_json: str) -> fsspec.AbstractFileSystem:
    """One S3 client per storage config and process: creating one costs a round trip."""
    import s3fs

    storage = StorageConfig.model_validate_json(storage_json)
    client_kwargs: dict[str, Any] = {}
    if storage.endpoint_url:
        client_kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client_kwargs["region_name"] = storage.region
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs,
        anon=storage.anon,
        # fail fast on an unreachable endpoint instead of retrying for minutes
        config_kwargs={"connect_timeout": storage.connect_timeout_s, "retries": {"max_attempts": storage.max_attempts}},
        skip_instance_cache=True,
        # listings are cached per instance; a cached instance must see other writers
        use_listings_cache=False,
    )


def arrow_filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The same location as a pyarrow filesystem, which is what Ray Data and Ray Train take."""
    fs, path = filesystem(uri, storage)
    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return _call(uri, lambda: fs.exists(path))


def _call(uri: str, fn):
    """Runs a filesystem call, turning connection failures into one clear error."""
    try:
        return fn()
    except (InputError, FileNotFoundError):
        raise
    except (OSError, Exception) as e:  # botocore/aiohttp raise many unrelated types
        name = type(e).__name__
        if any(s in name for s in ("Endpoint", "Connect", "ClientOSError", "Timeout")) or "connect" in str(e).lower():
            raise InputError(f"cannot reach storage for {uri}: {name}: {e}") from e
        if "Credentials" in name:
            raise InputError(f"no credentials for {uri}: set them in the environment, the AWS config or an instance profile ({name})") from e
        raise


def parquet_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The Parquet files of a file or directory URI (data files only, sorted), as fs paths."""
    fs, path = filesystem(uri, storage)
    if not _call(uri, lambda: fs.exists(path)):
        raise InputError(f"{uri}: no such file or directory")
    if fs.isfile(path):
        return [path]
    files = sorted(
        p
        for p in fs.find(path)
        if p.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in p[len(path) :].split("/") if part)
    )
    if not files:
        raise InputError(f"{uri}: directory holds no .parquet files")
    return files


def read_parquet(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """Reads a Parquet file or directory of files into one table."""
    fs, _ = filesystem(uri, storage)
    files = parquet_files(uri, storage)
    try:
        tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in files]
    except (pa.ArrowInvalid, KeyError) as e:
        raise InputError(f"{uri}: cannot read Parquet: {e}") from e
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def parquet_schema(uri: str, storage: StorageConfig | None = None) -> pa.Schema:
    fs, _ = filesystem(uri, storage)
    first = parquet_files(uri, storage)[0]
    try:
        return pq.read_schema(first, filesystem=fs)
    except pa.ArrowInvalid as e:
        raise InputError(f"{first}: not a Parquet file: {e}") from e


def write_parquet(table: pa.Table, uri: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, storage)
    fs.makedirs(posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs, compression="zstd")


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    fs, path = filesystem(uri, storage)
    with _call(uri, lambda: fs.open(path, "r")) as f:
        return json.load(f)


def write_json(obj: Any, uri: str, storage: StorageConfig | None = None) -> None:
    """Writes JSON so that a reader sees the old file or the new one, never a torn one.

    Locally: write a temporary sibling, then ``os.replace`` (atomic). On S3 a single PUT is
    already atomic.
    """
    fs, path = filesystem(uri, storage)
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    if is_s3(uri):
        _call(uri, lambda: fs.pipe_file(path, data))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
