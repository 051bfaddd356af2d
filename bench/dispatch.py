"""Dispatch benchmark: AgentRunner vs LocalRunner for a tiny job, and agent blob uploads vs a raw HTTPS upload.

One run, on loopback, over TLS as in production: the agent serves HTTPS with a certificate made here and the
runner pins it; the raw baseline is an HTTPS server with the same certificate and the same uvicorn TLS settings,
and its client trusts that certificate the same way (``depin_core.tls.client_context``).
1. a worker agent (``AgentProcess``, a child process) and a tiny training job (the toy family of the tests: a
   4-16-1 MLP, 30 steps on 256 rows). The same spec goes through ``LocalRunner`` and through ``AgentRunner``
   (health check, blob check, submit, polling, artifact download and sha256 verification included), interleaved,
   ``--repeat`` times each; each side's time is submit → verified result in hand, and ``overhead_s`` = median
   agent time − median local time. ``dispatch_overhead_s`` compares the time each side spends outside the
   worker's own run (wall time − the worker's ``timings.total_s``), which the machine's load disturbs less;
2. blob upload throughput: ``--blob-mb`` MiB of random bytes, a fresh blob each round, through
   ``AgentRunner.ensure_blob`` (HEAD, a streamed PUT, the agent hashing and verifying it) vs a raw streamed HTTPS
   PUT of the same bytes (the same httpx client, the same 1 MiB chunks) to a bare Starlette/uvicorn handler in a
   child process that writes the body to disk as it arrives. Best round per side (the least disturbed by other
   work on the machine), the same rule for both; ``upload_ratio`` = agent MB/s ÷ raw MB/s.
Last stdout line: one JSON object (``overhead_s``, ``upload_ratio`` and the figures behind them). No assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- bare server


def run_bare_server(directory: Path, ready_file: Path, tls_dir: Path) -> None:
    """The baseline: ``PUT /upload/{name}`` streams the body to ``directory/name``; nothing else. HTTPS with
    the certificate in ``tls_dir`` (the agent's), through the same uvicorn TLS settings."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from depin_core.fs import atomic_write_bytes
    from depin_core.net import listen_socket

    async def upload(request: Request) -> JSONResponse:
        n = 0
        with open(directory / request.path_params["name"], "wb") as fh:
            async for chunk in request.stream():
                fh.write(chunk)
                n += len(chunk)
        return JSONResponse({"size": n}, status_code=201)

    app = Starlette(routes=[Route("/upload/{name}", upload, methods=["PUT"])])
    sock = listen_socket("127.0.0.1", 0)
    sock.listen(128)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ssl_certfile=str(tls_dir / "tls-cert.pem"),
        ssl_keyfile=str(tls_dir / "tls-key.pem"),
    )
    server = uvicorn.Server(config)
    atomic_write_bytes(ready_file, json.dumps({"url": f"https://127.0.0.1:{sock.getsockname()[1]}"}).encode())
    server.run(sockets=[sock])


