"""MyST's book theme: vendored source, and its build committed so that building the site needs only the npm registry.

MyST (``jupyter-book build --html``) renders pages through a site theme, a Remix web app that it normally fetches as
a prebuilt zip from the theme's GitHub releases (``https://api.mystmd.org/templates/site/myst/book-theme``), which
fails offline ("getaddrinfo ENOTFOUND api.mystmd.org"). The theme's source is MIT-licensed and small, so it is
vendored in ``book/theme/`` (jupyter-book/myst-theme, ``themes/book`` and ``template/`` at version 1.1.2, see
``book/theme/VENDORED.md``). Building it the way its Makefile builds a release (``npm ci`` of a 1.3 GB tree, the
production Remix build) takes about 8 minutes, so its result, the release template (``server.js``, ``build/``,
``public/``, ``template.yml``, about 9 MB as ``tar.xz``), is committed as ``book/theme-build.tar.xz`` together with
the hash of the source it was built from. ``python -m book.theme`` rebuilds it after the vendored source changes;
``python tasks.py book`` refuses a stale one.

To use it, the archive is unpacked into ``~/.cache/moe-course/book-theme/<source hash>/template`` (``$XDG_CACHE_HOME``
if set) and the template's small run-time dependencies (the Express server that MyST crawls) are installed there
with ``npm ci`` (seconds), once per machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from moe_lib.files import atomic_path

SOURCE = Path(__file__).with_name("theme")
ARCHIVE = Path(__file__).with_name("theme-build.tar.xz")
HASH_MEMBER = "SOURCE_HASH"  # the archive's record of the source it was built from
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-course" / "book-theme"
NPM_INSTALL = ["npm", "ci", "--no-audit", "--no-fund", "--legacy-peer-deps"]
ASSETS_PLACEHOLDER = "/myst_assets_folder/"  # Remix's publicPath (remix.config.prod.js)
BUILT_FROM = ("book", "template")  # the vendored folders build_from_source reads
BUILD_ONLY = {"metafile.js.json", "metafile.server.json"}  # esbuild's size reports, not used at run time


def source_hash() -> str:
    """A hash of the path and bytes of every vendored file the build reads (not VENDORED.md): the cache key."""
    digest = hashlib.sha256()
    built_from = [p for folder in BUILT_FROM for p in (SOURCE / folder).rglob("*")]
    for path in sorted(p for p in built_from if p.is_file() and "node_modules" not in p.parts):
        digest.update(path.relative_to(SOURCE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def npm(*args: str, cwd: Path) -> None:
    print(f"[book] ({cwd.name}) " + " ".join(args), flush=True)
    subprocess.run(list(args), cwd=cwd, check=True)


def relative_asset_urls(assets: Path) -> None:
    """Point the stylesheets' ``url()``s (KaTeX's fonts) at their files relative to each stylesheet.

    Remix writes them as ``/myst_assets_folder/...``; MyST's static export rewrites that placeholder to the site's
    ``/build/`` in ``.html``, ``.js`` and ``.json`` files only, so from CSS every font would be a 404.
    """
    for css in assets.rglob("*.css"):
        text = css.read_text()
        if ASSETS_PLACEHOLDER in text:
            css.write_text(text.replace(ASSETS_PLACEHOLDER, Path(os.path.relpath(assets, css.parent)).as_posix() + "/"))


def build_from_source(work: Path) -> Path:
    """Build the release template from ``SOURCE`` in ``work`` (minutes, a 1.3 GB node_modules); return its folder."""
    app = work / "app"
    shutil.copytree(SOURCE / "book", app)
    npm(*NPM_INSTALL, cwd=app)
    shutil.copy2(app / "remix.config.prod.js", app / "remix.config.js")
    npm("npx", "copy-thebe-assets", "./public", cwd=app)
    npm("npx", "tailwindcss", "-m", "-i", "./styles/app.css", "-o", "app/styles/app.css", cwd=app)
    npm("npx", "remix", "build", cwd=app)
    relative_asset_urls(app / "public" / "build")
    template = work / "template"
    shutil.copytree(SOURCE / "template", template)
    shutil.copytree(app / "build", template / "build", ignore=shutil.ignore_patterns(*BUILD_ONLY))
    shutil.copytree(app / "public", template / "public")
    shutil.copy2(app / "template.yml", template / "template.yml")
    return template


def pack(template: Path, key: str) -> None:
    """Write ``ARCHIVE``: the template's files in a fixed order, and ``HASH_MEMBER`` holding ``key``."""
    with atomic_path(ARCHIVE) as tmp, tarfile.open(tmp, "w:xz", preset=9) as tar:
        for path in sorted(p for p in template.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(template).as_posix())
        record = tarfile.TarInfo(HASH_MEMBER)
        record.size = len(key.encode())
        tar.addfile(record, io.BytesIO(key.encode()))


def archive_hash() -> str | None:
    """The source hash ``ARCHIVE`` was built from (None if there is no archive)."""
    if not ARCHIVE.is_file():
        return None
    with tarfile.open(ARCHIVE) as tar:
        return tar.extractfile(HASH_MEMBER).read().decode()


def theme_template() -> Path:
    """The built template folder MyST takes as ``site.template``: the committed build, unpacked and installed once."""
    key, built = source_hash(), archive_hash()
    if built != key:
        raise SystemExit(f"{ARCHIVE.name} was built from theme source {built}, but {SOURCE} is now {key}: "
                         "rebuild it with `python -m book.theme` (npm, about 8 minutes) and commit it")
    template = CACHE / key / "template"
    if (template / "template.yml").is_file():
        return template
    with atomic_path(template, directory=True) as staging:  # complete or absent: never half-used
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(staging, members=[m for m in tar.getmembers() if m.name != HASH_MEMBER], filter="data")
        npm(*NPM_INSTALL, "--ignore-scripts", cwd=staging)
    return template


def main() -> int:
    """Rebuild ``ARCHIVE`` from the vendored source."""
    key = source_hash()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="source-build-") as work:
        pack(build_from_source(Path(work)), key)
    print(f"[book] {ARCHIVE} ({ARCHIVE.stat().st_size / 1e6:.1f} MB) built from theme source {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
