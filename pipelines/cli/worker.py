"""``depin worker serve``: run the worker agent on this node (a rented GPU box or a lab server).

The admin token comes from ``--token-file`` or ``$DEPIN_AGENT_TOKEN`` (≥ 16 characters; the agent keeps only
its sha256). Bind ``--host 0.0.0.0`` to serve other machines; the default is loopback only. It serves HTTPS:
``--tls-cert/--tls-key`` (or the PEM text in ``$DEPIN_AGENT_TLS_CERT``/``$DEPIN_AGENT_TLS_KEY``), else a
self-signed certificate kept in the data dir; ``--json`` prints its ``tls_fingerprint`` for
``depin worker register --fingerprint``. Plain HTTP only with ``--insecure-http``.

:data:`app` is the ``depin worker`` group: ``serve`` here, the node commands of :mod:`pipelines.cli.nodes`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from depin_core import paths
from pipelines.cli import nodes
from pipelines.cli._output import emit_json, say


def serve(
    host: Annotated[
        str, typer.Option(help="address to bind (0.0.0.0 to accept other machines)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind (0 = any free port)")] = 8900,
    data_dir: Annotated[Path, typer.Option(help="where blobs, jobs and outputs live")] = paths.AGENT_DATA_DIR,
    token_file: Annotated[
        Path | None, typer.Option(help="file holding the admin token (default: $DEPIN_AGENT_TOKEN)")
    ] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="write {url, host, port, pid} here as JSON once listening")
    ] = None,
    max_parallel: Annotated[int, typer.Option(help="jobs running at once; more wait PENDING")] = 1,
    max_blob_gb: Annotated[
        float, typer.Option(help="largest blob (dataset shard, checkpoint) accepted, GiB")
    ] = 20.0,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="certificate PEM file (default: $DEPIN_AGENT_TLS_CERT, else self-signed)"),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="its private key PEM file (default: $DEPIN_AGENT_TLS_KEY)")
    ] = None,
    insecure_http: Annotated[
        bool, typer.Option("--insecure-http", help="serve plain HTTP (clients accept it only on loopback)")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="print one JSON line (url, port, tls_fingerprint, …) on stdout once listening"
        ),
    ] = False,
) -> None:
    """Run the worker agent (HTTPS API for blobs and jobs) until Ctrl-C / SIGTERM."""
    from gpu_jobs.agent import TOKEN_ENV, read_admin_token
    from gpu_jobs.agent.app import AgentSettings
    from gpu_jobs.agent.server import resolve_tls
    from gpu_jobs.agent.server import serve as serve_agent

    token = read_admin_token(token_file)
    os.environ.pop(TOKEN_ENV, None)  # job workers inherit the environment: never the admin token
    tls = resolve_tls(data_dir, tls_cert, tls_key, insecure_http=insecure_http)
    settings = AgentSettings(
        data_dir=data_dir, max_parallel=max_parallel, max_blob_bytes=int(max_blob_gb * 2**30)
    )

    def announce(doc: dict[str, Any]) -> None:
        say(
            ("depin worker agent", "bold green"),
            f" on {doc['url']} (data {settings.data_dir}); certificate sha256 {doc['tls_fingerprint']}; "
            "register it with `depin worker register --url … --fingerprint …`; Ctrl-C stops",
        )
        if as_json:
            emit_json({**doc, "data_dir": str(settings.data_dir.resolve())})

    with contextlib.suppress(KeyboardInterrupt):
        serve_agent(settings, token, host=host, port=port, ready_file=ready_file, on_ready=announce, tls=tls)


app = typer.Typer(
    name="worker",
    rich_markup_mode=None,
    help="GPU workers: run the agent on a GPU node, register nodes, quote and reap rented instances.",
    no_args_is_help=True,
)
app.command("serve")(serve)
for _command in (nodes.register, nodes.nodes, nodes.remove, nodes.quote, nodes.reap, nodes.script):
    app.command(_command.__name__)(_command)
