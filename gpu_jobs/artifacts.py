"""The model artifact directory (the contract between ``gpu_jobs`` and ``serving``).

Layout: ``weights.safetensors`` (the state dict), ``model.json`` (family, hyperparameters, feature names and
units, normalization stats — whatever the family's ``TrainOutput.model_config`` holds), ``metrics.json`` and
``manifest.json`` (format, the sha256 of every other file, the job's ``spec_hash``, dataset hashes, device,
torch version, timings, ``created_at``). A family may add files for the model report (``TrainOutput.files``:
``report/…``, e.g. the held-out predictions), and plots drawn here later go to ``plots/…``
(:func:`update_artifact` lists them in the manifest, which then also says which plots are missing and why);
neither is needed to run the model (:func:`is_report_file`).

Loading verifies every sha256 against the manifest and refuses missing or unexpected files. It parses JSON and
safetensors only (from the very bytes it hashed), so a tampered artifact can never run code. The manifest cannot
hash itself: pass ``expected_manifest_sha256`` (``JobResult.artifacts`` holds it) to pin it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from gpu_jobs.errors import ArtifactIntegrityError
from gpu_jobs.spec import DeviceInfo, JobSpec

FORMAT = "depin-model/1"
WEIGHTS, MODEL, METRICS, MANIFEST = "weights.safetensors", "model.json", "metrics.json", "manifest.json"
REPORT_DIRS = ("report", "plots")  # files for people (held-out data, plots), not needed to run the model


def is_report_file(name: str) -> bool:
    """Whether the artifact file ``name`` (relative POSIX path) is report material (``report/``, ``plots/``)."""
    return name.split("/", 1)[0] in REPORT_DIRS and "/" in name


def _check_extra_name(name: str) -> None:
    parts = name.split("/")
    if not is_report_file(name) or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise ConfigError(
            f"artifact file {name!r}: extra files go under report/ or plots/ as a relative path (e.g. "
            "'report/heldout.parquet')"
        )


@dataclass
class LoadedArtifact:
    state_dict: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    metrics: dict[str, Any]
    manifest: dict[str, Any]


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"


def write_artifact(
    out_dir: Path | str,
    *,
    state_dict: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    metrics: dict[str, Any],
    spec: JobSpec | None = None,
    device: DeviceInfo | None = None,
    timings: dict[str, float] | None = None,
    files: dict[str, bytes] | None = None,
) -> dict[str, str]:
    """Write the artifact into ``out_dir`` (absent, empty, or holding an older artifact, which is replaced)
    and return ``{absolute path: sha256}`` for every file, manifest included. ``files``: extra report files
    (relative path under ``report/`` or ``plots/`` → bytes)."""
    for name in files or {}:
        _check_extra_name(name)
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ConfigError(
            f"output dir {out} holds files that are not a model artifact; choose an empty directory"
        )
    try:
        files = {
            # clone: safetensors refuses tensors sharing storage (tied weights)
            WEIGHTS: st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}),
            MODEL: _json_bytes(model_config),
            METRICS: _json_bytes(metrics),
            **(files or {}),
        }
    except ValueError as e:
        raise ConfigError(f"model_config/metrics must be JSON-able without NaN/inf: {e}") from e
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest = {
        "format": FORMAT,
        "files": hashes,
        "spec_hash": spec.spec_hash if spec else None,
        "family": spec.model.family if spec else model_config.get("family"),
        "datasets": [
            {"role": i.role, "sha256": i.sha256, "path": i.path, "table": i.table, "version": i.version}
            for i in spec.inputs
        ]
        if spec
        else [],
        "device": device.model_dump(mode="json") if device else None,
        "torch_version": torch.__version__,
        "timings": timings or {},
        "created_at": datetime.now(UTC).isoformat(),
    }
    files[MANIFEST] = _json_bytes(manifest)
    hashes[MANIFEST] = hashlib.sha256(files[MANIFEST]).hexdigest()

    # build beside the target, then swap it in, so readers never see a half-written artifact
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(tmp / name, data)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)  # the swap failed half-way: put the previous artifact back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return {str(out / name): digest for name, digest in hashes.items()}


def load_artifact(model_dir: Path | str, *, expected_manifest_sha256: str | None = None) -> LoadedArtifact:
    """Verify and load an artifact directory; raise ``ArtifactIntegrityError`` naming the offending file."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ArtifactIntegrityError(f"model artifact {d}: not a directory; pass the artifact's directory")
    manifest_bytes = _read(d, MANIFEST)
    if expected_manifest_sha256 and hashlib.sha256(manifest_bytes).hexdigest() != expected_manifest_sha256:
        raise ArtifactIntegrityError(f"model artifact {d}: {MANIFEST} does not match the expected sha256")
    try:
        manifest = json.loads(manifest_bytes)
        listed: dict[str, str] = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(listed, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactIntegrityError(
            f"model artifact {d}: {MANIFEST} is not a {FORMAT} manifest ({e})"
        ) from e
    present = {p.relative_to(d).as_posix() for p in d.rglob("*") if not p.is_dir()} - {MANIFEST}
    expected = set(listed)
    if missing := sorted(expected - present):
        raise ArtifactIntegrityError(f"model artifact {d}: {missing[0]} is missing (listed in {MANIFEST})")
    if extra := sorted(present - expected):
        raise ArtifactIntegrityError(
            f"model artifact {d}: unexpected file {extra[0]} (not in {MANIFEST}); remove it or re-export"
        )
    for required in (WEIGHTS, MODEL, METRICS):
        if required not in listed:
            raise ArtifactIntegrityError(f"model artifact {d}: {MANIFEST} does not list {required}")
    data: dict[str, bytes] = {}
    for name, want in listed.items():
        data[name] = _read(d, name)
        got = hashlib.sha256(data[name]).hexdigest()
        if got != want:
            raise ArtifactIntegrityError(
                f"model artifact {d}: {name} sha256 mismatch (manifest {want[:16]}…, file {got[:16]}…); "
                "the file was modified or corrupted — re-train or re-fetch the artifact"
            )
    try:
        state_dict = st_load(data[WEIGHTS])
        model_config = json.loads(data[MODEL])
        metrics = json.loads(data[METRICS])
    except (SafetensorError, ValueError) as e:
        raise ArtifactIntegrityError(f"model artifact {d}: cannot parse its files ({e})") from e
    return LoadedArtifact(state_dict, model_config, metrics, manifest)


def update_artifact(
    model_dir: Path | str, files: dict[str, bytes | None], *, manifest: dict[str, Any] | None = None
) -> str:
    """Write (bytes) or remove (None) the report files ``files`` of the artifact at ``model_dir`` and list
    them in its manifest with their sha256 (keys in ``manifest`` are set too); the manifest's new sha256.
    The caller has verified the artifact: this only keeps the manifest true to the files it changes."""
    d = Path(model_dir)
    for name in files:
        _check_extra_name(name)
    path = d / MANIFEST
    current = json.loads(path.read_bytes())
    listed: dict[str, str] = current["files"]
    for name, data in files.items():
        target = d / name
        if data is None:
            target.unlink(missing_ok=True)
            listed.pop(name, None)
            with contextlib.suppress(OSError):  # an emptied folder goes too (load_artifact ignores dirs)
                target.parent.rmdir()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        listed[name] = hashlib.sha256(data).hexdigest()
    current.update(manifest or {})
    current["files"] = dict(sorted(listed.items()))
    body = _json_bytes(current)
    atomic_write_bytes(path, body)
    return hashlib.sha256(body).hexdigest()


def _read(d: Path, name: str) -> bytes:
    try:
        return (d / name).read_bytes()
    except OSError as e:
        raise ArtifactIntegrityError(f"model artifact {d}: cannot read {name} ({e.strerror})") from e
