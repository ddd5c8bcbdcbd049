"""What a person sees in a real browser with every request that leaves the machine blocked: latest-wins live
estimates, an embedding click that selects a channel everywhere, deep links on a fresh server, and a closed tab
whose background work stops.

Chromium headless through Playwright (Debian's /usr/bin/chromium, never a downloaded browser); the server is
`python app.py`, started fresh for this module.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from test_browser import BROWSER_ARGS, CHROMIUM, RUN_TIMEOUT_MS, running_server, settle

pytestmark = pytest.mark.slow


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def fresh_server():
    with running_server("streamlit-live.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()


def offline_page(browser, url):
    """A page in a fresh context whose requests may only reach the app itself (others are recorded, then aborted)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def route(r):
        if r.request.url.startswith(url) or r.request.url.startswith(("data:", "blob:")):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    ctx.route("**/*", route)
    page = ctx.new_page()
    page.set_default_timeout(RUN_TIMEOUT_MS)
    return ctx, page, outside


def test_a_deep_link_on_a_fresh_server_opens_the_page_without_a_dialog(fresh_server, browser):
    """The very first request this server sees is a deep link (the module's fixture started it just now)."""
    ctx, page, outside = offline_page(browser, fresh_server)
    page.goto(fresh_server + "/plan")
    settle(page)
    assert page.locator("h1").first.inner_text() == "Fold plan"
    assert page.get_by_text("Page not found").count() == 0
    page.goto(fresh_server + "/no-such-page")
    settle(page)
    assert page.locator("h1").first.inner_text() == "Model & data"
    assert page.get_by_text("There is no page at /no-such-page").count() == 1
    assert not outside, outside
    ctx.close()


def test_ten_fast_ratio_changes_give_one_estimate_for_the_last_value(fresh_server, browser):
    ctx, page, outside = offline_page(browser, fresh_server)
    page.goto(fresh_server + "/plan")
    settle(page)
    page.wait_for_selector("text=on 256 test samples")            # the estimate of the starting plan
    slider = page.get_by_test_id("stSlider").first.get_by_role("slider")
    slider.focus()
    for _ in range(10):                                             # ten changes, as fast as the keyboard goes
        slider.press("ArrowRight")
    t0 = time.perf_counter()
    page.wait_for_selector("[data-testid='stSidebar'] :text('ratio 80%')")
    page.wait_for_selector("text=on 256 test samples", timeout=RUN_TIMEOUT_MS)
    settle(page)
    waited = time.perf_counter() - t0
    value = page.get_by_test_id("stMetricValue").first.inner_text()
    # the estimate shown is the one of the last value: the library's number for ratio 0.8
    from foldviz.session import DataSource, Workbench

    wb = Workbench.load("demo:digits-resnet")
    est = wb.quick_metric(wb.default_plan(0.8), DataSource("digits"))
    assert value == f"{100 * est['value']:.1f}%", (value, est)
    print(f"estimate for the last of ten changes shown {waited:.2f} s after the last key")
    assert not outside, outside
    ctx.close()


def test_an_embedding_click_selects_the_channel_in_every_linked_view(fresh_server, browser):
    ctx, page, outside = offline_page(browser, fresh_server)
    page.goto(fresh_server + "/explorer")
    settle(page)
    page.get_by_text("One group in detail", exact=True).scroll_into_view_if_needed()
    emb = page.locator("[data-testid='stPlotlyChart']").filter(has=page.locator(".gtitle:has-text('in 2-D')")).first
    emb.scroll_into_view_if_needed()
    pt = emb.locator(".scatterlayer .trace").last.locator(".points path").first
    pt.wait_for(state="attached")
    pt.click(force=True)
    settle(page)
    page.wait_for_selector("text=/Channel \\d+ is in cluster/")
    ch = int(page.get_by_text("is in cluster").first.inner_text().split()[1])
    assert page.get_by_text(f"Nearest neighbours of channel {ch}").count() == 1          # the table
    assert page.locator(f".annotation-text:has-text('channel {ch}')").count() >= 1       # heatmap crosshair
    assert page.locator(".legendtext:has-text('selected')").count() >= 1                 # ring in the embedding
    assert not outside, outside
    ctx.close()


def _cpu_per_second(pid: int) -> float:
    a = _proc_cpu_seconds(pid)
    time.sleep(1.0)
    return _proc_cpu_seconds(pid) - a


def test_closing_the_tab_stops_the_servers_background_work_within_a_second(browser):
    import subprocess

    with running_server("streamlit-close.log") as url:
        pid = int(subprocess.check_output(["pgrep", "-f", "--", f"--server.port {url.rsplit(':', 1)[1]}"]).split()[0])
        # a first visit compiles UMAP once per server (about 15 CPU-s, for every later session) and precomputes the
        # first group: let that finish, so that what is measured below is the closed session's own work
        ctx0, page0, _ = offline_page(browser, url)
        page0.goto(url + "/explorer")
        settle(page0)
        deadline = time.time() + 300
        while _cpu_per_second(pid) > 0.2 and time.time() < deadline:
            pass
        ctx0.close()
        ctx, page, outside = offline_page(browser, url)
        page.goto(url + "/explorer")
        settle(page)
        box = page.locator("[data-testid='stSelectbox']").filter(has_text="Group").first
        box.click()
        page.keyboard.type("layer3.1.conv1")            # the option list is virtualised: filter, then pick
        page.get_by_role("option").filter(has_text="layer3.1.conv1").first.click()
        page.wait_for_selector("text=/Slider stops ready: \\d+\\/20/")  # another group: its stops are computing
        assert _cpu_per_second(pid) > 0.2                                  # (the work is really there)
        ctx.close()                                  # the tab goes away while the stops are being computed
        deadline = time.time() + 5
        busy = None
        while time.time() < deadline:
            time.sleep(1.0)
            busy = _cpu_per_second(pid)              # CPU seconds used in one wall second
            if busy < 0.2:
                break
        assert busy is not None and busy < 0.2, f"the server still used {busy:.2f} CPU-s per second"
        assert not outside, outside
