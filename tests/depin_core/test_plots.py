"""``depin_core.plots``: numbers for people, PNG size cap and text chunks, data URIs, downsampling."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from depin_core import plots as P


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.6997098846497036, "0.700"),
        (2.887809595415702, "2.89"),
        (26.518706536317964, "26.5"),
        (7.217404103130713, "7.22"),
        (123.456, "123"),
        (12345.6, "12,300"),
        (9.9996, "10.0"),
        (-0.03249, "-0.0325"),
        (331398, "331,398"),
        (0.0, "0"),
        (1.5e-7, "1.50e-07"),
        (float("nan"), "n/a"),
        (None, "n/a"),
        (True, "True"),
    ],
)
def test_sig_gives_three_significant_digits(value: float | None, text: str) -> None:
    assert P.sig(value) == text


def test_quantity_adds_the_unit_and_percent_takes_a_fraction() -> None:
    assert P.quantity(0.7445720513053039, "kWh/100 km") == "0.745 kWh/100 km"
    assert P.quantity(0.032490082206247495, "%") == "3.25 %"
    assert P.quantity(None, "km") == "n/a"


def test_png_carries_the_data_digest_and_respects_the_cap() -> None:
    data = {"x": [1.0, 2.0, 3.0], "y": [3.0, 1.0, 2.0]}
    fig = P.figure()
    fig.add_subplot().plot(data["x"], data["y"])
    png = P.encode_png(fig, data)
    assert len(png) <= P.MAX_PNG_BYTES
    assert P.png_text(png)[P.DATA_KEY] == P.data_digest(data) != P.data_digest({**data, "y": [3.0, 1.0, 2.5]})
    assert P.png_size(png) == (700, 400)
    noisy = P.figure()
    noisy.add_subplot().scatter(*np.random.default_rng(0).random((2, 3000)), s=1)
    full = P.encode_png(noisy, max_bytes=10**7)
    with pytest.raises(P.PlotTooLarge, match="cap"):
        P.encode_png(noisy, max_bytes=5_000)
    small = P.encode_png(noisy, max_bytes=len(full) - 1)  # fits at a lower resolution
    assert len(small) < len(full) and P.png_size(small)[0] < P.png_size(full)[0] == 700


def test_data_uri_and_images_embed_the_png() -> None:
    png = P.encode_png(P.figure(1, 1))
    uri = P.data_uri(png)
    assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png
    assert P.markdown_image(png, "a [b]") == f"![a (b)]({uri})"
    assert P.html_image(png, 'x"y') == f'<img src="{uri}" alt="x&quot;y">'


def test_thin_and_peaks_keep_the_ends_and_the_extremes() -> None:
    assert P.thin(5, 10).tolist() == [0, 1, 2, 3, 4]
    idx = P.thin(1000, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999
    y = np.zeros(10_000)
    y[1234], y[8765] = 50.0, -7.0
    keep = P.peaks(np.arange(10_000), y, 100)
    assert len(keep) <= 100 and 1234 in keep and 8765 in keep
