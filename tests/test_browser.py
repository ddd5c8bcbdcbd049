"""Browser test: `streamlit run app.py` driven in headless Chromium with Playwright.

Visits every page through the sidebar navigation, checks a hover label on the embedding
scatter, runs a fold, walks the Learn page, and asserts that no exception or error box is shown.
Screenshots go to ``test-artifacts/browser/`` (set ``FOLDVIZ_SCREENSHOTS=assets/screenshots`` to
refresh the README images, which are then shrunk to a small palette PNG).

Needs Debian's Chromium at /usr/bin/chromium (CI installs it via .ci/run); never `playwright install`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # run by `make test`; skipped by the quick subset (-m 'not slow')

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("FOLDVIZ_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("FOLDVIZ_SCREENSHOTS") or ROOT / "test-artifacts" / "browser")
README_SHOTS = SHOTS.resolve() == (ROOT / "assets" / "screenshots").resolve()
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-dev-shm-usage"]
RUN_TIMEOUT_MS = 240_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(log_name: str = "streamlit-server.log", timeout: float = 90.0):
    """`streamlit run app.py` on a free port until the block ends; yields its URL once it answers /_stcore/health.
    (The browser tests' fixture and benchmarks/bench_app_browser.py both use it.)"""
    port = _free_port()
    log = ROOT / "test-artifacts"
    log.mkdir(exist_ok=True)
    out = open(log / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--server.headless", "true", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}; see test-artifacts/{log_name}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"streamlit did not become healthy within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()


@pytest.fixture(scope="module")
def server():
    try:
        with running_server() as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(CI does this in .ci/run) or set FOLDVIZ_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()


TIMES: dict[str, float] = {}


def settle(page, timeout: int = RUN_TIMEOUT_MS) -> None:
    """Wait until the run an action started is over and nothing on the page is stale (greyed out)."""
    try:  # fast runs may finish before we look: then there is nothing to wait for
        page.wait_for_selector("[data-testid='stApp'][data-test-script-state='running']", timeout=1500)
    except Exception:  # noqa: BLE001 — playwright's TimeoutError
        pass
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout)
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')", timeout=timeout)


_ARM = """() => {
  const app = document.querySelector("[data-testid='stApp']");
  if (window.__fvObs) window.__fvObs.disconnect();
  window.__fv = {t0: performance.now(), running: false, done: null};
  window.__fvObs = new MutationObserver(() => {
    const s = app.getAttribute('data-test-script-state');
    if (s === 'running') { window.__fv.running = true; window.__fv.done = null; }
    else if (s === 'notRunning' && window.__fv.running) { window.__fv.done = performance.now(); }
  });
  window.__fvObs.observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
}"""
_SETTLED = """() => !document.querySelector('[data-stale="true"]') && window.__fv &&
  ((window.__fv.done !== null) || (!window.__fv.running && performance.now() - window.__fv.t0 > 1500))"""


def timed(name: str, page, action, *, timeout: int = RUN_TIMEOUT_MS, until: str | None = None,
          navigates: bool = False) -> float:
    """Run ``action`` and record the seconds from it to a settled page: the script run it started has finished
    and nothing is stale (greyed out); ``until``: a selector that must also appear. The end of the run is taken
    from the page's own clock (a MutationObserver), so polling adds no delay; ``navigates``: the action loads a new
    document (goto, reload), timed from Python until the page settles."""
    if navigates:
        t0 = time.perf_counter()
        action()
        settle(page, timeout)
        if until:
            page.wait_for_selector(until, timeout=timeout)
        TIMES[name] = round(time.perf_counter() - t0, 3)
        return TIMES[name]
    page.evaluate(_ARM)
    t0 = time.perf_counter()
    action()
    page.wait_for_function(_SETTLED, timeout=timeout)
    js = page.evaluate("() => window.__fv.done === null ? null : (window.__fv.done - window.__fv.t0) / 1000")
    elapsed = js if js is not None else time.perf_counter() - t0
    if until:
        page.wait_for_selector(until, timeout=timeout)
        elapsed = max(elapsed, time.perf_counter() - t0) if js is None else elapsed
    TIMES[name] = round(float(elapsed), 3)
    return TIMES[name]


def write_times() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = (ROOT / "test-artifacts" / "browser-times.json")
    path.parent.mkdir(exist_ok=True)
    load = os.getloadavg()
    path.write_text(json.dumps({"times_s": TIMES, "loadavg": load}, indent=2) + "\n")
    return path


def wait_for_run(page, timeout: int = RUN_TIMEOUT_MS) -> None:
    """Wait until the app is connected and the script run (started by the last action) is finished."""
    page.wait_for_timeout(400)
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=timeout)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout)
    page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout)


