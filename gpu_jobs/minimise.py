"""Vehicle data minimised before it leaves this machine: the inputs a job sends to an untrusted node.

:func:`prepare` turns a ``JobSpec`` into one whose inputs are local, minimised copies:

- **columns**: a telemetry file keeps only the columns its model family declares (``family.columns``); a family
  that declares none keeps every column but the location ones. Location columns (``latitude``, ``longitude``)
  never leave unless the family's ``columns`` names them.
- **vehicles**: ground-truth files keep only the rows of the vehicles in the job's telemetry, and stay here
  altogether when the family declares it reads none (``family.uses_ground_truth = False``).
- **identifiers**: every ``token_id`` is replaced by a pseudonym drawn from keyed hashes (HMAC-SHA256, first 63
  bits as an int64, so the telemetry schema is unchanged) under a key that never leaves this machine
  (``Pseudonyms``, a 0600 key file). Within a job the pseudonyms keep the order of the real ids (the k-th
  smallest id gets the k-th smallest hash of the job's vehicles), so the families' seeded vehicle split holds
  out the same vehicles as on a trusted runner, and per-vehicle parameters line up with the sorted real ids.
  What a node learns is that order, nothing of the ids themselves. The copies are re-sorted by
  ``(token_id, timestamp)``, the order the families expect.
- **model inputs** (infer): the artifact's ``train_vehicles`` / ``heldout_vehicles`` are pseudonymised too and
  its manifest updated, so a locally trained model does not carry raw identifiers to the node.

Files that need no change are not copied (their digests stay, so ``spec_hash`` only changes when the data does).
The prepared spec is what the whole run uses — the node, the local hold-out evaluation and re-scoring (on our own
copy, so verification is unaffected) and the artifact's lineage (its dataset hashes are the minimised copies').
:func:`restore_outputs` maps the pseudonyms back to the real ``token_id``s, locally: in a scored output, and in a
trained artifact's vehicle lists (its manifest updated), once the result is verified.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.dimo.schema import LOCATION_COLUMNS
from depin_core import paths
from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from gpu_jobs.artifacts import is_report_file, update_artifact
from gpu_jobs.errors import JobError
from gpu_jobs.models.base import ModelFamily
from gpu_jobs.registry import load_family
from gpu_jobs.spec import DatasetRef, JobSpec, sha256_file

TOKEN = "token_id"
KEY_BYTES = 32
DEFAULT_KEY_FILE = paths.PSEUDONYM_KEY_FILE


class Pseudonyms:
    """Keyed pseudonyms of vehicle ``token_id``s; the key stays on this machine."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("pseudonym key: need at least 16 bytes; delete the key file to make a new one")
        self._key = key

    def __repr__(self) -> str:
        return "Pseudonyms(key=set)"

    @classmethod
    def from_file(cls, path: Path | str) -> Pseudonyms:
        """The key in ``path`` (hex), created (mode 0600, directory 0700) on first use."""
        p = Path(path)
        if not p.is_file():
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            key = bytes.fromhex(p.read_text().strip())
        except ValueError as e:
            raise ConfigError(
                f"pseudonym key {p}: not hex; delete it to make a new one (old pseudonyms change)"
            ) from e
        return cls(key)

    def of(self, token_id: int) -> int:
        """The keyed hash of ``token_id``: a positive int64."""
        digest = hmac.new(self._key, f"token_id:{int(token_id)}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def mapping(self, token_ids: Iterable[int]) -> dict[int, int]:
        """token_id → pseudonym for one job's vehicles: their keyed hashes, assigned in the ids' order."""
        real = sorted({int(t) for t in token_ids})
        fakes = sorted(self.of(t) for t in real)
        if len(set(fakes)) != len(fakes):
            raise ConfigError(
                "pseudonym collision between two vehicles; delete the pseudonym key file and rerun"
            )
        return dict(zip(real, fakes, strict=True))


@dataclass
class Prepared:
    """A spec whose inputs are minimised copies under ``root``, and the pseudonym → token_id map."""

    spec: JobSpec
    root: Path
    original: JobSpec
    sent: list[DatasetRef | None] = field(
        default_factory=list
    )  # per original input: its copy, None: kept here
    forward: dict[int, int] = field(default_factory=dict)  # token_id → pseudonym
    reverse: dict[int, int] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # input file → columns left behind

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _family(family: str) -> ModelFamily | None:
    try:
        return load_family(family)
    except (
        JobError
    ):  # the worker reports an unknown family as the job's failure; minimise by the defaults here
        return None


def family_columns(family: str) -> frozenset[str] | None:
    """The telemetry columns the family declares it needs (``family.columns``), or None when it declares none."""
    cols = getattr(_family(family), "columns", None)
    return None if cols is None else frozenset(cols)


def family_uses_ground_truth(family: str) -> bool:
    """Whether the family reads ground-truth inputs (``family.uses_ground_truth``; undeclared: it may)."""
    return bool(getattr(_family(family), "uses_ground_truth", True))


def prepare(spec: JobSpec, root: Path | str, pseudonyms: Pseudonyms) -> Prepared:
    """Minimised copies of ``spec``'s inputs under ``root`` and the spec that names them (see the module doc)."""
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    wanted = family_columns(spec.model.family)
    prep = Prepared(spec=spec, root=root, original=spec)
    vehicles: set[int] = set()
    for ref in spec.inputs:
        if ref.role == "telemetry":
            for f in _files(ref):
                if TOKEN in pq.ParquetFile(f).schema_arrow.names:
                    vehicles.update(
                        pc.unique(pq.read_table(f, columns=[TOKEN])[TOKEN]).drop_null().to_pylist()
                    )
    listed = {t for ref in spec.inputs if ref.role == "model" for t in _vehicle_lists(Path(ref.path))[1]}
    prep.forward = pseudonyms.mapping(vehicles | listed)
    prep.reverse = {p: t for t, p in prep.forward.items()}
    uses_truth = family_uses_ground_truth(spec.model.family)
    for i, ref in enumerate(spec.inputs):
        dest = root / str(i)
        if ref.role == "ground_truth" and not uses_truth:
            prep.sent.append(None)
            continue
        if ref.role == "model":
            prep.sent.append(_model_copy(ref, dest, prep.forward))
            continue
        changed = False
        for f in _files(ref):
            rel = Path(f.name) if not ref.files else f.relative_to(ref.path)
            keep = wanted if ref.role == "telemetry" else None
            gt = vehicles if ref.role == "ground_truth" else None
            table = _minimise(pq.read_table(f), keep, gt, prep, str(f))
            if table is None:
                _link(f, dest / rel)
                continue
            changed = True
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, dest / rel)
        if not changed:
            prep.sent.append(ref)
            shutil.rmtree(dest, ignore_errors=True)
            continue
        prep.sent.append(
            DatasetRef.from_path(dest if ref.files else dest / Path(ref.path).name, role=ref.role)
        )
    prep.spec = spec.model_copy(update={"inputs": [r for r in prep.sent if r is not None]})
    return prep


