"""``depin serve`` / ``depin publish`` / ``depin invoke``: run the function gateway, publish models to it,
call functions.

Admin key of a local gateway: on the first ``depin serve`` with no admin key configured
(``DEPIN_GATEWAY_ADMIN_KEY_HASHES`` / ``DEPIN_GATEWAY_ADMIN_KEYS_FILE``), a key is generated; only its
sha256 is stored, in ``<registry>/admin_keys.sha256``; the key itself is printed once (stderr) and written to
``<registry>/admin.key`` (mode 0600), which ``depin publish --target URL`` reads by default. Later starts
print only the file's path.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depin_core import paths
from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from pipelines._output import emit_json, say
from pipelines._targets import KEY_FILE, make_target
from serving.settings import GatewayClientSettings

if TYPE_CHECKING:
    from serving.settings import GatewaySettings

KEYS_FILE = "admin_keys.sha256"  # sha256 digests of the admin keys, one per line; KEY_FILE: the key itself


# ---------------------------------------------------------------------------------------------- serve


def _write_private(path: Path, text: str) -> bool:
    """Create ``path`` with mode 0600 holding ``text``; False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True


def ensure_admin_key(registry_dir: Path) -> tuple[Path, str | None]:
    """The registry's admin keys file, creating a key first if there is none: (keys file, new key or None).

    The new key is returned only so the caller can show it once; only its sha256 is kept in the keys file."""
    from serving import hash_api_key, new_admin_key
    from serving.settings import read_keys_file

    keys_file, key_file = registry_dir / KEYS_FILE, registry_dir / KEY_FILE
    if keys_file.exists() and read_keys_file(keys_file):
        return keys_file, None
    new: str | None = None
    if key_file.exists():  # a crash between writing the key and its digest: recover the digest
        digest = hash_api_key(key_file.read_text().strip())
    else:
        new, digest = new_admin_key()
        if not _write_private(key_file, new + "\n"):
            new, digest = None, hash_api_key(key_file.read_text().strip())  # another process was first
    header = "# sha256 of depin gateway admin keys, one per line (never the keys themselves)\n"
    atomic_write_bytes(keys_file, (header + digest + "\n").encode())
    return keys_file, new


def serve_settings(
    host: str | None, port: int | None, registry: Path | None
) -> tuple[Any, list[str], str | None]:
    """``GatewaySettings`` for ``depin serve``: environment + flags, an admin key (generated on first start)
    and the local publisher trusted when no publisher is configured. Returns (settings, notes, new key)."""
    from serving.bundle import load_publisher_account
    from serving.settings import GatewaySettings

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if registry is not None:
        overrides["registry_dir"] = registry
    settings = GatewaySettings(**overrides)
    notes: list[str] = []
    new_key = None
    if not settings.admin_key_hashes and settings.admin_keys_file is None:
        keys_file, new_key = ensure_admin_key(settings.registry_dir)
        settings = settings.model_copy(update={"admin_keys_file": keys_file})
        key_file = settings.registry_dir / KEY_FILE
        if new_key is None:
            where = f"in {key_file}" if key_file.exists() else f"digest in {keys_file}"
            notes.append(f"admin key: {where}")
    if not settings.trusted_publishers and not settings.allow_any_publisher:
        account = load_publisher_account()
        settings = settings.model_copy(update={"trusted_publishers": [account.address]})
        notes.append(
            f"trusting the local publisher {account.address} (DEPIN_PUBLISHER_KEY or "
            f"{paths.PUBLISHER_KEY_FILE}); "
            "set DEPIN_GATEWAY_TRUSTED_PUBLISHERS to trust others"
        )
    settings.trusted()  # ConfigError now rather than in the server
    return settings, notes, new_key


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
                    say(
                        ("depin gateway", "bold green"),
                        f" on {url} (registry {settings.registry_dir}); "
                        f"invoke: POST {url}/v1/functions/<name>/invoke; Ctrl-C stops",
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
                                "admin_keys_file": str(settings.admin_keys_file or ""),
                                "trusted_publishers": settings.trusted_publishers,
                                "tls_fingerprint": pin,
                            }
                        )
                    return
        stop.wait(0.05)


def run_serve(*, host: str | None, port: int | None, registry: Path | None, as_json: bool) -> None:
    """Serve the gateway in this process until Ctrl-C / SIGTERM."""
    from serving.server import serve

    settings, notes, new_key = serve_settings(host, port, registry)
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
    ) as where:
        done = publish_function(where, model, name, alias)
        return {**done.result.to_json(), "function_url": done.function_url, **where.details()}


# ---------------------------------------------------------------------------------------------- invoke


def parse_data(data: str) -> list[Any]:
    """``--data``: a JSON row, a list of rows, or ``{"inputs": [...]}``; ``@FILE`` reads it from a file."""
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
    if isinstance(doc, dict) and set(doc) == {"inputs"}:
        doc = doc["inputs"]
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list) and doc:
        return doc
    raise ConfigError('--data must be a row object, a non-empty list of rows, or {"inputs": [...]}')


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
