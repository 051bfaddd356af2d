"""Vehicle data minimised before it leaves this machine: the inputs a job sends to an untrusted node.

:func:`prepare` turns a ``JobSpec`` into one whose inputs are local, minimised copies:

- **columns**: a telemetry file keeps only the columns its model family declares (``family.columns``); a family
  that declares none keeps every column but the location ones. Location columns (``latitude``, ``longitude``)
  never leave unless the family's ``columns`` names them.
- **vehicles**: ground-truth files keep only the rows of the vehicles in the job's telemetry.
- **identifiers**: every ``token_id`` is replaced by its pseudonym, a keyed hash (HMAC-SHA256, first 63 bits as
  an int64, so the telemetry schema is unchanged) under a key that never leaves this machine (``Pseudonyms``,
  a 0600 key file). The copies are re-sorted by ``(token_id, timestamp)``, the order the families expect.
- **model inputs** (infer): the artifact's ``train_vehicles`` / ``heldout_vehicles`` are pseudonymised too and
  its manifest updated, so a locally trained model does not carry raw identifiers to the node.

Files that need no change are not copied (their digests stay, so ``spec_hash`` only changes when the data does).
The prepared spec is what the whole run uses — the node, the local hold-out evaluation and re-scoring (on our own
copy, so verification is unaffected) and the artifact's lineage (its dataset hashes are the minimised copies').
:func:`restore_outputs` maps the pseudonyms in a scored output back to the real ``token_id``s, locally.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.dimo.schema import LOCATION_COLUMNS
from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from gpu_jobs.spec import DatasetRef, JobSpec, sha256_file

TOKEN = "token_id"
KEY_BYTES = 32
DEFAULT_KEY_FILE = Path(".depin/keys/pseudonym.key")


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
        """The pseudonym of ``token_id``: a positive int64."""
        digest = hmac.new(self._key, f"token_id:{int(token_id)}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Prepared:
    """A spec whose inputs are minimised copies under ``root``, and the pseudonym → token_id map."""

    spec: JobSpec
    root: Path
    original: JobSpec
    reverse: dict[int, int] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # input file → columns left behind

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def family_columns(family: str) -> frozenset[str] | None:
    """The telemetry columns the family declares it needs (``family.columns``), or None when it declares none."""
    from gpu_jobs.registry import load_family
    from gpu_jobs.spec import JobError

    try:
        cols = getattr(load_family(family), "columns", None)
    except JobError:  # the worker reports an unknown family as the job's failure; keep all but location here
        return None
    return None if cols is None else frozenset(cols)


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
                    vehicles.update(pq.read_table(f, columns=[TOKEN])[TOKEN].to_pylist())
    inputs: list[DatasetRef] = []
    for i, ref in enumerate(spec.inputs):
        dest = root / str(i)
        if ref.role == "model":
            inputs.append(_model_copy(ref, dest, pseudonyms))
            continue
        changed = False
        for f in _files(ref):
            rel = Path(f.name) if not ref.files else f.relative_to(ref.path)
            keep = wanted if ref.role == "telemetry" else None
            gt = vehicles if ref.role == "ground_truth" else None
            table = _minimise(pq.read_table(f), keep, gt, pseudonyms, prep, str(f))
            if table is None:
                _link(f, dest / rel)
                continue
            changed = True
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, dest / rel)
        if not changed:
            inputs.append(ref)
            shutil.rmtree(dest, ignore_errors=True)
            continue
        inputs.append(DatasetRef.from_path(dest if ref.files else dest / Path(ref.path).name, role=ref.role))
    prep.spec = spec.model_copy(update={"inputs": inputs})
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
    pseudonyms: Pseudonyms,
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
    # one keyed hash per vehicle, not per row; rows take their vehicle's pseudonym (null stays null)
    ids = table[TOKEN].unique().drop_null()
    fake = []
    for t in ids.to_pylist():
        p = pseudonyms.of(t)
        if prep.reverse.setdefault(p, int(t)) != int(t):
            raise ConfigError(
                f"pseudonym collision for token_id {t}; delete the pseudonym key file and rerun"
            )
        fake.append(p)
    column = pa.array(fake, pa.int64()).take(pc.index_in(table[TOKEN], value_set=ids))
    table = table.set_column(table.column_names.index(TOKEN), TOKEN, column)
    order = [(TOKEN, "ascending")] + (
        [("timestamp", "ascending")] if "timestamp" in table.column_names else []
    )
    return table.sort_by(order)


def _model_copy(ref: DatasetRef, dest: Path, pseudonyms: Pseudonyms) -> DatasetRef:
    """A copy of the model artifact with its vehicle lists pseudonymised (manifest updated)."""
    src = Path(ref.path)
    config = json.loads((src / "model.json").read_bytes()) if (src / "model.json").is_file() else {}
    lists = [k for k in ("train_vehicles", "heldout_vehicles") if isinstance(config.get(k), list)]
    if not lists or not ref.files:
        return ref
    shutil.copytree(src, dest)
    for k in lists:
        config[k] = sorted(pseudonyms.of(t) for t in config[k])
    atomic_write_bytes(dest / "model.json", json.dumps(config, indent=2, sort_keys=True).encode() + b"\n")
    manifest_path = dest / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_bytes())
        if isinstance(manifest.get("files"), dict) and "model.json" in manifest["files"]:
            manifest["files"]["model.json"] = sha256_file(dest / "model.json")
            atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    return DatasetRef.from_path(dest, role="model")


def restore_outputs(artifacts: dict[str, str], prep: Prepared) -> dict[str, str]:
    """Map the pseudonyms in every Parquet output with a ``token_id`` column back to the real ids (in place);
    the artifacts with their new sha256s. A pseudonym this run did not make is an error (the node invented it)."""
    out: dict[str, str] = {}
    for path, sha in artifacts.items():
        p = Path(path)
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
    return out
