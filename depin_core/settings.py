"""Settings models read from the environment, or from a mapping standing in for it (tests, the environment
handed to a child process): ``Settings.from_env(env)``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Self

from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("depin_settings_env", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """``EnvSettingsSource`` over a given mapping instead of ``os.environ`` (same prefix, aliases, rules)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._mapping = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            (k if self.case_sensitive else k.lower()): v
            for k, v in self._mapping.items()
            if not (self.env_ignore_empty and v == "")
        }


@contextmanager
def _reading(env: Mapping[str, str]) -> Iterator[None]:
    token = _ENV.set(env)
    try:
        yield
    finally:
        _ENV.reset(token)


class EnvSettings(BaseSettings):
    """A ``BaseSettings`` that can also be read from a mapping (``from_env``); keyword arguments still win."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **values: Any) -> Self:
        """These settings from ``env`` (default: the process environment), ``values`` on top."""
        if env is None:
            return cls(**values)
        with _reading(env):
            return cls(**values)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = _ENV.get()
        if env is None:
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        return init_settings, _MappingEnvSource(settings_cls, env)


__all__ = ["EnvSettings"]
