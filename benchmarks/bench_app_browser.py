"""The app's responsiveness as a person sees it, in a real browser (headless Chromium driven by Playwright).

Every time runs from the input event to a **settled** page, read from the page's own clock: the script run the input
started has finished, no element is stale (greyed out), no spinner is left, every chart in view has drawn its SVG,
and no live estimate shows its "…" placeholder, all for two consecutive animation frames. Each figure is taken in a
fresh browser context (a new session) and, where it applies, in a warm one (the same session again); the machine's
load average is recorded with each figure. Requests that leave the machine are blocked and counted.

Targets, as settled times on the 2-core machine at idle: any widget change on a demo < 1 s; a new-session page on a
warm server < 3 s; ResNet-50's 2048-channel group < 5 s and every stop of its slider < 1 s; the first UMAP of a layer
< 10 s; the live estimate within 2 s of the last of ten fast changes; a deep link to any page with a valid ``?s=``
state < 3 s.

    python benchmarks/bench_app_browser.py [--reps 3]   # writes benchmarks/results/app_browser.{md,json}

Needs /usr/bin/chromium (or FOLDVIZ_CHROMIUM). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from test_browser import BROWSER_ARGS, CHROMIUM, running_server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

_ARM = """() => {
  window.__fv = {t0: performance.now(), ran: false, done: null, stable: 0};
  const app = document.querySelector("[data-testid='stApp']");
  const settled = () => {
    if (!app || app.getAttribute('data-test-script-state') === 'running') return false;
    if (document.querySelector('[data-stale="true"]')) return false;
    if (document.querySelector("[data-testid='stSpinner']")) return false;
    for (const m of document.querySelectorAll("[data-testid='stMetricValue']"))
      if (m.innerText.trim() === '…') return false;
    const vh = window.innerHeight;
    for (const c of document.querySelectorAll("[data-testid='stPlotlyChart']")) {
      const r = c.getBoundingClientRect();
      if (r.bottom > 0 && r.top < vh && !c.querySelector('.main-svg')) return false;
    }
    return true;
  };
  const tick = () => {
    const f = window.__fv;
    if (app && app.getAttribute('data-test-script-state') === 'running') f.ran = true;
    const waited = performance.now() - f.t0;
    if ((f.ran || waited > 400) && settled()) {
      f.stable += 1;
      if (f.stable >= 2) { f.done = performance.now(); return; }
    } else { f.stable = 0; }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


class Recorder:
    """Settled times with the load average at each measurement."""

    def __init__(self):
        self.rows: dict[str, list[dict]] = {}

    def add(self, name: str, seconds: float) -> float:
        self.rows.setdefault(name, []).append({"s": round(seconds, 3), "load": round(os.getloadavg()[0], 2)})
        print(f"{name}: {seconds:.2f} s", flush=True)
        return seconds


_WHY = """() => {
  const app = document.querySelector("[data-testid='stApp']");
  const vh = window.innerHeight;
  return {script: app && app.getAttribute('data-test-script-state'),
          stale: document.querySelectorAll('[data-stale="true"]').length,
          spinners: document.querySelectorAll("[data-testid='stSpinner']").length,
          placeholders: [...document.querySelectorAll("[data-testid='stMetricValue']")]
                           .filter(m => m.innerText.trim() === '…').length,
          undrawn: [...document.querySelectorAll("[data-testid='stPlotlyChart']")].filter(c => {
              const r = c.getBoundingClientRect(); return r.bottom > 0 && r.top < vh && !c.querySelector('.main-svg');
          }).length};
}"""


def _wait_settled(page, timeout_s: float) -> None:
    try:
        page.wait_for_function("() => window.__fv && window.__fv.done !== null", timeout=timeout_s * 1000)
    except Exception as exc:  # noqa: BLE001 - say what kept the page from settling
        raise RuntimeError(f"the page did not settle in {timeout_s:.0f} s: {page.evaluate(_WHY)}") from exc


def settled(page, action, timeout_s: float = 300.0) -> float:
    """Seconds from ``action`` to a settled page (the page's own clock)."""
    page.evaluate(_ARM)
    action()
    _wait_settled(page, timeout_s)
    return page.evaluate("() => (window.__fv.done - window.__fv.t0) / 1000")


def settled_goto(page, url: str, timeout_s: float = 300.0) -> float:
    """Seconds from a navigation to a settled page (timed from Python: the document is replaced)."""
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_s * 1000)
    page.evaluate(_ARM)
    _wait_settled(page, timeout_s)
    return time.perf_counter() - t0


def new_page(browser, url, blocked: list):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})

    def route(r):
        if r.request.url.startswith(url) or r.request.url.startswith(("data:", "blob:")):
            return r.continue_()
        blocked.append(r.request.url)
        return r.abort()
    ctx.route("**/*", route)
    page = ctx.new_page()
    page.set_default_timeout(600_000)
    return ctx, page


def nav(page, title: str) -> float:
    return settled(page, lambda: page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click())


