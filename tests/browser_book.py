"""The course website (``python tasks.py book``) as a reader sees it, in headless Chromium.

Run with ``python tasks.py book-test`` after ``python tasks.py book`` (CI does both). Serves ``build/book/`` on
localhost with the standard library's HTTP server, with every request to another host refused (the site must work
offline), and opens the landing page and every notebook's page: it loads once and hydrates (no reload), with no
console error or failed request (KaTeX's fonts included), every image loaded, each notebook's stored figures all
present, math rendered by KaTeX, and on each notebook page a Colab badge and a download link that serves the notebook.
Uses Debian's ``chromium`` through Playwright, as ``tests/browser_jupyterlab.py`` does.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import threading
import urllib.request
from pathlib import Path

import nbformat
import pytest

from browser_jupyterlab import CHROMIUM, CHROMIUM_ARGS, stored_figures

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "book"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTIFACTS = ROOT / "build" / "book-test"


def has_math(path: Path) -> bool:
    """Whether a notebook's markdown holds TeX math ($...$ or $$...$$)."""
    nb = nbformat.read(path, as_version=4)
    return any("$" in c.source for c in nb.cells if c.cell_type == "markdown")


def page_slug(path: Path) -> str:
    """MyST's URL for a notebook page: the file name without its number, lower case, hyphens for underscores."""
    return re.sub(r"^\d+_", "", path.stem).lower().replace("_", "-")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The standard library's static file server (it redirects ``/page`` to ``/page/``, as static hosts do), silent."""

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site():
    """``build/book/`` served on a free localhost port; yields its base URL."""
    if not (SITE / "index.html").is_file():
        raise RuntimeError(f"no site in {SITE}: build it first with python tasks.py book")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def browser_context(site):
    """One headless Chromium and one context for every page, with every request to another host refused."""
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install chromium; this test is not skipped without it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        context.route(lambda url: not url.startswith(site + "/"), lambda route: route.abort())
        yield context
        context.close()
        browser.close()


SEEN = """() => {
  const imgs = Array.from(document.querySelectorAll('article img, main img'));
  return {
    images: imgs.length,
    images_broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    figures: imgs.filter(i => !i.closest('a[href*="colab.research.google.com"]')).filter(i => i.naturalWidth > 0).length,
    katex: document.querySelectorAll('.katex').length,
    katex_errors: document.querySelectorAll('.katex-error').length,
    colab_badges: document.querySelectorAll('a[href*="colab.research.google.com"] img').length,
    downloads: Array.from(document.querySelectorAll('a[href$=".ipynb"]')).map(a => a.href),
    toc_links: Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href')),
  };
}"""


# React marks the elements it has hydrated; Remix reloads the page instead of hydrating when the URL it was rendered
# for differs from the browser's (a reload loop on a static host if they differ by a trailing slash).
HYDRATED = "() => Object.keys(document.body).some(k => k.startsWith('__reactFiber$'))"
IMAGES_DONE = "() => Array.from(document.images).every(i => i.complete)"
PAGE_TIMEOUT_MS = 30_000


def open_page(context, url: str, name: str) -> tuple[dict, list[str]]:
    """Load ``url`` offline; return what it shows and every console error, page error, failed request or reload."""
    from playwright.sync_api import Error as PlaywrightError

    problems: list[str] = []
    page = context.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    loads: list[str] = []
    page.on("load", lambda: loads.append(page.url))
    try:
        page.goto(url, wait_until="load")
        page.wait_for_function(HYDRATED)
        page.evaluate("() => { for (const i of document.images) i.loading = 'eager'; }")
        page.wait_for_function(IMAGES_DONE)
        seen = page.evaluate(SEEN)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=False)
        if len(loads) != 1:
            problems.append(f"the page loaded {len(loads)} times: {loads}")
    except PlaywrightError as error:  # a timeout, or a reload that destroyed the page being read
        raise AssertionError(f"{url} did not finish loading: {error.message}\nit reported: {problems}") from None
    finally:
        page.close()
    return seen, problems


def test_landing_page_has_the_overview_and_a_table_of_contents(site, browser_context):
    seen, problems = open_page(browser_context, f"{site}/", "index")
    assert problems == [], problems
    assert seen["images_broken"] == [] and seen["images"] >= 1, seen
    for path in NOTEBOOKS:
        assert any(page_slug(path) in (href or "") for href in seen["toc_links"]), f"{path.name} missing from the table of contents"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_page_renders_offline(site, browser_context, path):
    seen, problems = open_page(browser_context, f"{site}/{page_slug(path)}", path.stem)
    assert problems == [], problems
    assert seen["images_broken"] == [], seen
    assert seen["figures"] >= stored_figures(path), seen
    if has_math(path):
        assert seen["katex"] > 0 and seen["katex_errors"] == 0, seen
    assert seen["colab_badges"] == 1, seen
    assert len(seen["downloads"]) == 1, seen
    with urllib.request.urlopen(seen["downloads"][0]) as response:
        downloaded = json.loads(response.read())
    assert downloaded == json.loads(path.read_text()), "the download is not the notebook as stored"
