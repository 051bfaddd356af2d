"""The Prefect UI's work pool page in a real browser (``tests.support.browser``): the pool, its workers and the
runs it ran, as a person checks them.

The page (Prefect 3.9, route ``/work-pools/work-pool/<name>``) has the tabs Runs, Work Queues, Workers and
Deployments (plus Details on narrow screens). The Workers tab lists the workers that sent a heartbeat, with
their status (online/offline). The Runs tab lists every flow run of the pool's queues, subflow runs included:
the shards of a sharded ingest are runs of the ingest deployment, so they are listed there (each card shows its
state and work pool, not its worker). That list shows 10 runs a page, newest first (scheduled runs sort first)
and re-reads the API only every 30 s, so the runs are looked up with its search box (a name substring, queried
at once). Optionally the parent run's page is opened too: its Subflow Runs tab lists the shards it started.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from playwright import sync_api

from tests.support.browser import launch_chromium, screenshot

POOL_SHOT = "7-work-pool.png"
RUNS_SHOT = "8-work-pool-runs.png"
PARENT_SHOT = "9-parent-subflows.png"
FAILURE_SHOT = "work-pool-failure.png"
TAB_SELECT_MS = 3_000  # a click that took shows its tab selected at once
RUN_LINK = "a.flow-run-bread-crumbs__flow-run-link"
# A flow run list has answered: it shows its empty state, or runs that all match the search (which is
# debounced: until it applies, the previous, unfiltered list is shown).
LISTED_JS = """([scope, link, text]) => {
  const root = document.querySelector(scope);
  if (!root) return false;
  if (root.querySelector('.p-empty-results')) return true;
  const names = Array.from(root.querySelectorAll(link)).map(a => a.textContent.trim().toLowerCase());
  return names.length > 0 && names.every(n => n.includes(text));
}"""


def check_work_pool_page(
    ui_url: str,
    pool: str,
    workers: Sequence[str],
    runs: Sequence[str],
    out_dir: Path,
    *,
    online: bool = True,
    run_state: str | None = None,
    parent_run_id: str | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Open the work pool page of ``pool`` on the Prefect UI at ``ui_url`` (no ``/api``) and assert it shows the
    pool's name, every worker of ``workers`` on the Workers tab (each online when ``online``), and every run
    named in ``runs`` on the Runs tab (each in ``run_state``, e.g. ``"Completed"``, when given). With
    ``parent_run_id``, the parent run's Subflow Runs tab must list ``runs`` too. Screenshots go to ``out_dir``
    (:data:`POOL_SHOT`, :data:`RUNS_SHOT`, :data:`PARENT_SHOT`; :data:`FAILURE_SHOT` when a check fails).

    Call it once the workers and runs exist: each list is read once, when it has loaded (waits are bounded by
    ``timeout_s``). Check for the browser first (``tests.support.browser.require_browser``). Raises
    AssertionError naming what is missing and what the page shows instead."""
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(timeout_s * 1000)
            check_work_pool(page, ui_url, pool, workers, runs, out_dir, online=online, run_state=run_state,
                            parent_run_id=parent_run_id)  # fmt: skip
        finally:
            browser.close()


def check_work_pool(
    page: Any,
    ui_url: str,
    pool: str,
    workers: Sequence[str],
    runs: Sequence[str],
    out_dir: Path,
    *,
    online: bool = True,
    run_state: str | None = None,
    parent_run_id: str | None = None,
) -> None:
    """:func:`check_work_pool_page` on a Playwright ``page`` the caller opened (its default timeout bounds
    every wait), e.g. to check several pools in one browser."""
    ui = ui_url.rstrip("/")
    try:
        _pool_and_workers(page, ui, pool, workers, online, out_dir)
        _pool_runs(page, pool, runs, run_state, out_dir)
        if parent_run_id:
            _parent_subflows(page, ui, parent_run_id, runs, out_dir)
    except BaseException:
        screenshot(page, FAILURE_SHOT, out_dir)
        raise


def _shown(locator: Any) -> bool:
    """Whether ``locator`` appears within the page's default timeout."""
    try:
        locator.first.wait_for()
    except sync_api.TimeoutError:
        return False
    return True


