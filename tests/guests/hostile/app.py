"""A guest that misbehaves on request; the payload is the name of the misdeed.

ok        one result on results/<device>/hostile
loop      spins forever (stopped by the epoch deadline)
alloc     allocates without bound (stopped by the memory limit)
trap      raises an uncaught exception (a trap)
stack     recurses without bound
err       answers with an error value
flood     publishes more messages than its manifest allows
big       publishes more bytes than its manifest allows
topic     publishes to a topic its manifest does not allow
model     calls a model its manifest does not list
infer-bad calls the digits model with a wrongly sized tensor
file      reads /etc/hostname and publishes its content (there is no file system to read)
socket    opens a TCP connection to 127.0.0.1:1 (there is no network to reach)
badtopic  publishes to a topic with a control character (a broker would drop the connection)
wildtopic publishes to a topic with a wildcard
count     adds one to the counter "n" in its state and publishes the new value
bigstate  stores a 100 KiB state value (past the 64 KiB bound)
logflood  logs 1,000 lines of 4,000 characters (past the log's bound), then answers as ok
echo:BYTES publishes the bytes after `echo:` as they came (any byte values)
infer:{json}  calls host.infer with the model, dtype, shape and hex data of the JSON after the colon
              (for fuzzing the host side of infer); publishes the output shapes, or its error
"""

import json
import sys

from componentize_py_types import Err
from edgefn_guest import Function
from wit_world.imports import host
from wit_world.imports.types import Dtype, Message, Tensor


def _infer_args(text, device):
    args = json.loads(text)
    tensors = [Tensor(Dtype[t["dtype"].upper()], t["shape"], bytes.fromhex(t["data"])) for t in args["inputs"]]
    result = host.infer(args["model"], tensors)  # an error value raises Err: the event's error
    shapes = json.dumps([list(t.shape) for t in result.outputs])
    return [Message(f"results/{device}/hostile", shapes.encode())]


def _recurse(n):
    return _recurse(n + 1) + 1


class WitWorld(Function):
    def handle(self, event):
        device = event.topic.split("/")[1]
        if event.payload.startswith(b"echo:"):
            return [Message(f"results/{device}/hostile", event.payload[len(b"echo:"):])]
        what = bytes(event.payload).decode(errors="replace").strip()
        if what.startswith("infer:"):
            return _infer_args(what[len("infer:"):], device)
        ok = [Message(f"results/{device}/hostile", b"ok:" + event.id.encode())]
        if what == "ok":
            return ok
        if what == "loop":
            while True:
                pass
        if what == "alloc":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if what == "trap":
            raise RuntimeError("guest bug")
        if what == "stack":
            sys.setrecursionlimit(10**9)
            return [Message(f"results/{device}/hostile", str(_recurse(0)).encode())]
        if what == "err":
            raise Err("refused on purpose")
        if what == "flood":
            return ok * 10
        if what == "big":
            return [Message(f"results/{device}/hostile", b"x" * 10000)]
        if what == "topic":
            return [Message("elsewhere/secret", b"leak")]
        if what == "model":
            host.infer("not-mine", [])
            return ok
        if what == "infer-bad":
            host.infer("digits", [Tensor(Dtype.FLOAT32, [1, 64], b"\x00" * 10)])
            return ok
        if what == "file":
            with open("/etc/hostname") as f:
                content = f.read()
            return [Message(f"results/{device}/hostile", content.encode())]
        if what == "socket":
            import socket

            socket.create_connection(("127.0.0.1", 1))
            return ok
        if what == "badtopic":
            return [Message(f"results/{device}\x01/hostile", b"x")]
        if what == "wildtopic":
            return [Message("results/+/hostile", b"x")]
        if what == "count":
            n = int(host.state_get("n") or b"0") + 1
            host.state_set("n", str(n).encode())
            return [Message(f"results/{device}/hostile", str(n).encode())]
        if what == "logflood":
            for n in range(1000):
                host.log(20, f"{n:04d} " + "x" * 3995)
            return ok
        if what == "bigstate":
            host.state_set("big", b"x" * 100 * 1024)
            return ok
        raise Err(f"unknown misdeed {what!r}")
