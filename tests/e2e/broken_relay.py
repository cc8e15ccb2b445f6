"""Relays broken on purpose, to show that the convergence checker catches real bugs.

``python broken_relay.py MODE --host H --port P --store F [relay flags]``, where MODE is

- ``ack-before-persist``: acknowledges each update on receipt and commits (then fans
  out) only every 60 seconds, so a SIGKILL loses acknowledged writes (Hocuspocus, y-sweet);
- ``drop-1-in-50``: acknowledges every update but silently stores and forwards only
  49 of every 50;
- ``no-tail``: answers sync step 1 from the snapshot only, never with the update tail.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

from websockets.asyncio.server import broadcast

from crdtsync.cli import build_parser
from crdtsync.protocol import ExtAck
from crdtsync.server import Relay
from crdtsync.server.relay import _Pending
from crdtsync.settings import RelaySettings


class AckBeforePersist(Relay):
    def _submit(self, item: _Pending) -> None:
        if item.key is not None:
            # acknowledged, not stored (a channel's frame on a multiplexed connection)
            broadcast([item.peer.ws], item.peer.header + ExtAck(item.key).encode())
            item = _Pending(item.peer, item.update, None)
        self._batch.append(item)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(60.0, self._flush)


class DropOneInFifty(Relay):
    _counter = itertools.count(1)

    def _submit(self, item: _Pending) -> None:
        if item.update is not None and next(self._counter) % 50 == 0:
            print(f"dropped {item.update.hex()}", file=sys.stderr, flush=True)
            if item.key is not None:
                super()._submit(_Pending(item.peer, None, item.key))  # ack, store nothing
            return
        super()._submit(item)


class NoTail(Relay):
    def stored_document(self, document: str) -> bytes:
        assert self.store is not None
        return self.store.load(document).snapshot or b"\x00\x00"


MODES = {"ack-before-persist": AckBeforePersist, "drop-1-in-50": DropOneInFifty, "no-tail": NoTail}


def main() -> None:
    mode = sys.argv[1]
    args = build_parser().parse_args(["relay", *sys.argv[2:]])
    settings = RelaySettings(host=args.host, port=args.port, store=args.store)

    def listening(url: str) -> None:
        print(f'{{"event": "listening", "url": "{url}"}}', flush=True)

    asyncio.run(MODES[mode](settings).run(on_listening=listening))


if __name__ == "__main__":
    main()