def start_bare_server(
    directory: Path, ready_file: Path, tls_dir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(directory), str(ready_file),
           str(tls_dir)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the bare upload server did not start")
        time.sleep(0.05)
    return proc, json.loads(ready_file.read_text())["url"]


# --------------------------------------------------------------------------------------------------- the runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="jobs per side, and upload rounds per side")
    ap.add_argument("--steps", type=int, default=30, help="training steps of the tiny job")
    ap.add_argument("--blob-mb", type=int, default=64, help="MiB per upload round")
    ap.add_argument(
        "--bare-server", nargs=3, metavar=("DIR", "READY_FILE", "TLS_DIR"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.bare_server:
        run_bare_server(*(Path(a) for a in args.bare_server))
        return

    import httpx
    from pydantic import SecretStr

    from depin_core.proc import stop_process
    from depin_core.tls import client_context, make_certificate
    from gpu_jobs.agent.process import AgentProcess
    from gpu_jobs.local import LocalRunner
    from gpu_jobs.remote import AgentRunner, file_chunks
    from gpu_jobs.spec import DatasetRef, JobSpec, JobState, sha256_file
    from tests.support.toy_family import IMPORT_PATH, write_toy_dataset

    work = Path(tempfile.mkdtemp(prefix="depin-bench-dispatch-"))
    env = {"PYTHONPATH": str(REPO)}
    token = SecretStr(secrets.token_urlsafe(24))
    data = DatasetRef.from_path(write_toy_dataset(work / "data" / "part-0.parquet").parent)

    def spec(out: str) -> JobSpec:
        return JobSpec(
            kind="train",
            model={"family": IMPORT_PATH, "hyperparameters": {"steps": args.steps}},
            inputs=[data],
            seed=5,
            outputs={"dir": str(work / out)},
        )

    bare_proc = None
    tls = make_certificate()  # the node's certificate, pinned by the runner (and served by the baseline too)
    tls_dir = work / "tls"
    tls.write(tls_dir)
    agent = AgentProcess(work / "agent", token, env=env, tls=tls)
    try:
        t = time.perf_counter()
        agent.start()
        print(f"agent ready in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        local_s: list[float] = []
        agent_s: list[float] = []
        worker_s: dict[str, list[float]] = {"local": [], "agent": []}
        metrics = []
        with (
            LocalRunner(work / "local", env=env) as local,
            AgentRunner(agent.url, token, workdir_root=work / "remote", tls_cert=tls.cert_pem) as remote,
        ):
            for i in range(args.repeat):  # interleaved, so drift hits both alike
                for runner, times in ((local, local_s), (remote, agent_s)):
                    t = time.perf_counter()
                    res = runner.result(runner.submit(spec(f"{runner.name}-{i}")), timeout=600)
                    times.append(time.perf_counter() - t)
                    if res.state != JobState.SUCCEEDED:
                        raise SystemExit(f"{runner.name} job failed: {res.error}")
                    metrics.append(res.metrics)
                    worker_s[runner.name].append(res.timings["total_s"])
                print(f"round {i}: local {local_s[-1]:.2f}s, agent {agent_s[-1]:.2f}s", file=sys.stderr)

            bare_dir = work / "bare"
            bare_dir.mkdir()
            bare_proc, bare_url = start_bare_server(bare_dir, work / "bare-ready.json", tls_dir)
            size = args.blob_mb * 2**20
            raw_s: list[float] = []
            blob_s: list[float] = []
            with httpx.Client(timeout=120, verify=client_context(tls.cert_pem)) as client:
                for i in range(args.repeat):
                    blob = work / f"blob-{i}.bin"
                    with open(blob, "wb") as fh:
                        for _ in range(args.blob_mb):
                            fh.write(os.urandom(2**20))
                    sha = sha256_file(blob)  # known beforehand, as for a DatasetRef: not timed
                    t = time.perf_counter()
                    r = client.put(
                        f"{bare_url}/upload/{i}",
                        content=file_chunks(blob),
                        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                    )
                    raw_s.append(time.perf_counter() - t)
                    if r.status_code != 201 or r.json()["size"] != size:
                        raise SystemExit(f"raw upload failed: {r.status_code} {r.text[:200]}")
                    t = time.perf_counter()
                    if not remote.ensure_blob(blob, sha):
                        raise SystemExit("the agent already held a fresh random blob?")
                    blob_s.append(time.perf_counter() - t)
                    (bare_dir / str(i)).unlink()
                    blob.unlink()
                    print(f"upload round {i}: raw {raw_s[-1]:.2f}s, agent {blob_s[-1]:.2f}s", file=sys.stderr)
    finally:
        if bare_proc is not None:
            stop_process(bare_proc, timeout=10)
        agent.close()
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6
    local_med, agent_med = statistics.median(local_s), statistics.median(agent_s)
    # wall time outside the worker's own run (spawn, dispatch, polling, download): less sensitive to how long
    # the training itself took in that round on a busy machine
    local_out = statistics.median(w - j for w, j in zip(local_s, worker_s["local"], strict=True))
    agent_out = statistics.median(w - j for w, j in zip(agent_s, worker_s["agent"], strict=True))
    raw_mb_s, agent_mb_s = mb / min(raw_s), mb / min(blob_s)
    out = {
        "overhead_s": round(agent_med - local_med, 3),
        "upload_ratio": round(agent_mb_s / raw_mb_s, 3),
        "dispatch_overhead_s": round(agent_out - local_out, 3),
        "local_job_s": round(local_med, 3),
        "agent_job_s": round(agent_med, 3),
        "local_job_s_all": [round(x, 3) for x in local_s],
        "agent_job_s_all": [round(x, 3) for x in agent_s],
        "local_worker_s_all": [round(x, 3) for x in worker_s["local"]],
        "agent_worker_s_all": [round(x, 3) for x in worker_s["agent"]],
        "same_metrics": all(m == metrics[0] for m in metrics),
        "blob_mb": round(mb, 1),
        "agent_upload_mb_s": round(agent_mb_s, 1),
        "raw_upload_mb_s": round(raw_mb_s, 1),
        "job_steps": args.steps,
        "repeat": args.repeat,
        "transport": "https, pinned certificate (both sides)",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
