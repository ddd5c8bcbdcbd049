"""Full-page screenshots of every page at 1280 px and 1920 px, for an image classifier and a language model.

Each page is opened in a real browser (headless Chromium) against ``streamlit run app.py``, after a fold has run, so
the results sections are filled; every request that leaves the machine is blocked. Look at the images: nothing may
overlap at either width.

    python benchmarks/screenshots.py [--out DIR]     # default: test-artifacts/screens/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from test_browser import BROWSER_ARGS, CHROMIUM, goto_page, running_server, settle  # noqa: E402

PAGES = ("Model & data", "Layer explorer", "Fold plan", "Fold & results", "Learn")
WIDTHS = (1280, 1920)


def _offline(context) -> list[str]:
    blocked: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith(("http://127.0.0.1", "http://localhost", "ws://", "data:", "blob:")):
            return r.continue_()
        blocked.append(url)
        return r.abort()

    context.route("**/*", route)
    return blocked


def _load_lm(page) -> None:
    page.get_by_text("Bundled demo", exact=True).click()
    settle(page)
    page.get_by_test_id("stSelectbox").first.click()
    page.get_by_role("option", name="demo:shakespeare-llama (language model)", exact=True).click()
    settle(page)
    page.get_by_role("button", name="Load demo").click()
    page.wait_for_selector("text=Loaded demo:shakespeare-llama", timeout=600_000)
    settle(page)


def shoot(browser, url: str, out: Path, kind: str, width: int) -> list[str]:
    ctx = browser.new_context(viewport={"width": width, "height": 3000})   # the app scrolls inside: a tall window
    blocked = _offline(ctx)
    page = ctx.new_page()
    page.set_default_timeout(600_000)
    page.goto(url)
    settle(page)
    if kind == "lm":
        _load_lm(page)
    goto_page(page, "Fold & results")
    page.get_by_role("button", name="Run fold").click()
    page.wait_for_selector("[data-testid='stMetricLabel']:has-text('Parameters')", timeout=600_000)
    settle(page)
    for title in PAGES:
        goto_page(page, title)
        settle(page)
        page.wait_for_timeout(1500)  # charts finish drawing
        name = title.lower().replace(" & ", "-").replace(" ", "-")
        page.screenshot(path=str(out / f"{kind}-{name}-{width}.png"))
    ctx.close()
    return blocked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "screens")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with running_server("streamlit-screens.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            for kind in ("cnn", "lm"):
                for width in WIDTHS:
                    blocked = shoot(browser, url, args.out, kind, width)
                    print(f"{kind} at {width} px: {len(PAGES)} pages, {len(blocked)} outside request(s) blocked")
        finally:
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
