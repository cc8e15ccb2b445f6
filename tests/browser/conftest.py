"""Fixtures for the browser tests: Debian's Chromium driven by Playwright, and the built
page of ``examples/web`` served from loopback HTTP (see browserkit.py).

Without Chromium or Playwright the tests are skipped, saying what to install; under CI
(``CI`` set) they fail instead, since ``.ci/run`` installs both. The page is built
(``npm run build --prefix examples/web``) when ``dist/`` is missing or older than its
sources; without its npm packages (``npm ci --prefix examples/web``) the tests skip, or
fail under CI. The console lines of a failing test's pages are attached to its report.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from browserkit import Browser, build_page, load_example, need_chromium
from helpers import timeout_s

_PAGES = pytest.StashKey[Browser]()


@pytest.fixture(scope="session")
def built_page() -> Path:
    """``examples/web/dist``, built now if it is missing or older than its sources."""
    return build_page()


@pytest.fixture
def page_server(built_page: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT``: the built page from serve.py's HTTP server, in a thread.

    Its config.json names no relay: each test puts ``relay=`` in the page URL.
    """
    serve = load_example("serve")
    server = serve.make_http_server(built_page, dict, 0)
    thread = serve.start_http_server(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout_s(5))


@pytest.fixture
async def browser(request: pytest.FixtureRequest) -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, closed after the test."""
    path = need_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=path, timeout=timeout_s(30) * 1000)
        browser = Browser(chromium)
        request.node.stash[_PAGES] = browser
        try:
            yield browser
        finally:
            await chromium.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    browser = item.stash.get(_PAGES, None)
    if report.failed and browser is not None:
        for label, lines in browser.logs:
            report.sections.append((f"console of page {label}", "\n".join(lines) or "(empty)"))
    return report
