"""The stored notebooks as a learner sees them: JupyterLab in headless Chromium.

Run with ``python tasks.py browser-test`` (before storing outputs, and in CI). Needs Debian's
``chromium`` (``apt-get install chromium``) and Playwright's Python API (``pip install playwright``);
Playwright's own browser download is not used. Starts ``jupyter lab`` on localhost, opens every
notebook untrusted (as a fresh clone is), and checks what renders: figures as loaded images, no
broken local image in the markdown, no error output, and notebook 05's passage in more than one colour.
Screenshots go to ``build/browser-test/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTIFACTS = ROOT / "build" / "browser-test"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "browser-test"
# JupyterLab 4 renders only the cells in view by default; the test needs every cell in the page.
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
                "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``jupyter lab`` on localhost serving the repository; yields its base URL."""
    settings = tmp_path_factory.mktemp("lab-settings")
    for name, values in LAB_SETTINGS.items():
        plugin, file = name.split("/", 1)[0], name
        (settings / file).parent.mkdir(parents=True, exist_ok=True)
        (settings / file).write_text(json.dumps(values))
    port = _free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTER_CONFIG_DIR=str(tmp_path_factory.mktemp("jupyter-config")))
    log = open(tmp_path_factory.mktemp("lab-log") / "lab.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={ROOT}", "--LabApp.news_url=", "--ServerApp.open_browser=False", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"jupyter lab did not start:\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) "
                           "or point CHROMIUM at a Chromium binary; this test is not skipped without it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise RuntimeError("Playwright's Python API is missing: pip install playwright (python tasks.py browser-test does)") from err
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def stored_figures(path: Path) -> int:
    """Image outputs stored in the notebook (what should show as figures)."""
    nb = nbformat.read(path, as_version=4)
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type in ("display_data", "execute_result") and {"image/png", "image/svg+xml"} & set(o.get("data", {})))


RENDERED = """() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  const imgs = sel => Array.from(nb.querySelectorAll(sel));
  const figures = imgs('.jp-OutputArea-output img');
  // local images only: a remote one (the Colab badge) needs the internet, which the test does not assume
  const markdown = imgs('.jp-MarkdownOutput img').filter(i => new URL(i.src, location.href).origin === location.origin);
  const colours = new Set(imgs('.jp-RenderedHTMLCommon span[style]').map(s => getComputedStyle(s).backgroundColor)
                            .filter(c => c !== 'rgba(0, 0, 0, 0)'));
  return {
    cells: nb.querySelectorAll('.jp-Cell').length,
    figures: figures.length,
    figures_loaded: figures.filter(i => i.complete && i.naturalWidth > 0).length,
    broken_markdown_images: markdown.filter(i => i.complete && i.naturalWidth === 0).map(i => i.getAttribute('src')),
    markdown_images_pending: markdown.filter(i => !i.complete).length,
    errors: imgs('[data-mime-type="application/vnd.jupyter.error"]').length + nb.querySelectorAll('.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]').length,
    error_text: Array.from(nb.querySelectorAll('[data-mime-type="application/vnd.jupyter.error"]')).map(e => e.innerText.slice(0, 300)),
    passage_colours: colours.size,
  };
}"""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_renders_in_jupyterlab(lab, browser, path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        # a fresh workspace each time (``reset``), so only this notebook is open
        page.goto(f"{lab}/lab/tree/{path.relative_to(ROOT).as_posix()}?token={TOKEN}&reset")
        page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell", state="attached", timeout=60_000)
        expected = stored_figures(path)
        page.wait_for_function(
            """n => { const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
                      const imgs = Array.from(nb.querySelectorAll('img'));
                      return nb.querySelectorAll('.jp-OutputArea-output img').length >= n && imgs.every(i => i.complete); }""",
            arg=expected, timeout=60_000)
        seen = page.evaluate(RENDERED)
        page.screenshot(path=ARTIFACTS / f"{path.stem}.png")
        if path.name.startswith("05_"):
            passage = page.locator(".jp-RenderedHTMLCommon:has(span[style])").first
            passage.scroll_into_view_if_needed()
            passage.screenshot(path=ARTIFACTS / f"{path.stem}_passage.png")
    finally:
        page.close()
    assert seen["cells"] == len(nbformat.read(path, as_version=4).cells)
    assert seen["figures"] == expected and seen["figures_loaded"] == expected, seen
    assert seen["broken_markdown_images"] == [], seen
    assert seen["errors"] == 0, seen["error_text"]
    if path.name.startswith("05_"):
        assert seen["passage_colours"] > 1, "notebook 05's passage lost its per-expert colours (HTML sanitised?)"
