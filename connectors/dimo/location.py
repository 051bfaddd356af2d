"""Where a telemetry table lives: a local directory or an object-store URI, with the options to reach it.

``TableLocation.of("data/telemetry")`` is a local table; ``TableLocation.of("s3://bucket/telemetry")`` takes
its endpoint and credentials from :class:`connectors.dimo.settings.DatasetSettings` (``DEPIN_DATASET_S3_*``,
else the standard ``AWS_*`` variables). The options hold secrets: they never appear in ``repr`` or logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from depin_core.errors import ConfigError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
OBJECT_STORE_SCHEMES = ("s3", "s3a")


@dataclass(frozen=True)
class TableLocation:
    """A table URI (absolute local path, or ``s3://bucket/prefix``) and its object-store options."""

    uri: str
    storage_options: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(
        cls, where: TableLocation | str | Path, storage_options: dict[str, str] | None = None
    ) -> TableLocation:
        """Normalise a path or URI; object-store URIs get their options from settings unless given."""
        if isinstance(where, TableLocation):
            return where
        text = str(where)
        m = _SCHEME.match(text)
        if m is None or m.group(1).lower() == "file":
            local = Path(text.removeprefix("file://")).expanduser().resolve()
            return cls(str(local), dict(storage_options or {}))
        scheme = m.group(1).lower()
        if scheme not in OBJECT_STORE_SCHEMES:
            raise ConfigError(
                f"dataset: {text!r} uses the unsupported scheme {scheme!r}; give a directory or s3://bucket/prefix"
            )
        if not text[m.end() :].strip("/"):
            raise ConfigError(f"dataset: {text!r} names no bucket; give s3://bucket/prefix")
        if storage_options is None:
            from connectors.dimo.settings import DatasetSettings

            storage_options = DatasetSettings().storage_options()
        return cls(text.rstrip("/"), dict(storage_options))

    @property
    def is_local(self) -> bool:
        return _SCHEME.match(self.uri) is None

    @property
    def path(self) -> Path:
        """The local directory (only for local tables)."""
        if not self.is_local:
            raise ConfigError(f"dataset {self.uri} is on object storage, not a local directory")
        return Path(self.uri)

    def join(self, rel: str) -> str:
        """The URI of a file inside the table (``rel`` is a table-relative POSIX path)."""
        return f"{self.uri.rstrip('/')}/{rel}" if not self.is_local else str(Path(self.uri) / rel)

    def __str__(self) -> str:
        return self.uri
