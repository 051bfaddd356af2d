"""``depin serve`` / ``depin publish`` / ``depin invoke``: run the function gateway, publish models to it,
call functions.

The admin key a first ``depin serve`` generates (:func:`pipelines.stack.gateway.serve_settings`) is printed
once (stderr) and written to ``<registry>/admin.key`` (mode 0600); later starts print only the file's path.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from depin_core import paths
from depin_core.errors import ConfigError
from depin_core.names import FUNCTION_NAME_RULE
from pipelines._targets import KEY_FILE, make_target
from pipelines.cli._output import JsonOpt, emit_json, say
from pipelines.stack.gateway import serve_settings
from serving.settings import GatewayClientSettings

if TYPE_CHECKING:
    from serving.settings import GatewaySettings


# ---------------------------------------------------------------------------------------------- serve


def _announce(ready_file: Path, stop: threading.Event, settings: GatewaySettings, as_json: bool) -> None:
    """Wait until the gateway answers /healthz, then tell the user where it is (stderr, and --json stdout)."""
    import httpx

    from depin_core.tls import client_context, fingerprint

    verify: Any = True
    pin = None
    if settings.tls_cert_file is not None:
        pem = Path(settings.tls_cert_file).read_text()
        pin = fingerprint(pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
        verify = client_context(pem)
    while not stop.is_set():
        if ready_file.exists():
            doc = json.loads(ready_file.read_text())
            url = doc["url"]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2, verify=verify).status_code == 200:
                    where = f"registry {settings.registry_dir}"
                    if settings.registry_url:
                        where = f"registry {settings.registry_url}, cached in {settings.registry_dir}"
                    say(
                        ("depin gateway", "bold green"),
                        f" on {url} ({where}); invoke: POST {url}/v1/functions/<name>/invoke; Ctrl-C stops",
                    )
                    if pin:
                        say(f"TLS certificate sha256 {pin} (clients pin it: depin invoke --tls-cert FILE)")
                    if as_json:
                        emit_json(
                            {
                                "url": url,
                                "host": doc["host"],
                                "port": doc["port"],
                                "pid": doc["pid"],
                                "registry": str(settings.registry_dir),
                                "registry_url": settings.registry_url,
                                "admin_keys_file": str(settings.admin_keys_file or ""),
                                "trusted_publishers": settings.trusted_publishers,
                                "tls_fingerprint": pin,
                            }
                        )
                    return
        stop.wait(0.05)


def _shared_registry(
    settings: GatewaySettings, registry_url: str | None
) -> tuple[GatewaySettings, list[str]]:
    """Apply ``--registry-url`` and reach the shared registry's bucket once: a missing bucket or refused
    credentials stop here (``ConfigError``); an unreachable store only warns (the gateway keeps retrying)."""
    from depin_core.errors import TransientError
    from serving.object_store import ObjectStore
    from serving.settings import GatewaySettings

    if registry_url is not None:
        settings = GatewaySettings.model_validate({**dict(settings), "registry_url": registry_url})
    if not settings.registry_url:
        return settings, []
    try:
        ObjectStore.from_settings(settings).check()
    except TransientError as exc:
        return settings, [f"warning: {exc}"]
    return settings, []


def run_serve(
    *,
    host: str | None,
    port: int | None,
    registry: Path | None,
    as_json: bool,
    registry_url: str | None = None,
) -> None:
    """Serve the gateway in this process until Ctrl-C / SIGTERM (``registry_url``: a registry on object
    storage shared with other gateways; ``registry`` is then this gateway's cache of it)."""
    from serving.server import serve

    settings, notes, new_key = serve_settings(host, port, registry)
    settings, more = _shared_registry(settings, registry_url)
    notes += more
    if new_key is not None:
        key_file = settings.registry_dir / KEY_FILE
        # plain write, not rich: the key must come out exactly, unwrapped, once
        sys.stderr.write(
            f"new admin key (shown once; also saved to {key_file}, mode 0600; the gateway keeps only its "
            f"sha256): {new_key}\n"
        )
        sys.stderr.flush()
        del new_key
    for note in notes:
        say(note)
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="depin-serve-") as tmp:
        ready = Path(tmp) / "ready.json"
        watcher = threading.Thread(target=_announce, args=(ready, stop, settings, as_json), daemon=True)
        watcher.start()
        try:
            with contextlib.suppress(KeyboardInterrupt):
                serve(settings, ready_file=ready)
        finally:
            stop.set()


