"""Admin API keys: generated at random, stored only as sha256 digests, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Collection
from pathlib import Path

KEY_PREFIX = "dgk_"  # "depin gateway key": makes a leaked key easy to recognise and grep for


def hash_api_key(key: str) -> str:
    """The sha256 hex digest a gateway stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_admin_key() -> tuple[str, str]:
    """A fresh random admin key and its digest: ``(key, hash_api_key(key))``. Show the key once, store the
    digest (``DEPIN_GATEWAY_ADMIN_KEY_HASHES`` or the keys file)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_api_key(key)


def ensure_keys_file(path: Path | str) -> str | None:
    """Create the admin keys file ``path`` (mode 0600) with the digest of a fresh key if it does not exist,
    and return that key — to be shown to the operator once. Returns None when the file already exists."""
    path = Path(path)
    if path.exists():
        return None
    key, digest = new_admin_key()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"# sha256 digests of depin gateway admin keys, one per line\n{digest}\n")
    return key


class AdminKeys:
    """Checks a presented key against stored digests without leaking, through timing, which digest or how
    much of it matched (every digest is compared, each with ``hmac.compare_digest``)."""

    def __init__(self, digests: Collection[str]) -> None:
        self._digests = tuple(d.encode("ascii") for d in digests)

    @property
    def enabled(self) -> bool:
        """False when no key is configured (the admin API then refuses every request)."""
        return bool(self._digests)

    def check(self, presented: str) -> bool:
        """True when ``presented`` hashes to one of the stored digests."""
        digest = hash_api_key(presented).encode("ascii")
        ok = False
        for stored in self._digests:
            ok |= hmac.compare_digest(digest, stored)
        return ok
