"""Property: replicas making random edits with random disconnects always converge.

Each example runs 3 replicas (one SQLite file each) against a real relay process. A
disconnect closes the document (dropping the connection); a reconnect reopens it from
the replica's file with a fresh client id. Every edit writes a unique marker, so
"converged" cannot be two empty documents, and no marker may be lost.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from helpers import eventually
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from crdtsync.client import Replica

N_REPLICAS = 3

edit = st.tuples(
    st.just("edit"),
    st.integers(0, N_REPLICAS - 1),
    st.sampled_from(
        [
            "text_insert",
            "text_delete",
            "map_set",
            "map_delete",
            "array_push",
            "array_delete",
            "nested",
        ]
    ),
    st.integers(0, 10_000),
    st.text(alphabet="abcé€😀 ", min_size=1, max_size=6),
)
toggle = st.tuples(st.sampled_from(["disconnect", "reconnect"]), st.integers(0, N_REPLICAS - 1))
steps_strategy = st.lists(st.one_of(edit, edit, toggle), min_size=1, max_size=40)

_names = itertools.count()


def apply_edit(doc: Doc, kind: str, n: int, s: str, marker: str) -> None:
    text = doc.get("text", type=Text)
    mapping = doc.get("map", type=Map)
    array = doc.get("array", type=Array)
    marks = doc.get("marks", type=Map)
    with doc.transaction():
        marks[marker] = True
        content = str(text)
        if kind == "text_insert" or (kind == "text_delete" and not content):
            # pycrdt indexes Text in UTF-8 bytes: convert a code-point position
            pos = len(content[: n % (len(content) + 1)].encode())
            text.insert(pos, s)
        elif kind == "text_delete":
            start = n % len(content)
            a = len(content[:start].encode())
            b = len(content[: start + 1 + n % 3].encode())
            del text[a:b]
        elif kind == "map_set":
            mapping[f"k{n % 5}"] = s
        elif kind == "map_delete" and f"k{n % 5}" in mapping:
            del mapping[f"k{n % 5}"]
        elif kind == "array_push" or (kind == "array_delete" and not len(array)):
            array.append(s)
        elif kind == "array_delete":
            del array[n % len(array)]
        elif kind == "nested":
            mapping[f"nested{n % 3}"] = Map({"list": Array([s, n]), "text": Text(s)})


def view(doc: Doc) -> tuple[object, ...]:
    return (
        str(doc.get("text", type=Text)),
        doc.get("map", type=Map).to_py(),
        doc.get("array", type=Array).to_py(),
        doc.get("marks", type=Map).to_py(),
    )


async def run_scenario(url: str, tmp_path, steps: list[tuple]) -> None:
    name = f"prop-{next(_names)}"
    paths = [tmp_path / f"{name}-{i}.db" for i in range(N_REPLICAS)]
    online: list[Replica | None] = [Replica(p, relay=url) for p in paths]
    offline: list[Replica | None] = [None] * N_REPLICAS
    docs: list[Doc] = []
    markers: list[str] = []
    try:
        for r in online:
            assert r is not None
            await r.start()
            docs.append(await r.open(name))
        for n, step in enumerate(steps):
            i = step[1]
            if step[0] == "edit":
                marker = f"r{i}-{n}"
                apply_edit(docs[i], step[2], step[3], step[4], marker)
                markers.append(marker)
            elif step[0] == "disconnect" and online[i] is not None:
                # Offline: the same file, opened by a replica that has no relay.
                await online[i].stop()
                online[i] = None
                offline[i] = Replica(paths[i])
                await offline[i].start()
                docs[i] = await offline[i].open(name)
            elif step[0] == "reconnect" and offline[i] is not None:
                await offline[i].stop()
                offline[i] = None
                online[i] = Replica(paths[i], relay=url)
                await online[i].start()
                docs[i] = await online[i].open(name)
            await asyncio.sleep(0)
        for i in range(N_REPLICAS):
            if offline[i] is not None:
                await offline[i].stop()
                offline[i] = None
                online[i] = Replica(paths[i], relay=url)
                await online[i].start()
                docs[i] = await online[i].open(name)
        for r in online:
            assert r is not None
            await r.wait_synced(name, timeout=20)
        await eventually(
            lambda: all(view(d) == view(docs[0]) for d in docs),
            timeout=20,
            what="all replicas equal",
        )
        assert set(docs[0].get("marks", type=Map).to_py()) == set(markers)
    finally:
        for r in online + offline:
            if r is not None:
                await r.stop()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=steps_strategy)
@pytest.mark.slow
def test_replicas_with_random_edits_and_disconnects_always_converge(relay, tmp_path, steps):
    asyncio.run(run_scenario(relay.url, tmp_path, steps))


@pytest.mark.soak
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.one_of(edit, edit, toggle), min_size=1, max_size=150))
def test_replicas_converge_soak(relay, tmp_path, steps):
    asyncio.run(run_scenario(relay.url, tmp_path, steps))
