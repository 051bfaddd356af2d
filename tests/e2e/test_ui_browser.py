"""The Prefect UI served by ``depin up``, in a real headless browser (Debian's chromium driven by Playwright,
never a downloaded browser): the deployments are listed, a ``train-and-publish`` run is started from the
deployment's Run → Custom run form, its page shows it Completed with its subflows, the artifacts page shows
what the flows recorded, and the published function answers on the gateway ``depin up`` started.

Screenshots go to ``.depin/test-artifacts/ui-browser/`` (and the pytest tmp dir). Skipped only where chromium
is missing outside CI; ``.ci/run`` installs chromium, the dev extras install Playwright.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright import sync_api

from pipelines.stack.demo import FLEET, FLEET_END, invoke_once, range_signals
from serving.client import GatewayClient, GatewayRefused
from tests.support.browser import launch_chromium, require_browser
from tests.support.up_stack import depin, last_json, ports_free, survivors, tree, up_args

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

ARTIFACTS = Path(__file__).resolve().parents[2] / ".depin" / "test-artifacts" / "ui-browser"
RUN_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    """``depin up --background`` on the demo fleet in a fresh project directory; ``depin down`` after."""
    cwd = tmp_path_factory.mktemp("up-browser")
    args = up_args(vehicles=int(FLEET["vehicles"]), days=float(FLEET["days"]))
    started = depin(
        *args, "--seed", str(FLEET["seed"]), "--end", FLEET_END.isoformat(), "--background", "--json", cwd=cwd
    )
    assert started.returncode == 0, started.stderr[-3000:]
    doc = last_json(started.stdout)
    pids = tree(doc["pid"])
    try:
        yield doc, cwd
    finally:
        stopped = depin("down", "--json", cwd=cwd, timeout=120)
        assert stopped.returncode == 0 and last_json(stopped.stdout)["stopped"], stopped.stderr[-2000:]
        assert survivors(pids) == []
        assert ports_free(doc) == []


def _run_parameters() -> dict[str, Any]:
    """The Custom run JSON: the emulated fleet's whole history, the range model's signals."""
    since = FLEET_END - timedelta(days=float(FLEET["days"]))
    ingest = {
        "since": since.isoformat(),
        "until": FLEET_END.isoformat(),
        "signals": range_signals(),
        "rate_limit_per_s": 0,  # the local emulator has no rate limit to respect
    }
    return {"params": {"ingest": ingest}}


def _wait_for_run_named(api: str, name: str, *, timeout_s: float) -> None:
    """Wait until the Prefect API lists a flow run called ``name`` (the UI's Runs page reads the same API)."""
    deadline = time.monotonic() + timeout_s
    body = {"flow_runs": {"name": {"any_": [name]}}, "limit": 1}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json():
                return
        time.sleep(1)
    raise AssertionError(
        f"no flow run named {name!r} after {timeout_s:g} s: the UI's Submit did not create it"
    )


PNG_URI = "data:image/png;base64,"
# Each inline PNG of the page: its caption, decoded size, whether an ancestor is the markdown renderer of the
# artifact (prefect-design's p-markdown-renderer), and its ancestors' classes for the failure message.
IMAGES_JS = """(prefix) => Array.from(document.querySelectorAll(`img[src^="${prefix}"]`)).map(i => {
  const parents = [];
  for (let e = i.parentElement; e && parents.length < 8; e = e.parentElement) parents.push(e.className || e.tagName);
  return {alt: i.alt, width: i.naturalWidth, height: i.naturalHeight,
          markdown: !!i.closest('[class*="markdown"]'), parents: parents};
})"""


def _shot(page: Any, name: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    shutil.copy(ARTIFACTS / name, tmp_path / name)


def test_ui_runs_train_and_publish_to_completed_with_artifacts(
    stack: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    require_browser()
    doc, _cwd = stack
    ui, api = doc["ui"], doc["api"]
    deployment = httpx.get(f"{api}/deployments/name/train-and-publish/on-demand", timeout=10).json()

    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)

            # the deployments page lists every served deployment
            page.goto(f"{ui}/deployments")
            page.get_by_text(f"{len(doc['deployments'])} Deployments", exact=True).wait_for()
            for flow in (
                "train-and-publish",
                "ingest-telemetry",
                "train-model",
                "publish-function",
                "batch-score",
            ):
                page.get_by_text(flow, exact=True).first.wait_for()
            for name in ("on-demand", "nightly", "weekly"):
                page.get_by_text(name, exact=True).first.wait_for()
            _shot(page, "1-deployments.png", tmp_path)

            # train-and-publish / on-demand → Run → Custom run → JSON parameters → Submit
            page.locator(f'a[href="/deployments/deployment/{deployment["id"]}"]').first.click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run", exact=True).click()
            page.locator(".flow-run-create-form-v2__header .p-icon-button-menu button").click()
            page.get_by_text("Use JSON input", exact=True).click()
            page.locator("textarea").fill(json.dumps(_run_parameters(), indent=2))
            _shot(page, "2-custom-run.png", tmp_path)
            run_name = page.locator("input").first.input_value()  # the form's generated Run Name
            assert run_name
            # the API knows the run first (bounded wait); a loaded server can fail the UI's create call
            # ("Something went wrong"): then submit again, as a person would
            submit = page.get_by_role("button", name="Submit", exact=True)
            oops = page.get_by_text("Something went wrong", exact=False)
            for attempt in range(3):
                submit.click()
                try:
                    _wait_for_run_named(api, run_name, timeout_s=90)
                    break
                except AssertionError:
                    if attempt == 2 or not oops.count():
                        raise
            # then the Runs page must list it by the form's name
            link = page.get_by_role("link", name=run_name, exact=True).first
            for _ in range(6):
                page.goto(f"{ui}/runs")
                with contextlib.suppress(sync_api.TimeoutError):
                    link.wait_for(timeout=20_000)
                    break
            link.click()
            page.wait_for_url("**/runs/flow-run/**")
            run_id = page.url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]

            # its page turns Completed (the page polls the API); the three subflows are listed
            page.get_by_text("Completed", exact=True).first.wait_for(timeout=RUN_TIMEOUT_MS)
            page.get_by_text("Subflow Runs", exact=True).click()
            for flow in ("ingest-telemetry", "train-model", "publish-function"):
                page.get_by_text(flow, exact=True).first.wait_for()
            _shot(page, "3-run-completed.png", tmp_path)

            # the artifacts the flows recorded
            page.goto(f"{ui}/artifacts")
            keys = (
                "ingest-vehicles",
                "range-metrics",
                "range-model-report",
                "function-url",
                "function-manifest",
            )
            for key in keys:
                page.get_by_text(key, exact=True).first.wait_for()
            _shot(page, "4-artifacts.png", tmp_path)
            page.get_by_text("function-url", exact=True).first.click()  # the key's timeline
            page.locator('a[href^="/artifacts/artifact/"]').first.click()  # its latest version
            page.locator(f'a[href^="{doc["gateway"]}/v1/functions/range"]').first.wait_for()
            _shot(page, "5-function-url.png", tmp_path)

            # the model report shows its plots inline: every image loaded, inside the artifact's markdown
            page.goto(f"{ui}/artifacts")
            page.get_by_text("range-model-report", exact=True).first.click()
            page.locator('a[href^="/artifacts/artifact/"]').first.click()
            page.locator(f'img[src^="{PNG_URI}"]').first.wait_for()
            page.wait_for_function(f"() => Array.from(document.querySelectorAll('img[src^=\"{PNG_URI}\"]'))"
                                   ".every(i => i.complete)")  # fmt: skip
            images = page.evaluate(IMAGES_JS, PNG_URI)
            page.locator(f'img[src^="{PNG_URI}"]').nth(
                1
            ).scroll_into_view_if_needed()  # the page scrolls inside
            _shot(page, "6-model-report.png", tmp_path)
        except BaseException:
            _shot(page, "failure.png", tmp_path)
            raise
        finally:
            browser.close()

    # the range report's three plots (loss, predicted vs actual, residuals), each decoded by the browser and
    # rendered inside the markdown of the artifact
    assert [i["alt"] for i in images] == [
        "Training and validation loss per epoch",
        "Held-out trips: predicted vs actual energy use",
        "Residuals per held-out vehicle",
    ], images
    for image in images:
        assert image["width"] > 0 and image["height"] > 0, image
        assert image["markdown"], f"{image['alt']} is not inside the artifact's markdown: {image['parents']}"

    # the API agrees: the run the browser started completed with the form's parameters
    run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
    assert run["state"]["type"] == "COMPLETED"
    assert run["deployment_id"] == deployment["id"]
    assert run["parameters"]["params"]["ingest"]["signals"] == range_signals()
    # and the function it published answers on the gateway that depin up serves (it polls the registry)
    versions: dict[str, float] = {}
    with GatewayClient(doc["gateway"], retries=3, timeout=30) as client:
        for _ in range(100):
            with contextlib.suppress(GatewayRefused):
                if versions := client.function("range")["aliases"].get("prod"):
                    break
            time.sleep(0.1)
        assert versions, "the gateway never listed range@prod"
        invoked = invoke_once(doc["gateway"], "range", next(iter(versions)))
    assert invoked["function"] == "range" and len(invoked["outputs"]) == len(invoked["inputs"]) >= 1