def _files(ref: DatasetRef) -> list[Path]:
    return [Path(ref.path)] if not ref.files else [Path(ref.path) / f.path for f in ref.files]


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _minimise(
    table: pa.Table,
    keep: frozenset[str] | None,
    vehicles: set[int] | None,
    prep: Prepared,
    label: str,
) -> pa.Table | None:
    """``table`` reduced to ``keep`` (or all but location), to ``vehicles`` and pseudonymised; None if unchanged."""
    names = table.column_names
    if keep is None:
        drop = [n for n in names if n in LOCATION_COLUMNS]
    else:
        drop = [n for n in names if n not in keep and n != TOKEN]
    if not drop and TOKEN not in names:
        return None
    table = table.drop_columns(drop)
    if drop:
        prep.dropped[label] = drop
    if TOKEN not in names:
        return table
    if vehicles is not None:
        table = table.filter(pc.is_in(table[TOKEN], value_set=pa.array(sorted(vehicles), table[TOKEN].type)))
    # one lookup per vehicle, not per row; rows take their vehicle's pseudonym (null stays null)
    ids = table[TOKEN].unique().drop_null()
    fake = [prep.forward[int(t)] for t in ids.to_pylist()]  # (ground truth: only the job's vehicles are left)
    column = pa.array(fake, pa.int64()).take(pc.index_in(table[TOKEN], value_set=ids))
    table = table.set_column(table.column_names.index(TOKEN), TOKEN, column)
    order = [(TOKEN, "ascending")] + (
        [("timestamp", "ascending")] if "timestamp" in table.column_names else []
    )
    return table.sort_by(order)


VEHICLE_LISTS = ("train_vehicles", "heldout_vehicles")  # where a model artifact's model.json names vehicles


