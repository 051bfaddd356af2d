"""Function bundles from REAL model artifacts: build → verify, content-addressed versions, lineage, signatures,
tamper and trust checks, safe pack/unpack, the publisher key."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount
from pydantic import SecretStr

from depin_core.errors import ConfigError, PermanentError
from gpu_jobs.artifacts import load_artifact, write_artifact
from gpu_jobs.errors import ArtifactIntegrityError
from gpu_jobs.models.online import load_predictor
from serving.bundle import (
    FORMAT,
    Bundle,
    PublisherSettings,
    build_bundle,
    canonical_json,
    content_version,
    load_publisher_account,
    pack_bundle,
    predictor,
    recover_publisher,
    sign_manifest,
    unpack_bundle,
    valid_name,
    verify_bundle,
)
from serving.errors import BundleError
from tests.support.serving import MakeBundle

MODEL_FILES = {"model/weights.safetensors", "model/model.json", "model/metrics.json", "model/manifest.json"}


def copy_bundle(bundle: Bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle.path, dst)
    return dst


# ------------------------------------------------------------------------------------------ build / verify


def test_build_verify_round_trip(range_bundle: Bundle, range_artifact: Path, publisher: LocalAccount) -> None:
    b = range_bundle
    m = b.manifest
    assert m.format == FORMAT and m.name == "range-fn" and m.family == "range" and m.max_batch_size == 1024
    assert len(m.version) == 16 and int(m.version, 16) >= 0
    assert set(m.files) == MODEL_FILES
    for rel, digest in m.files.items():
        assert hashlib.sha256((b.path / rel).read_bytes()).hexdigest() == digest
        assert (b.path / rel).read_bytes() == (range_artifact / rel.removeprefix("model/")).read_bytes()
    assert {p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file()} == {
        *MODEL_FILES, "manifest.json", "signature.json"
    }  # fmt: skip
    raw = (b.path / "manifest.json").read_bytes()
    assert canonical_json(json.loads(raw)) == raw, "manifest.json is canonical JSON"
    sig = json.loads((b.path / "signature.json").read_bytes())
    assert sig == {"scheme": "eip191", "publisher": publisher.address, "signature": b.signature}
    assert b.publisher == publisher.address == b.signature_doc()["publisher"]

    again = verify_bundle(b.path, trusted=[publisher.address.lower()])
    assert again.manifest == m and again.publisher == publisher.address
    assert (
        m.example and m.input_schema["type"] == "object" and "kwh_per_100km" in m.output_schema["properties"]
    )


def test_lineage(range_bundle: Bundle, anomaly_bundle: Bundle, range_artifact: Path) -> None:
    art = load_artifact(range_artifact)
    lin = range_bundle.manifest.lineage
    assert [d.model_dump() for d in lin.datasets] == [
        {"role": d["role"], "sha256": d["sha256"]} for d in art.manifest["datasets"]
    ]
    assert lin.datasets and lin.datasets[0].role == "telemetry" and len(lin.datasets[0].sha256) == 64
    assert lin.spec_hash == art.manifest["spec_hash"] and len(lin.spec_hash or "") == 64
    assert lin.data is not None and lin.data.vehicles == 10 and lin.data.rows and lin.data.rows > 0
    assert lin.data.first and lin.data.last and lin.data.first < lin.data.last
    assert lin.data.first.endswith("Z")
    assert lin.device and lin.device["type"] == "cpu" and lin.torch_version == art.manifest["torch_version"]
    assert lin.metrics == art.metrics and "mae" in lin.metrics
    assert "path" not in json.dumps(lin.model_dump()), "local paths are not lineage"
    alin = anomaly_bundle.manifest.lineage
    assert alin.spec_hash != lin.spec_hash and alin.data == lin.data and "n_train_windows" in alin.metrics


def test_version_is_a_content_hash(make_bundle: MakeBundle, range_artifact: Path, tmp_path: Path) -> None:
    a = make_bundle(range_artifact, "fn")
    b = make_bundle(range_artifact, "fn")
    assert a.version == b.version and a.path != b.path, "same model + name + settings → same version"
    raw = json.loads((a.path / "manifest.json").read_bytes())
    assert content_version(raw) == a.version
    assert make_bundle(range_artifact, "fn2").version != a.version
    assert make_bundle(range_artifact, "fn", max_batch_size=64).version != a.version

    art = load_artifact(range_artifact)
    state = {k: v + 1e-3 for k, v in art.state_dict.items()}
    other = tmp_path / "other-model"
    write_artifact(other, state_dict=state, model_config=art.model_config, metrics=art.metrics)
    assert make_bundle(other, "fn").version != a.version


def test_predictor_loads_through_artifact_verification(range_bundle: Bundle, range_artifact: Path) -> None:
    pred = predictor(range_bundle)
    assert pred(pred.example) == load_predictor(range_artifact)(pred.example)
    assert pred.input_schema == range_bundle.manifest.input_schema
    weights = range_bundle.path / "model" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.safetensors"):
        predictor(range_bundle)  # a bundle modified after it was verified


def test_build_refusals(
    make_bundle: MakeBundle, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match="function name 'Bad Name'"):
        make_bundle(range_artifact, "Bad Name")
    with pytest.raises(ConfigError, match="max_batch_size"):
        make_bundle(range_artifact, "fn", max_batch_size=0)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        build_bundle(range_artifact, full, name="fn", account=publisher)
    bad = tmp_path / "bad-model"
    shutil.copytree(range_artifact, bad)
    (bad / "model.json").write_text("{}")
    with pytest.raises(ArtifactIntegrityError, match=r"model\.json"):
        build_bundle(bad, tmp_path / "out", name="fn", account=publisher)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("name", ["a", "range-fn", "fn_2", "0x", "a" * 63])
def test_valid_names(name: str) -> None:
    assert valid_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "_a", "a b", "a/b", "a.b", "..", "a" * 64, "é", None, 3])
def test_invalid_names(name: object) -> None:
    with pytest.raises(BundleError, match="function name"):
        valid_name(name)


# ------------------------------------------------------------------------------------------ tampering


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_file_is_named(range_bundle: Bundle) -> None:
    for rel in sorted(MODEL_FILES):
        _flip(range_bundle.path / rel)
        with pytest.raises(BundleError) as err:
            verify_bundle(range_bundle.path)
        assert rel in str(err.value) and "sha256 mismatch" in str(err.value)
        _flip(range_bundle.path / rel)  # back
    verify_bundle(range_bundle.path)


def test_tampered_manifest_breaks_the_signature(range_bundle: Bundle) -> None:
    path = range_bundle.path / "manifest.json"
    raw = json.loads(path.read_bytes())
    raw["max_batch_size"] = 1_000_000
    path.write_bytes(canonical_json(raw))
    with pytest.raises(BundleError, match=r"signature does not match manifest\.json"):
        verify_bundle(range_bundle.path)
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(BundleError, match=r"manifest\.json"):
        verify_bundle(range_bundle.path)


def test_tampered_signature_is_named(range_bundle: Bundle, other_publisher: LocalAccount) -> None:
    path = range_bundle.path / "signature.json"
    good = json.loads(path.read_bytes())
    s = good["signature"]
    variants = {
        "flipped byte": {**good, "signature": s[:10] + ("0" if s[10] != "0" else "1") + s[11:]},
        "other publisher claimed": {**good, "publisher": other_publisher.address},
        "truncated": {**good, "signature": s[:-2]},
        "wrong scheme": {**good, "scheme": "eip712"},
        "not an address": {**good, "publisher": "0x1234"},
    }
    for case, doc in variants.items():
        path.write_bytes(canonical_json(doc))
        with pytest.raises(BundleError, match=r"signature\.json") as err:
            verify_bundle(range_bundle.path)
        assert "re-" in str(err.value), case
    path.write_text("not json")
    with pytest.raises(BundleError, match=r"signature\.json is not JSON"):
        verify_bundle(range_bundle.path)


def test_resigned_manifest_with_stale_version(range_bundle: Bundle, publisher: LocalAccount) -> None:
    """A trusted publisher's signature does not make an inconsistent manifest valid."""
    raw = json.loads((range_bundle.path / "manifest.json").read_bytes())
    raw["max_batch_size"] = 8  # content changed, version not recomputed
    body = canonical_json(raw)
    (range_bundle.path / "manifest.json").write_bytes(body)
    (range_bundle.path / "signature.json").write_bytes(canonical_json(sign_manifest(body, publisher)))
    with pytest.raises(BundleError, match="is not its content hash"):
        verify_bundle(range_bundle.path, trusted=[publisher.address])
    raw["format"] = "depin-function/0"
    body = canonical_json(raw)
    (range_bundle.path / "manifest.json").write_bytes(body)
    (range_bundle.path / "signature.json").write_bytes(canonical_json(sign_manifest(body, publisher)))
    with pytest.raises(BundleError, match="format 'depin-function/0'"):
        verify_bundle(range_bundle.path)