def serve(
    host: Annotated[
        str | None, typer.Option(help="address to bind (default: 127.0.0.1, or DEPIN_GATEWAY_HOST)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (0 = any free port) (default: 8787)")] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            help=f"registry directory (default: {paths.REGISTRY_DIR}); with --registry-url, this gateway's cache"
        ),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(
            help="s3://bucket/prefix: serve a registry shared with other gateways (default: "
            "DEPIN_GATEWAY_REGISTRY_URL; credentials DEPIN_GATEWAY_S3_* or AWS_*)"
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON line (url, port, …) on stdout once listening")
    ] = False,
) -> None:
    """Run the function gateway on the registry until Ctrl-C (admin key generated on first start)."""
    run_serve(host=host, port=port, registry=registry, as_json=as_json, registry_url=registry_url)


# ---------------------------------------------------------------------------------------------- publish


def run_publish(
    *,
    model: Path,
    name: str,
    alias: str | None,
    target: str,
    registry: Path | None,
    admin_key_file: Path | None,
    max_batch_size: int,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
    tls_cert: Path | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """Build, sign and publish ``model`` as function ``name``, smoke-call the new version with its example,
    then move ``alias`` (``serving.targets.publish_function``); returns the ``depin publish --json`` object:
    the ``PublishResult`` fields, ``function_url`` and, for Fluence, ``fluence`` (the VM). ``tls_cert``: the
    gateway's certificate to pin (a recorded Fluence gateway's is pinned by itself)."""
    from serving.targets import publish_function

    with make_target(
        target,
        registry=registry,
        admin_key_file=admin_key_file,
        tls_cert=tls_cert,
        fluence_target=fluence_target,
        max_usd_per_day=max_usd_per_day,
        max_batch_size=max_batch_size,
        fluence_replicas=replicas,
    ) as where:
        done = publish_function(where, model, name, alias)
        return {**done.result.to_json(), "function_url": done.function_url, **where.details()}


def publish(
    model: Annotated[Path, typer.Option(help="model artifact directory (from depin train) or a bundle")],
    name: Annotated[str, typer.Option(help=f"function name: {FUNCTION_NAME_RULE}")],
    alias: Annotated[
        str | None, typer.Option(help="also point this alias (e.g. prod) at the version")
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="'local' (the registry directory), 'fluence' (a gateway VM on Fluence; DEPIN_FLUENCE_API_KEY) "
            "or a gateway URL"
        ),
    ] = "local",
    registry: Annotated[
        Path | None,
        typer.Option(help=f"registry directory for --target local (default: {paths.REGISTRY_DIR})"),
    ] = None,
    fluence_target: Annotated[
        str | None,
        typer.Option(
            help="--target fluence: deployment name, VM depin-gw-<name> (default DEPIN_FLUENCE_TARGET)"
        ),
    ] = None,
    max_usd_per_day: Annotated[
        float | None,
        typer.Option(
            help="--target fluence: refuse a new VM costing more (default DEPIN_FLUENCE_MAX_USD_PER_DAY, 5)"
        ),
    ] = None,
    admin_key_file: Annotated[
        Path | None,
        typer.Option(
            help="file with the gateway's admin key (default: DEPIN_ADMIN_KEY, else <registry>/admin.key)"
        ),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="most rows per request and per batch")] = 1024,
    tls_cert: Annotated[
        Path | None, typer.Option(help="--target https://…: the gateway's certificate (PEM) to pin")
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            help="--target fluence: gateway VMs, each in another datacenter (default DEPIN_FLUENCE_REPLICAS, "
            "else as many as the target has, 1 for a new one)"
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a model as a versioned function bundle and publish it: verified upload, a smoke call of the new
    version with its manifest's example, then the alias moves (not if the smoke call fails)."""
    result = run_publish(
        model=model,
        name=name,
        alias=alias,
        target=target,
        registry=registry,
        admin_key_file=admin_key_file,
        max_batch_size=max_batch_size,
        fluence_target=fluence_target,
        max_usd_per_day=max_usd_per_day,
        tls_cert=tls_cert,
        replicas=replicas,
    )
    moved = ", ".join(result["moved"]) or "none (version already present)"
    say(
        "published ",
        (f"{result['name']}@{result['version']}", "bold"),
        f" by {result['publisher']} to {result['target']}; aliases moved: {moved}",
    )
    if as_json:
        emit_json(result)


# ---------------------------------------------------------------------------------------------- invoke


def parse_data(data: str) -> list[Any] | dict[str, Any]:
    """``--data``: a JSON row, a list of rows, or a request body of one form (``{"inputs": [...]}``,
    ``{"telemetry": [...]}``, ``{"plan": {...}}``); ``@FILE`` reads it from a file."""
    text = data
    if data.startswith("@"):
        path = Path(data[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"--data {data}: cannot read {path} ({exc.strerror})") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"--data is not JSON ({exc}); pass a row object, a list of rows, "
            '{"inputs": [...]} or @file.json'
        ) from None
    if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), list | dict):
        return doc  # a request body (one form: rows, telemetry, a plan, …), sent as is; a row's fields are scalars
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list) and doc:
        return doc
    raise ConfigError(
        '--data must be a row object, a non-empty list of rows, {"inputs": [...]}, {"telemetry": [...]} '
        'or {"plan": {...}}'
    )


