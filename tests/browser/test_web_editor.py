"""The browser editor of examples/web in Chromium, against real relays and Python replicas.

Each page runs in a browser context of its own (like separate browsers: no shared
IndexedDB or BroadcastChannel), so every edit that reaches another page went through a
relay. Text is read from the DOM (CodeMirror's lines) and compared exactly with the
replica's ``pycrdt.Text``; presence, the online/offline badge and "saved in this
browser" are read from the DOM too. Never pixels.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from browserkit import (
    REPO,
    WEB,
    Browser,
    LineProcess,
    caret_names,
    editor_text,
    has_peers,
    page_url,
    saved,
    status_is,
    type_at_end,
    until,
)

from crdtsync.client import Replica
from crdtsync.testing.proxy import FaultProxy

pytestmark = pytest.mark.anyio


async def same_text(*sources: Any) -> str | None:
    """The common text of pages and pycrdt Texts, or None while they differ."""
    texts = [str(s) if isinstance(s, pycrdt.Text) else await editor_text(s) for s in sources]
    return texts[0] if len(set(texts)) == 1 else None


def lines_of(text: str) -> set[str]:
    return set(text.split("\n")) - {""}


async def test_two_pages_and_a_replica_converge_and_see_each_other(
    browser: Browser, page_server: str, relay_factory, tmp_path: Path
) -> None:
    relay = relay_factory()
    doc = "web/converge"
    async with Replica(tmp_path / "python.db", relay=relay.url) as replica:
        text = (await replica.open(doc)).get("text", type=pycrdt.Text)
        replica.awareness(doc).set_local_state({"user": {"name": "python", "color": "#123456"}})

        alice = await browser.open(page_url(page_server, doc, relay.url, "alice"), "alice")
        bob = await browser.open(page_url(page_server, doc, relay.url, "bob"), "bob")
        for page in (alice, bob):
            await until(lambda p=page: status_is(p, "online"), 15, "the page online")

        # Edits from all three at once, none waiting for another's to arrive.
        text.insert(0, "python: ünïcode ✓\n")
        await type_at_end(alice, "alice: hello from Chromium\n")
        await type_at_end(bob, "bob: a second context\n")
        expected = {"python: ünïcode ✓", "alice: hello from Chromium", "bob: a second context"}

        async def converged() -> str | None:
            common = await same_text(alice, bob, text)
            return common if common is not None and lines_of(common) == expected else None

        common = await until(converged, 15, "the pages and the replica hold the same text")
        assert common.endswith("\n")
        assert common.count("\n") == 3

        # Presence: everyone in each page's list of who is here, alice's named cursor in
        # bob's editor, and the pages' names in the Python replica's awareness.
        everyone = {"alice", "bob", "python"}
        await until(lambda: has_peers(alice, everyone), 10, "alice's page lists everyone")
        await until(lambda: has_peers(bob, everyone), 10, "bob's page lists everyone")
        await until(lambda: has_name(bob, "alice"), 10, "alice's cursor, named, in bob's page")

        def names() -> set[str]:
            states = replica.awareness(doc).states.values()
            return {str(s.get("user", {}).get("name")) for s in states if isinstance(s, dict)}

        async def replica_sees_pages() -> bool:
            return {"alice", "bob"} <= names()

        await until(replica_sees_pages, 10, "the pages in the replica's awareness")


async def has_name(page: Any, name: str) -> bool:
    return name in await caret_names(page)


async def text_is(page: Any, wanted: str) -> bool:
    return await editor_text(page) == wanted


async def test_an_offline_page_keeps_its_edits_across_a_reload_and_syncs_them_back(
    browser: Browser, page_server: str, relay_factory, tmp_path: Path
) -> None:
    relay = relay_factory()
    doc = "web/offline"
    async with (
        FaultProxy(relay.url, rng=random.Random(13), name="alice-link") as proxy,
        Replica(tmp_path / "python.db", relay=relay.url) as replica,
    ):
        text = (await replica.open(doc)).get("text", type=pycrdt.Text)
        # Alice reaches the relay through the proxy; her page is served from loopback HTTP.
        alice = await browser.open(page_url(page_server, doc, proxy.url, "alice"), "alice")
        bob = await browser.open(page_url(page_server, doc, relay.url, "bob"), "bob")
        for page in (alice, bob):
            await until(lambda p=page: status_is(p, "online"), 15, "the page online")
        await type_at_end(alice, "online: before the cut\n")
        await until(lambda: same_text(alice, bob, text), 15, "the first line everywhere")
        await until(lambda: has_peers(bob, {"alice"}), 10, "alice present in bob's page")

        proxy.partition()  # alice's link aborted, reconnects refused (503) until heal()
        await until(lambda: status_is(alice, "offline"), 10, "alice's page says offline")
        await type_at_end(alice, "offline: typed with no relay\n")
        await until(lambda: saved(alice), 10, "the offline edit saved in alice's IndexedDB")
        before_reload = await editor_text(alice)
        assert "offline: typed with no relay" in before_reload
        assert "offline" not in await editor_text(bob)
        assert "offline" not in str(text)

        # Reload while the relay is still unreachable: the text comes from IndexedDB.
        await alice.reload()
        await until(
            lambda: alice.evaluate("document.body.dataset.localLoaded === 'true'"),
            10,
            "alice's page loaded its IndexedDB copy",
        )
        await until(lambda: text_is(alice, before_reload), 10, "alice's text restored")
        await until(lambda: status_is(alice, "offline"), 10, "still offline after the reload")
        await type_at_end(alice, "offline: typed after the reload\n")
        await until(lambda: saved(alice), 10, "the second offline edit saved in IndexedDB")
        # Meanwhile the others go on.
        await type_at_end(bob, "bob: while alice is away\n")
        text.insert(0, "python: while alice is away\n")

        proxy.heal()
        await until(lambda: status_is(alice, "online"), 15, "alice's page back online")
        expected = {
            "python: while alice is away",
            "online: before the cut",
            "offline: typed with no relay",
            "offline: typed after the reload",
            "bob: while alice is away",
        }

        async def converged() -> str | None:
            common = await same_text(alice, bob, text)
            return common if common is not None and lines_of(common) == expected else None

        await until(converged, 20, "alice's offline edits in bob's page and the replica")
        await until(lambda: has_peers(bob, {"alice", "bob"}), 10, "alice present again")
        await until(lambda: has_peers(alice, {"alice", "bob"}), 10, "bob present for alice")


async def test_the_readme_path_serve_py_bot_py_and_a_page(
    browser: Browser, built_page: Path, tmp_path: Path
) -> None:
    """The README's section as a newcomer follows it, after `npm ci` and the build (the
    built_page fixture builds a missing page): serve.py in a terminal, the page it prints,
    the bot command it prints (with a line a second instead of every five); then Enter in
    serve.py's terminal to stop the relay, a question typed offline and kept across a
    reload, Enter again, and the bot's answer."""
    serve = LineProcess(
        [str(WEB / "serve.py"), "--port", "0", "--relay-port", "0", "--store", "relay.db"],
        tmp_path,
        tmp_path / "serve.stderr",
        terminal=True,
    )
    bot: LineProcess | None = None
    try:
        url = (await serve.wait_for(r"page:\s+(http://127\.0\.0\.1:\d+/\S*)", 30))[1]
        command = (await serve.wait_for(r"python (examples/web/bot\.py .*)$", 5))[1].split()
        assert command[1] == "--relay", command
        assert command[2].startswith("ws://127.0.0.1:"), command
        bot = LineProcess(
            [str(REPO / command[0]), *command[1:], "--every", "1", "--db", "bot.db"],
            tmp_path,
            tmp_path / "bot.stderr",
        )
        await bot.wait_for(r"^bot: editing 'demo'", 30)

        page = await browser.open(url + "&name=newcomer", "newcomer")
        await until(lambda: status_is(page, "online"), 15, "the page online")
        await until(lambda: has_peers(page, {"newcomer", "python bot"}), 10, "the bot present")
        await until(lambda: lines_starting(page, "bot> line 2 from a Python"), 15, "bot's lines")

        await type_at_end(page, "bot: hello from Chromium\n")
        answer = 'bot> heard "hello from Chromium" from the browser: 3 words'

        async def answered() -> bool:
            return below(await editor_text(page), "bot: hello from Chromium", answer)

        await until(answered, 15, "the bot's answer right below the question, in the page")
        await bot.wait_for(r"^bot: answered 'hello from Chromium'", 5)
        # The cursor was where the answer went (the line below the question): it stays
        # below the answer, so what the newcomer types next is a line of its own.
        await page.keyboard.type("thanks, bot")

        async def typed_below() -> bool:
            lines = (await editor_text(page)).split("\n")
            return lines[-1] == "thanks, bot" and not any(
                line.startswith("thanks") and line != "thanks, bot" for line in lines
            )

        await until(typed_below, 5, "the next line typed, below the answer, intact")

        # Enter in serve.py's terminal stops the relay; the page stays served.
        serve.press_enter()
        await serve.wait_for(r"^relay stopped", 10)
        await until(lambda: status_is(page, "offline"), 10, "the page says offline")
        await page.keyboard.type("\nbot: are you there?\n")
        await until(lambda: saved(page), 10, "the offline question saved in IndexedDB")
        before_reload = await editor_text(page)
        await page.reload()
        await until(lambda: text_is(page, before_reload), 10, "the page restored, offline")
        await until(lambda: status_is(page, "offline"), 10, "still offline after the reload")

        serve.press_enter()
        await serve.wait_for(r"^relay started again", 10)
        await until(lambda: status_is(page, "online"), 15, "the page back online")

        async def answered_again() -> bool:
            return below(await editor_text(page), "bot: are you there?", 'bot> heard "are you')

        await until(answered_again, 20, "the bot, reconnected, answers the offline question")
    finally:
        bot_status = bot.stop() if bot is not None else None
        serve_status = serve.stop()
    assert serve_status == 0, serve.stderr()
    assert bot is not None
    assert bot_status == 0, bot.stderr()


def below(text: str, line: str, prefix: str) -> bool:
    """``line`` is in ``text``, and the line after it starts with ``prefix``."""
    lines = text.split("\n")
    return any(a == line and b.startswith(prefix) for a, b in itertools.pairwise(lines))


async def lines_starting(page: Any, prefix: str) -> list[str]:
    return [line for line in (await editor_text(page)).split("\n") if line.startswith(prefix)]