def test_extra_missing_and_linked_files(range_bundle: Bundle) -> None:
    extra = range_bundle.path / "model" / "evil.py"
    extra.write_text("print('hi')")
    with pytest.raises(BundleError, match=r"unexpected file model/evil\.py"):
        verify_bundle(range_bundle.path)
    extra.unlink()
    weights = range_bundle.path / "model" / "metrics.json"
    moved = weights.read_bytes()
    weights.unlink()
    with pytest.raises(BundleError, match=r"model/metrics\.json is missing"):
        verify_bundle(range_bundle.path)
    target = range_bundle.path.parent / "metrics.json"
    target.write_bytes(moved)
    weights.symlink_to(target)
    with pytest.raises(BundleError, match=r"model/metrics\.json is not a regular file"):
        verify_bundle(range_bundle.path)
    weights.unlink()
    weights.write_bytes(moved)
    (range_bundle.path / "signature.json").unlink()
    with pytest.raises(BundleError, match=r"signature\.json is missing"):
        verify_bundle(range_bundle.path)


def test_untrusted_publisher(
    make_bundle: MakeBundle, range_artifact: Path, publisher: LocalAccount, other_publisher: LocalAccount
) -> None:
    theirs = make_bundle(range_artifact, "range-fn", account=other_publisher)
    assert theirs.publisher == other_publisher.address
    with pytest.raises(BundleError, match=f"publisher {other_publisher.address} is not trusted"):
        verify_bundle(theirs.path, trusted=[publisher.address])
    with pytest.raises(BundleError, match="not trusted"):
        verify_bundle(theirs.path, trusted=[])
    assert verify_bundle(theirs.path, trusted=[publisher.address, other_publisher.address]).publisher == (
        other_publisher.address
    )