def run_invoke(
    *,
    ref: str,
    data: str,
    target: str | None,
    request_id: str | None,
    tls_cert: Path | None = None,
    insecure_http: bool = False,
) -> dict[str, Any]:
    """Invoke ``ref`` (name, name@alias, name@version) on the gateway; returns the response document.
    ``target`` ``fluence`` is the recorded Fluence gateway (``DEPIN_FLUENCE_TARGET``); its certificate is
    pinned, as is the one of any recorded Fluence gateway URL, or ``tls_cert``. ``insecure_http``: accept a
    plain-HTTP gateway on another machine (the rows cross the network in clear)."""
    url = target or GatewayClientSettings().gateway_url
    if url == "local":
        raise ConfigError("--target local: give the URL of the gateway serving the registry (depin serve)")
    rows = parse_data(data)
    with make_target(url, tls_cert=tls_cert, insecure_http=insecure_http, retries=3, timeout=60) as where:
        t0 = time.perf_counter()
        doc = where.invoke(ref, rows, request_id=request_id)
        doc["latency_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    return doc


def invoke(
    ref: Annotated[str, typer.Argument(help="function: name, name@alias or name@version")],
    data: Annotated[
        str,
        typer.Option(
            help='a JSON row, a list of rows, a body of one form ({"inputs": [...]}, {"telemetry": [...]}, {"plan": {...}}), or @file.json'
        ),
    ],
    target: Annotated[
        str | None,
        typer.Option(
            help="gateway URL, or 'fluence' (the recorded Fluence gateway) (default: DEPIN_GATEWAY_URL, else "
            "http://127.0.0.1:8787)"
        ),
    ] = None,
    request_id: Annotated[str | None, typer.Option(help="X-Request-Id (keys sticky weighted splits)")] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="the gateway's certificate (PEM) to pin; a Fluence gateway's is pinned from "
            f"{paths.FLUENCE_STATE_DIR}"
        ),
    ] = None,
    insecure_http: Annotated[
        bool,
        typer.Option(
            "--insecure-http",
            help="allow a plain-HTTP gateway on another machine (the rows cross the network in clear)",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Call a served function with input rows (or raw telemetry, or a plan) and print its output rows."""
    doc = run_invoke(
        ref=ref,
        data=data,
        target=target,
        request_id=request_id,
        tls_cert=tls_cert,
        insecure_http=insecure_http,
    )
    say(f"{doc['function']}@{doc['version']} in {doc['latency_ms']:.1f} ms:")
    if as_json:
        emit_json(doc)
    else:
        for row in doc["outputs"]:
            say(json.dumps(row, separators=(",", ":")))
