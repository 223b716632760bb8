"""Build the `digits` model from scratch: scikit-learn's 8x8 handwritten digits (1,797 images).

Trains a small MLP on the first 1,400 images, validates on the remaining 397, and writes
`model.onnx` (input `pixels`: float32 [N, 64], raw values 0..16; outputs `label`: int64 [N] and
`probabilities`: float32 [N, 10]) and `model.json` (inputs, outputs, accuracy, sha256).

    python models/digits/build.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # models/: the shared build helpers
import _data  # noqa: E402

MIN_ACCURACY = 0.90


def build(out: Path) -> dict:
    x_train, y_train, x_val, y_val = _data.load_digits_split()
    model = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0))
    model.fit(x_train, y_train)
    onx = to_onnx(model, x_train[:1], options={"zipmap": False}, target_opset=17)
    onx.graph.input[0].name = "pixels"
    for node in onx.graph.node:
        node.input[:] = ["pixels" if name == "X" else name for name in node.input]

    # Accuracy is measured on the ONNX file itself, as the runtime will run it.
    session = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"pixels": x_val})[0]
    accuracy = float((labels == y_val).mean())
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"accuracy {accuracy:.3f} on the held-out images is below {MIN_ACCURACY}")

    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(onx.SerializeToString())
    meta = {
        "name": "digits",
        "inputs": [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "label", "dtype": "int64", "shape": [-1]},
            {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]},
        ],
        "dataset": "sklearn.datasets.load_digits",
        "train": f"images 0..{_data.TRAIN - 1}",
        "validation": f"images {_data.TRAIN}..{_data.TRAIN + len(y_val) - 1}",
        # Other variants (int8, pruned, TFLite) are made from this one and merged in by name.
        "variants": [_data.variant("fp32", out / "model.onnx", "onnx", "fp32", accuracy, "models/digits/build.py")],
    }
    return _data.merge_variants(out / "model.json", [], meta=meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder (default: beside this script)")
    meta = build(parser.parse_args().out)
    fp32 = meta["variants"][0]
    print(f"digits: accuracy {fp32['accuracy']:.4f} on {meta['validation']}, sha256 {fp32['sha256'][:16]}...")


if __name__ == "__main__":
    main()
