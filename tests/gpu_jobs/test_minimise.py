"""``gpu_jobs.minimise``: the minimised, pseudonymised copies of a job's inputs and the way back."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.minimise import Pseudonyms, prepare, restore_outputs
from gpu_jobs.models.range import RangeFamily
from gpu_jobs.spec import DatasetRef, JobKind, JobSpec, ModelSpec, Outputs
from tests.support.gpu_jobs import toy_data
from tests.support.toy_family import IMPORT_PATH

RAW = [101, 101, 202, 303]


def _telemetry(root: Path) -> DatasetRef:
    t = pa.table(
        {
            "token_id": pa.array(RAW, pa.int64()),
            "timestamp": pa.array([4, 1, 2, 3], pa.timestamp("us", tz="UTC")),
            "speed": [1.0, 2.0, 3.0, 4.0],
            "latitude": [48.1, 48.2, 48.3, 48.4],
            "longitude": [11.1, 11.2, 11.3, 11.4],
            "note": ["a", "b", "c", "d"],
        }
    )
    (root / "tel" / "date=1").mkdir(parents=True)
    pq.write_table(t, root / "tel" / "date=1" / "part-0.parquet")
    truth = pa.table({"token_id": pa.array([101, 999], pa.int64()), "fault": ["tyre", "v12"]})
    (root / "truth").mkdir()
    pq.write_table(truth, root / "truth" / "faults.parquet")
    return DatasetRef.from_path(root / "tel")


def _spec(root: Path, family: str = "range") -> JobSpec:
    return JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family=family),
        inputs=[_telemetry(root), DatasetRef.from_path(root / "truth", role="ground_truth")],
        outputs=Outputs(dir=str(root / "out")),
    )


def test_only_the_familys_columns_and_the_jobs_vehicles_leave_under_pseudonyms(tmp_path: Path) -> None:
    keys = Pseudonyms.from_file(tmp_path / "keys" / "pseudonym.key")
    orig = _spec(tmp_path, "anomaly")  # evaluated against the fault list: it gets the job's part of it
    prep = prepare(orig, tmp_path / "prep", keys)
    tel, truth = prep.spec.inputs
    assert Path(tel.path).is_relative_to(tmp_path / "prep") and tel.sha256 != orig.inputs[0].sha256
    t = pq.read_table(Path(tel.path) / "date=1" / "part-0.parquet")
    assert set(t.column_names) == {"token_id", "timestamp", "speed"} <= set(RangeFamily.columns)
    ids = t["token_id"].to_pylist()
    assert not set(ids) & set(RAW) and sorted(prep.reverse[i] for i in ids) == sorted(RAW)
    assert ids == sorted(ids)  # re-sorted by (pseudonym, timestamp), as the families read it
    f = pq.read_table(Path(truth.path) / "faults.parquet")
    assert f["token_id"].to_pylist() == [prep.forward[101]]  # vehicle 999 is not in the job: left behind
    # the pseudonyms are the vehicles' keyed hashes, handed out in the order of the real ids
    assert sorted(prep.forward.values()) == sorted(keys.of(t) for t in set(RAW))
    assert list(prep.forward) == sorted(set(RAW)) and list(prep.forward.values()) == sorted(
        prep.forward.values()
    )
    assert stat.S_IMODE((tmp_path / "keys" / "pseudonym.key").stat().st_mode) == 0o600
    # the same key gives the same pseudonyms (verification and later runs agree); another key does not
    again = Pseudonyms.from_file(tmp_path / "keys" / "pseudonym.key")
    assert again.of(101) == keys.of(101) != Pseudonyms(b"x" * 32).of(101)
    assert "key" not in repr(keys).replace("key=set", "")


def test_ground_truth_stays_here_for_a_family_that_reads_none(tmp_path: Path) -> None:
    prep = prepare(_spec(tmp_path, "range"), tmp_path / "prep", Pseudonyms(b"k" * 32))
    assert [r.role for r in prep.spec.inputs] == ["telemetry"] and prep.sent[1] is None
    assert not list((tmp_path / "prep").rglob("faults.parquet"))


def test_a_family_without_a_declaration_keeps_its_columns_but_never_the_location(tmp_path: Path) -> None:
    prep = prepare(_spec(tmp_path, IMPORT_PATH), tmp_path / "prep", Pseudonyms(b"k" * 32))
    t = pq.read_table(Path(prep.spec.inputs[0].path) / "date=1" / "part-0.parquet")
    assert set(t.column_names) == {"token_id", "timestamp", "speed", "note"}


def test_data_without_vehicles_or_excluded_columns_is_sent_as_is(tmp_path: Path) -> None:
    data = toy_data(tmp_path)
    spec = JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family=IMPORT_PATH),
        inputs=[data],
        outputs=Outputs(dir=str(tmp_path / "out")),
    )
    prep = prepare(spec, tmp_path / "prep", Pseudonyms(b"k" * 32))
    assert prep.spec == spec and prep.spec.spec_hash == spec.spec_hash


def test_scores_map_back_to_the_real_vehicles_and_invented_ones_are_refused(tmp_path: Path) -> None:
    keys = Pseudonyms(b"k" * 32)
    prep = prepare(_spec(tmp_path), tmp_path / "prep", keys)
    out = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"token_id": [prep.forward[303], prep.forward[101]], "score": [0.3, 0.1]}), out)
    arts = restore_outputs({str(out): "old"}, prep)
    back = pq.read_table(out)
    assert back["token_id"].to_pylist() == [101, 303] and back["score"].to_pylist() == [0.1, 0.3]
    assert arts[str(out)] != "old"
    pq.write_table(pa.table({"token_id": [keys.of(555)], "score": [1.0]}), out)
    with pytest.raises(ConfigError, match="not the job's vehicles"):
        restore_outputs({str(out): "x"}, prep)
    prep.cleanup()
    assert not (tmp_path / "prep").exists()


def test_a_model_sent_for_scoring_lists_no_raw_vehicle_and_still_loads(
    tmp_path: Path, range_artifact: Path
) -> None:
    keys = Pseudonyms(b"k" * 32)
    spec = JobSpec(
        kind=JobKind.INFER,
        model=ModelSpec(family="range"),
        inputs=[_telemetry(tmp_path), DatasetRef.from_path(range_artifact, role="model")],
        outputs=Outputs(dir=str(tmp_path / "out.parquet")),
    )
    prep = prepare(spec, tmp_path / "prep", keys)
    model = Path(prep.spec.inputs[1].path)
    raw = json.loads((range_artifact / "model.json").read_bytes())["train_vehicles"]
    sent = load_artifact(model).model_config["train_vehicles"]
    assert sorted(sent) == sorted(prep.forward[t] for t in raw) and not set(sent) & set(raw)
    # a model that comes back (trained on pseudonyms) names the real vehicles again, and still loads
    files = {str(f): "stale" for f in model.iterdir()}
    restored = restore_outputs(files, prep)
    back = load_artifact(model, expected_manifest_sha256=restored[str(model / "manifest.json")])
    assert back.model_config["train_vehicles"] == sorted(raw)
    assert all(v != "stale" for k, v in restored.items() if k.endswith(("model.json", "manifest.json")))


def test_the_seeded_split_holds_out_the_same_vehicles_under_pseudonyms(tmp_path: Path) -> None:
    from gpu_jobs.models.features import split_vehicles

    real = [1000 + 7 * i for i in range(40)]
    forward = Pseudonyms(b"k" * 32).mapping(real)
    for seed in range(5):
        train, held = split_vehicles(real, holdout=0.2, seed=seed)
        p_train, p_held = split_vehicles(list(forward.values()), holdout=0.2, seed=seed)
        assert [forward[t] for t in held] == p_held.tolist() and [
            forward[t] for t in train
        ] == p_train.tolist()
    # plain keyed hashes (no order kept) would hold out other vehicles: the check can fail
    keys = Pseudonyms(b"k" * 32)
    hashed = {keys.of(t): t for t in real}
    _, h = split_vehicles(list(hashed), holdout=0.2, seed=0)
    assert sorted(hashed[p] for p in h) != split_vehicles(real, holdout=0.2, seed=0)[1].tolist()
