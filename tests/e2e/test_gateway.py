"""The function gateway as a real uvicorn process on a free loopback port (GatewayProcess), serving real
bundles of real trained models: invoke, versions/aliases/splits, admin auth, bundle upload (incl. tampered
and untrusted bundles), a bad-input table, unknown functions, /readyz, /metrics, pickup of a registry change
made by another process.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from eth_account.signers.local import LocalAccount

from serving._auth import new_admin_key
from serving.bundle import Bundle, pack_bundle, predictor, recover_publisher
from serving.registry import Registry
from serving.server import GatewayProcess
from serving.settings import GatewaySettings
from tests.support.gateway import check_openapi_examples
from tests.support.serving import MakeBundle

# the real trained models, publishers and bundle factory of tests/serving (session-scoped fixtures)

pytestmark = pytest.mark.e2e

ADMIN_KEY, ADMIN_HASH = new_admin_key()
ADMIN = {"X-API-Key": ADMIN_KEY}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def bundles(make_bundle: MakeBundle, range_artifact: Path, anomaly_artifact: Path) -> dict[str, Bundle]:
    return {
        "range": make_bundle(range_artifact, "range"),
        "range2": make_bundle(range_artifact, "range", max_batch_size=512),
        "anomaly": make_bundle(anomaly_artifact, "anomaly"),
        "split": make_bundle(range_artifact, "split"),
        "split2": make_bundle(range_artifact, "split", max_batch_size=256),
    }


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory, publisher: LocalAccount, bundles: dict) -> Path:
    root = tmp_path_factory.mktemp("gateway-registry")
    reg = Registry(root, trusted=[publisher.address])
    for key in ("range", "anomaly", "split", "split2"):
        reg.add(bundles[key].path)
    return root


@pytest.fixture(scope="module")
def gateway(registry_root: Path, publisher: LocalAccount) -> Iterator[GatewayProcess]:
    settings = GatewaySettings(
        registry_dir=registry_root,
        trusted_publishers=[publisher.address],
        admin_key_hashes=[ADMIN_HASH],
        max_body_bytes=MAX_BODY,
        poll_interval_s=0.2,
    )
    with GatewayProcess(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=30) as c:
        yield c


def tar_of(path: Path) -> bytes:
    """A plain tar of a bundle tree (pack_bundle refuses a tampered manifest, an attacker would not)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(path.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=p.relative_to(path).as_posix())
    return buf.getvalue()


def err(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]


def test_listens_on_loopback(gateway: GatewayProcess) -> None:
    assert gateway.base_url.startswith("http://127.0.0.1:") and gateway.port > 0


def test_invoke_range_and_anomaly(client: httpx.Client, bundles: dict[str, Bundle]) -> None:
    rng, an = bundles["range"], bundles["anomaly"]
    rows = [{**rng.manifest.example[0], "km": 3.0 + i, "soc": 50.0 + i} for i in range(20)]
    r = client.post(f"/v1/functions/range@{rng.version}/invoke", json={"inputs": rows})
    assert r.status_code == 200, r.text
    assert r.headers["x-depin-version"] == rng.version
    got = r.json()
    assert got["function"] == "range" and got["version"] == rng.version
    for g, w in zip(got["outputs"], predictor(rng)(rows), strict=True):
        assert g["kwh_per_100km"] == pytest.approx(w["kwh_per_100km"], rel=1e-5)
        assert g["range_km"] == pytest.approx(w["range_km"], rel=1e-5)
    rows = an.manifest.example * 3
    r = client.post("/v1/functions/anomaly/invoke", json={"inputs": rows})
    assert r.status_code == 200, r.text
    for g, w in zip(r.json()["outputs"], predictor(an)(rows), strict=True):
        assert g["flagged"] == w["flagged"] and g["score"] == pytest.approx(w["score"], rel=1e-5)
    for _ in range(20):  # keep-alive requests on one connection
        assert client.post("/v1/functions/anomaly/invoke", json={"inputs": rows[:1]}).status_code == 200


def test_unknown_function_is_404(client: httpx.Client) -> None:
    r = client.post("/v1/functions/no-such-fn/invoke", json={"inputs": [{}]})
    assert r.status_code == 404 and err(r)["code"] == "function_not_found" and err(r)["field"] == "name"
    assert "range" in err(r)["message"]  # lists what exists
    assert client.get("/v1/functions/no-such-fn").status_code == 404


