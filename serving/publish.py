"""Publishing functions: build a signed bundle from a model artifact and ship it to a target.

A :class:`Publisher` takes a model artifact directory (``depin train`` output) — or an already built bundle
directory — and a function name, and returns a :class:`PublishResult` once the target serves the version and,
if asked, has moved an alias to it. Implementations:

- :class:`LocalPublisher` writes a registry directory (``serving.registry.Registry``); a gateway serving that
  directory picks the change up by polling ``Registry.revision()``.
- :class:`GatewayPublisher` uses a gateway's admin API over HTTP: ``PUT`` the packed bundle, then **verify the
  upload** (fetch the version's ``manifest.json`` + ``signature.json`` back and check the content, version and
  signer), then move the alias. Idempotent: publishing a version the target already holds is fine; transient
  failures are retried (``serving.client``), permanent ones raise ``GatewayRefused`` with the fix.

``serving.fluence.publisher.FluencePublisher`` implements it for a gateway on a Fluence VM. ``depin publish``
and the flows do not call publishers directly: they go through ``serving.targets`` (publish → smoke call →
alias move), whose targets use these publishers for the publish step.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Collection
from pathlib import Path
from types import EllipsisType
from typing import Any, Protocol, runtime_checkable

from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict, SecretStr

from depin_core.errors import ConfigError, PermanentError
from serving.bundle import (
    DEFAULT_MAX_BATCH_SIZE,
    MANIFEST,
    SIGNATURE,
    Bundle,
    build_bundle,
    pack_bundle,
    parse_manifest,
    recover_publisher,
    valid_name,
    verify_bundle,
)
from serving.client import GatewayClient
from serving.errors import BundleError
from serving.registry import Registry, valid_alias


class PublishResult(BaseModel):
    """What a publish did. ``aliases`` is the function's alias table after publishing; ``moved`` lists the
    aliases that now point to ``version`` and did not before; ``created`` is False when the target already
    held the version (then ``publisher``/``manifest_sha256`` describe the copy it holds)."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    publisher: str
    target: str
    manifest_sha256: str
    signature: str
    created: bool
    aliases: dict[str, dict[str, float]]
    moved: list[str]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (what ``depin publish --json`` prints)."""
        return self.model_dump(mode="json")


@runtime_checkable
class Publisher(Protocol):
    """Something that can publish a function: build/sign the bundle, ship it, verify it, move the alias."""

    @property
    def target(self) -> str:
        """Where this publisher publishes (a registry path, a URL, …): ``PublishResult.target``."""
        ...

    def publish(self, model_dir: Path | str, name: str, *, alias: str | None = None) -> PublishResult:
        """Publish the model artifact (or bundle) at ``model_dir`` as function ``name``; move ``alias``
        (besides ``latest``, which every new version gets) to the version. Returns once the target serves
        it."""
        ...


# ---------------------------------------------------------------------------------------------- shared


def is_bundle_dir(path: Path) -> bool:
    """True when ``path`` is a function bundle (it has ``signature.json``), not a bare model artifact."""
    return (path / SIGNATURE).is_file()


def prepare_bundle(
    model_dir: Path | str, name: str, account: LocalAccount, work: Path, *, max_batch_size: int
) -> Bundle:
    """The bundle to publish: ``model_dir`` itself when it already is a bundle (verified, its name must be
    ``name``), else a new bundle of the model artifact signed by ``account``, built under ``work``."""
    valid_name(name)
    src = Path(model_dir)
    if not src.is_dir():
        raise ConfigError(f"--model {src}: not a directory; pass a model artifact from `depin train`")
    if is_bundle_dir(src):
        bundle = verify_bundle(src)
        if bundle.name != name:
            raise ConfigError(
                f"--model {src} is a bundle of function {bundle.name!r}, not {name!r}; "
                f"pass --name {bundle.name}"
            )
        return bundle
    return build_bundle(src, work / "bundle", name=name, account=account, max_batch_size=max_batch_size)


def _same_content(a: bytes, b: bytes) -> bool:
    """True when two manifests describe the same function version (they may differ only in ``created_at``)."""
    ja, jb = json.loads(a), json.loads(b)
    ja.pop("created_at", None)
    jb.pop("created_at", None)
    return ja == jb


def _check_alias(alias: str | None) -> None:
    if alias is not None:
        valid_alias(alias)


def moved_aliases(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], version: str
) -> list[str]:
    return sorted(a for a, t in after.items() if t == {version: 1.0} and before.get(a) != t)


# ---------------------------------------------------------------------------------------------- local


class LocalPublisher:
    """Publish into the registry directory ``registry_root`` (what ``depin serve --registry`` serves).

    ``trusted``: publisher addresses the registry accepts; default (``...``) the publishing account only,
    ``None`` any valid signature. A gateway serving the directory must trust the account too (``depin serve``
    trusts the local publisher key by default)."""

    def __init__(
        self,
        registry_root: Path | str,
        account: LocalAccount,
        *,
        trusted: Collection[str] | EllipsisType | None = ...,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        self.root = Path(registry_root)
        self.account = account
        self.max_batch_size = max_batch_size
        allowed = [account.address] if isinstance(trusted, EllipsisType) else trusted
        self.registry = Registry(self.root, trusted=allowed)

    @property
    def target(self) -> str:
        return f"local:{self.root.resolve()}"

    def publish(self, model_dir: Path | str, name: str, *, alias: str | None = None) -> PublishResult:
        _check_alias(alias)
        with tempfile.TemporaryDirectory(prefix="depin-publish-") as tmp:
            built = prepare_bundle(
                model_dir, name, self.account, Path(tmp), max_batch_size=self.max_batch_size
            )
            sent = (built.path / MANIFEST).read_bytes()
            exists = name in self.registry.functions()
            before = self.registry.aliases(name) if exists else {}
            known = set(self.registry.version_ids(name)) if exists else set()
            self.registry.add(built.path)
        version = built.version
        if alias is not None:
            self.registry.set_alias(name, alias, version)
        stored = self.registry.bundle(name, version)  # re-verified from disk
        data = (stored.path / MANIFEST).read_bytes()
        if data != sent and not _same_content(data, sent):
            raise PermanentError(
                f"{self.target}: {name}@{version} in the registry differs from the bundle just published; "
                f"the registry was modified by hand — remove {stored.path} and publish again"
            )
        after = self.registry.aliases(name)
        return PublishResult(
            name=name,
            version=version,
            publisher=stored.publisher,
            target=self.target,
            manifest_sha256=hashlib.sha256(data).hexdigest(),
            signature=stored.signature,
            created=version not in known,
            aliases=after,
            moved=moved_aliases(before, after, version),
        )


# ---------------------------------------------------------------------------------------------- gateway


class GatewayPublisher:
    """Publish through a gateway's admin API at ``base_url`` with the admin key ``admin_key``.

    ``publish``: build + sign the bundle, ``PUT`` it (retried on transient errors; an existing version is
    fine), verify what the gateway now serves under that version (manifest content, version, a valid
    signature — by ``account`` for a new version), then ``PUT`` the alias and check it points there.
    ``client_options`` go to :class:`serving.client.GatewayClient` (retries, backoff, timeout, transport)."""

    def __init__(
        self,
        base_url: str,
        admin_key: SecretStr,
        account: LocalAccount,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        **client_options: Any,
    ) -> None:
        if not isinstance(admin_key, SecretStr):
            raise ConfigError("admin_key must be a pydantic SecretStr (keeps it out of logs and reprs)")
        self.account = account
        self.max_batch_size = max_batch_size
        self.client = GatewayClient(base_url, admin_key=admin_key, **client_options)

    def __repr__(self) -> str:
        return f"GatewayPublisher({self.client.base_url!r}, publisher={self.account.address})"

    @property
    def target(self) -> str:
        return self.client.base_url

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> GatewayPublisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def publish(self, model_dir: Path | str, name: str, *, alias: str | None = None) -> PublishResult:
        _check_alias(alias)
        with tempfile.TemporaryDirectory(prefix="depin-publish-") as tmp:
            bundle = prepare_bundle(
                model_dir, name, self.account, Path(tmp), max_batch_size=self.max_batch_size
            )
            sent = (bundle.path / MANIFEST).read_bytes()
            packed = pack_bundle(bundle.path)
        version = bundle.version
        put = self.client.upload(name, version, packed)
        created = bool(put.get("created", True))
        data, publisher, signature = self.verify_upload(name, version, sent, bundle, created=created)
        before = put.get("aliases") or {}
        if created:  # the add moved latest; what it pointed to before is not in the answer
            before = {a: t for a, t in before.items() if a != "latest"}
        if alias is not None:
            moved = self.client.set_alias(name, alias, version)
            if moved.get("target") != {version: 1.0}:
                raise PermanentError(
                    f"{self.target}: alias {alias} of {name} points at {moved.get('target')} after moving "
                    f"it to {version}; another publisher moved it meanwhile — check and retry"
                )
        after = self.client.function(name).get("aliases") or {}
        return PublishResult(
            name=name,
            version=version,
            publisher=publisher,
            target=self.target,
            manifest_sha256=hashlib.sha256(data).hexdigest(),
            signature=signature,
            created=created,
            aliases=after,
            moved=moved_aliases(before, after, version),
        )

    def verify_upload(
        self, name: str, version: str, sent: bytes, bundle: Bundle, *, created: bool
    ) -> tuple[bytes, str, str]:
        """Fetch ``name``@``version``'s manifest and signature back from the gateway and check them against
        what was sent: the same bytes (or, for a version the gateway already held, the same content), the
        version is the manifest's content hash, and the signature recovers to the bundle's publisher (for a
        version already held: to a valid signer). Returns (manifest bytes, publisher, signature); raises
        ``PermanentError`` otherwise."""
        where = f"{self.target}: upload verification of {name}@{version} failed"
        data = self.client.manifest_bytes(name, version)
        sig = self.client.signature(name, version)
        try:
            manifest = parse_manifest(data)
            signer = recover_publisher(data, sig)
        except BundleError as exc:
            raise PermanentError(
                f"{where}: the gateway serves an invalid manifest/signature ({exc})"
            ) from None
        if manifest.version != version or manifest.name != name:
            raise PermanentError(
                f"{where}: the gateway serves {manifest.name}@{manifest.version} under that URL; do not use "
                "this gateway until it is fixed"
            )
        if data == sent:
            if signer != bundle.publisher:
                raise PermanentError(f"{where}: the signature recovers to {signer}, not {bundle.publisher}")
        elif created or not _same_content(data, sent):
            sent_sha, got_sha = hashlib.sha256(sent).hexdigest(), hashlib.sha256(data).hexdigest()
            raise PermanentError(
                f"{where}: the gateway serves a different manifest.json (sha256 {got_sha[:16]}…, sent "
                f"{sent_sha[:16]}…); the upload was altered in transit or by the gateway — aliases were not "
                "moved"
            )
        return data, signer, str(sig.get("signature"))


__all__ = [
    "GatewayPublisher",
    "LocalPublisher",
    "PublishResult",
    "Publisher",
    "is_bundle_dir",
    "prepare_bundle",
]
