"""The hostile cases at full size (issue 8's figures, up to gigabytes of traffic), on demand:

    pytest -m full_size            # about 15-25 minutes on 2 cores

Each case runs one scenario of ``bench/hostile.py`` (a fresh relay process, the attack,
and a probe: two stock connections in another room exchanging an update 20 times a
second) and asserts on behaviour only, never on time: the relay stays up and logs no
traceback, every probe of the other room arrives, its memory comes back near where it
started, and the attacker gets what the README's limits promise. The default suite runs
scaled-down versions of the same cases (test_limits.py, test_backlogs.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.full_size, pytest.mark.timeout(1800)]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "hostile.py"
BACK_MB = 50  # the relay process's RSS after the scenario, above its RSS before

# scenario -> scale that reaches the sizes (bench/hostile.py describes each)
FULL_SIZE = {
    "presence": 4,  # 8 x 10 KB states per message, from reconnecting connections
    "heavy": 4,  # the largest update the caps allow, 80,000 one-item clients, 12 M integers
    "join": 1,  # 50,000 stored updates, 20 joiners at once
    "gaps": 1,  # gap updates into a room of 10 replicas
    "sync": 4,  # step 1 nonstop on a 16 MB document
    "idle": 1,  # 200 silent sockets from one address
    "answer": 4,  # 12,000 client ids in one answer
    "compaction": 1,  # a 20 MB tail compacted 3 times
    "repeats": 4,  # an 800 KB document resent 120 times
    "bigupdate": 1,  # one 60 MB update to 5 fast readers, caps raised to 64 MiB
    "silent": 4,  # 64 peers that never read
}


def run(scenario: str, scale: float, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--only", scenario, "--scale", str(scale),
         "--quiet-wait-s", "0", "--json-out", str(out)],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())[scenario]
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize("scenario", list(FULL_SIZE))
def test_full_size(scenario: str, tmp_path: Path) -> None:
    r = run(scenario, FULL_SIZE[scenario], tmp_path)
    outcome = "\n".join(r["outcome"])
    assert r["alive"], f"the relay died\n{outcome}"
    assert r["tracebacks"] == 0, f"the relay logged tracebacks\n{outcome}"
    assert r["load"]["lost"] == 0, f"probes of another room were lost: {r['load']}"
    assert r["probe_error"] is None, r["probe_error"]
    grew_mb = (r["rss_after_main_kb"] - r["rss_before_main_kb"]) / 1024
    assert grew_mb <= BACK_MB, f"the relay kept {grew_mb:.0f} MB after the scenario"
    c = r["counters"]
    if scenario == "presence":
        assert c["closed_over_limits"] >= 1, outcome
    elif scenario == "heavy":
        text, clients, values = r["outcome"][:3]
        assert "echoed" in text, outcome  # the valid update, near max_update_bytes
        assert "closed 1008" in clients, outcome  # over max_update_clients
        assert "closed 1008" in values or "closed 1009" in values, outcome  # structs or size
    elif scenario == "bigupdate":
        assert "readers: 5/5 received it" in outcome, outcome
        assert "open x5" in outcome, outcome  # no honest reader closed
    elif scenario == "silent":
        cut = re.search(r"([\d,]+) cut off", outcome)  # the relay-wide write budget at work
        assert cut is not None, outcome
        assert int(cut.group(1).replace(",", "")) >= 1, outcome
    elif scenario == "idle":
        assert c["refused"] >= 1, outcome
