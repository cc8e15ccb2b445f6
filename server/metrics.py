"""The relay's figures in the Prometheus text format (``GET /metrics``; README: metrics).

The relay counts as it goes in plain integers and :class:`Histogram` buckets (no lock,
no import of prometheus-client on its hot path or at start); a scrape turns them into
metric families with ``prometheus_client`` (imported on the first scrape). Label values
come from fixed sets (refusal reasons, close codes, HTTP statuses): never a document
name or a token subject, whose number has no bound.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REFUSAL_REASONS", "Histogram", "RelayMetrics", "exposition"]

# Why an update (or part of one) was not stored: the `reason` label's values.
REFUSAL_REASONS = ("integrity", "quota", "read_only", "limit")
# Close codes worth their own label value; any other is counted as "other".
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1013, 4401, 4403}
)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations counted into fixed buckets (upper bounds, seconds), plus their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class RelayMetrics:
    """What the relay counts for ``/metrics`` beyond its ``stats`` counters."""

    commit_seconds: Histogram = field(default_factory=Histogram)
    join_seconds: Histogram = field(default_factory=Histogram)
    answer_seconds: Histogram = field(default_factory=Histogram)
    refusals: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    handshakes_refused: Counter[str] = field(default_factory=Counter)

    def closed(self, code: int) -> None:
        """Count a connection that ended with ``code``."""
        self.closes[str(code) if code in KNOWN_CLOSE_CODES else "other"] += 1


@dataclass(frozen=True)
class Snapshot:
    """The relay's state at a scrape, handed to :func:`exposition`."""

    stats: dict[str, int]
    metrics: RelayMetrics
    connections: Counter[tuple[str, str]]  # (extensions yes/no, access rw/r) -> count
    rooms: int
    presence_states: int
    compacting: int
    links: Sequence[dict[str, Any]] = ()  # each region link's status (issue 12)


# A region link's counters: (metric name, status key, help). Labelled by the target
# region: a configured peer, so the label values are bounded.
_LINK_COUNTERS = (
    ("link_updates_shipped", "updates_shipped", "Updates a link shipped to its region."),
    ("link_bytes_shipped", "bytes_shipped", "Bytes of updates a link shipped."),
    ("link_fallbacks", "fallbacks", "Documents a link compared by state vectors."),
    ("link_sweeps", "sweeps", "Times a link compared every document."),
    ("link_refused", "refused", "Updates (parts) the link's target refused."),
    ("link_repairs", "repairs", "Anti-entropy findings: what this region wrote, lost."),
    ("link_failures", "failures", "Times a link's connection failed."),
)


def _link_families(links: Sequence[dict[str, Any]]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not links:
        return
    live = GaugeMetricFamily(
        "crdtsync_link_live", "1 if a link is live (caught up), else 0.", labels=["region"]
    )
    lag = GaugeMetricFamily(
        "crdtsync_link_lag_changes", "Changes a link has not checkpointed.", labels=["region"]
    )
    lag_s = GaugeMetricFamily(
        "crdtsync_link_lag_seconds", "Since when a link is behind.", labels=["region"]
    )
    for link in links:
        live.add_metric([link["region"]], 1 if link["state"] == "live" else 0)
        lag.add_metric([link["region"]], link["lag_changes"])
        lag_s.add_metric([link["region"]], link["lag_s"])
    yield from (live, lag, lag_s)
    for name, key, doc in _LINK_COUNTERS:
        family = CounterMetricFamily(f"crdtsync_{name}", doc, labels=["region"])
        for link in links:
            family.add_metric([link["region"]], link[key])
        yield family


def _families(snap: Snapshot) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    s, m = snap.stats, snap.metrics

    def counter(name: str, doc: str, value: int) -> Any:
        return CounterMetricFamily(f"crdtsync_{name}", doc, value=value)

    g = GaugeMetricFamily(
        "crdtsync_connections", "Open websocket connections.", labels=["extensions", "access"]
    )
    for ext in ("yes", "no"):
        for access in ("rw", "r"):
            g.add_metric([ext, access], snap.connections.get((ext, access), 0))
    yield g
    yield GaugeMetricFamily("crdtsync_rooms", "Documents with a connection.", value=snap.rooms)
    yield GaugeMetricFamily(
        "crdtsync_presence_states", "Presence states held for rooms.", value=snap.presence_states
    )
    yield GaugeMetricFamily(
        "crdtsync_compactions_running", "Compactions under way.", value=snap.compacting
    )
    yield counter("updates_stored", "Updates appended to the store.", s["updates_stored"])
    yield counter(
        "updates_fanned_out", "Update frames sent to connections (merged frames count once "
        "per connection).", s["frames_fanned_out"],
    )  # fmt: skip
    yield counter("commits", "Store commits (one per event-loop turn with updates).", s["commits"])
    yield counter("bytes_received", "Bytes of websocket messages received.", s["bytes_in"])
    yield counter("bytes_sent", "Bytes of websocket messages sent.", s["bytes_out"])
    yield counter(
        "acknowledgements", "Updates acknowledged as durably stored.", s["acknowledgements"]
    )
    yield counter("compactions", "Compactions finished.", s["compactions"])
    yield counter("compaction_failures", "Compactions that failed.", s["compactions_failed"])
    yield counter("store_errors", "Store operations that failed.", s["store_errors"])
    yield counter("connections_opened", "Connections accepted.", s["connections_opened"])
    refused = CounterMetricFamily(
        "crdtsync_refusals", "Updates (or parts) not stored, by reason.", labels=["reason"]
    )
    for reason in REFUSAL_REASONS:
        refused.add_metric([reason], m.refusals.get(reason, 0))
    yield refused
    closes = CounterMetricFamily(
        "crdtsync_connections_closed", "Connections ended, by close code.", labels=["code"]
    )
    for code in sorted(m.closes):
        closes.add_metric([code], m.closes[code])
    yield closes
    hs = CounterMetricFamily(
        "crdtsync_handshakes_refused", "Handshakes refused, by HTTP status.", labels=["status"]
    )
    for status in sorted(m.handshakes_refused):
        hs.add_metric([status], m.handshakes_refused[status])
    yield hs
    yield from _link_families(snap.links)
    for name, doc, h in (
        ("store_commit_seconds", "Time to commit one turn's updates.", m.commit_seconds),
        ("join_seconds", "From a connection's handshake to its first sync answer.", m.join_seconds),
        ("sync_answer_seconds", "From a sync request to its answer.", m.answer_seconds),
    ):
        family = HistogramMetricFamily(f"crdtsync_{name}", doc)
        family.add_metric([], h.cumulative(), sum_value=h.total)
        yield family


def exposition(snapshot: Callable[[], Snapshot]) -> tuple[bytes, str]:
    """The text format of a scrape, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    class _Collector:
        def collect(self) -> Iterator[Any]:
            return _families(snapshot())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
