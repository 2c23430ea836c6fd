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
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    """Where S3 lives. Credentials are never configured here: they come from the boto chain
    (environment, shared config file, instance profile). Every job's config nests one
    (``bert4rec.config``); it lives here, with what reads it, so that reading files never
    imports the model (and with it torch): Ray Data tasks that only read stay light."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = None
    anon: bool = False
    connect_timeout_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(2, ge=1)
    local_is_shared: bool = Field(
        False,
        description="set when local paths are a filesystem mounted at the same path on every node (NFS, EFS); "
        "otherwise a local path is refused on a Ray cluster of more than one node",
    )


class InputError(ValueError):
    """Bad input from the user: reported as one line, without a traceback. The line is kept
    apart from ``args``, which Ray Data extends with its retry advice when a task raises it."""

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(message, *args)
        self.message = str(message)

    def __str__(self) -> str:
        return self.message


def input_error_in(e: BaseException | None) -> InputError | None:
    """The InputError behind ``e``, where a Ray task raised one (Ray wraps it in a
    RayTaskError, Ray Data in its own exceptions), as a fresh one-line InputError; else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError's original exception
        if isinstance(cause, InputError):
            return InputError(str(cause))
        if isinstance(e, InputError):
            return InputError(str(e))
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def fs_path(uri: str) -> str:
    """The path that ``filesystem(uri)``'s methods take (``bucket/key`` or an absolute local
    path), computed without building a filesystem."""
    if is_s3(uri):
        return uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns ``(fs, path)`` for ``uri``; ``path`` is what ``fs`` methods take."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        return _s3(storage.model_dump_json()), fs_path(uri)
    return fsspec.filesystem("file"), fs_path(uri)


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