def test_anyone_can_check_who_published(range_bundle: Bundle, publisher: LocalAccount) -> None:
    manifest_bytes = (range_bundle.path / "manifest.json").read_bytes()
    assert recover_publisher(manifest_bytes, range_bundle.signature_doc()) == publisher.address
    with pytest.raises(BundleError, match=r"signature does not match manifest\.json"):
        recover_publisher(manifest_bytes.replace(b"range-fn", b"range-fx"), range_bundle.signature_doc())


def test_errors_are_permanent(range_bundle: Bundle) -> None:
    assert issubclass(BundleError, PermanentError)
    with pytest.raises(BundleError, match="not a directory"):
        verify_bundle(range_bundle.path / "nope")


# ------------------------------------------------------------------------------------------ pack / unpack


def test_pack_unpack_round_trip(range_bundle: Bundle, tmp_path: Path) -> None:
    data = pack_bundle(range_bundle.path)
    assert data == pack_bundle(range_bundle.path), "deterministic"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert names == sorted(names) and set(names) == {*MODEL_FILES, "manifest.json", "signature.json"}
        assert all(m.mtime == 0 and m.uid == 0 and m.isreg() for m in tar.getmembers())
    out = unpack_bundle(data, tmp_path / "unpacked")
    got = verify_bundle(out)
    assert got.manifest == range_bundle.manifest and got.publisher == range_bundle.publisher
    assert pack_bundle(out) == data
    with pytest.raises(ConfigError, match="not an empty directory"):
        unpack_bundle(data, out)


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, b""


