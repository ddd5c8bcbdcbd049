"""Issue #9's responsiveness targets, measured in a real browser (headless Chromium driven by Playwright).

Every time is from the interaction to a settled page: the script run it started has finished (read from the page's
own clock by a MutationObserver on Streamlit's run state) and no element is stale (greyed out). Interactions are
repeated and the median is reported with the min-max range; the load average is recorded before and after.

Targets (issue #9): every interaction on the bundled demos < 1 s once the model is loaded; first meaningful paint
on a warm server < 3 s; a 2048-channel group on ResNet-50 < 5 s; first UMAP < 10 s.

    python benchmarks/bench_app_browser.py            # writes benchmarks/results/app_browser.{md,json}

Needs /usr/bin/chromium (or FOLDVIZ_CHROMIUM). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_browser import BROWSER_ARGS, CHROMIUM, TIMES, running_server, settle, timed  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"interaction": 1.0, "first_paint": 3.0, "resnet50_2048": 5.0, "first_umap": 10.0}


def nav(page, title: str, name: str) -> float:
    return timed(name, page, lambda: page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click(),
                 until=f"h1:has-text('{title}')")


def repeat(name: str, n: int, fn) -> list[float]:
    out = []
    for i in range(n):
        fn(f"{name} #{i}")
        out.append(TIMES[f"{name} #{i}"])
    return out


def run(reps: int = 3) -> dict:
    from playwright.sync_api import sync_playwright

    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    load0 = os.getloadavg()
    rows: dict[str, list[float]] = {}
    with running_server("bench-app-server.log", timeout=120) as url:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            # cold server: the first visit loads the default demo (not a target; recorded for reference)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            timed("cold", page, lambda: page.goto(url), until="[data-testid='stMetricValue']:has-text('%')",
                  navigates=True)
            rows["cold server: first visit, settled (reference)"] = [TIMES["cold"]]
            # warm server: first meaningful paint of a new session (title + the model's numbers)
            paints = []
            for i in range(reps):
                pg = b.new_page(viewport={"width": 1400, "height": 1000})
                t0 = time.perf_counter()
                pg.goto(url)
                pg.wait_for_selector("h1:has-text('Model & data')")
                pg.wait_for_selector("[data-testid='stMetricValue']")
                paints.append(time.perf_counter() - t0)
                pg.close()
            rows["warm server: first meaningful paint (new session)"] = paints
            # interactions on the default demo
            rows["open a page (explorer, plan, results, learn, model)"] = [
                nav(page, t, f"nav {t} {i}") for i in range(reps)
                for t in ("Layer explorer", "Fold plan", "Fold & results", "Learn", "Model & data")]
            nav(page, "Layer explorer", "to explorer")
            sl = page.get_by_test_id("stSlider").first.get_by_role("slider")
            page.wait_for_timeout(3000)  # the background precomputes every slider stop
            rows["explorer: move the ratio slider"] = []
            for i in range(2 * reps):
                sl.focus()
                rows["explorer: move the ratio slider"].append(
                    timed(f"slider {i}", page, lambda: sl.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")))
            find = page.get_by_role("spinbutton", name="Find channel")
            rows["explorer: find a channel (linked highlight)"] = []
            for i in range(reps):
                find.fill(str(3 + i))
                rows["explorer: find a channel (linked highlight)"].append(
                    timed(f"find {i}", page, lambda: find.press("Enter")))
            box = page.get_by_test_id("stSelectbox").first
            rows["explorer: switch group"] = []
            for i, gname in enumerate(["layer2.0.conv2", "layer3.0.conv1", "layer1.0.conv1"][:reps]):
                def pick(g=gname):
                    box.click()
                    page.get_by_role("option", name=g, exact=True).click()
                rows["explorer: switch group"].append(timed(f"group {i}", page, pick))
            # first UMAP of this server process (compiled in the background since the explorer opened)
            rows["explorer: first UMAP (server's first)"] = [
                timed("umap", page, lambda: page.get_by_text("UMAP", exact=True).click())]
            nav(page, "Fold plan", "to plan")
            gs = page.get_by_test_id("stSlider").first.get_by_role("slider")
            rows["plan: move the global ratio (live estimate updates)"] = []
            for i in range(2 * reps):
                gs.focus()
                rows["plan: move the global ratio (live estimate updates)"].append(
                    timed(f"ratio {i}", page, lambda: gs.press("ArrowRight" if i % 2 == 0 else "ArrowLeft"),
                          until="text=on 256 test samples"))
            nav(page, "Fold & results", "to results")
            rows["results: run fold + 3-method variance comparison (reference)"] = [
                timed("fold", page, lambda: page.get_by_role("button", name="Run fold").click(),
                      until="text=See activations")]
            # ResNet-50 (random weights): a 2048-channel group in the explorer
            nav(page, "Model & data", "to model")
            page.get_by_text("torchvision architecture", exact=True).click()
            settle(page)
            arch = page.get_by_test_id("stSelectbox").first
            arch.click()
            page.keyboard.type("resnet50")
            page.get_by_role("option", name="resnet50", exact=True).click()
            settle(page)
            timed("load r50", page, lambda: page.get_by_role("button", name="Load architecture").click(),
                  until="text=Loaded torchvision:resnet50")
            rows["ResNet-50: load (reference)"] = [TIMES["load r50"]]
            nav(page, "Layer explorer", "to explorer r50")
            box = page.get_by_test_id("stSelectbox").first

            def pick50():
                box.click()
                page.keyboard.type("layer4.0.conv3")
                page.get_by_role("option", name="layer4.0.conv3", exact=True).click()
            rows["ResNet-50: open a 2048-channel group (layer4.0.conv3)"] = [timed("r50 group", page, pick50)]
            b.close()
    return {"rows": rows, "loadavg_before": load0, "loadavg_after": os.getloadavg(), "reps": reps}


def target_of(name: str) -> float | None:
    if "reference" in name:
        return None
    if "first meaningful paint" in name:
        return TARGETS["first_paint"]
    if "2048-channel" in name:
        return TARGETS["resnet50_2048"]
    if "UMAP" in name:
        return TARGETS["first_umap"]
    return TARGETS["interaction"]


def write(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "app_browser.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# App responsiveness in a real browser (issue #9 targets)", "",
             "Headless Chromium + Playwright against `streamlit run app.py` on the bundled default demo "
             "(`demo:digits-resnet`) and a randomly initialised torchvision ResNet-50. Each time runs from the "
             "interaction to a settled page (the script run finished, nothing greyed out). Median (min–max) over "
             f"the repeats. Load average before {', '.join(f'{x:.2f}' for x in res['loadavg_before'])}, after "
             f"{', '.join(f'{x:.2f}' for x in res['loadavg_after'])} (2 shared cores).", "",
             "| interaction | n | median s | range s | target s | met |", "|---|---|---|---|---|---|"]
    for name, v in res["rows"].items():
        t = target_of(name)
        med = statistics.median(v)
        lines.append(f"| {name} | {len(v)} | {med:.2f} | {min(v):.2f}–{max(v):.2f} | "
                     f"{'—' if t is None else f'< {t:g}'} | {'—' if t is None else ('yes' if med < t else '**no**')} |")
    lines += ["", "Command: `python benchmarks/bench_app_browser.py`.", ""]
    (RESULTS / "app_browser.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    write(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