def assert_no_errors(page, where: str) -> None:
    exc = page.get_by_test_id("stException")
    assert exc.count() == 0, f"{where}: exception box: {exc.first.inner_text()[:500]}"
    err = page.get_by_test_id("stAlertContentError")
    assert err.count() == 0, f"{where}: error box: {err.first.inner_text()[:500]}"


def wait_for_charts(page, n: int) -> None:
    """At least ``n`` plotly charts exist and each has drawn its SVG (charts render when scrolled into view)."""
    page.wait_for_function("n => document.querySelectorAll(\"[data-testid='stPlotlyChart']\").length >= n",
                           arg=n, timeout=60_000)
    for attempt in range(4):   # a background result may rerun the page (charts redrawn): then look again
        try:
            charts = page.get_by_test_id("stPlotlyChart")
            for i in range(charts.count()):
                c = charts.nth(i)
                c.scroll_into_view_if_needed()
                c.locator(".main-svg").first.wait_for(state="attached", timeout=60_000)
            break
        except Exception as exc:  # noqa: BLE001 - playwright's Error: the element left the DOM mid-rerun
            if attempt == 3 or "not attached" not in str(exc):
                raise
            settle(page)
    page.get_by_test_id("stMain").evaluate("el => el.scrollTo(0, 0)") if page.get_by_test_id("stMain").count() else None
    page.evaluate("window.scrollTo(0, 0)")


def shot(page, name: str, *, clip_to=None) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    if README_SHOTS:  # keep the committed images small: 1100 px wide, 128-colour palette
        from PIL import Image

        im = Image.open(path).convert("RGB")
        w, h = im.size
        im = im.resize((1100, int(h * 1100 / w)), Image.LANCZOS)
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def goto_page(page, title: str) -> None:
    key = f"open page: {title}" + (" (again)" if f"open page: {title}" in TIMES else "")
    timed(key, page, lambda: page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click(),
          until=f"h1:has-text('{title.split(' (')[0]}')")


def scroll_to(page, text: str) -> None:
    page.get_by_text(text, exact=True).first.scroll_into_view_if_needed()
    page.wait_for_timeout(400)


