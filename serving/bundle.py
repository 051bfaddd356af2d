"""Function bundles: a model artifact plus a signed manifest, the unit the registry stores and the gateway serves.

Layout::

    <bundle>/manifest.json    canonical JSON (sorted keys, compact, UTF-8): FunctionManifest
    <bundle>/signature.json   {"scheme": "eip191", "publisher": "0xChecksumAddr", "signature": "0x…"}
    <bundle>/model/…          the model artifact, exactly as gpu_jobs.artifacts wrote it

``version`` is the first 16 hex chars of the sha256 of the canonical JSON of the manifest without ``version``
and ``created_at``: the same model, name and settings always get the same version, and any change to a file,
the schemas or the settings gives a new one. The publisher signs the exact bytes of ``manifest.json``
(EIP-191 ``personal_sign``), and the manifest pins the sha256 of every other file, so anyone holding
``manifest.json`` + ``signature.json`` can check who published a version (:func:`recover_publisher`), and
:func:`verify_bundle` refuses a bundle with any modified, missing or extra file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from depin_core import paths
from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes, temp_path_beside
from depin_core.names import function_name_error, is_function_name
from gpu_jobs import artifacts as A
from gpu_jobs.errors import ArtifactIntegrityError
from gpu_jobs.models.online import Predictor, load_predictor, predictor_from
from serving.errors import BundleError, UntrustedPublisher

FORMAT: Final = "depin-function/1"
MANIFEST, SIGNATURE, MODEL_DIR = "manifest.json", "signature.json", "model"
SCHEME = "eip191"
DEFAULT_MAX_BATCH_SIZE = 1024
MAX_BUNDLE_BYTES = 512 * 2**20  # a packed bundle; the range/anomaly models are a few KiB
MAX_MEMBERS = 1000
DEFAULT_KEY_FILE = paths.PUBLISHER_KEY_FILE
_VERSION = re.compile(r"^[0-9a-f]{16}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


# ------------------------------------------------------------------------------------------- manifest


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetLineage(_Frozen):
    role: str
    sha256: str


class DataSummary(_Frozen):
    vehicles: int | None = None
    rows: int | None = None
    first: str | None = None
    last: str | None = None


class Lineage(_Frozen):
    """Where the model came from: the training job's inputs and spec, the data it covered, device, metrics."""

    datasets: list[DatasetLineage] = Field(default_factory=list)
    spec_hash: str | None = None
    data: DataSummary | None = None
    device: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    torch_version: str | None = None


