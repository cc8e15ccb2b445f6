"""Drive the browser editor of examples/web: Debian's Chromium through Playwright, the
built page, its DOM, and the example scripts (serve.py, bot.py) as child processes.

Chromium is ``/usr/bin/chromium`` (``apt-get install chromium``; ``CRDTSYNC_CHROMIUM``
names another binary): Playwright never downloads a browser here. Every wait is bounded
and scaled by ``CRDTSYNC_TEST_TIMEOUT_FACTOR`` (:func:`helpers.timeout_s`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pty
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import stop_process, timeout_s

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "examples" / "web"
DIST = WEB / "dist"
CHROMIUM = os.environ.get("CRDTSYNC_CHROMIUM", "/usr/bin/chromium")
INSTALL_NPM = "npm ci --prefix examples/web"
BUILD = "npm run build --prefix examples/web"

# The page's text, read from the DOM: each CodeMirror line, without the widgets inside it
# (other people's cursors carry their names as text).
EDITOR_TEXT_JS = """() => Array.from(document.querySelectorAll('.cm-content > .cm-line'), line => {
  const copy = line.cloneNode(true)
  copy.querySelectorAll('.cm-ySelectionCaret, [contenteditable="false"]').forEach(w => w.remove())
  return copy.textContent
}).join('\\n')"""


def unavailable(message: str) -> None:
    """Skip; under CI (``CI`` set, as .ci/run runs), which installs it all, fail."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_chromium() -> str:
    """The Chromium binary; skips (fails under CI) without it or without Playwright."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        unavailable("Playwright for Python is not installed (pip install -e '.[dev]')")
    return CHROMIUM


def stale(dist: Path = DIST) -> bool:
    """dist/ is missing, or older than a source of it."""
    built = dist / "app.js"
    if not built.is_file() or not (dist / "index.html").is_file():
        return True
    sources = [WEB / "build.mjs", WEB / "package-lock.json", *(WEB / "src").iterdir()]
    return max(p.stat().st_mtime for p in sources) > built.stat().st_mtime


def build_page() -> Path:
    """``examples/web/dist``, built now (``npm run build``) if missing or stale; skips
    (fails under CI) without the npm packages."""
    if not stale():
        return DIST
    if not (WEB / "node_modules" / "esbuild").is_dir():
        unavailable(f"examples/web is not built and its npm packages are missing: {INSTALL_NPM}")
    npm = shutil.which("npm")
    if npm is None:
        unavailable(f"examples/web is not built and npm is not on PATH ({BUILD})")
    assert npm is not None
    done = subprocess.run(
        [npm, "run", "build", "--prefix", str(WEB)],
        capture_output=True,
        text=True,
        timeout=timeout_s(120),
        check=False,
    )
    assert done.returncode == 0, f"{BUILD} failed:\n{done.stdout}\n{done.stderr}"
    assert not stale(), f"{BUILD} did not produce {DIST}"
    return DIST


def load_example(name: str) -> ModuleType:
    """Import ``examples/web/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"web_example_{name}", WEB / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Browser:
    """Headless Chromium; each page in a context of its own (its own IndexedDB, storage
    and BroadcastChannel: like another browser). Console lines are kept per page."""

    def __init__(self, chromium: Any) -> None:
        self.chromium = chromium
        self.logs: list[tuple[str, list[str]]] = []

    async def open(self, url: str, label: str) -> Any:
        context = await self.chromium.new_context(viewport={"width": 1100, "height": 640})
        context.set_default_timeout(timeout_s(15) * 1000)
        page = await context.new_page()
        lines: list[str] = []
        self.logs.append((label, lines))
        page.on("console", lambda m: lines.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: lines.append(f"pageerror: {e}"))
        await page.goto(url)
        return page


def page_url(server: str, doc: str, relay: str, name: str) -> str:
    return f"{server}/?doc={doc}&relay={relay}&name={name}"


async def editor_text(page: Any) -> str:
    return str(await page.evaluate(EDITOR_TEXT_JS))


async def type_at_end(page: Any, text: str) -> None:
    """Click into the editor, go to the end of the document, type like a person."""
    await page.click(".cm-content")
    await page.keyboard.press("Control+End")
    await page.keyboard.type(text)


async def status_is(page: Any, wanted: str) -> bool:
    """The online/offline badge: ``online``, ``offline`` or ``connecting``."""
    return await page.get_attribute("#status", "data-status") == wanted


async def saved(page: Any) -> bool:
    """Every update of the page is stored in its IndexedDB."""
    return await page.get_attribute("#local", "data-state") == "saved"


async def peers(page: Any) -> set[str]:
    """Names in the page's list of who is here (itself included)."""
    names = await page.eval_on_selector_all("#peers li", "items => items.map(i => i.dataset.name)")
    return set(names)


async def has_peers(page: Any, wanted: set[str]) -> bool:
    return wanted <= await peers(page)


async def caret_names(page: Any) -> list[str]:
    """Names on the other people's cursors in the page's editor."""
    names = await page.eval_on_selector_all(
        ".cm-ySelectionInfo", "infos => infos.map(i => i.textContent.replace(/\\u2060/g, ''))"
    )
    return [str(n).strip() for n in names]


async def until(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until truthy, at most ``timeout`` s (scaled); fail with the last
    value it returned."""
    deadline = time.monotonic() + timeout_s(timeout)
    while True:
        last = await predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            limit = timeout_s(timeout)
            raise AssertionError(f"timed out after {limit:g} s: {what}; last: {last!r}")
        await asyncio.sleep(interval)


class LineProcess:
    """A Python script as a child process in its own session; its stdout lines collected
    by a thread, its stderr in a file."""

    def __init__(self, args: list[str], cwd: Path, log: Path, terminal: bool = False) -> None:
        self.log = log
        # terminal: stdin is a pseudo-terminal, as in a shell (see press_enter)
        self._master: int | None = None
        slave: int | None = None
        if terminal:
            self._master, slave = pty.openpty()
        try:
            with open(log, "ab") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, *args],
                    cwd=cwd,
                    stdin=slave if slave is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    start_new_session=True,
                )
        finally:
            if slave is not None:
                os.close(slave)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    async def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stdout line so far matching ``pattern``; waits at most ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s(timeout)
        while True:
            with_new = True
            while with_new:
                try:
                    line = self._queue.get_nowait()
                except queue.Empty:
                    with_new = False
                else:
                    if line is None:
                        self._ended = True
                    else:
                        self.lines.append(line)
            for line in self.lines:
                if match := regex.search(line):
                    return match
            if self._ended or time.monotonic() > deadline:
                raise AssertionError(
                    f"no line matching {pattern!r} from {self.proc.args}"
                    f"{' (it ended)' if self._ended else ''}; stdout: {self.lines[-20:]}; "
                    f"stderr: {self.stderr()}"
                )
            await asyncio.sleep(0.05)

    def press_enter(self) -> None:
        """Type Enter on the process's terminal."""
        assert self._master is not None, "started without terminal=True"
        os.write(self._master, b"\n")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a bounded wait; its exit status."""
        stop_process(self.proc, 5.0)
        self._thread.join(timeout_s(5))
        if self._master is not None:
            os.close(self._master)
            self._master = None
        return self.proc.returncode