def run(reps: int) -> dict:
    from playwright.sync_api import sync_playwright

    from foldviz.share import encode_state

    rec, blocked = Recorder(), []
    load0 = os.getloadavg()
    with running_server("bench-app-server.log", timeout=180) as url, sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        ctx, page = new_page(b, url, blocked)
        rec.add("cold server: first visit (reference)", settled_goto(page, url))
        # warm server: a new session (fresh context) and the same session again (warm context)
        for _ in range(reps):
            c2, p2 = new_page(b, url, blocked)
            rec.add("new session: home page (fresh context)", settled_goto(p2, url))
            rec.add("same session: reload (warm context)", settled_goto(p2, url))
            c2.close()
        state = encode_state({"spec": "demo:digits-resnet"}, {"spec": "digits", "limit": 500, "repair_samples": 512},
                             {"foldviz_plan": 1, "default_ratio": 0.4, "repair": "dfr", "ratios": {"layer1.0.conv1": 0.6}})
        for path in ("plan", "explorer", "results", "learn", "model"):
            c3, p3 = new_page(b, url, blocked)
            rec.add("deep link with ?s= state (fresh context)", settled_goto(p3, f"{url}/{path}?s={state}"))
            c3.close()
        for _ in range(reps):
            for title in ("Layer explorer", "Fold plan", "Fold & results", "Learn", "Model & data"):
                rec.add("open a page (warm)", nav(page, title))
        # explorer interactions
        nav(page, "Layer explorer")
        page.wait_for_selector("text=Every slider stop is precomputed", timeout=600_000)
        sl = page.get_by_test_id("stSlider").first.get_by_role("slider")
        for i in range(2 * reps):
            sl.focus()
            rec.add("explorer: move the ratio slider", settled(page, lambda: sl.press(
                "ArrowRight" if i % 2 == 0 else "ArrowLeft")))
        find = page.get_by_role("spinbutton", name="Find channel")
        for i in range(reps):
            find.fill(str(3 + 7 * i))
            rec.add("explorer: find a channel", settled(page, lambda: find.press("Enter")))
        box = page.get_by_test_id("stSelectbox").first
        for g in ["layer2.0.conv2", "layer3.0.conv1", "layer1.0.conv1"][:reps]:
            def pick(g=g):
                box.click()
                page.keyboard.type(g)   # the option list is virtualised: filter, then pick
                page.get_by_role("option", name=g, exact=False).first.click()
            rec.add("explorer: switch group", settled(page, pick))
        rec.add("explorer: first UMAP of a layer", settled(page, lambda: page.get_by_text("UMAP", exact=True).click()))
        # plan: one change, then ten fast changes (the estimate must follow the last)
        nav(page, "Fold plan")
        page.wait_for_selector("text=on 256 test samples", timeout=600_000)
        gs = page.get_by_test_id("stSlider").first.get_by_role("slider")
        for i in range(2 * reps):
            gs.focus()
            rec.add("plan: move the global ratio (estimate shown)", settled(page, lambda: gs.press(
                "ArrowRight" if i % 2 == 0 else "ArrowLeft")))
        gs.focus()

        def ten():
            for _ in range(10):
                gs.press("ArrowRight")
        rec.add("plan: estimate after ten fast changes (from the last)", settled(page, ten))
        for _ in range(10):
            gs.press("ArrowLeft")
        page.wait_for_selector("text=on 256 test samples", timeout=600_000)
        nav(page, "Fold & results")
        rec.add("results: run fold + variance comparison (reference)",
                settled(page, lambda: page.get_by_role("button", name="Run fold").click()))
        # ResNet-50 (random weights): its 2048-channel group, then every slider stop
        nav(page, "Model & data")
        page.get_by_text("torchvision architecture", exact=True).click()
        page.wait_for_timeout(500)
        arch = page.get_by_test_id("stSelectbox").first
        arch.click()
        page.keyboard.type("resnet50")
        page.get_by_role("option", name="resnet50", exact=True).click()
        page.wait_for_timeout(500)
        rec.add("ResNet-50: load (reference)",
                settled(page, lambda: page.get_by_role("button", name="Load architecture").click()))
        nav(page, "Layer explorer")
        box = page.get_by_test_id("stSelectbox").first

        def pick50():
            box.click()
            page.keyboard.type("layer4.0.conv3")
            page.get_by_role("option", name="layer4.0.conv3", exact=False).first.click()
        rec.add("ResNet-50: open the 2048-channel group", settled(page, pick50))
        page.wait_for_selector("text=Every slider stop is precomputed", timeout=900_000)
        sl = page.get_by_test_id("stSlider").first.get_by_role("slider")
        for _ in range(6):
            sl.focus()
            rec.add("ResNet-50: every slider stop", settled(page, lambda: sl.press("ArrowRight")))
        ctx.close()
        b.close()
    return {"rows": rec.rows, "loadavg_before": load0, "loadavg_after": os.getloadavg(), "reps": reps,
            "blocked_requests": sorted(set(blocked)), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


TARGETS = [("first visit", None), ("reference", None), ("new session", 3.0), ("reload", 3.0), ("deep link", 3.0),
           ("2048-channel", 5.0), ("UMAP", 10.0), ("ten fast", 2.0), ("", 1.0)]


def target_of(name: str) -> float | None:
    return next(t for key, t in TARGETS if key in name)


def write(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "app_browser.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# The app's settled times in a real browser", "",
             f"_{res['when']}; headless Chromium + Playwright against `python app.py` (2 shared cores); every time "
             "from the input to a settled page (script run finished, nothing stale, no spinner, every chart in view "
             "drawn); median (min–max) of the repeats, with the 1-minute load average at each measurement. "
             f"Requests leaving the machine: {len(res['blocked_requests'])} (blocked)._", "",
             "| interaction | n | median s | range s | load | target s | met |", "|---|---|---|---|---|---|---|"]
    for name, v in res["rows"].items():
        s = [x["s"] for x in v]
        t = target_of(name)
        med = statistics.median(s)
        lines.append(f"| {name} | {len(s)} | {med:.2f} | {min(s):.2f}–{max(s):.2f} | "
                     f"{min(x['load'] for x in v):.1f}–{max(x['load'] for x in v):.1f} | "
                     f"{'—' if t is None else f'< {t:g}'} | {'—' if t is None else ('yes' if med < t else '**no**')} |")
    lines += ["", "Command: `python benchmarks/bench_app_browser.py`.", ""]
    (RESULTS / "app_browser.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    write(run(ap.parse_args().reps))