class FunctionManifest(_Frozen):
    """``manifest.json`` of a function bundle (see the module docstring)."""

    format: Literal["depin-function/1"] = FORMAT
    name: str
    version: str = Field(pattern=_VERSION.pattern)
    family: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    max_batch_size: int = Field(ge=1, le=1_000_000)
    example: list[dict[str, Any]] = Field(min_length=1)
    files: dict[str, str]
    lineage: Lineage
    created_at: str


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its manifest and who signed it."""

    path: Path
    manifest: FunctionManifest
    publisher: str  # checksum address
    signature: str  # 0x… hex

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def signature_doc(self) -> dict[str, str]:
        """The content of ``signature.json``."""
        return {"scheme": SCHEME, "publisher": self.publisher, "signature": self.signature}


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/inf."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def content_version(manifest: Mapping[str, Any]) -> str:
    """The version of a manifest: sha256[:16] of its canonical JSON without ``version`` and ``created_at``."""
    body = {k: v for k, v in manifest.items() if k not in ("version", "created_at")}
    return hashlib.sha256(canonical_json(body)).hexdigest()[:16]


def valid_name(name: Any) -> str:
    """``name`` if it is a valid function name (:mod:`serving.names`), else ``BundleError``."""
    if not is_function_name(name):
        raise BundleError(function_name_error(name))
    return name


# ------------------------------------------------------------------------------------------- signing


def sign_manifest(manifest_bytes: bytes, account: LocalAccount) -> dict[str, str]:
    """``signature.json`` content: the EIP-191 signature of ``manifest_bytes`` by ``account``."""
    signed = account.sign_message(encode_defunct(primitive=manifest_bytes))
    return {
        "scheme": SCHEME,
        "publisher": account.address,
        "signature": "0x" + signed.signature.hex().removeprefix("0x"),
    }


def recover_publisher(manifest_bytes: bytes, signature: Mapping[str, Any]) -> str:
    """Check ``signature.json`` content against the exact bytes of ``manifest.json``; return the publisher's
    checksum address, or raise ``BundleError`` naming ``signature.json``."""
    if not isinstance(signature, Mapping) or signature.get("scheme") != SCHEME:
        raise BundleError(f"{SIGNATURE}: scheme must be {SCHEME!r}; re-sign the bundle with depin publish")
    claimed, sig = signature.get("publisher"), signature.get("signature")
    if not isinstance(claimed, str) or not is_address(claimed):
        raise BundleError(
            f"{SIGNATURE}: publisher {claimed!r} is not an Ethereum address; re-sign the bundle"
        )
    if not isinstance(sig, str) or not re.fullmatch(r"0x[0-9a-fA-F]{130}", sig):
        raise BundleError(f"{SIGNATURE}: signature must be 0x + 130 hex chars (65 bytes); re-sign the bundle")
    try:
        signer = Account.recover_message(encode_defunct(primitive=manifest_bytes), signature=sig)
    except Exception as e:  # eth-keys raises assorted errors for malformed signatures
        raise BundleError(
            f"{SIGNATURE}: the signature is malformed ({type(e).__name__}); re-sign the bundle"
        ) from e
    if signer.lower() != claimed.lower():
        raise BundleError(
            f"{SIGNATURE}: the signature does not match {MANIFEST} (it recovers to {signer}, not the claimed "
            f"publisher {to_checksum_address(claimed)}): {MANIFEST} or {SIGNATURE} was modified; re-fetch or "
            "re-publish the bundle"
        )
    return to_checksum_address(signer)


# ------------------------------------------------------------------------------------------- build


def _lineage(art: A.LoadedArtifact) -> Lineage:
    m = art.manifest
    data = art.model_config.get("data")
    return Lineage(
        datasets=[DatasetLineage(role=d["role"], sha256=d["sha256"]) for d in m.get("datasets") or []],
        spec_hash=m.get("spec_hash"),
        data=DataSummary(**{k: data.get(k) for k in ("vehicles", "rows", "first", "last")})
        if isinstance(data, dict)
        else None,
        device=m.get("device"),
        metrics=art.metrics,
        torch_version=m.get("torch_version"),
    )


def build_bundle(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    name: str,
    account: LocalAccount,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> Bundle:
    """Package the model artifact ``model_dir`` as function ``name`` into ``out_dir`` (absent or empty),
    signed by ``account``. The model is verified and its example input run before anything is written."""
    valid_name(name)
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    src, out = Path(model_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"bundle output {out} exists and is not an empty directory; choose a new directory")
    art = A.load_artifact(src)  # verifies every file of the artifact
    listed = [*art.manifest["files"], A.MANIFEST]
    data = {f"{MODEL_DIR}/{rel}": (src / rel).read_bytes() for rel in listed}
    files = {rel: hashlib.sha256(b).hexdigest() for rel, b in data.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for rel, b in data.items():
            atomic_write_bytes(tmp / rel, b)
        copied = A.load_artifact(tmp / MODEL_DIR)  # what the bundle holds is what we describe and test
        pred = predictor_from(copied.state_dict, copied.model_config)
        pred(pred.example)  # the warm-up input must run
        body = FunctionManifest(
            name=name,
            version="0" * 16,
            family=pred.family,
            input_schema=pred.input_schema,
            output_schema=pred.output_schema,
            max_batch_size=max_batch_size,
            example=pred.example,
            files=files,
            lineage=_lineage(copied),
            created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        ).model_dump(mode="json")
        body["version"] = content_version(body)
        manifest_bytes = canonical_json(body)
        signature = sign_manifest(manifest_bytes, account)
        atomic_write_bytes(tmp / MANIFEST, manifest_bytes)
        atomic_write_bytes(tmp / SIGNATURE, canonical_json(signature))
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify_bundle(out)


# ------------------------------------------------------------------------------------------- verify


def _read(path: Path, rel: str) -> bytes:
    p = path / rel
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise BundleError(f"bundle {path}: {rel} is not a regular file; rebuild the bundle")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {path}: {rel} is missing; rebuild or re-fetch the bundle") from None
    except OSError as e:
        raise BundleError(f"bundle {path}: cannot read {rel} ({e.strerror})") from e


def _tree(path: Path) -> set[str]:
    """Relative POSIX paths of every file under ``path``; anything but regular files and dirs is refused."""
    out = set()
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        mode = p.lstat().st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise BundleError(f"bundle {path}: {rel} is not a regular file (link or device); remove it")
        out.add(rel)
    return out


def read_signature(path: Path) -> dict[str, Any]:
    """Parse ``signature.json`` of the bundle at ``path``."""
    try:
        doc = json.loads(_read(path, SIGNATURE))
    except ValueError as e:
        raise BundleError(f"bundle {path}: {SIGNATURE} is not JSON ({e}); re-sign the bundle") from e
    if not isinstance(doc, dict):
        raise BundleError(f"bundle {path}: {SIGNATURE} must be a JSON object; re-sign the bundle")
    return doc


def verify_bundle(path: Path | str, *, trusted: Collection[str] | None = None) -> Bundle:
    """Verify the bundle directory ``path``: signature over ``manifest.json``, publisher in ``trusted``
    (``None``: any valid signature), format, version = content hash, every file's sha256, no missing or extra
    file. Raises ``BundleError`` naming the file or field."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle {path}: not a directory; pass an unpacked bundle directory")
    manifest_bytes = _read(path, MANIFEST)
    signature = read_signature(path)
    try:
        publisher = recover_publisher(manifest_bytes, signature)
    except BundleError as e:
        raise BundleError(f"bundle {path}: {e}") from None
    if trusted is not None and publisher.lower() not in {a.lower() for a in trusted}:
        raise UntrustedPublisher(
            f"bundle {path}: publisher {publisher} is not trusted; add its address to the trusted publishers "
            "(or publish with a trusted key)"
        )
    manifest = parse_manifest(manifest_bytes, where=f"bundle {path}: ")
    expected = {*manifest.files, MANIFEST, SIGNATURE}
    present = _tree(path)
    if missing := sorted(expected - present):
        raise BundleError(
            f"bundle {path}: {missing[0]} is missing (listed in {MANIFEST}); re-fetch the bundle"
        )
    if extra := sorted(present - expected):
        raise BundleError(f"bundle {path}: unexpected file {extra[0]} (not in {MANIFEST}); remove it")
    for rel, want in sorted(manifest.files.items()):
        got = hashlib.sha256(_read(path, rel)).hexdigest()
        if got != want:
            raise BundleError(
                f"bundle {path}: {rel} sha256 mismatch ({MANIFEST} {want[:16]}…, file {got[:16]}…): the file "
                "was modified or corrupted; re-fetch or rebuild the bundle"
            )
    return Bundle(path=path, manifest=manifest, publisher=publisher, signature=signature["signature"])


