"""The function gateway on the local registry (``depin serve``, ``depin up``, ``depin demo``): its settings
from the environment and flags, and an admin key made on its first start.

Admin key of a local gateway: on the first start with no admin key configured
(``DEPIN_GATEWAY_ADMIN_KEY_HASHES`` / ``DEPIN_GATEWAY_ADMIN_KEYS_FILE``), a key is generated; only its
sha256 is stored, in ``<registry>/admin_keys.sha256``; the key itself is written to ``<registry>/admin.key``
(mode 0600), which ``depin publish --target URL`` reads by default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from depin_core import paths
from depin_core.fs import atomic_write_bytes
from pipelines._targets import KEY_FILE

KEYS_FILE = "admin_keys.sha256"  # sha256 digests of the admin keys, one per line; KEY_FILE: the key itself


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


__all__ = ["KEYS_FILE", "ensure_admin_key", "serve_settings"]
