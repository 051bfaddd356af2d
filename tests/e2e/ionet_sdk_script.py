"""Drive the fake io.net API with io.net's official SDK (``ionet-cloud`` 0.4.x, ``import iocloud``); runs inside
its own venv (``.venv-ionet``).

Usage: ``python ionet_sdk_script.py BASE_URL NAME ADAPTER_DEPLOYMENT_ID LOCATION_ID`` with the API key in
``$IONET_SDK_TEST_KEY`` and the bootstrap script on stdin. Makes every call our adapter makes (hardware, price,
deploy, show, containers, list, delete) and prints one JSON line of what the SDK parsed. Only the standard
library and ``iocloud`` are imported here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from typing import Any

import iocloud
from iocloud.errors import NotFoundError, UnprocessableError


def main(base: str, name: str, adapter_id: str, location: str) -> dict[str, Any]:
    boot = sys.stdin.read()
    out: dict[str, Any] = {"version": importlib.metadata.version("ionet-cloud")}  # iocloud.__version__ lags
    io = iocloud.Client(api_key=os.environ["IONET_SDK_TEST_KEY"], base_url=base, max_retries=0)

    hardware = io.hardware.list(refresh=True)
    out["hardware"] = [h.model_dump(mode="json") for h in hardware]
    rtx, h100 = io.hardware.resolve("RTX 4090"), io.hardware.resolve("H100")
    out["resolved"] = {"rtx": rtx.hardware_id, "h100": h100.hardware_id}

    out["quote"] = io.pricing.estimate(hardware_id=rtx.hardware_id, hours=2).model_dump(mode="json")
    out["quote_at"] = io.pricing.estimate(
        hardware_id=h100.hardware_id, hours=1, location_ids=[int(location)]
    ).model_dump(mode="json")
    try:
        io.pricing.estimate(hardware_id=h100.hardware_id, hours=1, gpus_per_container=1)
    except UnprocessableError as exc:
        out["price_refused"] = {"status": exc.status_code, "message": exc.message, "errors": exc.errors}

    dep = io.deployments.create(
        name=name,
        image="pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime",
        gpu="RTX 4090",  # no count: the SDK takes the hardware's max_gpus_per_container
        hours=2,
        port=8900,
        env={"DEPIN_AGENT_PORT": "8900"},
        secrets={"DEPIN_AGENT_TOKEN": "sdk-test-token-0123456789"},
        entrypoint=["/bin/sh", "-c"],
        args=[boot],
    )
    out["created"] = {"id": dep.id, "status": dep.status.value, "name": dep.name}
    dep.wait(until="running", timeout=60, poll=0.05)
    view = dep.data.container_config
    out["running"] = {
        "status": dep.status.value,
        "url": dep.url(),
        "containers": [c.model_dump(mode="json") for c in dep.containers()],
        "cost": dep.cost.model_dump(mode="json"),
        "gpus_per_container": dep.data.gpus_per_container,
        "hardware_id": dep.data.hardware_id,
        "secret_env_keys": view.secret_env_keys if view else None,
        "locations": [loc.model_dump(mode="json") for loc in dep.data.locations],
    }

    listed = io.deployments.list(page_size=2)
    out["listed"] = [{"id": d.id, "name": d.name, "status": d.status.value} for d in listed]
    out["listed_total"] = listed.total
    out["running_ids"] = [d.id for d in io.deployments.list(status="running")]

    theirs = io.deployments.get(adapter_id)  # what our adapter deployed, read by the SDK
    tv = theirs.data.container_config
    out["adapter_deployment"] = {
        "status": theirs.status.value,
        "hardware_id": theirs.data.hardware_id,
        "gpus_per_container": theirs.data.gpus_per_container,
        "image_url": tv.image_url if tv else None,
        "traffic_port": tv.traffic_port if tv else None,
        "secret_env_keys": tv.secret_env_keys if tv else None,
        "paid": theirs.cost.amount_paid,
    }

    io.deployments.delete(dep.id)
    out["deleted_status"] = io.deployments.get(dep.id).status.value
    try:
        io.deployments.create(name=f"{name}-full", image="x", gpu="A100", hours=1, port=8900)
    except UnprocessableError as exc:
        out["deploy_refused"] = {"status": exc.status_code, "message": exc.message}
    try:
        io.deployments.get("00000000-0000-0000-0000-000000000000")
    except NotFoundError as exc:
        out["missing"] = exc.status_code
    io.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
