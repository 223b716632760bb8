"""A guest built against the world before `handle-latin1` (its wit/ is that world, as shipped until then):
components built then must still load and run, their payloads crossing as byte lists. It echoes each
payload, marked by the export that ran it."""

import wit_world
from componentize_py_types import Ok
from wit_world.imports.types import Message


class WitWorld(wit_world.WitWorld):
    def handle(self, event):
        return [Message("results/dev1/before", b"one:" + bytes(event.payload), 1, False, [])]

    def handle_batch(self, events):
        return [Ok([Message("results/dev1/before", b"batch:" + bytes(e.payload), 1, False, [])]) for e in events]
