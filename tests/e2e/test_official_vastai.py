"""Compatibility: Vast.ai's official client (PyPI ``vastai`` 1.9.1, its SDK class and its CLI) against our fake
Vast.ai API, next to our adapter, for every call the adapter relies on: search offers, create instance, show
instance, show instances (v1 pages, label filter), destroy, and a rent of an offer that is gone.

The client lives in its own venv (``<repo>/.venv-vastai``, created on first use and reused while it imports
the pinned version); it reaches the fake through its own base-URL options (``VastAI(server_url=…)``,
``vastai --url …``). An unreachable package index skips the test, except under CI, where it fails.
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

from gpu_jobs.providers import Bootstrap, VastProvider, pick_offer, worker_name
from tests.support.client_venvs import VASTAI, obtain
from tests.support.fakes.vast import FakeVast
from tests.support.providers import JOB_ID, TOKEN, make_spec

pytestmark = pytest.mark.e2e

PYTHON = VASTAI.python
CLI = VASTAI.bin("vastai")

# Runs in the client's venv: the SDK calls, in the order a rental goes; prints one JSON line.
SDK_SCRIPT = r"""
import json, sys
import requests
from vastai import VastAI

a = json.load(open(sys.argv[1]))
sdk = VastAI(api_key=a["key"], server_url=a["server"], retry=1)
out = {}
env = " ".join(f"-e {k}={v}" for k, v in a["env"].items()) + " -p 8900:8900"
rent = dict(image=a["image"], disk=a["disk"], env=env, label=a["name"], onstart_cmd=a["script"],
            ssh=True, direct=True, cancel_unavail=True)
offers = sdk.search_offers(query="num_gpus>=1 gpu_ram>=24", order="dph_total", limit=10)
out["offer_ids"] = [o["id"] for o in offers]
created = sdk.create_instance(offers[0]["id"], **rent)
iid = created["new_contract"]
out["created"] = created
out["shown"] = sdk.show_instance(iid)
out["all"] = sdk.show_instances()
out["labelled"] = sdk.show_instances_v1({"select_filters": {"label": {"in": [a["name"]]}}, "limit": 25})
try:
    sdk.create_instance(offers[0]["id"], **rent)
except requests.HTTPError as e:
    out["gone"] = {"status": e.response.status_code, "body": e.response.json()}
out["destroyed"] = sdk.destroy_instance(iid)
out["after"] = sdk.show_instance(iid)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def client_venv() -> Path:
    """The venv with ``vastai`` (built on first use; see ``client_venvs.obtain``)."""
    obtain(VASTAI)
    return VASTAI.path


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVast]:
    with FakeVast(tmp_path / "vast", agent_factory=None) as f:
        f.page_limit = 2  # the client's 25-row pages would hide paging
        yield f