def test_browser_walkthrough(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(RUN_TIMEOUT_MS)
    timed("first visit: model page settled", page, lambda: page.goto(server),
          until="[data-testid='stMetricValue']:has-text('%')", navigates=True)
    page.wait_for_selector("h1:has-text('Model & data')")
    assert_no_errors(page, "Model & data")
    assert page.get_by_test_id("stSidebarNav").get_by_text("Learn", exact=True).is_visible()
    shot(page, "1-model-data")

    # Layer explorer: charts render, the scatter's hover names a channel and its cluster
    goto_page(page, "Layer explorer")
    wait_for_charts(page, 5)
    assert_no_errors(page, "Layer explorer")
    shot(page, "2a-layer-overview")
    scroll_to(page, "One group in detail")
    emb = page.get_by_test_id("stPlotlyChart").nth(2)
    emb.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    point = emb.locator(".scatterlayer .points path").first
    point.hover(force=True)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    hover = page.locator(".hoverlayer .hovertext").first.text_content() or ""
    assert "channel" in hover and "cluster" in hover, hover

    # linked views: find a channel -> it is highlighted in the heatmap, the embedding and the neighbour table
    find = page.get_by_role("spinbutton", name="Find channel")
    find.fill("3")
    timed("explorer: find a channel (linked highlight)", page, lambda: find.press("Enter"),
          until="text=Channel 3 is in cluster")
    assert page.locator("[data-testid='stPlotlyChart'] .legendtext:has-text('selected')").count() >= 1
    assert page.get_by_text("Nearest neighbours of channel 3").count() == 1
    assert page.locator("[data-testid='stPlotlyChart'] .annotation-text:has-text('channel 3')").count() >= 1
    # a click on a point of the embedding selects that channel instead
    emb = page.get_by_test_id("stPlotlyChart").nth(2)
    pt = emb.locator(".scatterlayer .trace").nth(1).locator(".points path").first
    pt.scroll_into_view_if_needed()
    timed("explorer: click a point in the embedding", page, lambda: pt.click(force=True))
    page.wait_for_selector("text=/Channel \\d+ is in cluster/")
    # the ratio slider: every stop is precomputed in the background
    page.wait_for_timeout(1500)
    sl = page.get_by_test_id("stSlider").first.get_by_role("slider")
    sl.focus()
    timed("explorer: move the ratio slider", page, lambda: sl.press("ArrowRight"))
    assert_no_errors(page, "Layer explorer (linked views)")
    shot(page, "2b-layer-detail")

    # Fold plan: change the global ratio with the keyboard, preview updates
    goto_page(page, "Fold plan")
    wait_for_charts(page, 1)
    slider = page.get_by_test_id("stSlider").first.get_by_role("slider")
    slider.focus()
    slider.press("ArrowRight")
    slider.press("ArrowRight")
    wait_for_run(page)
    page.wait_for_selector("[data-testid='stSidebar'] :text('ratio 40%')")
    assert_no_errors(page, "Fold plan")
    # skip one group, then ask for a suggestion: the skip stays
    skip = page.get_by_test_id("stCheckbox").filter(has_text="Skip").first
    timed("plan: toggle skip", page, lambda: skip.click())
    page.wait_for_selector("[data-testid='stSidebar'] :text('1 skipped')")
    # a suggested plan replaces the widgets' values in the browser too (no stale slider state)
    timed("plan: suggest a plan", page, lambda: page.get_by_role("button", name="Suggest a plan").click(),
          until="text=Suggested plan for 50% parameter sparsity")
    assert "1 skipped" in page.get_by_test_id("stSidebar").inner_text()   # the suggestion kept the skip
    assert "stay skipped" in page.get_by_test_id("stAlertContentSuccess").first.inner_text()
    side = page.get_by_test_id("stSidebar").inner_text()
    suggested = int(re.search(r"ratio (\d+)%", side).group(1))
    assert 0 < suggested < 95 and "0 override(s)" not in side, side   # never the old "global ratio 0%"
    slider = page.get_by_test_id("stSlider").first.get_by_role("slider")
    slider.focus()
    timed("plan: move the global ratio", page, lambda: slider.press("ArrowRight"))
    page.wait_for_selector(f"[data-testid='stSidebar'] :text('ratio {suggested + 5}%')")
    # the live accuracy estimate follows the plan
    page.wait_for_selector("text=on 256 test samples",
                           timeout=RUN_TIMEOUT_MS)
    # reload: the plan lives in the URL and comes back
    assert "s=" in page.url
    timed("plan: reload the tab", page, lambda: page.reload(),
          until=f"[data-testid='stSidebar'] :text('ratio {suggested + 5}%')", navigates=True)
    assert "1 skipped" in page.get_by_test_id("stSidebar").inner_text()
    page.wait_for_selector("h1:has-text('Fold plan')")
    assert "0 override(s)" not in page.get_by_test_id("stSidebar").inner_text()
    assert_no_errors(page, "Fold plan after suggestion")
    wait_for_charts(page, 1)
    shot(page, "3-fold-plan")
    # the exported plan is the engine's JSON and matches what the page shows
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download plan (JSON)").click()
    exported = json.loads(Path(dl.value.path()).read_text())
    assert exported["foldviz_plan"] == 1 and len(exported["ratios"]) > 1
    assert exported["default_ratio"] == pytest.approx((suggested + 5) / 100)

    # Fold & results: run the plan
    goto_page(page, "Fold & results")
    timed("results: run fold (+3-method variance comparison)", page,
          lambda: page.get_by_role("button", name="Run fold").click(),
          until="[data-testid='stMetricLabel']:has-text('Accuracy')")
    page.wait_for_selector("text=See activations")
    wait_for_run(page)
    wait_for_charts(page, 3)
    assert_no_errors(page, "Fold & results")
    assert page.get_by_text("Why repair matters").count() == 1
    shot(page, "4a-fold-results")
    # take the folded model home: the zip holds a safetensors model that foldviz loads again
    with page.expect_download() as dl:
        page.get_by_role("button", name="Folded model (.zip)").click()
    with zipfile.ZipFile(dl.value.path()) as z, tempfile.TemporaryDirectory() as tmp:
        names = z.namelist()
        assert any(n.endswith("model.safetensors") for n in names), names
        z.extractall(tmp)
        from foldviz.persist import load_folded

        folded = load_folded(Path(tmp) / "folded")
        assert sum(p.numel() for p in folded.model.parameters()) < 696_042
    scroll_to(page, "Why repair matters: activation variance per layer")
    shot(page, "4b-variance")
    scroll_to(page, "See activations: one input, before and after folding")
    page.wait_for_timeout(800)
    shot(page, "4d-activations")

    # Sweep (small: two ratios, default methods)
    scroll_to(page, "Sweep: accuracy vs. parameter sparsity")
    timed("results: run sweep (3 methods x 4 ratios)", page,
          lambda: page.get_by_role("button", name="Run sweep").click(), until="text=/Sweep done: \\d+ points/")
    wait_for_run(page)
    wait_for_charts(page, 4)
    assert_no_errors(page, "Sweep")
    page.get_by_test_id("stPlotlyChart").last.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    shot(page, "4c-sweep")
    assert page.locator("[data-testid='stPlotlyChart'] .legendtext:has-text('your plan')").count() == 1
    # the report zip holds the variance plot, the sweep table and the sweep plot
    with page.expect_download() as dl:
        page.get_by_role("button", name="Report (.zip: JSON, CSV, plots)").click()
    with zipfile.ZipFile(dl.value.path()) as z:
        names = set(z.namelist())
    assert {"report.json", "groups.csv", "plan.json", "sweep.csv", "plots/variance_ratio.html",
            "plots/sweep.html"} <= names, names

    # Learn: walk every step
    goto_page(page, "Learn")
    wait_for_charts(page, 1)
    for step in range(6):
        timed(f"learn: next to step {step + 2}", page, lambda: page.get_by_role("button", name="Next →").click())
        assert_no_errors(page, f"Learn step {step + 2}")
        if step == 1:
            wait_for_charts(page, 2)
            shot(page, "5a-learn-clusters")
    wait_for_charts(page, 1)
    page.wait_for_selector("text=Unfolded accuracy")
    shot(page, "5b-learn-repair")

    # back to the plan: the change survived every page switch
    goto_page(page, "Fold plan")
    assert page.locator(f"[data-testid='stSidebar'] :text('ratio {suggested + 5}%')").count() == 1
    assert f"{(suggested + 5) / 100:.2f}" in page.get_by_test_id("stSlider").first.inner_text()
    assert_no_errors(page, "Fold plan (again)")
    page.close()
    print("interaction times (s):", json.dumps(TIMES, indent=1), "->", write_times())


def test_browser_language_model(server, browser):
    """Load the bundled LM demo and use every page's LM view in a real browser."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(RUN_TIMEOUT_MS)
    page.goto(server)
    settle(page)
    page.wait_for_selector("h1:has-text('Model & data')")
    page.get_by_text("Bundled demo", exact=True).click()
    settle(page)
    box = page.get_by_test_id("stSelectbox").first
    box.click()
    page.get_by_role("option", name="demo:shakespeare-llama (language model)", exact=True).click()
    settle(page)
    timed("LM: load the demo", page, lambda: page.get_by_role("button", name="Load demo").click(),
          until="text=Loaded demo:shakespeare-llama")
    page.wait_for_selector("[data-testid='stMetricLabel']:has-text('Baseline perplexity')")
    assert_no_errors(page, "LM model page")
    wait_for_charts(page, 1)
    shot(page, "6a-lm-model")
    goto_page(page, "Layer explorer")
    wait_for_charts(page, 2)
    assert_no_errors(page, "LM explorer")
    shot(page, "6b-lm-explorer")
    goto_page(page, "Fold plan")
    # the plan editor's column header (the grid keeps its header cells in an accessible, visually hidden table)
    page.wait_for_selector("th:has-text('heads kept per KV group')", state="attached")
    assert_no_errors(page, "LM plan")
    goto_page(page, "Fold & results")
    timed("LM: run fold", page, lambda: page.get_by_role("button", name="Run fold").click(),
          until="[data-testid='stMetricLabel']:has-text('Perplexity')")
    wait_for_charts(page, 1)
    assert_no_errors(page, "LM results")
    assert page.get_by_text("Greedy generations").count() == 1
    shot(page, "6c-lm-results")
    page.close()
    write_times()
