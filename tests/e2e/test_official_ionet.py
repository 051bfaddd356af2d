"""Compatibility: io.net's official SDK (``ionet-cloud`` 0.4.1, ``import iocloud``) against the fake io.net API,
for every call our adapter makes, side by side with ``IonetProvider``: the fake accepts what the SDK sends and
the SDK parses what the fake answers; the adapter and the SDK agree on prices and see each other's deployments.

The SDK lives in its own venv (``<repo>/.venv-ionet``, created on first use and reused while valid);
``ionet_sdk_script.py`` runs there.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gpu_jobs.providers import IonetProvider, pick_offer, worker_name
from gpu_jobs.providers.ionet import CAAS
from tests.support.client_venvs import IONET, obtain
from tests.support.fakes.ionet import FakeIonet
from tests.support.providers import JOB_ID, make_bootstrap, make_spec

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("ionet_sdk_script.py")


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    """The SDK venv's interpreter (built on first use; see ``client_venvs.obtain``)."""
    return obtain(IONET)


class _Node:
    """A machine whose container is up at once (the SDK test needs a running deployment, not an agent)."""

    url = "http://127.0.0.1:9"

    def __init__(self, data_dir: Path, token: str) -> None:
        pass

    def start(self) -> _Node:
        return self

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeIonet]:
    with FakeIonet(tmp_path, agent_factory=_Node) as f:
        yield f


def _run_sdk(python: Path, fake: FakeIonet, name: str, adapter_id: str, tmp: Path) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp),  # the SDK's config and credential store stay out of the real home
        "IOCLOUD_DISABLE_KEYRING": "1",
        "IONET_SDK_TEST_KEY": fake.api_key,
    }
    loc = str(fake.locations[0]["id"])
    proc = subprocess.run(
        [str(python), str(SCRIPT), fake.base_url, name, adapter_id, loc],
        input=make_bootstrap().script(),
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_official_sdk_and_adapter_agree_on_the_fake(
    sdk_python: Path, fake: FakeIonet, tmp_path: Path
) -> None:
    with IonetProvider(SecretStr(fake.api_key), fake.base_url, poll_s=0.05) as ionet:
        spec = make_spec(gpu_count=1, min_vram_gb=24, max_wall_s=3600)  # + 30 min margin → 2 prepaid hours
        offer = pick_offer(ionet, spec)
        boot = make_bootstrap()  # token + this node's TLS certificate and key, all secret env
        ours = ionet.launch(offer, boot, name=worker_name(JOB_ID, 1))
        sdk_name = worker_name(JOB_ID, 2)
        calls_before = len(fake.calls)
        out = _run_sdk(sdk_python, fake, sdk_name, ours.instance_id, tmp_path)
        sdk_calls = fake.calls[calls_before:]

        assert out["version"] == IONET.version
        # hardware: the SDK parses every inventory row, string ids included, and resolves names
        rows = {(str(h["hardware_id"]), h["location"]) for h in out["hardware"]}
        assert ("203", "United States") in rows and ("7", "Germany") in rows and len(rows) == 7
        assert out["resolved"] == {"rtx": "203", "h100": 7}

        # price: the same total for the same container as the adapter's offer (8 GPUs, 2 h, anywhere)
        assert offer.offer_id == '"203":8:2' and offer.gpu_count == 8
        assert out["quote"]["total_cost_usdc"] == pytest.approx(offer.usd_per_hour * 2)
        assert out["quote"]["gpus_per_container"] == 8 and out["quote"]["available_replica_count"] == [1, 2]
        assert out["quote_at"]["available_replica_count"] == [2]  # location_ids as a JSON array string
        refused = out["price_refused"]
        assert refused["status"] == 422 and "gpus_per_container" in refused["message"]
        assert refused["errors"][0]["loc"] == ["query", "gpus_per_container"]

        # deploy: the fake accepted the SDK's body (with what the spec lacks) and the SDK parsed the answers
        sdk_body = next(b for b in fake.deploy_bodies if b["resource_private_name"] == sdk_name)
        assert sdk_body["resource_private_name"] == sdk_name and sdk_body["hardware_id"] == "203"
        assert sdk_body["gpus_per_container"] == 8
        assert (sdk_body["payment_source"], sdk_body["on_incomplete_booking"]) == ("credits", "full_refund")
        # (io.net's details carry no name, only the listing does; the container may be up already)
        assert out["created"]["name"] is None
        assert out["created"]["status"] in {"deployment requested", "running"}
        running = out["running"]
        assert running["status"] == "running" and running["url"] == _Node.url
        assert running["containers"][0]["public_url"] == _Node.url and running["gpus_per_container"] == 8
        assert running["secret_env_keys"] == ["DEPIN_AGENT_TOKEN"] and running["hardware_id"] == "203"
        assert running["cost"]["amount_paid"] == pytest.approx(0.39 * 8 * 2 * 1.02)
        assert running["locations"][0]["name"] == "United States"

        # list: pages counted from 1, all three deployments found, and the status filter
        pages = [
            q.get("page") for m, p, q in sdk_calls if p == f"{CAAS}/deployments" and q.get("page_size") == "2"
        ]
        assert pages == ["1", "2"]
        assert {d["name"] for d in out["listed"]} == {ours.name, sdk_name} and out["listed_total"] == 2
        assert out["created"]["id"] in out["running_ids"]

        # show: the SDK reads what the adapter deployed
        theirs = out["adapter_deployment"]
        assert theirs["hardware_id"] == "203" and theirs["gpus_per_container"] == 8
        assert sorted(theirs["secret_env_keys"]) == sorted(boot.env()) and theirs["traffic_port"] == 8900
        assert theirs["image_url"] == make_bootstrap().image and theirs["paid"] > 0

        # delete, and the two refusals the adapter classifies, as the SDK maps them
        assert out["deleted_status"] == "destroyed"
        assert (
            out["deploy_refused"]["status"] == 422
            and "Not enough available" in out["deploy_refused"]["message"]
        )
        assert out["missing"] == 404

        # the adapter lists the SDK's deployment too (destroyed now: not one of its live instances)
        assert out["created"]["id"] in {str(r["id"]) for r in ionet.deployments()}
        assert fake.deployments[out["created"]["id"]]["status"] == "destroyed"
        assert [i.name for i in ionet.instances()] == [ours.name]
        ionet.destroy(ours)
        assert ionet.instances() == []
        deprecated = {f"{CAAS}/hardware/max-gpus-per-container", f"{CAAS}/available-replicas"}
        assert not fake.paths() & deprecated  # neither client uses them
