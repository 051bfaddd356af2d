"""``depin worker register|nodes|remove|reap|quote|script``: registered worker nodes and rented instances.

Plain typer-compatible command functions (:mod:`pipelines.cli.worker` mounts them under ``depin worker``). Each takes
``--json`` and then prints one JSON object as its last stdout line; human text goes to stderr. Tokens are read
from files, stored only in the 0600 nodes file, and never printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr, ValidationError

from depin_core import paths
from depin_core.errors import ConfigError, PermanentError
from gpu_jobs.providers import (
    DEFAULT_NODES_FILE,
    PROVIDERS,
    bootstrap_script,
    choose_offer,
    make_provider,
    new_agent_token,
)
from gpu_jobs.providers import reap as reap_instances
from gpu_jobs.providers.base import DEFAULT_AGENT_PORT, DEFAULT_DATA_DIR
from gpu_jobs.providers.manual import ManualProvider, Node
from gpu_jobs.spec import JobKind, JobSpec, Limits, ModelSpec, Outputs, Resources
from pipelines.cli._output import JsonOpt, emit_json, say

NodesFileOpt = Annotated[
    Path,
    typer.Option("--nodes-file", help=f"registered nodes (JSON, mode 0600) (default: {paths.NODES_FILE})"),
]
ProviderOpt = Annotated[str, typer.Option("--provider", help=f"one of: {', '.join(PROVIDERS)}")]


def read_token_file(path: Path) -> SecretStr:
    """The agent token in ``path`` (surrounding whitespace stripped); ``ConfigError`` naming the file."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot read it ({exc.strerror}); fix the path") from None
    if not token:
        raise ConfigError(f"--token-file {path} is empty; it must hold the agent's token (DEPIN_AGENT_TOKEN)")
    return SecretStr(token)


def _health_row(manual: ManualProvider, node: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": node.name,
        "url": node.url,
        "gpu": node.gpu,
        "usd_per_hour": node.usd_per_hour,
        "healthy": False,
        "problem": None,
    }
    try:
        health = manual.health(node)
    except PermanentError as exc:
        row["problem"] = str(exc)
        return row
    if health is None:
        row["problem"] = manual.last_problem
        return row
    row.update(
        healthy=True,
        gpus=health.get("gpus") or [],
        agent_version=health.get("agent_version"),
        node=health.get("node"),
        jobs_running=health.get("jobs_running"),
        tflops=health.get("tflops"),
    )
    return row