def parse_manifest(manifest_bytes: bytes, *, where: str = "") -> FunctionManifest:
    """Parse and check ``manifest.json`` bytes (format, canonical form, version, names, file paths)."""
    try:
        raw = json.loads(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"{where}{MANIFEST} is not JSON ({e}); rebuild the bundle") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise BundleError(f"{where}{MANIFEST}: format {fmt!r} is not {FORMAT!r}; rebuild the bundle")
    try:
        manifest = FunctionManifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise BundleError(f"{where}{MANIFEST}: field {loc}: {err['msg']}; rebuild the bundle") from None
    if canonical_json(raw) != manifest_bytes:
        raise BundleError(f"{where}{MANIFEST} is not in canonical form; rebuild the bundle")
    if (want := content_version(raw)) != manifest.version:
        raise BundleError(
            f"{where}{MANIFEST}: version {manifest.version} is not its content hash {want}; rebuild the bundle"
        )
    try:
        valid_name(manifest.name)
    except BundleError as e:
        raise BundleError(f"{where}{MANIFEST}: field name: {e}") from None
    for rel, digest in manifest.files.items():
        _check_member_name(rel, where=f"{where}{MANIFEST}: files")
        if rel in (MANIFEST, SIGNATURE) or not rel.startswith(f"{MODEL_DIR}/"):
            raise BundleError(
                f"{where}{MANIFEST}: files lists {rel!r}; only {MODEL_DIR}/… files belong there"
            )
        if not _SHA256.match(digest):
            raise BundleError(f"{where}{MANIFEST}: files[{rel!r}] is not a sha256 hex digest")
    return manifest


def predictor(bundle: Bundle, *, device: str = "cpu") -> Predictor:
    """Load the bundle's model (re-verified by ``gpu_jobs.artifacts.load_artifact``) as a ``Predictor``,
    checking that it matches the manifest's family and schemas."""
    try:
        pred = load_predictor(bundle.path / MODEL_DIR, device=device)
    except ArtifactIntegrityError as e:
        raise BundleError(f"bundle {bundle.path}: {e}") from e
    m = bundle.manifest
    if (pred.family, pred.input_schema, pred.output_schema) != (m.family, m.input_schema, m.output_schema):
        raise BundleError(
            f"bundle {bundle.path}: {MANIFEST} family/schemas differ from what the model serves (built by "
            "another depin version?); rebuild the bundle"
        )
    return pred


# ------------------------------------------------------------------------------------------- pack / unpack


