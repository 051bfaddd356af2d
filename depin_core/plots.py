"""What every plot shares: an Agg figure, PNG encoding under a size cap, the plot data's digest in the PNG,
data-URI embedding, point downsampling and number formatting for people.

Plots are two functions each: one computes the plot data (a JSON-able dict of plain lists, testable), one
draws it on a :func:`figure`. :func:`encode_png` writes the sha256 of the canonical JSON of that data into
the PNG's text chunk ``depin:data-sha256`` (:func:`png_text` reads it back), so a PNG says which data it
shows. matplotlib is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import struct
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_PNG_BYTES = 200_000  # per image: Prefect markdown artifacts and the README embed them
DPI = 100
DATA_KEY = "depin:data-sha256"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PlotTooLarge(ValueError):
    """A figure that stays above the size cap even at the lowest resolution."""


def figure(width: float = 7.0, height: float = 4.0) -> Figure:
    """A new Agg figure (no pyplot, no global state: safe in threads and flows), constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def data_digest(data: Any) -> str:
    """sha256 of the canonical JSON of a plot's data (NaN allowed: it is a digest, not a document)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode_png(fig: Figure, data: Any = None, *, max_bytes: int = MAX_PNG_BYTES) -> bytes:
    """``fig`` as PNG bytes ≤ ``max_bytes`` (lower resolutions are tried in turn), carrying the digest of
    ``data`` (:func:`data_digest`) when given. ``PlotTooLarge`` when even the smallest is too big."""
    metadata = {"Software": "depin-pipeline"}
    if data is not None:
        metadata[DATA_KEY] = data_digest(data)
    size = 0
    for dpi in (DPI, 80, 60):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata=metadata)
        png = buf.getvalue()
        if (size := len(png)) <= max_bytes:
            return png
    raise PlotTooLarge(
        f"the PNG is {size} bytes at {60} dpi, over the {max_bytes}-byte cap; plot fewer points"
    )


def png_text(png: bytes) -> dict[str, str]:
    """The text chunks (``tEXt``, ``zTXt``, ``iTXt``) of a PNG: keyword → text."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    out: dict[str, str] = {}
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            out[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            out[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode()
        elif kind == b"IEND":
            break
    return out


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels of a PNG."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    w, h = struct.unpack(">II", png[16:24])
    return int(w), int(h)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,…`` of a PNG (what Prefect's markdown artifacts and the HTML report show)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(png: bytes, alt: str) -> str:
    """A markdown image with the PNG inline."""
    safe = alt.replace("[", "(").replace("]", ")").replace("\n", " ")
    return f"![{safe}]({data_uri(png)})"


def html_image(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inline."""
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt, quote=True)}">'


def thin(n: int, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` of ``n`` points, evenly spread, first and last kept (deterministic)."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(max_points, 2)).round().astype(np.int64))


def peaks(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ~``max_points`` points of a series: per bin the min and the max of ``y``, so
    spikes (anomalies, gaps) survive downsampling; ``x`` must be sorted."""
    n = len(x)
    if n <= max_points:
        return np.arange(n)
    yv = np.asarray(y, dtype=np.float64)
    bins = np.array_split(np.arange(n), max(max_points // 2, 1))
    keep: list[int] = []
    for b in bins:
        seg = yv[b]
        finite = np.isfinite(seg)
        if not finite.any():
            keep.append(int(b[0]))
            continue
        idx = b[finite]
        keep += [int(idx[np.argmin(seg[finite])]), int(idx[np.argmax(seg[finite])])]
    return np.unique(np.asarray(keep, dtype=np.int64))


def sig(value: float | int | None, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits for people: ``0.6997 → "0.700"``, ``12345 → "12,300"``,
    ``None``/NaN → ``"n/a"``; integers keep every digit with thousands separators."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    v = float(value)
    if not math.isfinite(v):
        return "n/a" if math.isnan(v) else ("∞" if v > 0 else "-∞")
    if v == 0:
        return "0"
    exp = math.floor(math.log10(abs(v)))
    decimals = digits - 1 - exp
    rounded = round(v, decimals)
    if abs(rounded) >= 10 ** (exp + 1):  # 9.996 → 10.0: one decimal fewer
        decimals -= 1
    if abs(v) >= 1e15 or abs(v) < 1e-4:
        return f"{v:.{digits - 1}e}"
    if decimals <= 0:
        return f"{round(v, decimals):,.0f}"
    return f"{v:,.{decimals}f}"


def quantity(value: float | int | None, unit: str | None = None, digits: int = 3) -> str:
    """``value`` with its unit for people: ``quantity(0.6997, "kWh/100 km") → "0.700 kWh/100 km"``; a ``%``
    unit takes a fraction (``quantity(0.031, "%") → "3.10 %"``)."""
    if unit == "%" and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value) * 100.0
    text = sig(value, digits)
    return text if not unit or text == "n/a" else f"{text} {unit}"
