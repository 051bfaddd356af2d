"""Replica names and state keys: replica 0 keeps the single gateway's VM name and state key (a state file written
before replicas loads as replica 0), replica i is ``depin-gw-<target>-r<i>`` / ``<target>.r<i>``, and a target
name that would collide with a replica's VM name is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from depin_core.errors import ConfigError
from serving.fluence.state import Deployment, StateStore, replica_key, split_key, valid_target
from serving.fluence.vms import replica_of, vm_name

BEFORE_REPLICAS = {  # a record as the single-gateway publisher wrote it
    "version": 1,
    "deployments": {
        "t1": {
            "target": "t1",
            "vm_name": "depin-gw-t1",
            "vm_id": "0xabc",
            "generation": "A",
            "public_ip": "203.0.113.7",
            "port": 8787,
            "admin_key_hash": "c" * 64,
            "tls_fingerprint": "d" * 64,
            "status": "ready",
            "bootstrapped": True,
            "published": [],
        }
    },
}


def test_names_and_keys_of_replicas() -> None:
    assert [vm_name("t1", i) for i in range(3)] == ["depin-gw-t1", "depin-gw-t1-r1", "depin-gw-t1-r2"]
    assert [replica_of("t1", vm_name("t1", i)) for i in range(3)] == [0, 1, 2]
    assert replica_of("t1", "depin-gw-t10") is None and replica_of("t1", "depin-gw-t1-r01") is None
    assert [replica_key("t1", i) for i in range(2)] == ["t1", "t1.r1"]
    assert split_key("t1.r12") == ("t1", 12) and split_key("t1") == ("t1", 0)
    for bad in ("../t1", "t1.r0", "t1.x1", "T1"):
        with pytest.raises(ConfigError):
            split_key(bad)
    with pytest.raises(ConfigError, match="-r<digits>"):
        valid_target("api-r1")
    assert valid_target("api-rr") == "api-rr"


def test_a_state_file_from_before_replicas_is_replica_0(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    store.path.write_text(json.dumps(BEFORE_REPLICAS))
    (dep,) = store.replicas("t1")
    assert dep.replica == 0 and dep.key == "t1" and dep.datacenter is None and store.get("t1") == dep
    store.write_admin_key("t1", SecretStr("k0"))
    second = store.put(
        Deployment(
            target="t1", replica=1, vm_name=vm_name("t1", 1), generation="A", port=1, admin_key_hash="e" * 64
        )
    )
    store.write_admin_key(second.key, SecretStr("k1"))
    assert [d.replica for d in store.replicas("t1")] == [0, 1] and store.get("t1", 1) == second
    assert store.key_path("t1.r1").name == "t1.r1.admin.key"
    assert store.admin_key("t1").get_secret_value() == "k0"  # type: ignore[union-attr]
    store.remove("t1.r1")
    assert store.get("t1", 1) is None and not store.key_path("t1.r1").exists() and store.admin_key("t1")