def _check_member_name(name: str, *, where: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise BundleError(f"{where}: unsafe path {name!r} (absolute, '..', '.' or empty part); refused")
    return p


def pack_bundle(path: Path | str) -> bytes:
    """A deterministic uncompressed tar (ustar) of the bundle: ``manifest.json``, ``signature.json`` and the
    files the manifest lists, sorted, with zeroed owners and times."""
    path = Path(path)
    manifest = parse_manifest(_read(path, MANIFEST), where=f"bundle {path}: ")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for rel in sorted({MANIFEST, SIGNATURE, *manifest.files}):
            data = _read(path, rel)
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime, info.type = len(data), 0o644, 0, tarfile.REGTYPE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_bundle(data: bytes, dest: Path | str, *, max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
    """Extract a packed bundle into ``dest`` (absent or empty) and return it; the caller then runs
    :func:`verify_bundle`. Only regular files (and directories) are accepted: no absolute or ``..`` paths, no
    links or devices, no duplicates, at most ``max_bytes`` in all."""
    dest = Path(dest)
    if len(data) > max_bytes:
        raise BundleError(f"bundle upload is {len(data)} bytes, over the {max_bytes}-byte limit; refused")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"unpack destination {dest} exists and is not an empty directory")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            files = _safe_members(tar.getmembers(), max_bytes)
            dest.mkdir(parents=True, exist_ok=True)
            root = dest.resolve()
            try:
                for m in files:
                    target = (root / m.name).resolve()
                    if root not in target.parents:
                        raise BundleError(
                            f"bundle archive: {m.name!r} resolves outside the destination; refused"
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    assert src is not None
                    with open(target, "xb") as fh:
                        fh.write(src.read(m.size))
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(
            f"bundle upload is not an uncompressed tar archive ({e}); send pack_bundle output"
        ) from e
    return dest


def _safe_members(members: list[tarfile.TarInfo], max_bytes: int) -> list[tarfile.TarInfo]:
    """The regular-file members, after refusing unsafe names, links, special files, duplicates, oversize."""
    if len(members) > MAX_MEMBERS:
        raise BundleError(f"bundle archive has {len(members)} entries, over the {MAX_MEMBERS} limit; refused")
    total, seen, files = 0, set(), []
    for m in members:
        _check_member_name(m.name.removesuffix("/") if m.isdir() else m.name, where="bundle archive")
        if m.isdir():
            continue
        if not m.isreg():
            raise BundleError(
                f"bundle archive: {m.name!r} is a link or special file; only regular files allowed"
            )
        if m.name in seen:
            raise BundleError(f"bundle archive: {m.name!r} appears twice; refused")
        seen.add(m.name)
        total += m.size
        if total > max_bytes:
            raise BundleError(f"bundle archive expands past the {max_bytes}-byte limit; refused")
        files.append(m)
    return files


# ------------------------------------------------------------------------------------------- publisher key


class PublisherSettings(BaseSettings):
    """Where the publisher's signing key comes from: ``DEPIN_PUBLISHER_KEY`` (hex), else the dev key file
    ``DEPIN_PUBLISHER_KEY_FILE`` (default :data:`depin_core.paths.PUBLISHER_KEY_FILE`, created 0600 on first use)."""

    model_config = SettingsConfigDict(env_prefix="DEPIN_PUBLISHER_", extra="ignore")

    key: SecretStr | None = None
    key_file: Path = DEFAULT_KEY_FILE


def load_publisher_account(
    key: SecretStr | str | None = None, *, key_file: Path | str | None = None, create: bool = True
) -> LocalAccount:
    """The publisher's account: ``key`` if given, else ``DEPIN_PUBLISHER_KEY``, else the dev key file
    (created with mode 0600 when absent and ``create``). The key is never logged or put in a message."""
    settings = PublisherSettings()
    secret = key if key is not None else settings.key
    if secret is not None:
        raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        return _account(raw.strip(), "DEPIN_PUBLISHER_KEY")
    path = Path(key_file) if key_file is not None else settings.key_file
    if path.exists():
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"publisher key file {path} is readable by others (mode {mode & 0o777:o}); chmod 600 it"
            )
        return _account(path.read_text().strip(), f"publisher key file {path}")
    if not create:
        raise ConfigError(f"no publisher key: set DEPIN_PUBLISHER_KEY or create {path}")
    account = Account.create()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = temp_path_beside(path)  # mkstemp: mode 0600; written whole, then linked into place
    try:
        tmp.write_text(account.key.hex().removeprefix("0x") + "\n")
        os.link(tmp, path)  # fails if another process created the key first: use theirs
    except FileExistsError:
        return load_publisher_account(key_file=path, create=False)
    finally:
        tmp.unlink(missing_ok=True)
    return account


def _account(raw: str, where: str) -> LocalAccount:
    if not _KEY.match(raw):
        raise ConfigError(f"{where} is not a secp256k1 private key (64 hex chars, optional 0x); fix it")
    try:
        return Account.from_key(raw)
    except Exception:  # an out-of-range key; never chain (the exception may hold the key)
        raise ConfigError(f"{where} is not a valid secp256k1 private key; generate a new one") from None
