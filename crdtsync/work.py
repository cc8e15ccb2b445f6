"""The relay's work process: CPU work on stored documents, off the event loop.

pycrdt and the update validator hold the GIL, so a thread would stall the relay's loop
all the same (DESIGN: measured facts); these functions run in a worker process instead.
Each reads the store file itself (in its own transaction), so the relay's loop neither
reads large documents nor pickles them over.

The process keeps its latest reads of documents (:func:`read_file`) so that the answers
to the sync requests that share a read (:func:`answer_read`) are diffed from it there;
only the answer travels back. One work process per relay: the cache is its own.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from collections import OrderedDict
from dataclasses import dataclass

from pycrdt import get_state, get_update

from .folders import document_digest
from .integrity import Comparison, Lookup, compare_stored
from .store import UpdateLog, merge_in_batches
from .sync import split_update

__all__ = ["Read", "answer_read", "compare_file", "forget_read", "read_file", "worker_init"]

MAX_KEPT_BYTES = 256 * 1024 * 1024  # reads kept for answers, all documents together

_logs: dict[str, UpdateLog] = {}  # this process's open stores, by path
_kept: OrderedDict[tuple[str, str], tuple[str, bytes]] = OrderedDict()  # -> (read id, merged)
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Read:
    """One read of a stored document: what the relay needs to answer sync requests.

    ``merged`` is the whole document as one update when the relay keeps it (a small
    document: answered on the loop); None when it stays in the work process, which
    answers from it (:func:`answer_read`) as long as it keeps it.
    """

    id: str
    state: bytes  # its state vector
    updates: int  # updates in the store's tail when it was read
    size: int  # bytes stored: snapshot and tail
    merged: bytes | None = None


def worker_init(relay_pid: int) -> None:
    """Run first in each worker process: it dies with the relay (Linux).

    A relay killed with SIGKILL left its work and compaction processes running for good,
    each holding the store open.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != relay_pid:  # the relay died before prctl took effect
        os._exit(1)


def release() -> None:
    """Do nothing, as the last call of a burst: it frees the one before.

    multiprocessing's feeder thread (the pickled call) and the executor's manager
    thread (the result) each keep the last item they passed until the next one: after
    a 60 MB update was checked here, the relay kept 60 MB for good.
    """


def _log(path: str) -> UpdateLog:
    log = _logs.get(path)
    if log is None:
        log = _logs[path] = UpdateLog(path)
    return log


def read_file(path: str, doc: str, keep_above: int) -> Read:
    """Read ``doc`` from the store at ``path`` and merge it; keep it here if it is larger
    than ``keep_above`` bytes (the relay then asks :func:`answer_read` for answers)."""
    stored = _log(path).load(doc)
    updates = stored.all_updates()
    size = sum(len(u) for u in updates)
    merged = merge_in_batches(updates)
    read_id = f"{os.getpid()}:{next(_ids)}"
    if len(merged) <= keep_above:
        return Read(read_id, get_state(merged), len(stored.updates), size, merged)
    key = (path, doc)
    _kept.pop(key, None)
    _kept[key] = (read_id, merged)
    while sum(len(m) for _, m in _kept.values()) > MAX_KEPT_BYTES and len(_kept) > 1:
        _kept.popitem(last=False)
    return Read(read_id, get_state(merged), len(stored.updates), size)


def forget_read(path: str, doc: str) -> None:
    """Drop the kept read of ``doc`` (its room closed: nobody will ask for answers)."""
    _kept.pop((path, doc), None)


def answer_read(
    path: str, doc: str, read_id: str, state_vectors: list[bytes], piece_bytes: int
) -> list[list[bytes]] | None:
    """The answers to sync requests from the kept read ``read_id`` of ``doc``, cut into
    pieces (:func:`~crdtsync.sync.split_update`); None if that read is no longer kept."""
    kept = _kept.get((path, doc))
    if kept is None or kept[0] != read_id:
        return None
    merged = kept[1]
    return [split_update(get_update(merged, sv), piece_bytes) for sv in state_vectors]


def compare_file(path: str, doc: str, update: bytes, lookup: Lookup) -> Comparison:
    """:func:`~crdtsync.integrity.compare_stored` against ``doc`` as stored in ``path``.

    The comparison costs in proportion to the document (reading it, cutting each stored
    update, walking the repeat in Python). The store is read in its own transaction,
    after the ledger the lookup came from was committed: it holds at least what that
    ledger describes.
    """
    log = _log(path)
    return compare_stored(
        update,
        lookup,
        lambda: log.load(doc).all_updates(),
        lambda: log.load_ledger(doc).ends(),  # read here: O(clients), off the loop
    )


def digest_file(path: str, docs: list[str]) -> list[bytes]:
    """:func:`~crdtsync.folders.document_digest` of each of ``docs`` as stored in ``path``
    (an empty document's for one that is not stored)."""
    log = _log(path)
    return [document_digest(log.load(doc).all_updates()) for doc in docs]


def changes_file(path: str, cursor: int, limit: int, prefix: str) -> list[tuple[str, int]]:
    """:meth:`~crdtsync.store.UpdateLog.changes` of the store at ``path`` (a listing from
    an old cursor reads much of the log: never on the relay's loop)."""
    return _log(path).changes(cursor, limit, prefix)