def _vehicle_lists(model_dir: Path) -> tuple[dict[str, Any], set[int]]:
    """(model.json of ``model_dir`` or {}, every token_id its vehicle lists name)."""
    path = model_dir / "model.json"
    config = json.loads(path.read_bytes()) if path.is_file() else {}
    ids = {int(t) for k in VEHICLE_LISTS if isinstance(config.get(k), list) for t in config[k]}
    return config, ids


def _rewrite_vehicle_lists(model_dir: Path, config: dict[str, Any], mapping: dict[int, int]) -> None:
    """Map ``config``'s vehicle lists through ``mapping`` into ``model_dir/model.json``; the manifest's
    sha256 of model.json follows. ``ConfigError`` for an id the mapping lacks."""
    for k in (k for k in VEHICLE_LISTS if isinstance(config.get(k), list)):
        unknown = sorted({int(t) for t in config[k]} - set(mapping))
        if unknown:
            raise ConfigError(f"model {model_dir}: {k} {unknown[:3]} are not the job's vehicles")
        config[k] = sorted(mapping[int(t)] for t in config[k])
    atomic_write_bytes(
        model_dir / "model.json", json.dumps(config, indent=2, sort_keys=True).encode() + b"\n"
    )
    manifest_path = model_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_bytes())
        if isinstance(manifest.get("files"), dict) and "model.json" in manifest["files"]:
            manifest["files"]["model.json"] = sha256_file(model_dir / "model.json")
            atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")


def _model_copy(ref: DatasetRef, dest: Path, forward: dict[int, int]) -> DatasetRef:
    """A copy of the model artifact with its vehicle lists pseudonymised and without its report files (the
    held-out data and plots name real vehicles; running the model needs neither), manifest updated."""
    src = Path(ref.path)
    config, ids = _vehicle_lists(src)
    report = [f.path for f in ref.files if is_report_file(f.path)]
    if not ref.files or not (ids or report):
        return ref
    shutil.copytree(src, dest)
    if report:
        update_artifact(dest, dict.fromkeys(report), manifest={"plots": {}})
    if ids:
        _rewrite_vehicle_lists(dest, config, forward)
    return DatasetRef.from_path(dest, role="model")


def restore_outputs(artifacts: dict[str, str], prep: Prepared) -> dict[str, str]:
    """Map the pseudonyms back to the real ids (in place) in every Parquet output with a ``token_id`` column
    (a scored output, a model artifact's report files) and in a model artifact's vehicle lists
    (``model.json``); an artifact's manifest follows; the artifacts with their new sha256s. A pseudonym this
    run did not make is an error (the node invented it)."""
    out: dict[str, str] = {}
    for path in artifacts:
        p = Path(path)
        if p.name == "model.json" and p.is_file():
            config, ids = _vehicle_lists(p.parent)
            if ids:
                _rewrite_vehicle_lists(p.parent, config, prep.reverse)
    for path, sha in artifacts.items():
        p = Path(path)
        if p.name in ("model.json", "manifest.json"):
            continue
        if p.suffix != ".parquet" or not p.is_file() or TOKEN not in pq.ParquetFile(p).schema_arrow.names:
            out[path] = sha
            continue
        table = pq.read_table(p)
        ids = table[TOKEN].to_pylist()
        unknown = sorted({t for t in ids if t is not None and t not in prep.reverse})
        if unknown:
            raise ConfigError(f"output {p}: token_id pseudonyms {unknown[:3]} are not the job's vehicles")
        real = pa.array([None if t is None else prep.reverse[t] for t in ids], pa.int64())
        table = table.set_column(table.column_names.index(TOKEN), TOKEN, real).sort_by(TOKEN)  # stable
        tmp = p.with_name(f".{p.name}.restore")
        pq.write_table(table, tmp)
        os.replace(tmp, p)
        out[path] = sha256_file(p)
        _follow_manifest(p)
    for path, sha in artifacts.items():  # last: the manifests above changed
        p = Path(path)
        if p.name in ("model.json", "manifest.json"):
            out[path] = sha256_file(p) if p.is_file() else sha
    return {path: out[path] for path in artifacts}


def _follow_manifest(file: Path) -> None:
    """Update the sha256 of ``file`` in the manifest of the model artifact holding it, if one lists it."""
    for root in list(file.parents)[:2]:  # the artifact's top level or one folder down (report/)
        manifest_path = root / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_bytes())
            listed = manifest.get("files")
            rel = file.relative_to(root).as_posix()
            if isinstance(listed, dict) and rel in listed:
                listed[rel] = sha256_file(file)
                atomic_write_bytes(
                    manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
                )
            return
