"""Folders: every document under a name prefix, kept in sync (issue 11); no I/O.

A replica that *keeps* a folder (``"team/"``) holds every document whose name starts
with that prefix, including documents created later anywhere. The relay announces the
documents of a folder that changed, from its store's list of changes (so it works across
relay processes, and regions); the replica remembers how far those announcements went as
a cursor of that store (its identity and epoch with a position). When a cursor is of no
use (another store, a restored one), the replica describes what it holds instead, one
digest per document, and only documents whose digests differ are exchanged.

The digest covers the state vector *and the delete set*: a delete-only change leaves the
state vector as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pycrdt import merge_updates

from .errors import InvalidDocumentName
from .protocol import DIGEST_BYTES, write_var_uint
from .settings import MAX_DOCUMENT_NAME_BYTES, validate_document_name
from .updates import UpdateInfo, check_update

__all__ = ["Cursor", "FolderIndex", "digest_of", "document_digest", "in_folder", "validate_prefix"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far a folder's announcements went: ``position`` among the changes of store
    ``store`` at ``epoch`` (crdtsync.backend.StoreIdentity). Valid only on that store."""

    store: str
    epoch: int
    position: int

    def valid_on(self, store: str, epoch: int) -> bool:
        """Whether this cursor means something on store ``store`` at ``epoch``."""
        return bool(self.store) and self.store == store and self.epoch == epoch

    def replaces(self, older: Cursor) -> bool:
        """Whether a replica should record this cursor instead of ``older``: a position
        at least as far on the same store and epoch, or any position of another store
        or epoch (a restored store counts again from lower positions, and the older
        cursor means nothing there)."""
        if not older.valid_on(self.store, self.epoch):
            return True
        return self.position >= older.position


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start a document name ("" keeps every document).

    Raises:
        InvalidDocumentName: it could never start a valid name.
    """
    if not prefix:
        return prefix
    if len(prefix.encode("utf-8")) > MAX_DOCUMENT_NAME_BYTES:
        raise InvalidDocumentName(f"folder prefix exceeds {MAX_DOCUMENT_NAME_BYTES} bytes")
    # A prefix ending in "/" names a folder; checked as the name it would start.
    probe = prefix + "x" if prefix.endswith("/") else prefix
    try:
        validate_document_name(probe)
    except InvalidDocumentName as exc:
        raise InvalidDocumentName(f"folder prefix {prefix!r}: {exc}") from None
    return prefix


def in_folder(name: str, prefix: str) -> bool:
    """Whether document ``name`` is in the folder of ``prefix``."""
    return name.startswith(prefix)


def digest_of(info: UpdateInfo) -> bytes:
    """The digest of a document described by ``info`` (see :func:`document_digest`)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for client in sorted(info.state):
        h.update(write_var_uint(client))
        for start, end in info.ranges(client):
            h.update(write_var_uint(start))
            h.update(write_var_uint(end))
        h.update(b"\xff")
    h.update(b"\xfe")
    for client in sorted(info.deletes):
        merged = _merged(info.deletes[client])
        if not merged:
            continue
        h.update(write_var_uint(client))
        for start, end in merged:
            h.update(write_var_uint(start))
            h.update(write_var_uint(end))
        h.update(b"\xff")
    return h.digest()


def document_digest(updates: Iterable[bytes]) -> bytes:
    """A digest of a document's state vector and delete set, canonically encoded.

    Two stores holding the same document (however its updates were merged, compacted or
    ordered) give the same digest: clients and clock ranges in order, delete ranges
    sorted and joined where they touch. Different digests mean the documents may differ
    (a state-vector exchange settles it); equal digests mean neither lacks anything.
    """
    parts = [u for u in updates if u]
    if not parts:
        return digest_of(check_update(b"\x00\x00"))
    update = parts[0] if len(parts) == 1 else merge_updates(*parts)
    return digest_of(check_update(update))


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Delete ranges ``(clock, length)`` as sorted, joined ``(start, end)`` intervals."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((clock, clock + length) for clock, length in ranges if length):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


@dataclass
class FolderIndex(Generic[_T]):
    """Who keeps which folder: prefix -> subscribers, and the subscribers of a name.

    Looking a name up costs the smaller of (distinct prefixes) and (the name's length)
    dictionary lookups, however many subscribers there are.
    """

    _by_prefix: dict[str, set[_T]] = field(default_factory=dict)

    def add(self, prefix: str, subscriber: _T) -> None:
        self._by_prefix.setdefault(prefix, set()).add(subscriber)

    def discard(self, prefix: str, subscriber: _T) -> None:
        subs = self._by_prefix.get(prefix)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self._by_prefix[prefix]

    def __bool__(self) -> bool:
        return bool(self._by_prefix)

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_prefix.values())

    def matching(self, name: str) -> Iterator[tuple[str, _T]]:
        """``(prefix, subscriber)`` for every folder ``name`` is in."""
        if len(self._by_prefix) <= len(name) + 1:
            for prefix, subs in list(self._by_prefix.items()):
                if name.startswith(prefix):
                    for sub in list(subs):
                        yield prefix, sub
            return
        for end in range(len(name) + 1):
            found = self._by_prefix.get(name[:end])
            if found:
                for sub in list(found):
                    yield name[:end], sub