def _pool_and_workers(
    page: Any, ui: str, pool: str, workers: Sequence[str], online: bool, out_dir: Path
) -> None:
    url = f"{ui}/work-pools/work-pool/{quote(pool, safe='')}"
    page.goto(url)
    if not _shown(page.locator(".page-heading-work-pool").get_by_text(pool, exact=True)):
        body = page.locator("body").inner_text()[:500]
        raise AssertionError(
            f"the work pool page {url} does not show the pool {pool!r}; the page reads: {body!r}"
        )

    _open_tab(page, "Workers", f"the work pool page of {pool!r}")
    table = page.locator("#workers-content")
    # the table renders one API answer: once the first worker is shown, the others are there or missing
    if workers:
        _shown(_worker_cell(table, workers[0]))
    listed = [c.strip() for c in table.locator("tbody tr td:first-child").all_inner_texts()]
    missing = [w for w in workers if w not in listed]
    if missing:
        raise AssertionError(
            f"the Workers tab of pool {pool!r} does not list {missing}; it lists {listed} (did they start "
            f"with --pool {pool} and reach this server?)"
        )
    if online:
        badge = ".worker-status-badge--status-text"
        status = {w: _worker_row(table, w).locator(badge).text_content() or "" for w in workers}
        offline = {w: s.strip() for w, s in status.items() if s.strip().lower() != "online"}
        if offline:
            raise AssertionError(f"the Workers tab of pool {pool!r} shows workers not online: {offline}")
    screenshot(page, POOL_SHOT, out_dir)


def _pool_runs(page: Any, pool: str, runs: Sequence[str], run_state: str | None, out_dir: Path) -> None:
    _open_tab(page, "Runs", f"the work pool page of {pool!r}")
    scope = "#runs-content"
    # one search for what the names share shows them on the first page; without one, a search per name
    prefix = _common_prefix(runs)
    shown: dict[str, list[str]] = {}
    searches = [prefix] if prefix else list(runs)
    for text in searches:
        page.locator(scope).get_by_placeholder("Search by run name").fill(text)
        shown |= _listed(page, scope, text)
    missing = [r for r in runs if r not in shown]
    if missing:
        count = page.locator(f"{scope} .results-count").inner_text()
        raise AssertionError(
            f"the Runs tab of pool {pool!r} does not list {missing}; searching {searches} it shows "
            f"{sorted(shown)} ({count})"
        )
    if run_state:
        wrong = {r: shown[r] for r in runs if run_state not in shown[r]}
        if wrong:
            raise AssertionError(f"the Runs tab of pool {pool!r} shows runs not {run_state}: {wrong}")
    screenshot(page, RUNS_SHOT, out_dir)


def _parent_subflows(page: Any, ui: str, parent_run_id: str, runs: Sequence[str], out_dir: Path) -> None:
    url = f"{ui}/runs/flow-run/{parent_run_id}"
    page.goto(url)
    _open_tab(page, "Subflow Runs", f"the parent run's page {url} (a run not started has no subflows tab)")
    shown = _listed(page, "#subflow-runs-content", "")
    missing = [r for r in runs if r not in shown]
    if missing:
        raise AssertionError(
            f"the parent run's page {url} does not list the subflow runs {missing}; its Subflow Runs tab "
            f"shows {sorted(shown)}"
        )
    screenshot(page, PARENT_SHOT, out_dir)


def _common_prefix(names: Sequence[str]) -> str:
    if not names:
        return ""
    first, last = min(names), max(names)
    size = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), min(len(first), len(last))
    )
    return first[:size]


def _open_tab(page: Any, name: str, where: str, attempts: int = 10) -> None:
    """Select the tab ``name``. The tabs re-render as the page's data loads, which can swallow a click: it
    is clicked again until the tab shows as selected."""
    exact = re.compile(f"^\\s*{re.escape(name)}\\s*$")
    tab = page.locator("li.p-tab", has_text=exact).first
    selected = page.locator("li.p-tab.p-tab__active", has_text=exact).first
    if _shown(tab):
        for _ in range(attempts):
            with contextlib.suppress(sync_api.TimeoutError):
                tab.click(timeout=TAB_SELECT_MS)
                selected.wait_for(timeout=TAB_SELECT_MS)
                return
    tabs = [t.strip() for t in page.locator("li.p-tab").all_inner_texts()]
    raise AssertionError(f"{where}: the tab {name!r} is missing or could not be selected; its tabs: {tabs}")


def _listed(page: Any, scope: str, text: str) -> dict[str, list[str]]:
    """The runs a flow run list shows once it has answered the search ``text``: name -> the states shown
    (runs may share a name)."""
    with contextlib.suppress(sync_api.TimeoutError):  # what is missing is reported by the caller
        page.wait_for_function(LISTED_JS, arg=[scope, RUN_LINK, text.lower()])
    shown: dict[str, list[str]] = {}
    for card in page.locator(f"{scope} .state-list-item").all():
        names = card.locator(RUN_LINK).all_inner_texts()
        if names:
            state = card.locator(".state-badge").first.inner_text().strip()
            shown.setdefault(names[0].strip(), []).append(state)
    return shown


def _worker_cell(table: Any, name: str) -> Any:
    return table.get_by_role("cell", name=name, exact=True)


def _worker_row(table: Any, name: str) -> Any:
    # ``has`` takes a locator relative to each row: built from the page, not from ``table``
    return table.get_by_role("row").filter(has=table.page.get_by_role("cell", name=name, exact=True)).first
