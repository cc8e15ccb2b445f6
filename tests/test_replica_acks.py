"""Acknowledgements count in order: an update acknowledged after a gap is not yet stored."""

from __future__ import annotations

import pytest
from pycrdt import Text

from crdtsync.client import Replica

pytestmark = pytest.mark.anyio


async def test_acknowledgement_after_a_gap_waits_for_the_earlier_one(tmp_path):
    async with Replica(tmp_path / "r.db") as replica:
        doc = await replica.open("d")
        text = doc.get("text", type=Text)
        for ch in "abc":
            text += ch
        assert replica.pending("d") == 3
        d = replica._docs["d"]
        first, second, third = list(replica._pending_seqs(d))
        # The relay acknowledged the third edit, but the second never arrived: without it
        # nobody can integrate the third (same client, next clocks), so it stays pending.
        replica._confirm(d, [third])
        assert replica.pending("d") == 3
        replica._confirm(d, [first])
        assert replica.pending("d") == 2
        replica._confirm(d, [first])  # a duplicated acknowledgement changes nothing
        assert replica.pending("d") == 2
        replica._confirm(d, [second])
        assert replica.pending("d") == 0
    async with Replica(tmp_path / "r.db") as again:
        assert again.pending("d") == 0  # and the file agrees
