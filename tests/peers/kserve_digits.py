"""KServe's Python model server (V2 REST) serving an ONNX file with onnxruntime, as a user would write
one: a `kserve.Model` that declares no input or output types. Runs in the peers' venv.

    python tests/peers/kserve_digits.py --model_name digits --model_path model.onnx --http_port 8080
"""

from __future__ import annotations

import argparse

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.numpy_codec import from_np_dtype


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        names = [o.name for o in payload.request_outputs] if payload.request_outputs else \
            [o.name for o in self.session.get_outputs()]
        outputs = []
        for name, result in zip(names, self.session.run(names, feeds), strict=True):
            out = InferOutput(name=name, shape=list(result.shape), datatype=from_np_dtype(result.dtype))
            out.set_data_from_numpy(result, binary_data=False)
            outputs.append(out)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    kserve.ModelServer(workers=1, enable_grpc=False).start([OnnxModel(args.model_name, args.model_path)])
