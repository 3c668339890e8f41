"""The built book, opened in headless Chromium: every chapter renders figures and widgets.

Run by `make book` after the site is built (``SAEKIT_SITE=_build/html``); skipped by `make test`,
which does not build the book. The site is served on 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

SITE = Path(os.environ.get("SAEKIT_SITE", "_build/html"))
SCREENSHOTS = Path(os.environ.get("SAEKIT_SCREENSHOTS", "_build/screenshots"))
CHAPTERS = sorted((SITE / "book").glob("[0-9][0-9]_*.html")) if SITE.is_dir() else []
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]

pytestmark = pytest.mark.skipif(
    "SAEKIT_SITE" not in os.environ, reason="site checks run after `make book` (SAEKIT_SITE set)"
)


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _chromium(tmp_path: Path, *args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Chromium is needed for the site checks: apt-get install chromium"
    command = [
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def test_the_site_has_every_chapter():
    assert (SITE / "index.html").exists()
    sources = sorted(p.stem for p in Path("notebooks").glob("[0-9][0-9]_*.py"))
    assert [p.stem for p in CHAPTERS] == sources


@pytest.mark.parametrize("page", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_renders_figures_widgets_and_no_errors(page, server, tmp_path):
    url = f"{server}/book/{page.name}"
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert "saekit-provenance" in dom, "the page must say which profile and parameters made it"
    figures = re.findall(r'<img[^>]+src="[^"]*_images/[^"]+\.png"', dom)
    assert figures, "no figure rendered"
    assert "Traceback (most recent call last)" not in dom and 'class="output error"' not in dom
    # ipywidgets' HTML manager replaced the widget-view placeholders with live widget DOM.
    assert re.search(r'class="lm-Widget[^"]*jupyter-widgets', dom), "no widget rendered"
    assert "Error rendering Jupyter widget" not in dom
    # Progress bars belong in the terminal, not saved into the page as finished widgets.
    # tqdm's "25/25 [00:25<00:00", spaced with figure spaces (raw or JSON-escaped in the state).
    bar = re.search(r"\d+/\d+(\s|\u2007|\\u2007|&nbsp;)\[\d\d:\d\d(<|&lt;)\d\d:\d\d", dom)
    assert not bar, f"a progress bar was saved into the page: {bar and bar.group(0)}"
    if 'class="math' in page.read_text():
        assert "<mjx-container" in dom, "formulas were not typeset (MathJax must be served locally)"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    _chromium(
        tmp_path, "--window-size=1280,2400", f"--screenshot={SCREENSHOTS / page.stem}.png", url
    )
    assert (SCREENSHOTS / f"{page.stem}.png").stat().st_size > 10_000
