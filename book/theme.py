"""MyST's book theme, built locally with npm so that building the site needs no download outside the npm registry.

MyST (``jupyter-book build --html``) renders pages through a site theme, a Remix web app that it normally fetches as
a prebuilt zip from the theme's GitHub releases (``https://api.mystmd.org/templates/site/myst/book-theme``), which
fails offline ("getaddrinfo ENOTFOUND api.mystmd.org"). The theme's source is MIT-licensed and small, so it is
vendored in ``book/theme/`` (jupyter-book/myst-theme, ``themes/book`` and ``template/`` at version 1.1.2, see
``book/theme/VENDORED.md``) and built here the way its Makefile builds a release: ``npm ci``, then the production
Remix build, then the release template (``server.js``, ``build/``, ``public/``, ``template.yml``) with its own
``npm ci``. That takes minutes (a 1.3 GB node_modules for the build), so the result is cached outside the checkout,
in ``~/.cache/moe-course/book-theme/<hash of the source>/`` (``$XDG_CACHE_HOME`` if set), and reused by every clone
until the vendored source changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("theme")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-course" / "book-theme"
NPM_INSTALL = ["npm", "ci", "--no-audit", "--no-fund", "--legacy-peer-deps"]


def source_hash() -> str:
    """A hash of every vendored file's path and bytes: the cache key."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCE.rglob("*") if p.is_file() and "node_modules" not in p.parts):
        digest.update(path.relative_to(SOURCE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def npm(*args: str, cwd: Path) -> None:
    print(f"[book] ({cwd.name}) " + " ".join(args), flush=True)
    subprocess.run(list(args), cwd=cwd, check=True)


def build_theme() -> Path:
    """The built template folder (holding ``template.yml`` and ``node_modules``), built on first use."""
    target = CACHE / source_hash()
    template = target / "template"
    if (template / "template.yml").is_file() and (template / "node_modules").is_dir():
        return template
    if target.exists():
        shutil.rmtree(target)
    app = target / "app"
    shutil.copytree(SOURCE / "book", app)
    npm(*NPM_INSTALL, cwd=app)
    shutil.copy2(app / "remix.config.prod.js", app / "remix.config.js")
    npm("npx", "copy-thebe-assets", "./public", cwd=app)
    npm("npx", "tailwindcss", "-m", "-i", "./styles/app.css", "-o", "app/styles/app.css", cwd=app)
    npm("npx", "remix", "build", cwd=app)
    staging = target / "template.partial"
    shutil.copytree(SOURCE / "template", staging)
    for folder in ("build", "public"):
        shutil.copytree(app / folder, staging / folder)
    shutil.copy2(app / "template.yml", staging / "template.yml")
    npm(*NPM_INSTALL, cwd=staging)
    staging.rename(template)  # complete or absent: an interrupted build is redone, never half-used
    shutil.rmtree(app)
    return template
