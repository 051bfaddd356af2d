"""Replica propagation benchmark: how long a change made through one gateway takes to be served by another
gateway of the same registry on object storage, against the same change on a single local gateway.

One run:
1. a real ``range`` model (a tiny real fleet, trained by the real family), signed as two bundles (two
   versions of one function);
2. an S3-compatible server (moto, own process, loopback) holding the shared registry, and two gateway
   processes A and B on it (``DEPIN_GATEWAY_REGISTRY_URL``, each with its own cache, ``--poll-interval``);
3. a publish through A, timed until B serves it; then ``--moves`` moves of alias ``prod`` between the two
   versions through A, each after a random pause (0 to one poll interval, so that moves do not fall in step
   with B's polling) and timed from the admin request until B answers ``name@prod`` with the new version (B
   is probed back to back);
4. the baseline, in the same run: a single gateway on a local registry, the same moves through its admin API,
   timed until it serves the new version itself.

Last stdout line: one JSON object with ``propagation_p50_s``, ``propagation_max_s`` (A → B, per move),
``local_move_p50_s`` (the baseline), ``ratio_p50`` (propagation ÷ baseline), ``publish_propagation_s``,
``poll_interval_s`` and ``moves``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLEET = {"vehicles": 6, "days": 1.0, "seed": 3}
NAME = "range"


def build_bundles(work: Path) -> tuple[list[Any], str]:
    """Two signed versions of one real range model; returns (bundles, publisher address)."""
    from serving.bundle import build_bundle
    from tests.support.fleet_data import build_fleet_data
    from tests.support.serving import RANGE_HP, dev_account, train_artifact

    fleet = build_fleet_data(work / "fleet", **FLEET)  # type: ignore[arg-type]
    model_dir = train_artifact(work / "model", "range", [fleet.telemetry], RANGE_HP, seed=1)
    account = dev_account("bench-publisher")
    bundles = [
        build_bundle(model_dir, work / f"bundle-{n}", name=NAME, account=account, max_batch_size=n)
        for n in (256, 512)
    ]
    return bundles, account.address


def served(client: Any, ref: str, body: dict[str, Any]) -> str | None:
    r = client.post(f"/v1/functions/{ref}/invoke", json=body)
    return r.json()["version"] if r.status_code == 200 else None


def until_served(client: Any, ref: str, body: dict[str, Any], version: str, timeout: float = 120.0) -> float:
    """Probe back to back until ``ref`` answers with ``version``; returns the time it first did."""
    end = time.perf_counter() + timeout
    while served(client, ref, body) != version:
        if time.perf_counter() > end:
            raise SystemExit(f"bench failed: {ref} not served by {version} after {timeout:.0f}s")
    return time.perf_counter()


def moves(
    admin: Any, probe: Any, versions: list[str], n: int, body: dict[str, Any], spread: float
) -> list[float]:
    """``n`` moves of ``prod`` through ``admin``, each timed until ``probe`` serves the new target. Each move
    waits a random 0..``spread`` s first, so moves do not fall in step with the replicas' polling."""
    rng = random.Random(7)
    out = []
    for i in range(n):
        target = versions[(i + 1) % 2]
        time.sleep(rng.uniform(0, spread))
        t0 = time.perf_counter()
        r = admin.put(f"/v1/functions/{NAME}/aliases/prod", json={"version": target})
        if r.status_code != 200:
            raise SystemExit(f"bench failed: moving prod answered {r.status_code}: {r.text[:300]}")
        out.append(until_served(probe, f"{NAME}@prod", body, target) - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=20, help="alias moves measured per side")
    ap.add_argument(
        "--poll-interval", type=float, default=1.0, help="DEPIN_GATEWAY_POLL_INTERVAL_S of the gateways"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (model, caches, logs)")
    args = ap.parse_args()

    import httpx

    from serving._auth import new_admin_key
    from serving.bundle import pack_bundle
    from serving.registry import Registry
    from serving.server import GatewayProcess
    from serving.settings import GatewaySettings
    from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server

    work = Path(tempfile.mkdtemp(prefix="depin-bench-replicas-"))
    key, digest = new_admin_key()
    try:
        t = time.perf_counter()
        bundles, address = build_bundles(work)
        versions = [b.version for b in bundles]
        body = {"inputs": list(bundles[0].manifest.example)}
        print(f"model + 2 bundles ready in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        base = {
            "trusted_publishers": [address],
            "admin_key_hashes": [digest],
            "poll_interval_s": args.poll_interval,
        }
        with contextlib.ExitStack() as stack:
            s3 = stack.enter_context(S3Server())
            shared = {
                **base,
                "registry_url": f"s3://{s3.new_bucket()}/registry",
                "s3_endpoint_url": s3.url,
                "s3_region": REGION,
                "s3_allow_http": True,
            }
            env = {
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            }  # settings JSON masks secrets
            gws = [
                stack.enter_context(
                    GatewayProcess(GatewaySettings(**shared, registry_dir=work / f"cache-{n}"), env=env)
                )
                for n in "ab"
            ]
            a, b = (
                stack.enter_context(httpx.Client(base_url=g.base_url, headers={"X-API-Key": key}, timeout=60))
                for g in gws
            )
            for bundle in bundles:  # v1 then v2 (latest); the first one is timed until B serves it
                t0 = time.perf_counter()
                r = a.put(f"/v1/functions/{NAME}/versions/{bundle.version}", content=pack_bundle(bundle.path))
                if r.status_code != 201:
                    raise SystemExit(
                        f"bench failed: publishing through A answered {r.status_code}: {r.text[:300]}"
                    )
                if bundle is bundles[0]:
                    publish_s = until_served(b, f"{NAME}@{bundle.version}", body, bundle.version) - t0
            r = a.put(f"/v1/functions/{NAME}/aliases/prod", json={"version": versions[0]})
            until_served(b, f"{NAME}@prod", body, versions[0])
            propagation = moves(a, b, versions, args.moves, body, args.poll_interval)

            local = work / "local"
            registry = Registry(local, trusted=[address])
            for bundle in bundles:
                registry.add(bundle.path)
            registry.set_alias(NAME, "prod", versions[0])
            gw = stack.enter_context(GatewayProcess(GatewaySettings(**base, registry_dir=local)))
            c = stack.enter_context(
                httpx.Client(base_url=gw.base_url, headers={"X-API-Key": key}, timeout=60)
            )
            baseline = moves(c, c, versions, args.moves, body, args.poll_interval)
        p50, local_p50 = statistics.median(propagation), statistics.median(baseline)
        out = {
            "moves": args.moves,
            "poll_interval_s": args.poll_interval,
            "propagation_p50_s": round(p50, 4),
            "propagation_max_s": round(max(propagation), 4),
            "propagation_min_s": round(min(propagation), 4),
            "publish_propagation_s": round(publish_s, 4),
            "local_move_p50_s": round(local_p50, 4),
            "local_move_max_s": round(max(baseline), 4),
            "ratio_p50": round(p50 / local_p50, 2),
        }
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
