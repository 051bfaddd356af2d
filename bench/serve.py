"""Serving benchmark: the function gateway vs a bare Starlette + orjson handler, same model, same rows.

One run:
1. a real ``range`` model: a tiny real fleet (emulator physics → Parquet), trained by the real family, packed
   as a signed bundle in a temp registry; request rows are real trips of that fleet (1 row per request);
2. two uvicorn subprocesses on loopback, both pinned to CPU 0 (when there are ≥ 2 CPUs): the gateway
   (``GatewayProcess``: dynamic batching, validation, metrics) and a bare app whose async handler decodes with
   orjson and calls the same predictor (validate → model → rows) once per request, inline, no batching;
3. a load generator in a separate process pinned to CPU 1: raw asyncio HTTP/1.1 keep-alive connections (one
   per client, uvloop), each sending its next request as soon as the previous answer arrived; for each of 1,
   16 and 64 concurrent clients, gateway and bare in turn (``--rounds`` times): a warm-up, then a fixed
   measuring window. Each side's best round counts (highest rps, lowest p50/p99: the least disturbed by
   other work on the machine), the same rule for both sides.

Only 200 answers count (throughput and latency); any other answer, warm-up included, fails the run with a
non-zero exit and the status and body it got. Last stdout line: one JSON object with ``ratio_1``,
``ratio_16``, ``ratio_64`` (gateway ÷ bare throughput), ``p99_ratio_64`` (gateway ÷ bare p99 latency at 64
clients), the absolute rps / p50 / p99 per side and point, the gateway's batch statistics and ``device``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depin_core.proc import ServerProcess

SERVER_CPU, CLIENT_CPU = 0, 1
FLEET = {"vehicles": 10, "days": 2.0, "seed": 3}


# ----------------------------------------------------------------------------------------------- bare server


def run_bare_server(model_dir: Path, ready_file: Path) -> None:
    """The baseline: one async Starlette handler; orjson in/out; the predictor called once per request."""
    import orjson
    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from depin_core.fs import atomic_write_bytes
    from depin_core.net import listen_socket
    from gpu_jobs.device import cpu_threads
    from gpu_jobs.errors import InvalidInput
    from gpu_jobs.models.online import load_predictor

    torch.set_num_threads(
        cpu_threads()
    )  # the gateway's setting (1 unless DEPIN_TORCH_THREADS says otherwise)
    pred = load_predictor(model_dir)

    async def invoke(request: Request) -> Response:
        try:
            rows = pred(orjson.loads(await request.body())["inputs"])
        except (InvalidInput, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            return Response(orjson.dumps({"error": str(exc)}), status_code=422, media_type="application/json")
        return Response(orjson.dumps({"outputs": rows}), media_type="application/json")

    app = Starlette(routes=[Route("/invoke", invoke, methods=["POST"])])
    pred(pred.example)
    sock = listen_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", backlog=2048)
    server = uvicorn.Server(config)
    gc.collect()
    gc.freeze()  # as serving.server does for the gateway: same process-level settings on both sides
    doc = {"url": f"http://127.0.0.1:{sock.getsockname()[1]}"}
    atomic_write_bytes(ready_file, json.dumps(doc).encode())
    server.run(sockets=[sock])


class BareProcess(ServerProcess):
    """The bare server in a child process (pinned to ``cpu``), on a free loopback port."""

    def __init__(self, model_dir: Path, cpu: int | None) -> None:
        super().__init__("bare server", startup_timeout=120, cpu=cpu)
        self.model_dir = model_dir

    def start(self) -> BareProcess:
        self._launch([sys.executable, __file__, "_bare", str(self.model_dir), str(self.ready_path)], {}, [])
        try:
            _wait_http(self.url, "/invoke", method="POST")
        except BaseException:
            self.stop()
            raise
        return self


def _pin(cpu: int):  # type: ignore[no-untyped-def]
    return lambda: os.sched_setaffinity(0, {cpu})


def _wait_http(url: str, path: str, method: str = "GET", timeout: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            httpx.request(method, url + path, content=b"{}", timeout=2)
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url}{path} never answered")


# -------------------------------------------------------------------------------------------- load generator


async def _client(
    host: str,
    port: int,
    requests: list[bytes],
    offset: int,
    t_measure: float,
    t_stop: float,
    lat: list[float],
    bad: list[tuple[int, bytes]],
) -> None:
    """One keep-alive connection; latencies of 200 answers inside the window go to ``lat``, every non-200
    answer (warm-up included) to ``bad`` as (status, start of the body)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock = time.perf_counter
    i = offset
    n = len(requests)
    try:
        while True:
            t0 = clock()
            if t0 >= t_stop:
                break
            writer.write(requests[i % n])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if m is None:
                raise RuntimeError(f"no Content-Length in {head[:200]!r}")
            body = await reader.readexactly(int(m.group(1)))
            t1 = clock()
            if head[9:12] != b"200":
                bad.append((int(head[9:12]), body[:300]))
            elif t_measure <= t1 < t_stop:
                lat.append(t1 - t0)
    finally:
        writer.close()


