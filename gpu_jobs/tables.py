"""Job inputs read from a Delta table version: the exact files a job sees, wherever the table lives.

A telemetry dataset is a Delta Lake table (the ``connectors.dimo`` contract is the table format, not our
code: this module reads it with ``deltalake`` alone). A job never reads "the table" — it reads the data files
of one version, named in its :class:`gpu_jobs.spec.DatasetRef` (``table`` = URI, ``version`` = the version,
``files`` = that version's files with their sha256). So the model's lineage points at the exact data it saw,
files that compaction or a crashed writer left in the directory are never read, and a remote runner uploads
exactly those files. A table on object storage is first copied file by file into a local cache (files of a
Delta table never change once written, so a cached file with the right size is reused).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler

from depin_core import paths
from depin_core.errors import ConfigError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
DEFAULT_CACHE_DIR = paths.DATASET_CACHE_DIR


def is_remote(where: str | Path) -> bool:
    """True for an object-store URI (``s3://…``), False for a local path."""
    return bool(_SCHEME.match(str(where))) and not str(where).startswith("file://")


def is_delta_table(where: str | Path, storage_options: dict[str, str] | None = None) -> bool:
    """True when ``where`` holds a Delta table (a ``_delta_log``)."""
    if not is_remote(where):
        return (Path(where) / "_delta_log").is_dir()
    return bool(DeltaTable.is_deltatable(str(where), storage_options=storage_options or None))


def version_files(
    where: str | Path, version: int | None = None, storage_options: dict[str, str] | None = None
) -> tuple[int, list[tuple[str, int]]]:
    """(version, [(table-relative path, size)]) of the table at ``version`` (latest when None)."""
    uri = str(where) if is_remote(where) else str(Path(where).resolve())
    try:
        dt = DeltaTable(uri, version=version, storage_options=storage_options or None)
    except Exception as exc:  # delta-rs raises several types for "no such table/version"
        raise ConfigError(
            f"dataset {where}: cannot open version {version if version is not None else 'latest'} of the "
            f"Delta table ({type(exc).__name__}: {str(exc)[:200]}); check the path and --dataset-version"
        ) from None
    adds = pa.table(dt.get_add_actions(flatten=True))
    files = sorted(zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist(), strict=True))
    return dt.version(), [(str(p), int(s)) for p, s in files]


def local_copy(
    uri: str,
    files: list[tuple[str, int]],
    *,
    storage_options: dict[str, str] | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> Path:
    """A local directory holding ``files`` of the remote table ``uri`` (downloaded once, then reused)."""
    root = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    fs = pafs.PyFileSystem(DeltaStorageHandler(uri, storage_options or None))
    for rel, size in files:
        dest = root / rel
        if dest.is_file() and dest.stat().st_size == size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with fs.open_input_stream(rel) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        tmp.replace(dest)
    return root
