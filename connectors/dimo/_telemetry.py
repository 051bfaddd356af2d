"""Telemetry history: query building, request planning (signal chunks × time windows) and page → Arrow.

Planning. A request is one ``signals(tokenId, interval, from, to)`` query for a chunk of signals over a window.
Chunks keep gqlgen's complexity (each selected field 1 + its children) at most 100 and at most
``max_signals_per_request`` signals. Windows are whole multiples of ``interval`` starting at ``since`` (so every
bucket start stays on the ``since + k·interval`` grid) with buckets × value columns ≤ ``max_values_per_request``
and length ≤ ``max_window``. A 422 COMPLEXITY_LIMIT_EXCEEDED halves the chunk; "maximum execution time" halves
the window; both lessons are remembered for later plans.

Data spans. With the per-signal ``firstSeen``/``lastSeen`` of ``dataSummary`` (:func:`parse_data_summary`),
signals a vehicle never reported are dropped, the range shrinks to the buckets that can hold data, and a chunk
is not asked for a window outside its signals' spans. Bucket starts stay on the ``since + k·interval`` grid, so
the rows are the same as without it; only empty pages are saved.

Conversion (measured on a 1440-row × 15-signal page, 644 KB, this 2-core machine, best of 7×20):
  orjson.loads alone 1.8 ms · orjson + pa.Table.from_pylist 3.7 ms · orjson + pa.array(struct) 3.3 ms ·
  polars.read_json(schema) + arrow cast 3.2 ms · pyarrow.json (one block) 4.2 ms.
Pages are parsed with polars on the event loop (a worker thread measured slower end to end). Signals are
selected under short aliases (``s0``, ``s1``, …): DIMO repeats every key in every row, and the long signal
names made up more than half of a page (1M-row benchmark: 997 MB → 467 MB of JSON, connector 1.25x faster).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from connectors.dimo._http import orjson_or_none, raise_graphql_errors
from connectors.dimo.catalog import signal_catalog
from connectors.dimo.errors import ComplexityLimitExceeded, DimoTransientError, ExecutionTimeExceeded
from connectors.dimo.schema import LOCATION_COLUMNS, TIMESTAMP_TYPE, conform_table, signal_fields
from depin_core.timeparse import to_rfc3339

COMPLEXITY_LIMIT = 100
_US = timedelta(microseconds=1)


# ---------------------------------------------------------------- query building


def _is_location(name: str) -> bool:
    return signal_catalog()[name].gql_type == "Location"


def _field_complexity(name: str) -> int:
    """gqlgen's default complexity of one signal field: 1, plus ``latitude longitude`` for a location."""
    return 3 if _is_location(name) else 1


def query_complexity(signals: Sequence[str]) -> int:
    """gqlgen's default complexity of :func:`build_query`: ``signals`` + ``timestamp`` + each field (+children)."""
    return 2 + sum(map(_field_complexity, signals))


def value_columns(signals: Sequence[str]) -> int:
    """Arrow value columns for ``signals`` (location → latitude + longitude)."""
    return sum(2 if _is_location(s) else 1 for s in signals)


def alias(index: int) -> str:
    """The response key of a chunk's ``index``-th signal: short aliases halve the bytes of a page (the signal
    names are repeated in every row, e.g. ``chassisAxleRow1WheelLeftTirePressure``)."""
    return f"s{index}"


@lru_cache(maxsize=1024)
def build_query(signals: tuple[str, ...]) -> str:
    """The ``signals`` query for a chunk; signal ``i`` is returned under the alias ``s<i>``."""
    catalog = signal_catalog()
    lines = []
    for i, name in enumerate(signals):
        sig = catalog[name]
        if sig.gql_type == "Location":
            lines.append(f"{alias(i)}: {name}(agg: {sig.default_agg}) {{ latitude longitude }}")
        else:
            lines.append(f"{alias(i)}: {name}(agg: {sig.default_agg})")
    body = "\n    ".join(["timestamp", *lines])
    return (
        "query Signals($tokenId: Int!, $interval: String!, $from: Time!, $to: Time!) {\n"
        "  signals(tokenId: $tokenId, interval: $interval, from: $from, to: $to) {\n"
        f"    {body}\n  }}\n}}"
    )


# ---------------------------------------------------------------- planning