async def _load(
    url: str, path: str, bodies: list[bytes], clients: int, warmup: float, duration: float
) -> dict:
    host, port = url.removeprefix("http://").split(":")
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    lat: list[float] = []
    bad: list[tuple[int, bytes]] = []
    now = time.perf_counter()
    t_measure, t_stop = now + warmup, now + warmup + duration
    step = max(1, len(requests) // clients)
    await asyncio.gather(
        *(_client(host, int(port), requests, c * step, t_measure, t_stop, lat, bad) for c in range(clients))
    )
    lat.sort()
    if len(lat) >= 2:
        q = statistics.quantiles(lat, n=100, method="inclusive")
    else:  # 0 or 1 successes: the run fails below or in ``main`` (no successes = no throughput)
        q = [lat[0] if lat else float("nan")] * 99
    return {
        "rps": round(len(lat) / duration, 1),  # successful (200) answers only
        "p50_ms": round(q[49] * 1e3, 3),
        "p99_ms": round(q[98] * 1e3, 3),
        "requests": len(lat),
        "errors": len(bad),
        "error_statuses": sorted({status for status, _ in bad})[:5],
        "error_example": bad[0][1].decode(errors="replace") if bad else None,
    }


def run_load(args: argparse.Namespace) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    bodies = json.loads(Path(args.bodies).read_text())
    out = asyncio.run(
        _load(args.url, args.path, [b.encode() for b in bodies], args.clients, args.warmup, args.duration)
    )
    print(json.dumps(out))


def measure(
    url: str, path: str, bodies_file: Path, clients: int, warmup: float, duration: float, cpu: int | None
) -> dict[str, Any]:
    """Run the load generator in its own process (pinned to ``cpu``) against ``url`` + ``path``."""
    cmd = [
        sys.executable,
        __file__,
        "_load",
        url,
        path,
        str(bodies_file),
        "--clients",
        str(clients),
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=warmup + duration + 120,
        preexec_fn=_pin(cpu) if cpu is not None else None,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- orchestration


def real_rows(telemetry: Path, input_schema: dict[str, Any], limit: int = 512) -> list[dict[str, Any]]:
    """Input rows from the fleet's real trips (each field as the schema names it; unmeasured → null)."""
    import math

    from gpu_jobs.models import features as F
    from gpu_jobs.models.range.features import trip_windows

    trips = trip_windows(F.read_telemetry(telemetry))
    props = input_schema["properties"]
    required = set(input_schema.get("required", []))
    rows = []
    for rec in trips.iter_rows(named=True):
        row: dict[str, Any] = {}
        for name in props:
            v = rec.get(name)
            if name == "soc":
                v = rec.get("soc_start")
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            if v is None and name in required:
                break
            if v is not None:
                row[name] = round(float(v), 4)
        else:
            rows.append(row)
    return rows[:limit]


def device_label(threads: int) -> str:
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return f"cpu: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} thread(s)"


def batch_counters(base_url: str) -> tuple[float, float]:
    """(batches, rows) run so far, from the gateway's ``depin_gateway_batch_rows`` histogram."""
    import httpx

    batches = rows = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("depin_gateway_batch_rows_count"):
            batches += float(line.rsplit(" ", 1)[1])
        elif line.startswith("depin_gateway_batch_rows_sum"):
            rows += float(line.rsplit(" ", 1)[1])
    return batches, rows


def build_model(work: Path) -> tuple[Path, Path, str, list[dict[str, Any]]]:
    """Fleet → trained range model → signed bundle in a registry. Returns (registry, model files inside the
    bundle, publisher address, real request rows)."""
    from serving.bundle import build_bundle
    from serving.registry import Registry
    from tests.support.fleet_data import build_fleet_data
    from tests.support.serving import RANGE_HP, dev_account, train_artifact

    fleet = build_fleet_data(work / "fleet", **FLEET)  # type: ignore[arg-type]
    model_dir = train_artifact(work / "model", "range", [fleet.telemetry], RANGE_HP, seed=1)
    account = dev_account("bench-publisher")
    bundle = build_bundle(model_dir, work / "bundle", name="range", account=account)
    Registry(work / "registry", trusted=[account.address]).add(bundle.path)
    rows = real_rows(fleet.telemetry, bundle.manifest.input_schema) or list(bundle.manifest.example)
    return work / "registry", bundle.path / "model", account.address, rows


def summarize(results: dict[str, dict[int, list[dict[str, Any]]]], levels: list[int]) -> dict[str, Any]:
    """Per point and side: the best round (highest rps, lowest p50/p99: the least disturbed); the ratios."""
    out: dict[str, Any] = {}
    for n in levels:
        best = {}
        for side in ("gateway", "bare"):
            runs = results[side][n]
            best[side] = {
                "rps": max(r["rps"] for r in runs),
                "p50_ms": min(r["p50_ms"] for r in runs),
                "p99_ms": min(r["p99_ms"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
            }
        g, b = best["gateway"], best["bare"]
        out[f"ratio_{n}"] = round(g["rps"] / b["rps"], 3) if b["rps"] else None
        out[f"p99_ratio_{n}"] = round(g["p99_ms"] / b["p99_ms"], 3) if b["p99_ms"] else None
        for side, r in best.items():
            for k, v in r.items():
                out[f"{side}_{k}_{n}"] = v
        out[f"gateway_mean_batch_rows_{n}"] = results["gateway"][n][-1]["mean_batch_rows"]
    return out


def _require_success(side: str, clients: int, res: dict[str, Any]) -> None:
    """Stop the run on any non-200 answer or an empty window: such a point's throughput means nothing."""
    if res["errors"]:
        raise SystemExit(
            f"bench failed: {side} answered {res['errors']} request(s) with HTTP {res['error_statuses']} at "
            f"{clients} client(s), e.g. {res['error_example']!r}; fix the server or the request rows and rerun"
        )
    if res["requests"] < 2:
        raise SystemExit(
            f"bench failed: {side} completed {res['requests']} request(s) in the {clients}-client window; "
            "raise --duration or check the server's log (--keep)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measuring window")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per point, side and round")
    ap.add_argument(
        "--rounds", type=int, default=2, help="gateway and bare in turn, this many times per point"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (model, logs)")
    args = ap.parse_args()

    import httpx

    from gpu_jobs.device import cpu_threads
    from serving.server import GatewayProcess
    from serving.settings import GatewaySettings

    levels = [int(c) for c in args.clients.split(",")]
    pin = len(os.sched_getaffinity(0)) >= 2
    server_cpu, client_cpu = (SERVER_CPU, CLIENT_CPU) if pin else (None, None)
    work = Path(tempfile.mkdtemp(prefix="depin-bench-serve-"))
    results: dict[str, dict[int, list[dict[str, Any]]]] = {"gateway": {}, "bare": {}}
    try:
        t = time.perf_counter()
        registry, model_files, address, rows = build_model(work)
        bodies = [json.dumps({"inputs": [r]}, separators=(",", ":")) for r in rows]
        bodies_file = work / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        print(f"model + {len(rows)} real trip rows ready in {time.perf_counter() - t:.1f}s", file=sys.stderr)

        settings = GatewaySettings(registry_dir=registry, trusted_publishers=[address])
        with contextlib.ExitStack() as stack:
            gateway = stack.enter_context(GatewayProcess(settings, cpu=server_cpu))
            bare = stack.enter_context(BareProcess(model_files, server_cpu))  # the files the gateway serves
            sides = {
                "gateway": (gateway.base_url, "/v1/functions/range/invoke"),
                "bare": (bare.url, "/invoke"),
            }
            answers = []
            for url, path in sides.values():
                first = httpx.post(url + path, content=bodies[0], timeout=10)
                first.raise_for_status()
                answers.append(first.json())
            assert answers[0]["outputs"] == answers[1]["outputs"], answers  # same model, same numbers
            for n in levels:
                for _ in range(args.rounds):
                    for side, (url, path) in sides.items():
                        before = batch_counters(gateway.base_url) if side == "gateway" else None
                        res = measure(url, path, bodies_file, n, args.warmup, args.duration, client_cpu)
                        if before is not None:
                            batches, batch_rows = (
                                a - b for a, b in zip(batch_counters(url), before, strict=True)
                            )
                            res["mean_batch_rows"] = round(batch_rows / batches, 2) if batches else None
                        results[side].setdefault(n, []).append(res)
                        print(
                            f"{side:8s} {n:3d} clients: {res['rps']:8.0f} rps  p50 {res['p50_ms']:7.2f} ms  "
                            f"p99 {res['p99_ms']:7.2f} ms  errors {res['errors']}"
                            + (f"  rows/batch {res['mean_batch_rows']}" if side == "gateway" else ""),
                            file=sys.stderr,
                        )
                        _require_success(side, n, res)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    out = summarize(results, levels)
    out["rows_per_request"] = 1
    out["device"] = device_label(cpu_threads())
    out["pinned"] = {"servers": server_cpu, "load_generator": client_cpu}
    out["seconds_per_point"] = args.duration
    out["rounds"] = args.rounds
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        run_bare_server(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_load":
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("url")
        p.add_argument("path")
        p.add_argument("bodies")
        p.add_argument("--clients", type=int, default=1)
        p.add_argument("--warmup", type=float, default=1.0)
        p.add_argument("--duration", type=float, default=3.0)
        run_load(p.parse_args())
    else:
        main()
