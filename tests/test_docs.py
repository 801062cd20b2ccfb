"""The docs: every relative link resolves inside the repository, the API reference page renders
with no network (Debian's Chromium through Playwright, every non-localhost request blocked), and
the LICENSE matches pyproject.toml.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import pytest

from lumos.api import create_app
from lumos.cluster.runtime import ServeConfig
from serving import Server

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    return LINK.findall(text) + REF_LINK.findall(text)


def relative_targets(path: Path) -> list[tuple[str, Path]]:
    out = []
    for target in links(path.read_text()):
        parsed = urlparse(target)
        if parsed.scheme or target.startswith(("#", "//")):
            continue
        out.append((target, (path.parent / unquote(parsed.path)).resolve()))
    return out


def test_link_checker_sees_links_and_catches_broken_ones(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) ![img](pic.png 'x') [web](https://example.org) [anchor](#top)\n"
        "```\n[not a link](nowhere.md)\n```\n[ref]: other.md#part\n"
    )
    found = [t for t, _ in relative_targets(page)]
    assert found == ["page.md", "pic.png", "other.md#part"]
    missing = [t for t, p in relative_targets(page) if not p.exists()]
    assert missing == ["pic.png", "other.md#part"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path):
    assert path.is_file()
    for target, resolved in relative_targets(path):
        assert resolved.is_relative_to(ROOT), f"{path.name}: {target} points outside the repo"
        assert resolved.exists(), f"{path.name}: {target} does not exist"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_do_not_point_outside_the_repository(path):
    text = path.read_text()
    assert "../shared" not in text, f"{path.name} refers to ../shared"
    external = [t for t in links(text) if urlparse(t).scheme or t.startswith("//")]
    assert not external, f"{path.name} links outside the repository: {external}"


def test_readme_links_the_user_docs():
    targets = {t for t, _ in relative_targets(ROOT / "README.md")}
    for doc in ("docs/METHOD.md", "docs/ARCHITECTURE.md", "docs/DEPLOY.md", "LICENSE"):
        assert doc in targets, f"README does not link {doc}"


def test_license_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app under uvicorn without its lifespan: the docs need no cluster."""
    db = tmp_path_factory.mktemp("docs") / "lumos.db"
    srv = Server(
        ServeConfig(model="random:tiny", workers=0, store_url=f"sqlite:///{db}"), lifespan="off"
    )
    yield srv
    srv.stop()


def test_no_cdn_docs(server):
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(server.url.rstrip("/") + path).status_code == 404
    page = httpx.get(server.url + "docs")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace('href="/', ""), "the docs page names an external URL"
    for asset in ("docs.js", "docs.css"):
        body = httpx.get(f"{server.url}static/{asset}").text
        assert not re.search(r"https?://", body), f"{asset} refers to an external URL"


def test_docs_page_renders_offline(server):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    spec = create_app(ServeConfig(model="random:tiny", workers=0)).openapi()
    operations = [
        f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item
    ]
    assert "POST /api/sessions" in operations and "GET /api/health" in operations
    blocked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()

            def gate(route):
                host = urlparse(route.request.url).hostname
                if host in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            context.route("**/*", gate)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(server.url + "docs")
            toc = page.locator("#toc a")
            expect(toc).to_have_count(len(operations), timeout=30_000)
            assert toc.all_inner_texts() == operations
            create = page.locator("#op-post--api-sessions")
            expect(create).to_contain_text("Start a session")
            expect(create).to_contain_text("CreateSessionRequest")
            expect(create.locator("table").first).to_contain_text("x-lumos-owner")
            expect(page.locator("#schema-SessionState")).to_contain_text("n_frames")
            description = page.locator("#description")
            expect(description).to_contain_text("WebSocket")
            for raw in ("|---", "### ", "`"):  # Markdown is rendered, not shown
                expect(description).not_to_contain_text(raw)
            if "\n|" in spec["info"]["description"]:
                assert description.locator("table").count() >= 1
            expect(page.locator("#status")).to_be_hidden()
            assert not errors, errors
        finally:
            browser.close()
    assert not blocked, f"the docs page asked for non-local URLs: {blocked}"
