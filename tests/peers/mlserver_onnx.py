"""A custom MLServer runtime that serves an ONNX file with onnxruntime, as a user would write one: the
`implementation` of a model-settings.json (`mlserver_onnx.OnnxModel`), with or without declared
inputs and outputs. Runs inside MLServer, in the peers' venv."""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        self._session = ort.InferenceSession(await get_model_uri(self._settings), providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        names = [o.name for o in payload.outputs] if payload.outputs else [o.name for o in self._session.get_outputs()]
        results = self._session.run(names, feeds)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(n, r) for n, r in zip(names, results, strict=True)])
