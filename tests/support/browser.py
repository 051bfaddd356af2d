"""A real headless browser for the UI tests: Debian's chromium (``/usr/bin/chromium``, or ``DEPIN_CHROMIUM``)
driven by Playwright, never a browser Playwright downloads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from tests.support.ci import require

CHROMIUM = os.environ.get("DEPIN_CHROMIUM", "/usr/bin/chromium")


def require_browser() -> None:
    """A skip where the system's chromium is missing (a failure under CI, which must have it)."""
    if not Path(CHROMIUM).exists():
        reason = f"browser test needs chromium ({CHROMIUM}; apt-get install chromium)"
        require(reason, in_ci=reason + "; .ci/run installs chromium")


def launch_chromium(pw: Any) -> Any:
    """The system's chromium, headless, from a running ``sync_playwright()``; the caller closes it."""
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def screenshot(page: Any, name: str, out_dir: Path, *copies: Path) -> Path:
    """A full-page screenshot ``out_dir/name`` (the directory is created), copied into each of ``copies``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    page.screenshot(path=str(path), full_page=True)
    for other in copies:
        shutil.copy(path, other / name)
    return path
