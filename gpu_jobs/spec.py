"""The job model: what to run (``JobSpec``), how it went (``JobState``, ``AttemptRecord``, ``JobResult``).

Everything here is a pydantic v2 model that round-trips through JSON, so a remote runner can ship it by value.

Dataset references. A ``DatasetRef`` names one file or one directory:

- a file: ``path`` is the file, ``sha256`` its digest, ``files`` is empty;
- a directory: ``files`` lists every matching file under it (recursively, sorted by relative POSIX path) with
  its own sha256, and ``sha256`` is the digest of the canonical JSON of that list (``[[relpath, sha256], …]``).
  Telemetry / ground-truth directories hold ``*.parquet`` files; a ``model`` directory (an artifact) holds
  every regular file.

``spec_hash`` identifies the computation, not where it runs: it is the sha256 of the canonical JSON (sorted keys,
no whitespace) of the spec without ``outputs``, ``limits`` and ``checkpoint`` (where results go, when to give up
and how often to save cannot change the result) and without each input's local ``path``, ``table`` and ``version`` (the
content digests stand for the data, so the same job staged elsewhere has the same hash).

A Delta table input (``table``/``version`` set, see :mod:`gpu_jobs.tables`) lists the files of that table
version; other files in its directory (compacted away, or left by a crashed writer) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpu_jobs.errors import FailureKind, JobError

_CHUNK = 1 << 20
_REBUILD = "rebuild the spec from the current data (DatasetRef.from_path) or restore the data"


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class JobKind(StrEnum):
    TRAIN = "train"
    INFER = "infer"


class JobState(StrEnum):
    PENDING = "PENDING"
    STAGING = "STAGING"
    RUNNING = "RUNNING"
    UPLOADING = "UPLOADING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Model):
    family: str = Field(description="registered family name (gpu_jobs.registry) or import path 'module:attr'")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class DatasetFile(_Model):
    path: str  # relative POSIX path inside the DatasetRef directory
    sha256: str


DatasetRole = Literal["telemetry", "ground_truth", "model"]


class DatasetRef(_Model):
    path: str
    sha256: str
    role: DatasetRole = "telemetry"
    files: list[DatasetFile] = Field(default_factory=list)
    # A Delta table input (see gpu_jobs.tables): the table's URI and the version whose files ``files`` lists;
    # ``path`` is then the local directory holding those files (the table itself, or a cache of it).
    table: str | None = None
    version: int | None = Field(None, ge=0)

    @classmethod
    def from_table(
        cls,
        where: str | Path,
        *,
        version: int | None = None,
        role: DatasetRole = "telemetry",
        storage_options: dict[str, str] | None = None,
        cache_dir: Path | None = None,
    ) -> DatasetRef:
        """The files of one version of the Delta table at ``where`` (latest when None), hashed.

        A table on object storage is copied into ``cache_dir`` first (see :mod:`gpu_jobs.tables`)."""
        from gpu_jobs import tables

        at, listed = tables.version_files(where, version, storage_options)
        if not listed:
            raise JobError(
                f"dataset {where}: version {at} of the table holds no data files; ingest telemetry first",
                FailureKind.USER,
            )
        if tables.is_remote(where):
            uri = str(where)
            root = tables.local_copy(
                uri, listed, storage_options=storage_options, cache_dir=cache_dir or tables.DEFAULT_CACHE_DIR
            )
        else:
            root = Path(where).resolve()
            uri = str(root)
        files = [DatasetFile(path=rel, sha256=sha256_file(root / rel)) for rel, _ in listed]
        return cls(
            path=str(root.resolve()),
            sha256=_files_digest(files),
            role=role,
            files=files,
            table=uri,
            version=at,
        )

    @classmethod
    def from_path(cls, path: Path | str, role: DatasetRole = "telemetry") -> DatasetRef:
        """Hash a file, or every dataset file of a directory (``*.parquet``; any file for role ``model``)."""
        p = Path(path).resolve()
        if p.is_file():
            return cls(path=str(p), sha256=sha256_file(p), role=role)
        if role != "model" and (p / "_delta_log").is_dir():
            return cls.from_table(p, role=role)
        if not p.is_dir():
            raise JobError(f"dataset {p}: no such file or directory; pass an existing path", FailureKind.USER)
        files = [DatasetFile(path=rel, sha256=sha256_file(p / rel)) for rel in _dataset_files(p, role)]
        if not files:
            what = "files" if role == "model" else "*.parquet files"
            raise JobError(
                f"dataset {p}: directory holds no {what}; point at the dataset root", FailureKind.USER
            )
        return cls(path=str(p), sha256=_files_digest(files), role=role, files=files)

    def verify(self) -> list[Path]:
        """Re-hash the referenced data; return its files (spec order) or raise ``JobError(user)`` on mismatch."""
        p = Path(self.path)
        if not self.files:
            if not p.is_file():
                raise JobError(
                    f"input {p} ({self.role}) is missing; stage it before running", FailureKind.USER
                )
            self._check_file(p, self.sha256)
            return [p]
        if _files_digest(self.files) != self.sha256:
            raise JobError(
                f"input {p}: the file list does not match its sha256 (the spec was edited); {_REBUILD}",
                FailureKind.USER,
            )
        present = _dataset_files(p, self.role) if p.is_dir() else []
        listed = [f.path for f in self.files]
        if self.version is not None:  # a table version: other files of the table directory are not ours
            present = [f for f in listed if (p / f).is_file()]
        if sorted(present) != sorted(listed):
            extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
            raise JobError(
                f"input {p} ({self.role}) changed: missing {missing[:5]}, unexpected {extra[:5]}; {_REBUILD}",
                FailureKind.USER,
            )
        for f in self.files:
            self._check_file(p / f.path, f.sha256)
        return [p / f.path for f in self.files]

    def _check_file(self, path: Path, want: str) -> None:
        actual = sha256_file(path)
        if actual != want:
            raise JobError(
                f"input {path} ({self.role}) changed: sha256 is {actual}, the spec says {want}; {_REBUILD}",
                FailureKind.USER,
            )


def _dataset_files(root: Path, role: str) -> list[str]:
    pattern = "*" if role == "model" else "*.parquet"
    return sorted(
        f.relative_to(root).as_posix()
        for f in root.rglob(pattern)
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)
    )


def _files_digest(files: list[DatasetFile]) -> str:
    return hashlib.sha256(canonical_json([[f.path, f.sha256] for f in files])).hexdigest()


class Resources(_Model):
    gpu_count: int = Field(
        0, ge=0, description="GPUs required; 0 = none required (CUDA is still used if present)"
    )
    min_vram_gb: float = Field(0.0, ge=0)
    cpu_fallback: bool = True


class Limits(_Model):
    max_wall_s: float = Field(3600.0, gt=0, description="per attempt; the runner kills the worker after this")


class CheckpointPolicy(_Model):
    every_steps: int = Field(0, ge=0, description="0 = never")
    keep_last: int = Field(2, ge=1)
    resume_from: str | None = Field(
        None,
        description="a local directory of checkpoint files (ckpt-*.json + ckpt-*.safetensors) to start from; "
        "the runner copies them into the job's checkpoint directory before the first attempt",
    )


class Outputs(_Model):
    dir: str


class JobSpec(_Model):
    kind: JobKind
    model: ModelSpec
    inputs: list[DatasetRef] = Field(default_factory=list)
    seed: int = 0
    resources: Resources = Field(default_factory=Resources)
    limits: Limits = Field(default_factory=Limits)
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    outputs: Outputs

    @model_validator(mode="after")
    def _infer_needs_a_model(self) -> JobSpec:
        models = sum(1 for i in self.inputs if i.role == "model")
        if self.kind == JobKind.INFER and models != 1:
            raise ValueError(
                f"an infer job needs exactly one input with role 'model' (the artifact), got {models}"
            )
        return self

    @property
    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of everything that can change the result (see the module doc)."""
        data = self.model_dump(mode="json", exclude={"outputs", "limits", "checkpoint"})
        for ref in data["inputs"]:
            del ref["path"]
            # Where the table lives and its version number are lineage, not content: the files' digests
            # stand for the data (an unchanged table at a later version is the same computation).
            ref.pop("table", None)
            ref.pop("version", None)
        return hashlib.sha256(canonical_json(data)).hexdigest()

    def inputs_with_role(self, role: DatasetRole) -> list[DatasetRef]:
        return [i for i in self.inputs if i.role == role]


class DeviceInfo(_Model):
    type: str  # "cuda" | "cpu"
    name: str  # GPU model or "cpu"
    index: int | None = None
    torch_version: str
    cuda_version: str | None = None
    threads: int
    bf16_autocast: bool = False

    @property
    def label(self) -> str:
        return f"cuda:{self.index}" if self.type == "cuda" else self.type


class AttemptRecord(_Model):
    attempt: int
    runner: str  # e.g. "local"
    node: str  # host name of the worker
    started: datetime
    ended: datetime | None = None
    state: JobState
    failure: FailureKind | None = None
    reason: str | None = None
    device: DeviceInfo | None = None


class JobResult(_Model):
    job_id: str
    spec_hash: str
    state: JobState
    failure: FailureKind | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)  # absolute path → sha256
    metrics: dict[str, Any] = Field(default_factory=dict)
    device: DeviceInfo | None = None
    timings: dict[str, float] = Field(default_factory=dict)  # staging_s, running_s, uploading_s, total_s
    attempts: list[AttemptRecord] = Field(default_factory=list)
    error: str | None = None  # failure message; the traceback for failures in family code