def test_versions_aliases_and_splits(
    client: httpx.Client, bundles: dict[str, Bundle], publisher: LocalAccount
) -> None:
    v1, v2 = bundles["split"].version, bundles["split2"].version
    body = {"inputs": bundles["split"].manifest.example}
    info = client.get("/v1/functions/split").json()
    assert [v["version"] for v in info["versions"]] == [v1, v2] and info["latest"] == v2
    manifest = client.get(f"/v1/functions/split/versions/{v1}/manifest.json").content
    signature = client.get(f"/v1/functions/split/versions/{v1}/signature.json").json()
    assert recover_publisher(manifest, signature) == publisher.address  # anyone can check the publisher

    assert client.post("/v1/functions/split/invoke", json=body).json()["version"] == v2
    assert client.post("/v1/functions/split@latest/invoke", json=body).json()["version"] == v2
    assert client.post(f"/v1/functions/split@{v1}/invoke", json=body).json()["version"] == v1

    r = client.put("/v1/functions/split/aliases/prod", json={"version": v1}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["target"] == {v1: 1.0}
    assert client.post("/v1/functions/split@prod/invoke", json=body).json()["version"] == v1

    r = client.put("/v1/functions/split/aliases/prod", json={"weights": {v1: 1, v2: 1}}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["target"] == {v1: 0.5, v2: 0.5}
    picks = {}
    for i in range(60):
        h = {"X-Request-Id": f"req-{i}"}
        picks[i] = client.post("/v1/functions/split@prod/invoke", json=body, headers=h).json()["version"]
    assert set(picks.values()) == {v1, v2}
    for i in range(0, 60, 6):
        h = {"X-Request-Id": f"req-{i}"}
        assert (
            client.post("/v1/functions/split@prod/invoke", json=body, headers=h).json()["version"] == picks[i]
        )

    r = client.post("/v1/functions/split/aliases/prod/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["target"] == {v1: 1.0}
    assert client.post("/v1/functions/split@prod/invoke", json=body).json()["version"] == v1
    r = client.put("/v1/functions/split/aliases/latest", json={"version": "prod"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["target"] == {v1: 1.0}  # copy another alias's target
    assert client.post("/v1/functions/split/invoke", json=body).json()["version"] == v1
    assert client.get("/v1/functions/split").json()["aliases"]["latest"] == {v1: 1.0}


def test_admin_auth(client: httpx.Client, gateway: GatewayProcess, bundles: dict[str, Bundle]) -> None:
    v = bundles["range"].version
    routes = [
        ("PUT", "/v1/functions/range/aliases/canary", {"json": {"version": v}}),
        ("POST", "/v1/functions/range/aliases/latest/rollback", {}),
        ("PUT", f"/v1/functions/range/versions/{v}", {"content": pack_bundle(bundles["range"].path)}),
    ]
    for method, url, kw in routes:
        r = client.request(method, url, **kw)
        assert r.status_code == 401 and err(r)["field"] == "X-API-Key", r.text
        for wrong in (ADMIN_KEY[:-1], ADMIN_HASH, "x"):
            r = client.request(method, url, headers={"X-API-Key": wrong}, **kw)
            assert r.status_code == 403 and err(r)["code"] == "forbidden", r.text
    assert "canary" not in client.get("/v1/functions/range").json()["aliases"]
    # the gateway was given only the key's digest; the key itself appears nowhere in its process or log
    assert gateway.proc is not None
    cmdline = Path(f"/proc/{gateway.proc.pid}/cmdline").read_bytes().decode()
    assert ADMIN_HASH in cmdline and ADMIN_KEY not in cmdline
    assert ADMIN_KEY not in gateway.log_text()


def test_upload_bundle(
    client: httpx.Client,
    bundles: dict[str, Bundle],
    make_bundle: MakeBundle,
    range_artifact: Path,
    other_publisher: LocalAccount,
    tmp_path: Path,
) -> None:
    new = bundles["range2"]
    url = f"/v1/functions/range/versions/{new.version}"
    tampered = tmp_path / "tampered"
    shutil.copytree(new.path, tampered)
    manifest = orjson.loads((tampered / "manifest.json").read_bytes())
    manifest["max_batch_size"] = 4096  # a changed manifest no longer matches the publisher's signature
    (tampered / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS))
    r = client.put(url, content=tar_of(tampered), headers=ADMIN)
    assert r.status_code == 422 and err(r)["code"] == "invalid_bundle", r.text
    assert "signature" in err(r)["message"]

    foreign = make_bundle(range_artifact, "range", account=other_publisher, max_batch_size=300)
    r = client.put(
        f"/v1/functions/range/versions/{foreign.version}", content=pack_bundle(foreign.path), headers=ADMIN
    )
    assert (
        r.status_code == 403
        and err(r)["code"] == "untrusted_publisher"
        and "not trusted" in err(r)["message"]
    )
    versions = [v["version"] for v in client.get("/v1/functions/range").json()["versions"]]
    assert foreign.version not in versions and new.version not in versions

    r = client.put(url, content=pack_bundle(new.path), headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["aliases"]["latest"] == {new.version: 1.0}
    r = client.post("/v1/functions/range/invoke", json={"inputs": new.manifest.example})
    assert r.status_code == 200 and r.json()["version"] == new.version  # loaded and served when PUT returned
    doc = client.get(url).json()
    assert doc["loaded"] is True and doc["manifest"]["max_batch_size"] == 512


def test_bad_input_table(client: httpx.Client, bundles: dict[str, Bundle]) -> None:
    """Every malformed request gets a 4xx JSON error naming the field — never a 5xx."""
    rng = bundles["range"]
    row = dict(rng.manifest.example[0])
    anomaly_row = dict(bundles["anomaly"].manifest.example[0])
    url = f"/v1/functions/range@{rng.version}/invoke"

    def js(doc: Any) -> bytes:
        return orjson.dumps(doc)

    cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
        ("not JSON", url, b"{inputs: [", {}, 400, "body"),
        ("NaN literal", url, b'{"inputs": [{"km": NaN}]}', {}, 400, "body"),
        ("Infinity literal", url, b'{"inputs": [{"km": Infinity}]}', {}, 400, "body"),
        ("number overflowing to inf", url, b'{"inputs": [{"km": 1e400}]}', {}, 400, "body"),
        ("invalid UTF-8", url, b'{"inputs": ["\xff\xfe"]}', {}, 400, "body"),
        ("empty body", url, b"", {}, 400, "body"),
        ("body is an array", url, js([row]), {}, 422, "body"),
        ("inputs missing", url, js({}), {}, 422, "inputs"),
        ("unknown input form", url, js({"rows": [row]}), {}, 422, "rows"),
        ("two input forms", url, js({"inputs": [row], "plan": {"km": 5}}), {}, 422, "plan"),
        ("telemetry not an array", url, js({"telemetry": row}), {}, 422, "telemetry"),
        (
            "telemetry row without time",
            url,
            js({"telemetry": [{"speed": 5}]}),
            {},
            422,
            "telemetry[0].timestamp",
        ),
        (
            "telemetry signal of the wrong type",
            url,
            js({"telemetry": [{"timestamp": "2026-05-04T08:00:00Z", "speed": "5"}]}),
            {},
            422,
            "telemetry[0].speed",
        ),
        (
            "telemetry without a trip",
            url,
            js({"telemetry": [{"timestamp": "2026-05-04T08:00:00Z"}]}),
            {},
            422,
            "telemetry",
        ),
        ("plan without km", url, js({"plan": {"mean_speed": 80}}), {}, 422, "plan.km"),
        ("plan for anomaly", "/v1/functions/anomaly/invoke", js({"plan": {"km": 5}}), {}, 422, "plan"),
        ("extra top-level field", url, js({"inputs": [row], "debug": True}), {}, 422, "debug"),
        ("inputs not an array", url, js({"inputs": row}), {}, 422, "inputs"),
        ("inputs empty", url, js({"inputs": []}), {}, 422, "inputs"),
        ("row not an object", url, js({"inputs": [row, 5]}), {}, 422, "inputs[1]"),
        ("string for a number", url, js({"inputs": [{**row, "km": "12"}]}), {}, 422, "inputs[0].km"),
        (
            "boolean for a number",
            url,
            js({"inputs": [{**row, "mean_speed": True}]}),
            {},
            422,
            "inputs[0].mean_speed",
        ),
        ("null for a required number", url, js({"inputs": [{**row, "km": None}]}), {}, 422, "inputs[0].km"),
        (
            "required field missing",
            url,
            js({"inputs": [{k: v for k, v in row.items() if k != "km"}]}),
            {},
            422,
            "inputs[0].km",
        ),
        ("unknown field", url, js({"inputs": [row, {**row, "colour": "red"}]}), {}, 422, "inputs[1].colour"),
        ("negative distance", url, js({"inputs": [{**row, "km": -5}]}), {}, 422, "inputs[0].km"),
        ("share above 1", url, js({"inputs": [{**row, "stop_share": 1.5}]}), {}, 422, "inputs[0].stop_share"),
        ("soc above 100 %", url, js({"inputs": [{**row, "soc": 140}]}), {}, 422, "inputs[0].soc"),
        (
            "wrong shape (nested array)",
            url,
            js({"inputs": [{**row, "air": [1, 2]}]}),
            {},
            422,
            "inputs[0].air",
        ),
        ("derived field sent", url, js({"inputs": [{**row, "cold": 3}]}), {}, 422, "inputs[0].cold"),
        ("more rows than max_batch_size", url, js({"inputs": [{}] * 1025}), {}, 413, "inputs"),
        ("body over the size limit", url, js({"inputs": [row] * 400}), {}, 413, "body"),
        (
            "request id too long",
            url,
            js({"inputs": [row]}),
            {"X-Request-Id": "r" * 201},
            400,
            "X-Request-Id",
        ),
        (
            "unknown powertrain",
            "/v1/functions/anomaly/invoke",
            js({"inputs": [{**anomaly_row, "powertrain": "DIESEL"}]}),
            {},
            422,
            "inputs[0].powertrain",
        ),
        ("unknown alias", "/v1/functions/range@nope/invoke", js({"inputs": [row]}), {}, 404, "ref"),
        (
            "unknown version",
            "/v1/functions/range@0000000000000000/invoke",
            js({"inputs": [row]}),
            {},
            404,
            "ref",
        ),
    ]
    assert len(js({"inputs": [row] * 400})) > MAX_BODY
    failures = []
    for what, path, content, headers, status, field in cases:
        r = client.post(path, content=content, headers={"content-type": "application/json", **headers})
        ok = r.status_code == status and r.headers.get("content-type", "").startswith("application/json")
        got = r.json().get("error", {}) if ok else {}
        if not ok or got.get("field") != field or not got.get("message"):
            failures.append(f"{what}: {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 15
    # the gateway is still healthy and serving afterwards
    assert client.post(url, json={"inputs": [row]}).status_code == 200


def test_readyz_and_metrics(client: httpx.Client, bundles: dict[str, Bundle]) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert {"range", "anomaly", "split"} <= set(r.json()["functions"])
    assert client.get("/healthz").json() == {"status": "ok"}
    an = bundles["anomaly"]
    for _ in range(5):
        client.post("/v1/functions/anomaly/invoke", json={"inputs": an.manifest.example})
    client.post("/v1/functions/anomaly/invoke", json={"inputs": [{"powertrain": "X"}]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = r.text
    v = an.version
    for line in (
        f'depin_gateway_requests_total{{function="anomaly",status="200",version="{v}"}}',
        f'depin_gateway_requests_total{{function="anomaly",status="422",version="{v}"}}',
        f'depin_gateway_request_seconds_bucket{{function="anomaly",le="+Inf",version="{v}"}}',
        f'depin_gateway_batch_rows_bucket{{function="anomaly",le="1.0",version="{v}"}}',
        f'depin_gateway_queue_rows{{function="anomaly",version="{v}"}} 0.0',
        "depin_gateway_ready 1.0",
    ):
        assert line in m, line
    assert "_created" not in m
    spec = client.get("/openapi.json").json()
    assert "/v1/functions/anomaly/invoke" in spec["paths"]


def test_picks_up_a_registry_change_from_another_process(
    client: httpx.Client,
    registry_root: Path,
    publisher: LocalAccount,
    make_bundle: MakeBundle,
    anomaly_artifact: Path,
) -> None:
    late = make_bundle(anomaly_artifact, "late-fn")
    Registry(registry_root, trusted=[publisher.address]).add(late.path)  # like `depin publish --target local`
    import time

    end = time.monotonic() + 60
    while client.get("/v1/functions/late-fn").status_code != 200:
        assert time.monotonic() < end, "the gateway never picked up late-fn"
        time.sleep(0.05)
    r = client.post("/v1/functions/late-fn/invoke", json={"inputs": late.manifest.example})
    assert r.status_code == 200 and r.json()["version"] == late.version


async def test_every_openapi_example_works_over_http(gateway: GatewayProcess) -> None:
    """Each function's OpenAPI request examples (engineered rows, raw telemetry, a plan) get 200 as is."""
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        await check_openapi_examples(
            client, {"range": {"inputs", "telemetry", "plan"}, "anomaly": {"inputs", "telemetry"}}
        )