def _client_env(tmp_path: Path, key: str) -> dict[str, str]:
    """The client's environment: its key, no update check, its config and cache dirs under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAST")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        **env,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".state"),
        "XDG_DATA_HOME": str(home / ".data"),
        "VAST_API_KEY": key,
        "VASTAI_NO_UPDATE_CHECK": "1",
    }


def _bootstrap() -> Bootstrap:
    return Bootstrap(token=SecretStr(TOKEN))


def _vastai(fake: FakeVast, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """``vastai --url <fake> --raw <argv>`` (the key from ``env``'s ``VAST_API_KEY``)."""
    cmd = [str(CLI), "--url", fake.server_url, "--raw", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _rent_argv(boot: Bootstrap, name: str) -> list[str]:
    """``create instance`` options for the rental our adapter makes (ssh + direct: the on-start script runs)."""
    env = " ".join(f"-e {k}={v}" for k, v in boot.env().items()) + f" -p {boot.port}:{boot.port}"
    return ["--image", boot.image, "--disk", f"{boot.disk_gb:g}", "--label", name, "--ssh", "--direct",
            "--cancel-unavail", "--env", env, "--onstart-cmd", boot.script(background=True)]  # fmt: skip


def _without_label(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "label"}


def test_official_sdk_rents_lists_and_destroys_like_our_adapter(
    client_venv: Path, fake: FakeVast, tmp_path: Path
) -> None:
    boot = _bootstrap()
    ours, theirs = worker_name(JOB_ID, 1), worker_name(JOB_ID, 2)
    leaked = [fake.leak(worker_name("ffffffffffff-00000000", 1)), fake.leak("my-jupyter-box")]
    with VastProvider(SecretStr(fake.api_key), fake.server_url, poll_s=0.05) as vast:
        mine = vast.launch(pick_offer(vast, make_spec(min_vram_gb=24)), boot, name=ours)
        our_body = fake.asks[-1]
        quoted = [int(o.offer_id) for o in vast.quote(make_spec(min_vram_gb=24))]

        args = {
            "key": fake.api_key,
            "server": fake.server_url,
            "env": boot.env(),  # the token and this node's TLS certificate and key
            "image": boot.image,
            "disk": boot.disk_gb,
            "script": boot.script(background=True),
            "name": theirs,
        }
        (tmp_path / "args.json").write_text(json.dumps(args))
        (tmp_path / "sdk.py").write_text(SDK_SCRIPT)
        proc = subprocess.run(
            [str(PYTHON), str(tmp_path / "sdk.py"), str(tmp_path / "args.json")],
            capture_output=True,
            text=True,
            timeout=300,
            env=_client_env(tmp_path, fake.api_key),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])

        # search: the client's parsed query (numbers as strings) selects what ours selects, in the same order
        assert out["offer_ids"] == quoted == [1001, 1003]  # 1002 is rented by our adapter
        # create: the client's body for the same bootstrap is ours, field for field
        sdk_body = fake.asks[1]
        assert _without_label(sdk_body) == _without_label(our_body)
        assert (sdk_body["label"], our_body["label"]) == (theirs, ours)
        iid = out["created"]["new_contract"]
        assert out["created"]["success"] is True and isinstance(iid, int)
        # show instance: the fields the adapter reads, in the shape the client expects
        shown = out["shown"]
        assert shown["id"] == iid and shown["label"] == theirs and shown["actual_status"] == "loading"
        assert (
            shown["image_runtype"] == "ssh_direc ssh_proxy"
            and shown["extra_env"]["DEPIN_AGENT_TOKEN"] == TOKEN
        )
        # show instances: every page (2 rows a page here), and the server-side label filter
        everyone = sorted([*leaked, int(mine.instance_id), iid])
        assert sorted(r["id"] for r in out["all"]) == everyone
        later = [q for _, path, q in fake.calls if path == "/api/v1/instances/" and "after_token" in q]
        assert [json.loads(q["select_filters"]) for q in later] == [{}]  # 4 rows: a second page, no third
        labelled = out["labelled"]
        assert [r["id"] for r in labelled["instances"]] == [iid] and labelled["total_instances"] == 1
        assert labelled["label_counts"] == {theirs: 1} and labelled["next_token"] is None
        # a rent of an offer that is gone: Vast's 410 no_such_ask, which the adapter reads as "quote again"
        assert out["gone"]["status"] == 410 and out["gone"]["body"]["error"] == "no_such_ask"
        # destroy, then the instance is gone for both
        assert out["destroyed"]["success"] is True and out["after"] is None
        assert vast.find(theirs) is None and iid in fake.destroyed

        # and the adapter finds an instance the official client created (no second rental under that name)
        made = _vastai(
            fake, _client_env(tmp_path, fake.api_key), "create", "instance", "1003", *_rent_argv(boot, theirs)
        )
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        offer = pick_offer(vast, make_spec())
        again = vast.launch(offer, boot, name=theirs)
        assert again.instance_id == str(created["new_contract"]) and fake.launches == 3
        assert _without_label(fake.asks[-1]) == _without_label(our_body)  # the CLI's body is ours too
        vast.destroy(again)
        vast.destroy(mine)
    assert sorted(fake.instances) == sorted(leaked)


def test_official_cli_against_the_fake(client_venv: Path, fake: FakeVast, tmp_path: Path) -> None:
    env = _client_env(tmp_path, fake.api_key)

    def vastai(*argv: str) -> subprocess.CompletedProcess[str]:
        return _vastai(fake, env, *argv)

    boot = _bootstrap()
    name = worker_name(JOB_ID, 1)
    found = vastai("search", "offers", "num_gpus>=1 gpu_ram>=24 reliability>0.9", "-o", "dph_total")
    assert found.returncode == 0, found.stderr
    offers = json.loads(found.stdout)
    with VastProvider(SecretStr(fake.api_key), fake.base_url) as vast:
        assert [o["id"] for o in offers] == [int(o.offer_id) for o in vast.quote(make_spec(min_vram_gb=24))]

        rent = _rent_argv(boot, name)
        made = vastai("create", "instance", str(offers[0]["id"]), *rent)
        assert made.returncode == 0, made.stderr
        iid = json.loads(made.stdout)["new_contract"]

        listed = vastai("show", "instances", "--label", name)
        assert listed.returncode == 0, listed.stderr
        assert [r["id"] for r in json.loads(listed.stdout)] == [iid]
        calls = [q for _, path, q in fake.calls if path == "/api/v1/instances/"]
        assert json.loads(calls[-1]["select_filters"]) == {"label": {"in": [name]}}
        assert vast.find(name)["id"] == iid  # our adapter's label lookup sees the CLI's instance

        shown = vastai("show", "instance", str(iid))
        assert shown.returncode == 0 and json.loads(shown.stdout)["label"] == name

        gone = vastai("create", "instance", str(offers[0]["id"]), *rent)
        error = json.loads(gone.stderr.strip().splitlines()[-1])
        assert error["status_code"] == 410 and "no_such_ask" in error["msg"]  # the client prints Vast's msg

        refused = _vastai(fake, {**env, "VAST_API_KEY": "not-the-key"}, "show", "instances")
        assert json.loads(refused.stderr.strip().splitlines()[-1])["status_code"] == 401

        dropped = vastai("destroy", "instance", str(iid), "-y")
        assert dropped.returncode == 0, dropped.stderr
        assert fake.destroyed == [iid]  # (1.9.1's `destroy instance` prints nothing under --raw)
        assert fake.instances == {} and vast.instances() == []