def register(
    name: Annotated[str, typer.Argument(help="node name: 1-63 of a-z, 0-9, '.', '_', '-'")],
    url: Annotated[str, typer.Option(help="the agent's base URL, e.g. https://203.0.113.7:8900")],
    token_file: Annotated[
        Path, typer.Option(help="file holding the agent's token (DEPIN_AGENT_TOKEN there)")
    ],
    fingerprint: Annotated[
        str | None,
        typer.Option(
            help="sha256 of the agent's TLS certificate (tls_fingerprint of `depin worker serve --json`); "
            "required for https"
        ),
    ] = None,
    gpu: Annotated[str | None, typer.Option(help="what the node has, e.g. 'RTX 4090' (informative)")] = None,
    usd_per_hour: Annotated[
        float, typer.Option(help="what the node costs per hour (for offer choice)")
    ] = 0.0,
    nodes_file: NodesFileOpt = DEFAULT_NODES_FILE,
    as_json: JsonOpt = False,
) -> None:
    """Register a node running `depin worker serve` (GPUnet rental, lab server, …) under NAME."""
    token = read_token_file(token_file)
    with ManualProvider(nodes_file) as manual:
        try:  # validate and probe the node before saving it
            candidate = Node(
                name=name,
                url=url,
                token=token,
                gpu=gpu,
                usd_per_hour=usd_per_hour,
                tls_fingerprint=fingerprint,
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "node"
            if field in ("node", "tls_fingerprint"):  # the checks across fields: the pin, or http to a remote
                field = "fingerprint" if "fingerprint" in err["msg"] else "url"
            raise ConfigError(f"register {name}: --{field.replace('_', '-')}: {err['msg']}") from None
        row = _health_row(manual, candidate)
        if row["problem"] and "refused the token" in row["problem"]:
            raise ConfigError(
                f"{url} refused the token in {token_file}: use the token the agent was started with"
            )
        if row["problem"] and "pinned" in row["problem"]:
            raise ConfigError(f"register {name}: --fingerprint: {row['problem']}; nothing was registered")
        manual.register(
            name, url, token, gpu=gpu, usd_per_hour=usd_per_hour, tls_fingerprint=candidate.tls_fingerprint
        )
    state = "healthy" if row["healthy"] else f"not answering now ({row['problem']})"
    say("registered node ", (name, "bold"), f" at {row['url']}: {state}; nodes file {nodes_file}")
    if as_json:
        emit_json({"registered": name, "nodes_file": str(nodes_file), **row})


def nodes(nodes_file: NodesFileOpt = DEFAULT_NODES_FILE, as_json: JsonOpt = False) -> None:
    """List the registered nodes with their health (GPUs, jobs running)."""
    with ManualProvider(nodes_file) as manual:
        rows = [_health_row(manual, n) for n in manual.list()]
    if not rows:
        say(
            f"no nodes registered in {nodes_file} "
            "(depin worker register NAME --url … --token-file … --fingerprint …)"
        )
    for row in rows:
        gpus = (
            ", ".join(f"{g.get('name')} {g.get('memory_gb')} GB" for g in row.get("gpus") or []) or "no GPU"
        )
        state = (
            f"healthy, {gpus}, {row.get('jobs_running')} job(s)"
            if row["healthy"]
            else f"DOWN: {row['problem']}"
        )
        say(f"{row['name']:<20} {row['url']:<36} ${row['usd_per_hour']:.2f}/h  {state}")
    if as_json:
        emit_json({"nodes_file": str(nodes_file), "nodes": rows})


def remove(
    name: Annotated[str, typer.Argument(help="the registered node's name")],
    nodes_file: NodesFileOpt = DEFAULT_NODES_FILE,
    as_json: JsonOpt = False,
) -> None:
    """Forget a registered node (the node itself keeps running)."""
    with ManualProvider(nodes_file) as manual:
        if not manual.remove(name):
            known = ", ".join(n.name for n in manual.list()) or "none"
            raise ConfigError(f"node {name!r} is not registered in {nodes_file} (known: {known})")
    say("removed node ", (name, "bold"), f" from {nodes_file}")
    if as_json:
        emit_json({"removed": name, "nodes_file": str(nodes_file)})


def reap(
    provider: ProviderOpt,
    keep: Annotated[
        list[str] | None, typer.Option(help="instance name of a live job to leave alone (repeatable)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would be destroyed")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Destroy our rented instances (names depin-…) that belong to no live job: what crashed runs leaked."""
    live = set(keep or [])
    p = make_provider(provider)
    try:
        ours = p.instances()
        doomed = sorted(i.name for i in ours if i.name not in live)
        destroyed = doomed if dry_run else reap_instances(p, live)
    finally:
        p.close()
    verb = "would destroy" if dry_run else "destroyed"
    say(f"{provider}: {len(ours)} instance(s) of ours; {verb} {len(destroyed)}: {', '.join(destroyed)}")
    if as_json:
        emit_json(
            {
                "provider": provider,
                "dry_run": dry_run,
                "destroyed": [] if dry_run else destroyed,
                "would_destroy": destroyed if dry_run else [],
                "kept": sorted(i.name for i in ours if i.name in live),
            }
        )


def quote(
    provider: ProviderOpt,
    gpus: Annotated[int, typer.Option(help="GPUs needed")] = 1,
    min_vram: Annotated[float, typer.Option(help="GB of memory per GPU")] = 0.0,
    max_usd_per_hour: Annotated[float | None, typer.Option(help="price cap for the choice")] = None,
    max_wall_s: Annotated[float, typer.Option(help="job wall time (io.net prepays it)")] = 3600.0,
    limit: Annotated[int, typer.Option(help="offers to show, cheapest first")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Print the provider's current offers for GPUS x MIN_VRAM and the one a run would choose."""
    spec = JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family="quote"),
        resources=Resources(gpu_count=gpus, min_vram_gb=min_vram),
        limits=Limits(max_wall_s=max_wall_s),
        outputs=Outputs(dir="."),
    )
    p = make_provider(provider)
    try:
        offers = sorted(p.quote(spec), key=lambda o: (o.usd_per_hour, o.offer_id))
    finally:
        p.close()
    fitting = [o for o in offers if o.gpu_count >= gpus and o.vram_gb >= min_vram]
    chosen = choose_offer(offers, spec, max_usd_per_hour=max_usd_per_hour)
    for o in fitting[:limit]:
        mark = "*" if chosen is not None and o.offer_id == chosen.offer_id else " "
        say(
            f"{mark} {o.offer_id:<16} {o.gpu_count} x {o.gpu_name:<18} {o.vram_gb:6.1f} GB  "
            f"${o.usd_per_hour:.3f}/h  {o.region or ''}"
        )
    if chosen is None:
        say(f"{provider}: no offer fits {gpus} GPU(s) x {min_vram:g} GB under the cap")
    if as_json:
        emit_json(
            {
                "provider": provider,
                "offers": [o.model_dump(mode="json") for o in fitting[:limit]],
                "count": len(fitting),
                "chosen": chosen.model_dump(mode="json") if chosen else None,
            }
        )


def script(
    package: Annotated[
        str, typer.Option(help="pip requirement installed on the node (name, git URL, wheel URL)")
    ] = ("depin-pipeline"),
    port: Annotated[
        int,
        typer.Option(help="port the agent listens on (0.0.0.0); $DEPIN_AGENT_PORT on the node overrides it"),
    ] = DEFAULT_AGENT_PORT,
    data_dir: Annotated[
        str, typer.Option(help="the agent's data directory on the node; $DEPIN_AGENT_DATA_DIR overrides it")
    ] = DEFAULT_DATA_DIR,
    background: Annotated[
        bool, typer.Option(help="start the agent with nohup and return (on-start hooks)")
    ] = False,
    token_out: Annotated[
        Path | None, typer.Option(help="also write a fresh agent token here (mode 0600; never printed)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the bootstrap script that turns a rented GPU node (GPUnet, any SSH host) into a worker.

    Run it there with the token in the environment (DEPIN_AGENT_TOKEN=... sh bootstrap.sh), then
    `depin worker register NAME --url https://HOST:PORT --token-file FILE --fingerprint SHA256` here."""
    text = bootstrap_script(package=package, port=port, data_dir=data_dir, background=background)
    if token_out is not None:
        token_out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(token_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"--token-out {token_out} exists; remove it or pick another path") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(new_agent_token().get_secret_value() + "\n")
        say(f"wrote a new agent token to {token_out} (mode 0600)")
    if as_json:
        emit_json({"script": text, "port": port, "token_file": str(token_out) if token_out else None})
    else:
        typer.echo(text, nl=False)
