"""edgefn's guest-side helper, built into every Python function's component.

    from edgefn_guest import Function

    class WitWorld(Function):
        def handle(self, event):
            ...

`Function` supplies `handle_batch` by calling `handle` once per event. A function whose work
batches well (one `host.infer` for all the events) overrides `handle_batch` as well.
"""

from componentize_py_types import Err, Ok


class Function:
    def handle(self, event):
        raise NotImplementedError("define handle(self, event) in your WitWorld class")

    def handle_batch(self, events):
        answers = []
        for event in events:
            try:
                answers.append(Ok(self.handle(event)))
            except Err as err:
                answers.append(err)
        return answers
