"""edgefn's guest-side helper, built into every Python function's component.

    from edgefn_guest import Function

    class WitWorld(Function):
        def handle(self, event):
            ...

`Function` supplies `handle_batch` by calling `handle` once per event. A function whose work
batches well (one `host.infer` for all the events) overrides `handle_batch` as well. It also supplies
`handle_latin1`, the export the daemon calls: the same events with their payloads carried as strings
(far cheaper across the boundary than byte lists), handed to `handle` (one event) or `handle_batch`
as the `Event`s with bytes payloads a function has always seen.

Messages: `Message(topic, payload)` publishes at QoS1, not retained, with no user properties, as
before. Importing this module gives the world's `Message` keyword defaults for the rest:
`Message(topic, payload, qos=0)`, `Message(topic, payload, retain=True, properties={"k": "v"})`
(a dict, or pairs, or `Property` records). The manifest's `[publish]` bounds them.

For tensors (edgefn_tensors, re-exported here): `tensor(items, shape, dtype)` and `values(t)` to and
from the world's `Tensor`; `pack`/`unpack` for raw bytes; `rows`, `argmax`, `top_k`, `softmax`,
`normalise`, `rescale` and `resize` for pre- and post-processing.
"""

from componentize_py_types import Err, Ok
from edgefn_tensors import (  # noqa: F401 - re-exported: the guest's tools for tensors
    TYPECODES,
    argmax,
    normalise,
    pack,
    rescale,
    resize,
    rows,
    softmax,
    top_k,
    unpack,
)
from wit_world.imports.types import Dtype, Event, Message, MessageLatin1, Property, Tensor

_DTYPES = {name: Dtype[name.upper()] for name in TYPECODES}  # looked up once: enum access is dear here
_NAMES = {member: name for name, member in _DTYPES.items()}


def tensor(items, shape, dtype="float32"):
    """A `Tensor` for host.infer from numbers (row-major), e.g. tensor(pixels, [1, 64])."""
    return Tensor(_DTYPES[dtype], list(shape), pack(items, dtype))


def values(t):
    """A `Tensor`'s elements as a flat list of numbers (see `rows` to split a batch)."""
    return unpack(t.data, _NAMES[t.dtype])


_message_init = Message.__init__


def _message_with_defaults(self, topic, payload, qos=1, retain=False, properties=()):
    pairs = properties.items() if isinstance(properties, dict) else properties
    _message_init(self, topic, payload, qos, retain,
                  [p if isinstance(p, Property) else Property(str(p[0]), str(p[1])) for p in pairs])


# The world's record has no defaults: functions written as Message(topic, payload) keep working.
Message.__init__ = _message_with_defaults


def _carried(message):
    return MessageLatin1(message.topic, bytes(message.payload).decode("latin-1"), message.qos, message.retain,
                         message.properties)


class Function:
    def handle(self, event):
        raise NotImplementedError("define handle(self, event) in your WitWorld class")

    def handle_latin1(self, carried):
        events = [Event(e.id, e.topic, e.payload.encode("latin-1"), e.received_ms) for e in carried]
        if len(events) == 1:  # one event runs through handle, as the daemon's call of the `handle` export did
            try:
                answers = [Ok(self.handle(events[0]))]
            except Err as err:
                answers = [err]
        else:
            answers = self.handle_batch(events)
        return [Ok([_carried(m) for m in a.value]) if isinstance(a, Ok) else a for a in answers]

    def handle_batch(self, events):
        answers = []
        for event in events:
            try:
                answers.append(Ok(self.handle(event)))
            except Err as err:
                answers.append(err)
        return answers
