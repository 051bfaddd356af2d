"""Model artifact directory: write, verify, refuse tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import MANIFEST, load_artifact, write_artifact
from gpu_jobs.errors import ArtifactIntegrityError
from gpu_jobs.spec import DatasetRef, DeviceInfo, JobSpec, sha256_file


@pytest.fixture()
def artifact(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    lin = torch.nn.Linear(3, 2)
    tied = {"w": lin.weight, "w_tied": lin.weight, "b": lin.bias, "half": torch.ones(2, dtype=torch.bfloat16)}
    spec = JobSpec(
        kind="train",
        model={"family": "toy"},
        inputs=[DatasetRef(path="/d", sha256="d" * 64)],
        outputs={"dir": str(tmp_path / "model")},
    )
    dev = DeviceInfo(type="cpu", name="cpu", torch_version=torch.__version__, threads=1)
    hashes = write_artifact(
        tmp_path / "model",
        state_dict=tied,
        model_config={"family": "toy", "features": ["a", "b", "c"], "norm": {"mean": [0.0, 1.0]}},
        metrics={"mae": 0.25},
        spec=spec,
        device=dev,
        timings={"running_s": 1.0},
    )
    return tmp_path / "model", hashes, tied


def test_round_trip_and_manifest(artifact) -> None:
    d, hashes, sd = artifact
    assert sorted(Path(p).name for p in hashes) == [
        MANIFEST,
        "metrics.json",
        "model.json",
        "weights.safetensors",
    ]
    loaded = load_artifact(d, expected_manifest_sha256=hashes[str(d / MANIFEST)])
    assert set(loaded.state_dict) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict[k], v.detach())
    assert loaded.model_config["norm"] == {"mean": [0.0, 1.0]}
    assert loaded.metrics == {"mae": 0.25}
    m = loaded.manifest
    assert m["format"] == "depin-model/1" and m["family"] == "toy" and m["device"]["type"] == "cpu"
    assert m["datasets"] == [
        {"role": "telemetry", "sha256": "d" * 64, "path": "/d", "table": None, "version": None}
    ]
    assert m["spec_hash"] and m["torch_version"] == torch.__version__ and m["created_at"]
    assert m["files"] == {Path(p).name: h for p, h in hashes.items() if not p.endswith(MANIFEST)}


def test_flipped_weight_byte_is_refused(artifact) -> None:
    d, _, _ = artifact
    w = d / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"weights\.safetensors sha256 mismatch"):
        load_artifact(d)


def test_edited_model_json_is_refused(artifact) -> None:
    d, _, _ = artifact
    cfg = json.loads((d / "model.json").read_text())
    cfg["features"] = ["x", "y", "z"]
    (d / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactIntegrityError, match=r"model\.json sha256 mismatch"):
        load_artifact(d)


def test_missing_extra_and_pinned_manifest_are_refused(artifact, tmp_path: Path) -> None:
    d, _, _ = artifact
    (d / "payload.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ArtifactIntegrityError, match=r"unexpected file payload\.pkl"):
        load_artifact(d)
    (d / "payload.pkl").unlink()
    (d / "metrics.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"metrics\.json is missing"):
        load_artifact(d)
    with pytest.raises(ArtifactIntegrityError, match="does not match the expected sha256"):
        load_artifact(d, expected_manifest_sha256="0" * 64)
    with pytest.raises(ArtifactIntegrityError, match="not a directory"):
        load_artifact(tmp_path / "nope")


def test_forged_manifest_cannot_smuggle_unparseable_weights(artifact) -> None:
    """Rewriting the manifest to match bad bytes still never gets past the safetensors parser."""
    d, _, _ = artifact
    import hashlib

    (d / "weights.safetensors").write_bytes(b"not safetensors at all")
    m = json.loads((d / MANIFEST).read_text())
    m["files"]["weights.safetensors"] = hashlib.sha256(b"not safetensors at all").hexdigest()
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match="cannot parse"):
        load_artifact(d)


def test_overwrite_policy(artifact, tmp_path: Path) -> None:
    d, _, _ = artifact
    write_artifact(d, state_dict={"w": torch.zeros(1)}, model_config={}, metrics={"v": 2})
    assert load_artifact(d).metrics == {"v": 2}  # an older artifact is replaced
    other = tmp_path / "not-an-artifact"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a model artifact"):
        write_artifact(other, state_dict={}, model_config={}, metrics={})
    with pytest.raises(ConfigError, match="JSON-able"):
        write_artifact(tmp_path / "nan", state_dict={}, model_config={}, metrics={"mae": float("nan")})


def test_returned_hashes_match_the_files(artifact) -> None:
    _, hashes, _ = artifact
    assert hashes == {p: sha256_file(p) for p in hashes}


def test_failed_swap_keeps_the_previous_artifact(artifact, monkeypatch) -> None:
    d, hashes, _ = artifact
    real_rename = Path.rename

    def rename(self: Path, target):  # the new artifact cannot be moved into place
        if self.name.startswith(f".{d.name}.tmp-"):
            raise OSError("simulated rename failure")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_artifact(d, state_dict={"w": torch.zeros(1)}, model_config={}, metrics={"v": 2})
    monkeypatch.undo()
    assert load_artifact(d, expected_manifest_sha256=hashes[str(d / MANIFEST)]).metrics == {"mae": 0.25}
    assert [p.name for p in d.parent.iterdir() if p.name.startswith(".")] == []