def chunk_signals(
    signals: Sequence[str], max_signals: int, limit: int = COMPLEXITY_LIMIT
) -> list[tuple[str, ...]]:
    """Split ``signals`` (in order) into chunks of at most ``max_signals`` and complexity ≤ ``limit``."""
    empty = query_complexity(())
    chunks: list[tuple[str, ...]] = []
    current: list[str] = []
    complexity = empty  # of ``current``, kept incrementally (the plan is made per vehicle)
    for name in signals:
        cost = _field_complexity(name)
        if current and (len(current) >= max_signals or complexity + cost > limit):
            chunks.append(tuple(current))
            current, complexity = [], empty
        current.append(name)
        complexity += cost
    if current:
        chunks.append(tuple(current))
    return chunks


def plan_windows(
    since: datetime,
    until: datetime,
    interval: timedelta,
    *,
    columns: int,
    max_values: int,
    max_window: timedelta,
) -> list[tuple[datetime, datetime]]:
    """``[since, until)`` as windows of whole intervals starting at ``since + k·window``."""
    if until <= since:
        return []
    total = buckets_in(since, until, interval)
    per = max(1, min(max_values // max(columns, 1), max_window // interval, total))
    out = []
    for k in range(0, total, per):
        start = since + interval * k
        out.append((start, min(until, since + interval * (k + per))))
    return out


def buckets_in(start: datetime, end: datetime, interval: timedelta) -> int:
    """Buckets of ``interval`` starting in ``[start, end)``, the last one maybe partial."""
    return -(-((end - start) // _US) // (interval // _US))


# (first seen, last seen) of one signal's data, from ``dataSummary``.
Span = tuple[datetime, datetime]
# dataSummary times may be rounded to whole seconds: widen spans so a rounded time never drops a bucket.
SPAN_SLACK = timedelta(seconds=1)
DATA_SUMMARY_QUERY = (
    "query Summary($tokenId: Int!) {\n"
    "  dataSummary(tokenId: $tokenId) { signalDataSummary { name firstSeen lastSeen } }\n}"
)
_EARLIEST, _LATEST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
# Signals derived from another one: their data spans are those of the source signal.
_SPAN_OF = {"currentLocationApproximateCoordinates": "currentLocationCoordinates"}


def parse_data_summary(data: dict, what: str) -> dict[str, Span] | None:
    """``{signal: (firstSeen, lastSeen)}`` of a ``dataSummary`` answer, widened by :data:`SPAN_SLACK`.

    None when the answer holds no summary (null or missing): nothing is known, so nothing may be skipped.
    """
    summary = data.get("dataSummary")
    items = summary.get("signalDataSummary") if isinstance(summary, dict) else None
    if not isinstance(items, list):
        return None
    out: dict[str, Span] = {}
    for item in items:
        try:
            first, last = _instant(item["firstSeen"]), _instant(item["lastSeen"])
        except (KeyError, TypeError, ValueError):
            raise DimoTransientError(
                f"{what}: dataSummary entry {item!r} has no valid firstSeen/lastSeen"
            ) from None
        if first > last:  # an inverted span must never be used to skip anything
            out[str(item["name"])] = (_EARLIEST, _LATEST)
        else:
            out[str(item["name"])] = (first - SPAN_SLACK, last + SPAN_SLACK)
    return out


def _instant(text: str) -> datetime:
    """An RFC 3339 time from Go (up to 9 fractional digits) as an aware UTC datetime."""
    head, dot, frac = text.replace("Z", "+00:00").partition(".")
    if dot:
        digits = len(frac) - len(frac.lstrip("0123456789"))
        head += "." + frac[:digits][:6].ljust(6, "0") + frac[digits:]
    dt = datetime.fromisoformat(head)
    if dt.tzinfo is None:
        raise ValueError(text)
    return dt.astimezone(UTC)


def signal_span(name: str, spans: Mapping[str, Span]) -> Span | None:
    """The data span of ``name`` (None: the vehicle never reported it)."""
    return spans.get(_SPAN_OF.get(name, name))


def chunk_span(chunk: Sequence[str], spans: Mapping[str, Span]) -> Span | None:
    """The union of the spans of ``chunk``'s signals (None when none has data)."""
    found = [sp for n in chunk if (sp := signal_span(n, spans)) is not None]
    if not found:
        return None
    return min(f for f, _ in found), max(last for _, last in found)


def clamp_range(
    since: datetime, until: datetime, interval: timedelta, span: Span
) -> tuple[datetime, datetime] | None:
    """The part of ``[since, until)`` whose buckets (on the ``since + k·interval`` grid) can hold data seen
    within ``span``; None when none can."""
    first, last = span
    if last < since or first >= until:
        return None
    start = since if first <= since else since + interval * ((first - since) // interval)
    end = until if last >= until else min(until, since + interval * ((last - since) // interval + 1))
    return start, end


# ---------------------------------------------------------------- conversion


@lru_cache(maxsize=1024)
def _page_schemas(signals: tuple[str, ...]) -> tuple[dict[str, pl.DataType], pa.Schema]:
    """(polars read schema of a response, Arrow schema of the converted page) for a chunk."""
    row: dict[str, pl.DataType] = {"timestamp": pl.Utf8()}
    fields = [pa.field("timestamp", TIMESTAMP_TYPE, nullable=False)]
    for i, name in enumerate(signals):
        sig = signal_catalog()[name]
        if sig.gql_type == "Location":
            row[alias(i)] = pl.Struct({c: pl.Float64() for c in LOCATION_COLUMNS})
        else:
            row[alias(i)] = pl.Utf8() if sig.gql_type == "String" else pl.Float64()
        fields.extend(signal_fields(name))
    # ``errors`` is read with the page: no separate scan of the body for error documents.
    read: dict[str, pl.DataType] = {
        "errors": pl.List(pl.Struct({"message": pl.Utf8()})),
        "data": pl.Struct({"signals": pl.List(pl.Struct(row))}),
    }
    return read, pa.schema(fields)


def empty_page(signals: tuple[str, ...]) -> pa.Table:
    return _page_schemas(signals)[1].empty_table()


def parse_page(
    body: bytes, signals: tuple[str, ...], *, what: str = "DIMO telemetry", privilege_hint: str = ""
) -> pa.Table:
    """One ``signals`` response → Arrow (``timestamp`` + value columns), no per-row Python.

    GraphQL errors raise classified errors; a page that cannot be parsed is transient (retried).
    """
    read_schema, schema = _page_schemas(signals)
    try:
        df = pl.read_json(io.BytesIO(body), schema=read_schema)
        errors = df.get_column("errors")[0]
        rows = df.get_column("data").struct.field("signals")[0]
    except (pl.exceptions.PolarsError, IndexError) as exc:
        doc = orjson_or_none(body)
        if doc is not None:  # valid JSON of an unexpected shape: maybe errors polars could not type
            raise_graphql_errors(doc, what, privilege_hint=privilege_hint)
        raise DimoTransientError(
            f"{what}: response could not be parsed ({type(exc).__name__}); retrying"
        ) from None
    if errors is not None and len(errors):  # error documents are small: decode them fully to classify
        raise_graphql_errors(orjson.loads(body), what, privilege_hint=privilege_hint)
    if rows is None or len(rows) == 0:
        return schema.empty_table()
    t = rows.struct.unnest().to_arrow()
    keys = {name: alias(i) for i, name in enumerate(signals)}
    arrays: list[pa.Array | pa.ChunkedArray] = [pc.cast(t.column("timestamp"), TIMESTAMP_TYPE)]
    for f in schema.remove(0):
        if f.name in LOCATION_COLUMNS:
            arrays.append(pc.struct_field(t.column(keys[f.metadata[b"signal"].decode()]), f.name))
        else:
            arrays.append(pc.cast(t.column(keys[f.name]), f.type))
    try:
        return pa.Table.from_arrays(arrays, schema=schema)
    except pa.ArrowInvalid as exc:  # e.g. a null timestamp
        raise DimoTransientError(f"{what}: page violates the schema ({exc}); retrying") from None


def join_chunks(tables: Sequence[pa.Table]) -> pa.Table:
    """Outer-join the pages of several signal chunks of one window on ``timestamp`` (sorted)."""
    out = tables[0]
    for t in tables[1:]:
        out = out.join(t, keys="timestamp", join_type="full outer", coalesce_keys=True)
    return out.sort_by("timestamp")


def assemble(token_id: int, pages: Sequence[pa.Table], schema: pa.Schema) -> pa.Table:
    """Concatenate window tables and shape them to ``schema`` (missing columns become nulls)."""
    pages = [p for p in pages if p.num_rows]
    if not pages:
        return schema.empty_table()
    combined = pa.concat_tables(pages, promote_options="default") if len(pages) > 1 else pages[0]
    token_ids = pa.array(np.full(combined.num_rows, token_id, dtype=np.int64))
    return conform_table(combined.append_column("token_id", token_ids), schema)


# ---------------------------------------------------------------- execution


@dataclass
class Planner:
    """Plans requests and learns from the server: chunk and window sizes shrink after 422/timeouts."""

    max_signals: int
    max_values: int
    max_window: timedelta

    def chunks(self, signals: Sequence[str]) -> list[tuple[str, ...]]:
        return chunk_signals(signals, self.max_signals)

    def windows(
        self, since: datetime, until: datetime, interval: timedelta, chunks: Sequence[tuple[str, ...]]
    ) -> list[tuple[datetime, datetime]]:
        columns = max((value_columns(c) for c in chunks), default=1)
        return plan_windows(
            since, until, interval, columns=columns, max_values=self.max_values, max_window=self.max_window
        )


def planned_requests(
    planner: Planner, signals: Sequence[str], since: datetime, until: datetime, interval: timedelta
) -> int:
    """Requests the plan for ``signals`` over ``[since, until)`` makes before any skipping or splitting."""
    chunks = planner.chunks(signals)
    return len(chunks) * len(planner.windows(since, until, interval, chunks))


PageFetcher = Callable[[tuple[str, ...], datetime, datetime], Awaitable[pa.Table]]


async def fetch_unit(
    fetch: PageFetcher,
    planner: Planner,
    chunk: tuple[str, ...],
    start: datetime,
    end: datetime,
    interval: timedelta,
) -> pa.Table:
    """One chunk over one window, halving the chunk on complexity errors and the window on timeouts."""
    try:
        return await fetch(chunk, start, end)
    except ComplexityLimitExceeded:
        if len(chunk) == 1:
            raise
        planner.max_signals = min(planner.max_signals, max(1, len(chunk) // 2))
        mid = len(chunk) // 2
        parts = await asyncio.gather(
            *(fetch_unit(fetch, planner, c, start, end, interval) for c in (chunk[:mid], chunk[mid:]))
        )
        return join_chunks(parts)
    except ExecutionTimeExceeded as exc:
        n = buckets_in(start, end, interval)
        if n <= 1:
            raise DimoTransientError(f"{exc} (already one bucket per request)") from None
        planner.max_values = min(planner.max_values, max(1, (n // 2) * value_columns(chunk)))
        middle = start + interval * (n // 2)
        halves = await asyncio.gather(
            fetch_unit(fetch, planner, chunk, start, middle, interval),
            fetch_unit(fetch, planner, chunk, middle, end, interval),
        )
        return pa.concat_tables(halves)


async def fetch_range(
    fetch: PageFetcher,
    planner: Planner,
    signals: Sequence[str],
    since: datetime,
    until: datetime,
    interval: timedelta,
    spans: Mapping[str, Span] | None = None,
) -> list[pa.Table]:
    """All windows × chunks for one vehicle, concurrently (the service bounds concurrency); one table per window.

    With ``spans`` (from ``dataSummary``), signals without data, buckets outside every span and chunk × window
    pairs outside the chunk's span are not requested.
    """
    if spans is not None:
        signals = [n for n in signals if signal_span(n, spans) is not None]
        whole = chunk_span(signals, spans)
        clamped = clamp_range(since, until, interval, whole) if whole else None
        if clamped is None:
            return []
        since, until = clamped
    chunks = planner.chunks(signals)
    windows = planner.windows(since, until, interval, chunks)
    chunk_spans = [chunk_span(c, spans) if spans is not None else None for c in chunks]

    def wanted(i: int, start: datetime, end: datetime) -> bool:
        sp = chunk_spans[i]
        return sp is None or (sp[0] < end and sp[1] >= start)

    async def window(start: datetime, end: datetime) -> pa.Table:
        todo = [c for i, c in enumerate(chunks) if wanted(i, start, end)]
        if not todo:
            return empty_page(chunks[0])
        parts = await asyncio.gather(*(fetch_unit(fetch, planner, c, start, end, interval) for c in todo))
        return parts[0] if len(parts) == 1 else join_chunks(parts)

    return list(await asyncio.gather(*(window(s, e) for s, e in windows)))


def request_body(
    token_id: int, chunk: tuple[str, ...], start: datetime, end: datetime, interval: str
) -> bytes:
    return orjson.dumps(
        {
            "query": build_query(chunk),
            "variables": {
                "tokenId": token_id,
                "interval": interval,
                "from": to_rfc3339(start),
                "to": to_rfc3339(end),
            },
        }
    )


async def parse_response(body: bytes, chunk: tuple[str, ...], what: str, privilege_hint: str) -> pa.Table:
    """Parse a page on the event loop: measured faster than a worker thread here, pinned or not
    (bench/ingest.py, 1M rows: 3.9 s inline vs 4.4 s threaded; the thread hop and GIL hand-offs cost more
    than the overlap they buy)."""
    return parse_page(body, chunk, what=what, privilege_hint=privilege_hint)
