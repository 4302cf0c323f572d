"""The committed build of MyST's book theme (``book/theme-build.tar.xz``) and what ``book/theme.py`` does to it."""

import tarfile

from book import theme


def test_the_committed_theme_build_is_of_the_vendored_source():
    """Editing ``book/theme/`` without ``python -m book.theme`` would publish a site from the old theme."""
    assert theme.archive_hash() == theme.source_hash()


def test_the_committed_theme_build_holds_what_myst_runs_and_no_installed_packages():
    with tarfile.open(theme.ARCHIVE) as tar:
        names = set(tar.getnames())
    assert {"template.yml", "server.js", "package.json", "package-lock.json", "build/index.js", theme.HASH_MEMBER} <= names
    assert any(name.startswith("public/build/") for name in names)
    assert not any("node_modules" in name for name in names)
    assert not names & {f"build/{name}" for name in theme.BUILD_ONLY}


def test_stylesheet_urls_point_at_their_files_relative_to_each_stylesheet(tmp_path):
    """MyST's static export rewrites the assets placeholder in .html/.js/.json but not in CSS: KaTeX's fonts 404'd."""
    assets = tmp_path / "public" / "build"
    (assets / "_assets").mkdir(parents=True)
    (assets / "_assets" / "katex.css").write_text("src:url(/myst_assets_folder/_assets/KaTeX_Main.woff2)")
    (assets / "root.css").write_text("a{background:url(/myst_assets_folder/_assets/x.svg)}")
    (assets / "app.js").write_text('"/myst_assets_folder/x.js"')
    theme.relative_asset_urls(assets)
    assert (assets / "_assets" / "katex.css").read_text() == "src:url(../_assets/KaTeX_Main.woff2)"
    assert (assets / "root.css").read_text() == "a{background:url(./_assets/x.svg)}"
    assert (assets / "app.js").read_text() == '"/myst_assets_folder/x.js"'  # MyST rewrites these itself


def test_the_built_site_asks_no_cdn_for_mathjax(tmp_path):
    """thebe-core's default MathJax CDN URL is blanked in the site's scripts (an offline reader would get a refused
    request and a console error on every page with an HTML output); other scripts are left alone."""
    from book.build import THEBE_MATHJAX_DEFAULT, offline_output_renderers

    (tmp_path / "build").mkdir()
    chunk = tmp_path / "build" / "chunk.js"
    chunk.write_text(f'this._options={{mathjaxUrl:(s=e.mathjaxUrl)??"{THEBE_MATHJAX_DEFAULT}",mathjaxConfig:"TeX"}}')
    other = tmp_path / "other.js"
    other.write_text("console.log(1)")
    assert offline_output_renderers(tmp_path) == 1
    assert THEBE_MATHJAX_DEFAULT not in chunk.read_text() and 'mathjaxUrl:(s=e.mathjaxUrl)??""' in chunk.read_text()
    assert other.read_text() == "console.log(1)"