def move_tree(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Moves the folder ``src`` (a path of ``fs``) to ``dst``, which must not exist. On a
    local disk one rename; on S3, which has no folders, file by file (a recursive move of the
    "folder" asks for a key of that name, which does not exist), then the rest of ``src`` is removed."""
    if "file" in fs.protocol or "local" in fs.protocol:
        fs.mv(src, dst, recursive=True)
        return
    for path in fs.find(src):
        fs.mv(path, posixpath.join(dst, posixpath.relpath(path, src)))
    if fs.exists(src):
        fs.rm(src, recursive=True)


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    return locate(uri, storage).exists()


def storage_call(uri: str, fn):
    """Runs ``fn()``, a filesystem call on ``uri``, turning connection and credential
    failures into one clear ``InputError`` naming ``uri``; ``FileNotFoundError`` passes through."""
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


def fsync_dir(path: str) -> None:
    """Makes a local directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_plain_name(name: Any, source: str) -> str:
    """``name`` if it is a plain file name (a string with no ``/`` or ``\\``, no ``..``, not
    starting with ``.``), else an ``InputError`` naming ``source`` (the file it was read from).

    Names read from storage (manifests, plans) are untrusted: one like ``../x`` would make a
    reader or a cleanup reach outside its directory."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise InputError(f"{source}: bad file name {name!r}: expected a plain name (no '/', '\\', '..' or leading '.')")
    return name


_ABSENT: Any = object()


@dataclass(frozen=True, eq=False)
class Location:
    """A storage location resolved once: the fsspec filesystem, the path its methods take,
    and the URI as the user wrote it (for messages and for code that wants a URI).

    Build one per job with ``locate(uri, storage)`` and derive the rest with ``join``: on S3
    this keeps one client for all of a job's calls instead of resolving the URI again at
    every step."""

    fs: fsspec.AbstractFileSystem
    path: str
    uri: str

    @property
    def s3(self) -> bool:
        return is_s3(self.uri)

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts) if self.s3 else os.path.join(self.path, *parts)
        return Location(self.fs, path, join(self.uri, *parts))

    def call(self, fn):
        """``storage_call`` for this location."""
        return storage_call(self.uri, fn)

    def exists(self) -> bool:
        return self.call(lambda: self.fs.exists(self.path))

    def read_bytes(self) -> bytes:
        """The file's content; ``FileNotFoundError`` if there is none."""
        return self.call(lambda: self.fs.cat_file(self.path))

    def read_json(self, default: Any = _ABSENT) -> Any:
        """The JSON value of the file; ``default`` if it is missing (else ``FileNotFoundError``).
        A file that is not JSON is an ``InputError`` naming it."""
        try:
            data = self.read_bytes()
        except FileNotFoundError:
            if default is _ABSENT:
                raise
            return default
        try:
            return json.loads(data)
        except ValueError as e:
            raise InputError(f"{self.uri}: not valid JSON: {e}") from e

    def write_json(self, obj: Any) -> None:
        """Writes JSON so that a reader sees the old file or the new one, never a torn one.

        Locally: write a temporary sibling, then ``os.replace`` (atomic). On S3 a single PUT is
        already atomic."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        if self.s3:
            self.call(lambda: self.fs.pipe_file(self.path, data))
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def children(self) -> list[dict]:
        """The direct children as ``{"name": base name, "type": "file"|"directory", ...}``;
        ``[]`` if there is nothing here."""
        try:
            entries = self.call(lambda: self.fs.ls(self.path, detail=True))
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = posixpath.basename(e["name"].rstrip("/"))
            if name and e["name"].rstrip("/") != self.path.rstrip("/"):
                out.append({**e, "name": name})
        return sorted(out, key=lambda e: e["name"])


def locate(target: "str | Location", storage: StorageConfig | None = None) -> Location:
    """``target`` as a ``Location`` (returned as is if it already is one)."""
    if isinstance(target, Location):
        return target
    fs, path = filesystem(target, storage)
    return Location(fs, path, target)


def parquet_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The Parquet files of a file or directory URI (data files only, sorted), as fs paths."""
    fs, path = filesystem(uri, storage)
    if not storage_call(uri, lambda: fs.exists(path)):
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


@dataclass(frozen=True)
class ParquetFooters:
    """What a Parquet file or directory's footers say, from one listing."""

    files: list[str]  # fs paths, sorted
    schema: pa.Schema  # the first file's
    rows: int  # all files'


def parquet_footers(uri: str, storage: StorageConfig | None = None) -> ParquetFooters:
    """Lists ``uri`` once and reads every file's footer (none of its rows)."""
    fs, _ = filesystem(uri, storage)
    files = parquet_files(uri, storage)
    rows, schema = 0, None
    for f in files:
        with fs.open(f, "rb") as fh:
            try:
                pf = pq.ParquetFile(fh)
            except pa.ArrowInvalid as e:
                raise InputError(f"{f}: not a Parquet file: {e}") from e
            rows += pf.metadata.num_rows
            schema = pf.schema_arrow if schema is None else schema
    return ParquetFooters(files, schema, rows)


def parquet_file_batches(batch: pa.Table, uri: str, storage: StorageConfig | None, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """A Ray Data task: one Parquet file of ``uri`` (``batch``: one row, its ``path``) ->
    its ``columns`` in tables of ``rows`` rows (the file's last may hold fewer), in file order,
    streamed. This module imports no torch, so a worker that only reads stays light."""
    fs, _ = filesystem(uri, storage)
    path = batch["path"][0].as_py()
    with fs.open(path, "rb") as handle:
        try:
            pf = pq.ParquetFile(handle)
        except pa.ArrowInvalid as e:
            raise InputError(f"{path}: not a Parquet file: {e}") from e
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; the table's first file has them")
        for rb in pf.iter_batches(batch_size=rows, columns=columns):
            yield pa.Table.from_batches([rb])


def parquet_dataset(uri: str, files: list[str], storage: StorageConfig | None, columns: list[str], rows: int):
    """The Parquet ``files`` of ``uri``, as the driver listed them (:func:`parquet_footers`),
    as a Ray Dataset of ``rows``-row blocks: one read task per file, and every consumer takes
    a share of even a one-file table. Unlike ``ray.data.read_parquet``, it does not list the
    table again, nor start footer-reading actors (a process each) to do so."""
    import ray.data

    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    ds = ds.map_batches(parquet_file_batches, batch_size=1, batch_format="pyarrow", fn_kwargs={"uri": uri, "storage": storage, "columns": columns, "rows": rows})
    # a task's outputs are joined into blocks of up to 128 MiB on the way out: cut them again
    return ds.repartition(target_num_rows_per_block=rows)


def read_parquet(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """Reads a Parquet file or directory of files into one table."""
    fs, _ = filesystem(uri, storage)
    files = parquet_files(uri, storage)
    tables = []
    for f in files:
        try:
            names = pq.read_schema(f, filesystem=fs).names
            duplicated = sorted({n for n in names if names.count(n) > 1})
            if duplicated:
                raise InputError(f"{f}: duplicate column name(s) {duplicated}; each column must appear once")
            tables.append(pq.read_table(f, columns=columns, filesystem=fs))
        except (pa.ArrowInvalid, KeyError) as e:
            raise InputError(f"{f}: cannot read Parquet: {e}") from e
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
    with storage_call(uri, lambda: fs.open(path, "r")) as f:
        return json.load(f)


def write_json(obj: Any, uri: str, storage: StorageConfig | None = None) -> None:
    """Writes JSON atomically: see ``Location.write_json``."""
    locate(uri, storage).write_json(obj)
