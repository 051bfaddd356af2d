"""Vehicle data minimised before it leaves, nothing left behind: a real range model trained and scored through a
real worker agent. What reached the agent's blob store (captured just before the runner has the job's data
deleted) holds only the family's columns, no location and no raw ``token_id``; the scores come back keyed by the
real vehicles (the same rows as a local run), and afterwards the agent's data directory holds nothing of either
job."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_jobs import api
from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.chain import AGENT_FINGERPRINT_ENV, DefaultRunnerFactory, Entry, Lease
from gpu_jobs.models.range import RangeFamily
from gpu_jobs.verify import compare_frames
from tests.support.fleet_data import FleetData
from tests.support.gpu_jobs import ENV, TOKEN
from tests.support.serving import RANGE_HP

pytestmark = pytest.mark.e2e

EXTRA = ("latitude", "longitude", "note")  # location and a column no family reads


class CapturingFactory(DefaultRunnerFactory):
    """Real agent runners whose ``purge`` first copies the agent's blob store to ``captured/<job_id>/``."""

    def __init__(self, tmp: Path, agent: AgentProcess) -> None:
        super().__init__(
            tmp / "jobs",
            env={"DEPIN_AGENT_TOKEN": TOKEN, AGENT_FINGERPRINT_ENV: agent.fingerprint or ""},
            nodes_file=tmp / "workers.json",
            local_env=ENV,
            heartbeat_timeout_s=300.0,
            connect_timeout_s=60.0,
        )
        self.agent, self.captured, self.purged = agent, tmp / "captured", []

    @contextlib.contextmanager
    def lease(self, entry: Entry, **kw: object) -> Iterator[Lease]:
        with super().lease(entry, **kw) as lease:  # type: ignore[arg-type]
            real = getattr(lease.runner, "purge", None)

            def purge(job_id: str) -> list[str]:
                assert real is not None
                shutil.copytree(self.agent.data_dir / "blobs", self.captured / job_id)
                removed = real(job_id)
                self.purged.append((job_id, removed))
                return list(removed)

            if real is not None:  # an agent runner (the local one keeps its jobs)
                lease.runner.purge = purge
            yield lease


def _with_extras(src: Path, dest: Path) -> Path:
    """A copy of the telemetry dataset with location columns and a free-text column added."""
    for f in sorted(src.rglob("*.parquet")):
        t = pq.read_table(f)
        n = t.num_rows
        t = t.append_column("latitude", pa.array(np.linspace(48.1, 48.2, n)))
        t = t.append_column("longitude", pa.array(np.linspace(11.5, 11.6, n)))
        t = t.append_column("note", pa.array(["home address"] * n))
        out = dest / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, out)
    return dest


def _blob_tables(d: Path) -> tuple[list[pa.Table], list[bytes]]:
    """(Parquet tables, other blobs' bytes) of a copied blob store."""
    tables, others = [], []
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        data = f.read_bytes()
        if data[:4] == b"PAR1":
            tables.append(pq.read_table(io.BytesIO(data)))
        else:
            others.append(data)
    return tables, others


def _job_files(data_dir: Path) -> list[str]:
    """Every file of any job in the agent's data directory (blobs, jobs, staging, outputs, manifests)."""
    roots = [data_dir / d for d in ("blobs", "jobs", "staging", "out", "manifests")]
    return sorted(
        str(p.relative_to(data_dir)) for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file()
    )


@pytest.fixture()
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", TOKEN, env=ENV) as proc:
        yield proc


def test_a_node_gets_only_minimised_pseudonymous_data_and_keeps_nothing(
    tmp_path: Path, serving_fleet: FleetData, agent: AgentProcess
) -> None:
    dataset = _with_extras(serving_fleet.telemetry, tmp_path / "telemetry")
    raw_ids = set(pl.read_parquet(list(dataset.rglob("*.parquet")))["token_id"].to_list())
    factory = CapturingFactory(tmp_path, agent)
    runner = [f"agent:{agent.url}"]
    model = tmp_path / "range-model"
    doc = api.train(
        dataset=dataset, model="range", out=model, runners=runner, params=RANGE_HP, seed=1,
        jobs_dir=tmp_path / "jobs", factory=factory,
    )  # fmt: skip
    assert doc["state"] == "SUCCEEDED" and doc["attempts"][0]["verified"] is True
    trained = json.loads((model / "model.json").read_bytes())  # back home, the model names the real vehicles
    assert (
        trained["heldout_vehicles"]
        and set(trained["train_vehicles"] + trained["heldout_vehicles"]) <= raw_ids
    )

    scores = tmp_path / "scores.parquet"
    scored = api.score(
        model_dir=model, dataset=dataset, out=scores, runners=runner, jobs_dir=tmp_path / "jobs",
        factory=factory,
    )  # fmt: skip
    assert scored["attempts"][0]["verified"] is True

    # what reached the node: the family's columns only, pseudonyms only, the same number of vehicles
    assert [j for j, _ in factory.purged] == [doc["job_id"], scored["job_id"]]
    allowed = set(RangeFamily.columns)
    for job_id, _ in factory.purged:
        tables, others = _blob_tables(factory.captured / job_id)
        assert tables, "no Parquet blob reached the agent"
        for t in tables:
            assert not set(EXTRA) & set(t.column_names) and set(t.column_names) <= allowed
            sent = set(t["token_id"].to_pylist())
            assert sent and not sent & raw_ids
        assert not any(d.startswith(b"\x89PNG") for d in others)  # the model's plots stay here
        for data in others:  # the model files sent for scoring name no raw vehicle either
            if data.lstrip().startswith(b"{"):
                listed = json.loads(data)
                for key in ("train_vehicles", "heldout_vehicles"):
                    assert not set(listed.get(key, [])) & raw_ids
    sent_ids = {
        i for t in _blob_tables(factory.captured / doc["job_id"])[0] for i in t["token_id"].to_pylist()
    }
    assert len(sent_ids) == len(raw_ids)

    # the scores came back keyed by the real vehicles: the very rows a local run gives
    local = tmp_path / "scores-local.parquet"
    api.score(
        model_dir=model, dataset=dataset, out=local, runners=["local"], jobs_dir=tmp_path / "jobs",
        factory=factory,
    )  # fmt: skip
    remote_rows, local_rows = pl.read_parquet(scores), pl.read_parquet(local)
    assert set(remote_rows["token_id"].to_list()) <= raw_ids
    assert compare_frames(remote_rows, local_rows) == []

    # nothing of either job is left on the node, and it said so
    for _, removed in factory.purged:
        assert any(r.startswith("blobs/") for r in removed) and any(r.startswith("out/") for r in removed)
    assert _job_files(agent.data_dir) == []
