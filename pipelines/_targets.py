"""Which publish target a run means: the one place that turns ``--target`` / ``PublishParams.target``
('local', 'fluence' or a gateway URL) and the options around it into a ``serving.targets.Target``, reading
the settings and files it needs — the registry directory, the admin key, the certificate to pin, the Fluence
state. ``depin publish``, ``depin invoke`` and the flows all get their target here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from depin_core.errors import ConfigError
from serving.settings import ADMIN_KEY_ENV, GatewayClientSettings

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from pipelines.params import PublishParams
    from serving.fluence.publisher import FluencePublisher
    from serving.fluence.settings import FluenceSettings
    from serving.targets import Target

KEY_FILE = "admin.key"  # the key `depin serve` generated, beside the registry's keys file


def registry_dir(registry: Path | None) -> Path:
    """``registry``, else the gateway's registry directory (``DEPIN_GATEWAY_REGISTRY_DIR``, else
    :data:`depin_core.paths.REGISTRY_DIR`)."""
    from serving.settings import GatewaySettings

    return registry or GatewaySettings().registry_dir


def local_gateway_url(url: str | None = None) -> str:
    """The gateway serving the local registry: ``url``, else ``DEPIN_GATEWAY_URL``, else the default."""
    return (url or GatewayClientSettings().gateway_url).rstrip("/")


def read_admin_key(admin_key_file: Path | None, registry: Path) -> SecretStr:
    """The admin key: ``--admin-key-file``, else ``DEPIN_ADMIN_KEY``, else ``<registry>/admin.key``."""
    path = admin_key_file
    if path is None:
        if (env := GatewayClientSettings().admin_key_value()) is not None:
            return env
        path = registry / KEY_FILE
        if not path.exists():
            raise ConfigError(
                f"no admin key: pass --admin-key-file FILE, set {ADMIN_KEY_ENV}, or run against the gateway "
                f"`depin serve --registry {registry}` started (it wrote {path})"
            )
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--admin-key-file {path}: cannot read it ({exc.strerror}); fix the path") from None
    if not key:
        raise ConfigError(f"--admin-key-file {path} is empty; it must hold the gateway's admin key")
    return SecretStr(key)


def gateway_pin(url: str, tls_cert: Path | None) -> str | None:
    """The certificate (PEM) to pin for ``url``: ``--tls-cert``, else ``DEPIN_GATEWAY_CERT`` (PEM text), else
    the one recorded for a Fluence gateway at that URL (``depin publish --target fluence``), else None (system
    CAs for https)."""
    from serving.settings import GatewayClientSettings

    if tls_cert is not None:
        try:
            return tls_cert.read_text()
        except OSError as exc:
            raise ConfigError(
                f"--tls-cert {tls_cert}: cannot read it ({exc.strerror}); fix the path"
            ) from None
    if (pem := GatewayClientSettings().gateway_cert) and pem.strip():
        if "BEGIN CERTIFICATE" not in pem:
            raise ConfigError("DEPIN_GATEWAY_CERT must hold a PEM certificate (-----BEGIN CERTIFICATE-----)")
        return pem
    return fluence_pin_for(url)


# ---------------------------------------------------------------------------------------------- Fluence


def fluence_settings(**overrides: Any) -> FluenceSettings:
    """``FluenceSettings`` from the environment, with the non-None ``overrides`` on top."""
    from serving.fluence.settings import FluenceSettings

    return FluenceSettings(**{k: v for k, v in overrides.items() if v is not None})


def make_fluence_publisher(
    *,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    max_batch_size: int = 1024,
    account: LocalAccount | None = None,
    replicas: int | None = None,
    **overrides: Any,
) -> FluencePublisher:
    """A :class:`FluencePublisher` for the settings in the environment plus these overrides (``replicas``:
    gateway VMs, default ``DEPIN_FLUENCE_REPLICAS``; other ``FluenceSettings`` fields by name in
    ``overrides``), signing with ``account`` (default: the local
    publisher key, ``DEPIN_PUBLISHER_KEY`` or :data:`depin_core.paths.PUBLISHER_KEY_FILE`). Close it (context
    manager)."""
    from serving.bundle import load_publisher_account
    from serving.fluence.publisher import FluencePublisher

    settings = fluence_settings(
        target=fluence_target,
        max_usd_per_day=max_usd_per_day,
        port=port,
        state_dir=state_dir,
        replicas=replicas,
        **overrides,
    )
    client = settings.client()
    try:
        return FluencePublisher(
            client,
            account or load_publisher_account(),
            settings,
            max_batch_size=max_batch_size,
            own_client=True,
        )
    except BaseException:
        client.close()
        raise


def fluence_gateway_url(fluence_target: str | None = None, state_dir: Path | None = None) -> str | None:
    """The URL of the target's gateway recorded in the state file (None before the first publish). Reads
    no API."""
    from serving.fluence.state import StateStore
    from serving.fluence.target import recorded_url

    settings = fluence_settings(target=fluence_target, state_dir=state_dir)
    return recorded_url(StateStore(settings.state_dir), settings.target)


def fluence_pin_for(url: str, state_dir: Path | None = None) -> str | None:
    """The pinned certificate (PEM) of the recorded Fluence gateway serving at ``url``, or None. Reads no
    API."""
    from serving.fluence.target import pinned_cert_for

    return pinned_cert_for(url, fluence_settings(state_dir=state_dir).state_dir)


# ---------------------------------------------------------------------------------------------- factory


def make_target(
    target: str,
    *,
    registry: Path | None = None,
    gateway_url: str | None = None,
    admin_key_file: Path | None = None,
    tls_cert: Path | None = None,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
    max_batch_size: int = 1024,
    insecure_http: bool = False,
    fluence_replicas: int | None = None,
    **client_options: Any,
) -> Target:
    """The :class:`serving.targets.Target` ``target`` names. 'local': the registry directory ``registry``
    (served at ``gateway_url``); 'fluence': the recorded gateway VM of ``fluence_target`` (created by the
    first publish, price-capped at ``max_usd_per_day``; ``fluence_replicas`` gateway VMs, each in another
    datacenter, default ``DEPIN_FLUENCE_REPLICAS``); an ``http(s)://`` URL: that gateway, with the admin
    key of ``admin_key_file`` and the certificate ``tls_cert`` pinned (a recorded Fluence VM's by itself).
    Keys are read only when a call needs them. ``client_options`` go to ``serving.client.GatewayClient``."""
    from serving.bundle import load_publisher_account

    if target == "local":
        from serving.targets import LocalTarget

        return LocalTarget(
            registry_dir(registry),
            load_publisher_account,
            url=local_gateway_url(gateway_url),
            max_batch_size=max_batch_size,
        )
    if target == "fluence":
        from serving.fluence.state import StateStore
        from serving.fluence.target import FluenceTarget

        settings = fluence_settings(target=fluence_target, max_usd_per_day=max_usd_per_day)
        return FluenceTarget(
            StateStore(settings.state_dir),
            settings.target,
            lambda: make_fluence_publisher(
                fluence_target=fluence_target,
                max_usd_per_day=max_usd_per_day,
                max_batch_size=max_batch_size,
                replicas=fluence_replicas,
            ),
            **client_options,
        )
    if not target.startswith(("http://", "https://")):
        raise ConfigError(
            f"--target {target!r}: use 'local' (the registry directory), 'fluence' or a gateway URL "
            "http(s)://…"
        )
    from serving.targets import GatewayTarget

    url = target.rstrip("/")
    return GatewayTarget(
        url,
        load_publisher_account,
        admin_key=lambda: read_admin_key(admin_key_file, registry_dir(registry)),
        tls_cert_pem=gateway_pin(url, tls_cert),
        insecure_http=insecure_http,
        max_batch_size=max_batch_size,
        **client_options,
    )


def open_target(params: PublishParams, **client_options: Any) -> Target:
    """The target of the flows' ``PublishParams`` (see :func:`make_target`). Close it (context manager)."""
    return make_target(
        params.target,
        registry=params.registry,
        gateway_url=params.gateway_url,
        admin_key_file=params.admin_key_file,
        tls_cert=params.tls_cert,
        fluence_target=params.fluence_target,
        max_usd_per_day=params.max_usd_per_day,
        max_batch_size=params.max_batch_size,
        fluence_replicas=params.fluence_replicas,
        **client_options,
    )


__all__ = [
    "fluence_gateway_url",
    "fluence_pin_for",
    "fluence_settings",
    "gateway_pin",
    "local_gateway_url",
    "make_fluence_publisher",
    "make_target",
    "open_target",
    "read_admin_key",
    "registry_dir",
]
