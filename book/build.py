"""Build the course as a static website (Jupyter Book 2 / MyST) into ``build/book/``: ``python tasks.py book``.

The notebooks are rendered with their stored outputs (never executed). Each page gets an "Open in Colab" badge and
a link to download the notebook as stored; the landing page is the README's overview (up to its profiles section).
Everything is staged in ``build/book-src/`` so the repository holds no generated MyST files.

MyST renders a site through a theme (a Node.js web app) that it normally downloads from the internet at build time.
So that the build needs no network, the theme is vendored and its build committed (``book/theme.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from book.theme import theme_template
from tools.colab import colab_link, github_slug, repo_url

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "book-src"
OUT = ROOT / "build" / "book"
TITLE = "Mixture-of-Experts, by experiment"
LANDING_END = "\n## Profiles"  # the landing page is the README up to this heading
HEADER_CELL_ID = "book-header"


def colab_target(notebook: str, ref: str) -> tuple[str, str]:
    """The Colab link of ``notebook`` once the course is published, else Colab's start page and how to use it."""
    try:
        slug = github_slug(repo_url(ROOT / "pyproject.toml"))
    except ValueError:  # not published yet: no GitHub URL for Colab to open
        return "https://colab.research.google.com/", " (upload the downloaded notebook there)"
    return colab_link(slug, ref, notebook), ""


def header_cell(notebook: Path, ref: str) -> nbformat.NotebookNode:
    """The badge and download line put at the top of each page."""
    link, note = colab_target(f"notebooks/{notebook.name}", ref)
    cell = nbformat.v4.new_markdown_cell(
        f"[![Open in Colab](../colab-badge.svg)]({link}){note} · {{download}}`Download this notebook <../downloads/{notebook.name}>`")
    cell["id"] = f"{HEADER_CELL_ID}-{notebook.stem}"  # MyST wants ids unique across the whole site
    return cell


def landing_page(readme: str) -> str:
    """The README's overview, with links to the notebooks (pages here) kept and links to repository files made plain."""
    overview = readme.split(LANDING_END, 1)[0]
    keep = re.compile(r"\.(ipynb|png|svg)$")
    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)]+)\)", lambda m: m[0] if keep.search(m[2]) else m[1], overview) + "\n"


def stage(ref: str) -> list[str]:
    """Copy what the site is made of into ``STAGE``; return the notebook pages' paths."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "notebooks").mkdir(parents=True)
    shutil.copytree(ROOT / "images", STAGE / "images")
    shutil.copytree(ROOT / "notebooks", STAGE / "downloads", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy2(Path(__file__).with_name("colab-badge.svg"), STAGE / "colab-badge.svg")
    (STAGE / "index.md").write_text(landing_page((ROOT / "README.md").read_text()))
    pages = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nb.cells.insert(0, header_cell(path, ref))
        nbformat.write(nb, STAGE / "notebooks" / path.name)
        pages.append(f"notebooks/{path.name}")
    toc = [{"file": "index.md"}] + [{"file": page} for page in pages]
    config = {"version": 1, "project": {"title": TITLE, "toc": toc},
              "site": {"title": TITLE, "template": str(theme_template())}}
    (STAGE / "myst.yml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return pages


def build(ref: str) -> Path:
    pages = stage(ref)
    # --ci: no interactive prompts; notebooks are never executed unless --execute is given.
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or "jupyter-book"
    subprocess.run([jupyter_book, "build", "--html", "--ci"], cwd=STAGE, check=True)
    html = STAGE / "_build" / "html"
    if not (html / "index.html").is_file():
        sys.exit(f"jupyter-book wrote no {html / 'index.html'}")
    if OUT.exists():
        shutil.rmtree(OUT)
    shutil.copytree(html, OUT)
    offline_output_renderers(OUT)
    print(f"[book] {len(pages)} notebooks and the landing page -> {OUT} (serve it: python -m http.server -d {OUT.relative_to(ROOT)})")
    return OUT


# thebe-core, which the theme uses to render notebook outputs such as pandas' HTML tables, defaults to loading
# MathJax 2 from a CDN for them. The course's math is rendered by KaTeX at build time, and a reader offline (or CI)
# would get a refused request and a console error on every page with an HTML output. An empty URL makes thebe-core
# register no MathJax typesetter (it checks ``mathjaxUrl && mathjaxConfig``); the theme offers no setting for it.
THEBE_MATHJAX_DEFAULT = "https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.5/MathJax.js"


def offline_output_renderers(site: Path) -> int:
    """Blank thebe-core's default MathJax CDN URL in the built site's scripts; returns how many files changed."""
    changed = 0
    for script in site.rglob("*.js"):
        text = script.read_text(encoding="utf-8")
        if THEBE_MATHJAX_DEFAULT in text:
            script.write_text(text.replace(f'"{THEBE_MATHJAX_DEFAULT}"', '""'), encoding="utf-8")
            changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="main", help="git ref the Colab badges open, once the course is published (default: main)")
    build(parser.parse_args(argv).ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