@pytest.mark.parametrize(
    ("case", "members", "message"),
    [
        ("dotdot", [_file("manifest.json"), _file("../evil")], "unsafe path '../evil'"),
        ("nested dotdot", [_file("model/../../evil")], "unsafe path"),
        ("absolute", [_file("/etc/evil")], "unsafe path '/etc/evil'"),
        ("symlink", [_special("model/link", tarfile.SYMTYPE, "/etc/passwd")], "link or special file"),
        ("hardlink", [_file("a"), _special("b", tarfile.LNKTYPE, "a")], "link or special file"),
        ("device", [_special("dev", tarfile.CHRTYPE)], "link or special file"),
        ("fifo", [_special("fifo", tarfile.FIFOTYPE)], "link or special file"),
        ("duplicate", [_file("a"), _file("a", b"y")], "appears twice"),
        ("dot part", [_file("./model/x")], "unsafe path"),
        ("backslash", [_file("model\\..\\x")], "unsafe path"),
    ],
)
def test_unpack_refuses_unsafe_archives(case: str, members: list, message: str, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=message):
        unpack_bundle(_tar(*members), dest)
    assert not (tmp_path / "evil").exists() and not (dest.exists() and any(dest.rglob("*")))


def test_unpack_refuses_oversized_and_garbage(range_bundle: Bundle, tmp_path: Path) -> None:
    data = pack_bundle(range_bundle.path)
    with pytest.raises(BundleError, match="over the 1000-byte limit"):
        unpack_bundle(data, tmp_path / "a", max_bytes=1000)
    header = tarfile.TarInfo("model/weights.safetensors")
    header.size = 10**9  # a header claiming more than the archive holds
    lying = header.tobuf(tarfile.USTAR_FORMAT) + b"0" * 512
    with pytest.raises(BundleError, match=r"expands past the 100000-byte limit|unexpected end of data"):
        unpack_bundle(lying, tmp_path / "b", max_bytes=100_000)  # the archive fits; its claimed content not
    with pytest.raises(BundleError, match="not an uncompressed tar"):
        unpack_bundle(b"\x1f\x8b" + os.urandom(600), tmp_path / "c")
    out = unpack_bundle(_tar(_file("manifest.json", b"{}")), tmp_path / "d")
    with pytest.raises(BundleError):  # unpacking checks safety; verify_bundle checks content
        verify_bundle(out)


# ------------------------------------------------------------------------------------------ publisher key


KEY = "0x" + hashlib.sha256(b"depin-test-env-key").hexdigest()


def test_publisher_key_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEPIN_PUBLISHER_KEY", KEY)
    acct = load_publisher_account(key_file=tmp_path / "unused.key")
    assert acct.key.hex().removeprefix("0x") == KEY[2:]
    assert not (tmp_path / "unused.key").exists()
    settings = PublisherSettings()
    assert KEY[2:] not in repr(settings) and KEY[2:] not in str(settings.model_dump())
    assert load_publisher_account(SecretStr(KEY)).address == acct.address


def test_publisher_key_errors_do_not_leak_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for bad in ("0x" + "zz" * 32, KEY[:-2], "0x" + "00" * 32, "0x" + "ff" * 32):
        monkeypatch.setenv("DEPIN_PUBLISHER_KEY", bad)
        with pytest.raises(ConfigError, match="DEPIN_PUBLISHER_KEY") as err:
            load_publisher_account()
        assert bad[2:] not in str(err.value) + repr(err.value)
        assert err.value.__cause__ is None, "the underlying error (which may hold the key) is not chained"
        assert err.value.__context__ is None or err.value.__suppress_context__


def test_dev_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEPIN_PUBLISHER_KEY", raising=False)
    path = tmp_path / ".depin" / "keys" / "publisher.key"
    first = load_publisher_account(key_file=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_publisher_account(key_file=path).address == first.address, "reused, not regenerated"
    monkeypatch.setenv("DEPIN_PUBLISHER_KEY_FILE", str(path))
    assert load_publisher_account().address == first.address
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_publisher_account(key_file=path)
    with pytest.raises(ConfigError, match="no publisher key"):
        load_publisher_account(key_file=tmp_path / "absent.key", create=False)
