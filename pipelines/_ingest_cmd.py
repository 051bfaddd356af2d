"""``depin ingest``: settings from env or a credentials file, a progress bar, an IngestReport."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from connectors.dimo.client import DimoClient
from connectors.dimo.go_duration import parse_interval
from connectors.dimo.ingest import IngestProgress, IngestReport, ingest
from connectors.dimo.schema import resolve_signals
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore
from depin_core.errors import ConfigError
from depin_core.timeparse import parse_instant
from pipelines._output import err_console


def load_settings(credentials: Path | None) -> DimoSettings:
    """DIMO settings from ``--credentials PATH`` (emulator JSON) or the ``DEPIN_DIMO_*`` environment."""
    if credentials is not None:
        if not credentials.exists():
            raise ConfigError(
                f"credentials: {credentials} does not exist; run `depin emulator --credentials-out {credentials}`"
            )
        return DimoSettings.from_credentials_file(credentials)
    settings = DimoSettings()
    settings.require_credentials()
    return settings


async def run_ingest(
    *,
    since: str,
    until: str,
    interval: str,
    signals: str | None,
    vehicles: str | None,
    out: Path,
    credentials: Path | None,
    show_progress: bool = True,
    settings: DimoSettings | None = None,
) -> IngestReport:
    now = datetime.now(UTC)
    t0 = parse_instant(since, field="since", now=now)
    t1 = parse_instant(until, field="until", now=now)
    step = parse_interval(interval)
    wanted = resolve_signals(s.strip() for s in signals.split(",") if s.strip()) if signals else None
    token_ids = _parse_token_ids(vehicles) if vehicles else None
    settings = settings or load_settings(credentials)
    store = TelemetryStore(out)

    with Progress(
        TextColumn("[bold blue]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("vehicles"),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show_progress,
        transient=True,
    ) as progress:
        task = progress.add_task("ingest", total=None, rows=0)

        def on_progress(p: IngestProgress) -> None:
            progress.update(task, total=p.vehicles_total, completed=p.vehicles_done, rows=p.rows)

        async with DimoClient(settings) as client:
            return await ingest(
                client,
                store,
                since=t0,
                until=t1,
                interval=step,
                signals=wanted,
                token_ids=token_ids,
                on_progress=on_progress,
            )


def _parse_token_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"vehicles: {text!r} must be comma-separated integer token ids, e.g. 10021,10022"
        ) from None
